"""The "auto" spacing (sampling/auto_grid.py): the data scale it measures against the closed form for Gaussian data,
its cache, and how `sample`, `tune_grid` and the jobs resolve it."""
import math

import pytest
import torch

import sde_diffusion.sampling as sampling
from sde_diffusion.sampling import auto_grid
from sde_diffusion.sdes import VESDE, VPSDE
from sde_diffusion.toy import Gaussian

pytestmark = pytest.mark.usefixtures("one_thread")


def exact_quantile_sigma(sde, s: float, q: float, steps: int = auto_grid.AUTO_PROBE_STEPS) -> float:
    """For data N(μ, s² I) the probability-flow path from x̃_T = x_T/α is x̃(σ̃) = μ + z·√(s² + σ̃²) (σ̃ = σ/α), so
    D − μ = s²·z·g(σ̃) with g = 1/√(s² + σ̃²); the endpoints' spread is s, so the weighted motion is
    ∝ |dg|·s/√(s² + σ̃²) = s·g·|dg| = s·|d(g²/2)|, and the fraction done at σ̃ is (g(σ̃)² − g_first²)/(g_last² −
    g_first²) over the probe's first and last evaluated nodes: σ̃_q ≈ s·√(1/q − 1)."""
    lam = torch.linspace(float(sde.log_snr(torch.tensor(sde.T, dtype=torch.float64))),
                         float(sde.log_snr(torch.tensor(sde.default_eps, dtype=torch.float64))),
                         steps + 1, dtype=torch.float64)
    first, last = math.exp(-lam[0].item()), math.exp(-lam[-2].item())

    def g2(sigma):
        return 1 / (s**2 + sigma**2)

    target = g2(first) + q * (g2(last) - g2(first))
    return math.sqrt(1 / target - s**2)


@pytest.mark.parametrize("sde_cls", [VPSDE, VESDE])
@pytest.mark.parametrize("scale", [0.1, 1.0, 3.0])
def test_measured_data_scale_is_the_closed_form_for_gaussian_data(sde_cls, scale):
    """The σ/α at which AUTO_QUANTILE of the denoiser's weighted motion is done matches the closed form on Gaussian
    data of std 0.1, 1 and 3 (so it scales with the data: a wrong ratio of s, a wrong D or a wrong weight would
    not): within 1 % with a 400-step probe (the endpoints' spread is estimated from 512 draws), within 3 % with the
    default probe (its 2M paths and linear interpolation bias it by a few per cent); and auto_centre is
    AUTO_CENTRE_FACTOR times it."""
    sde, dim = sde_cls(), 8
    data = Gaussian(torch.full((dim,), 0.5), scale**2 * torch.eye(dim))
    score_fn = data.marginal_score_fn(sde)
    x = sde.prior_sampling((512, dim), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    lam, motion = auto_grid.denoiser_motion(score_fn, sde, x, sde.default_eps, steps=400)
    exact = exact_quantile_sigma(sde, scale, auto_grid.AUTO_QUANTILE, steps=400)
    assert auto_grid.quantile_sigma(lam, motion) == pytest.approx(exact, rel=0.01)
    assert 0.32 * scale < exact < 0.36 * scale  # ≈ s·√(1/q − 1) = s/3 (the ends shift it at s = 0.1)
    exact = exact_quantile_sigma(sde, scale, auto_grid.AUTO_QUANTILE)
    centre = sampling.auto_centre(score_fn, sde, (512, dim), dtype=torch.float64)
    assert centre == pytest.approx(auto_grid.AUTO_CENTRE_FACTOR * exact, rel=0.03)


def test_auto_is_the_few_step_default_measured_once_and_not_counted():
    """At ≤ FEW_STEPS steps `sample` runs the sech spacing at auto_centre's σ/α (the same times as naming "auto" or
    passing them); the probe's AUTO_PROBE_STEPS calls happen once per score function, shape and SDE, and are not in
    nfe; "auto" without a model is refused by solver_grid."""
    sde, dim = VPSDE(), 4
    data = Gaussian(torch.zeros(dim), 0.2**2 * torch.eye(dim))
    exact = data.marginal_score_fn(sde)
    calls = []

    def score_fn(x, t):
        calls.append(len(x))
        return exact(x, t)

    z = sde.prior_sampling((64, dim), generator=torch.Generator().manual_seed(1))
    assert sampling.SAMPLERS["unipc"].grid_for(5) == sampling.FEW_STEP_GRID == "auto"
    default, nfe = sampling.sample(score_fn, sde, z.shape, "unipc", steps=5, x_T=z, denoise=False)
    assert nfe == 5 and len(calls) == auto_grid.AUTO_PROBE_STEPS + 5
    named, _ = sampling.sample(score_fn, sde, z.shape, "unipc", steps=5, x_T=z, denoise=False, grid="auto")
    assert len(calls) == auto_grid.AUTO_PROBE_STEPS + 10  # cached: no second probe
    centre = sampling.auto_centre(score_fn, sde, z.shape)
    assert centre == pytest.approx(auto_grid.AUTO_CENTRE_FACTOR * exact_quantile_sigma(sde, 0.2, 0.9),
                                  rel=0.06)  # the spread is estimated from 64 draws here
    times = sampling.solver_grid(sde, sampling.time_grid(sde, 5, sde.default_eps), "auto", centre=centre)
    explicit, _ = sampling.sample(score_fn, sde, z.shape, "unipc", grid=times, x_T=z, denoise=False)
    assert torch.equal(default, named) and torch.equal(default, explicit)
    fixed = sampling.solver_grid(sde, sampling.time_grid(sde, 5, sde.default_eps), "sech")
    assert not torch.allclose(times, fixed)  # 0.2-std data: not the fixed centre's grid
    sampling.sample(score_fn, sde, (32, dim), "unipc", steps=5, denoise=False)
    assert len(calls) == 2 * auto_grid.AUTO_PROBE_STEPS + 20  # another shape: measured again
    sampling.sample(score_fn, sde, (32, dim), "unipc", steps=sampling.FEW_STEPS + 1, denoise=False)
    assert len(calls) == 2 * auto_grid.AUTO_PROBE_STEPS + 21 + sampling.FEW_STEPS  # λ-uniform above: no probe
    with pytest.raises(ValueError, match="fitted to a model"):
        sampling.solver_grid(sde, sampling.time_grid(sde, 5, sde.default_eps), "auto")


def test_resolve_auto_fixes_one_grid_for_per_batch_score_functions():
    """resolve_auto turns an "auto" grid (named or the sampler's default) into times, measured on the score
    function it is given, and leaves other grids alone; the times give what sample gives with "auto"."""
    sde, dim = VPSDE(), 4
    score_fn = Gaussian(torch.zeros(dim), 0.5**2 * torch.eye(dim)).marginal_score_fn(sde)
    settings = dict(method="dpm_solver", steps=6, eps=None, denoise=False, grid=None)
    resolved = sampling.resolve_auto(settings, score_fn, sde, (16, dim))
    assert resolved["steps"] is None and resolved["eps"] is None and len(resolved["grid"]) == 7
    z = sde.prior_sampling((16, dim), generator=torch.Generator().manual_seed(2))
    a, _ = sampling.sample(score_fn, sde, z.shape, x_T=z, **resolved)
    b, _ = sampling.sample(score_fn, sde, z.shape, x_T=z, **{**settings, "grid": "auto"})
    assert torch.equal(a, b)
    for grid, steps in (("logsnr", 6), (None, 20), (resolved["grid"], None)):
        kept = {**settings, "grid": grid, "steps": steps}
        assert sampling.resolve_auto(kept, score_fn, sde, (16, dim)) == kept


def test_a_model_with_no_finite_motion_falls_back_to_the_fixed_centre_with_a_warning():
    sde = VPSDE()

    def broken(x, t):
        return torch.full_like(x, float("nan"))

    with pytest.warns(RuntimeWarning, match="no finite motion"):
        assert sampling.auto_centre(broken, sde, (8, 2)) == pytest.approx(sampling.grids.SECH_CENTER_SIGMA)


class _Model:
    """A score function as a bound method (each attribute access makes a new method object)."""

    def __init__(self, data, sde):
        self.exact, self.calls = data.marginal_score_fn(sde), 0

    def score(self, x, t):
        self.calls += 1
        return self.exact(x, t)


def test_bound_methods_are_cached_on_their_object_and_means_do_not_count_as_spread():
    """A bound method's probe runs once across calls (cached on its object); the spread S is taken about each
    coordinate's mean, so data N(μ, s²I) with very different coordinate means gives the same centre as with equal
    ones (0.4·s up to the probe's bias), not one inflated by the means' spread; the centre is rounded to
    AUTO_DIGITS significant digits."""
    sde, dim, s = VPSDE(), 8, 0.1
    means = torch.tensor([3.0, -3.0] * (dim // 2))
    model = _Model(Gaussian(means, s**2 * torch.eye(dim)), sde)
    first = sampling.auto_centre(model.score, sde, (256, dim))
    sampling.sample(model.score, sde, (256, dim), "unipc", steps=4, denoise=False)
    assert model.calls == auto_grid.AUTO_PROBE_STEPS + 4
    equal = sampling.auto_centre(Gaussian(torch.full((dim,), 0.5), s**2 * torch.eye(dim)).marginal_score_fn(sde),
                                 sde, (256, dim))
    assert first == pytest.approx(equal, rel=0.05)
    assert first == pytest.approx(auto_grid.AUTO_CENTRE_FACTOR * exact_quantile_sigma(sde, s, 0.9), rel=0.05)
    assert first == float(f"{first:.{auto_grid.AUTO_DIGITS}g}")
