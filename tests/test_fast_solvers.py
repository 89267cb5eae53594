"""The few-step solvers against exact answers: equivalences between them, the stochastic samplers' weak error on a
Gaussian (whose every marginal is known), grids tuned for a budget, and grid files."""
from __future__ import annotations

import json
import math

import pytest
import torch

from sde_diffusion import sampling
from sde_diffusion.errors import ConfigError
from sde_diffusion.sampling import sample, steps_for_nfe, tune_grid
from sde_diffusion.sdes import SubVPSDE, VESDE, VPSDE
from sde_diffusion.toy import Gaussian, default_mixture, high_dim_mixture

SDES = {"vp": VPSDE, "subvp": SubVPSDE, "ve": VESDE}


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run(sde, method, steps, score_fn=None, n=200, seed=0, **options):
    mixture = default_mixture()
    score_fn = mixture.marginal_score_fn(sde) if score_fn is None else score_fn
    z = sde.prior_sampling((n, 2), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return sample(score_fn, sde, z.shape, method, steps=steps, x_T=z, dtype=torch.float64, denoise=False,
                  generator=torch.Generator().manual_seed(seed + 1), **options)[0]


@pytest.mark.parametrize("sde_name", SDES)
def test_equivalences(sde_name):
    """η = 0 turns DPM-Solver++ SDE into the ODE solver, churn 0 turns EDM's stochastic sampler into Heun, no
    restarts turn Restart into Heun, iPNDM and DEIS of order 1 are DDIM, UniP-2 with bh2 is DPM-Solver++ 2M."""
    sde = SDES[sde_name]()
    for order in (1, 2, 3):
        assert torch.equal(run(sde, "dpm_solver_sde", 8, order=order, eta=0.0, grid="logsnr"),
                           run(sde, "dpm_solver", 8, order=order, grid="logsnr"))
    heun = run(sde, "heun", 8)
    torch.testing.assert_close(run(sde, "edm_sde", 8, s_churn=0.0), heun, rtol=0, atol=1e-12)
    torch.testing.assert_close(run(sde, "restart", 8, restarts=0), heun, rtol=0, atol=1e-12)
    ddim = run(sde, "ddim", 8, grid="logsnr")
    torch.testing.assert_close(run(sde, "ipndm", 8, order=1, grid="logsnr"), ddim, rtol=0, atol=1e-10)
    torch.testing.assert_close(run(sde, "deis", 8, order=1, grid="logsnr"), ddim, rtol=0, atol=1e-10)
    torch.testing.assert_close(run(sde, "unipc", 8, order=2, corrector=False),
                               run(sde, "dpm_solver", 8, order=2), rtol=0, atol=1e-10)
    assert (run(sde, "unipc", 8, order=2) - run(sde, "unipc", 8, order=2, variant="bh1")).abs().max() > 1e-4


def test_deis_coefficients_integrate_polynomials_exactly():
    """Σ_j C_j·p(t_j) = ∫ p(τ) dσ̃(τ) for every polynomial p of degree < number of nodes (VP, float64)."""
    sde = VPSDE()
    nodes = torch.tensor([0.3, 0.45, 0.6], dtype=torch.float64)
    t, s = nodes[0], torch.tensor(0.2, dtype=torch.float64)
    c = sampling.multistep.deis_coefficients(sde, nodes, t, s)
    fine = torch.linspace(t.item(), s.item(), 200001, dtype=torch.float64)
    sig = torch.exp(-sde.log_snr(fine))
    for p in (lambda u: torch.ones_like(u), lambda u: u, lambda u: 3 * u**2 - u):
        values = p(fine)
        exact = (0.5 * (values[1:] + values[:-1]) * (sig[1:] - sig[:-1])).sum()  # trapezoid in σ̃
        assert abs((c * p(nodes)).sum() - exact) < 1e-8


# --------------------------------------------------------------------------------------------------
# Stochastic samplers: weak error on a 1-D Gaussian, exact variance known
# --------------------------------------------------------------------------------------------------
GAUSSIAN = Gaussian(torch.tensor([0.7]), torch.tensor([[0.25]]))
WEAK = {  # method, options, steps pair, largest |variance error| allowed at the larger step count
    "dpm_solver_sde_2": ("dpm_solver_sde", dict(order=2), (20, 80), 0.02),
    "dpm_solver_sde_3": ("dpm_solver_sde", dict(order=3), (20, 80), 0.02),
    "edm_sde": ("edm_sde", {}, (20, 80), 0.06),  # weak order ≈ 1.4 (the churn): 0.29 → 0.04 on sub-VP
    "restart": ("restart", {}, (10, 40), 0.03),
}


@pytest.mark.parametrize("solver", WEAK)
@pytest.mark.parametrize("sde_name", SDES)
def test_stochastic_solver_variance_converges(sde_name, solver):
    """Var(x) − s² of 200 000 samples (no final denoising) shrinks with the steps and ends near 0: a wrong noise
    amplitude or drift coefficient leaves a bias that does not shrink."""
    method, options, (few, many), tolerance = WEAK[solver]
    sde = SDES[sde_name]()
    errors = []
    for steps in (few, many):
        x, _ = sample(GAUSSIAN.marginal_score_fn(sde), sde, (200_000, 1), method, steps=steps, denoise=False,
                      generator=torch.Generator().manual_seed(3), **options)
        errors.append(x.double().var().item() / 0.25 - 1)
        assert abs(x.double().mean().item() - 0.7) < 0.01
    assert abs(errors[1]) < tolerance, errors
    assert abs(errors[1]) < abs(errors[0]) or abs(errors[0]) < tolerance, errors


def test_adaptive_sde_quality_knob_and_refusals():
    """Tighter tolerances spend more score calls; at d = 16 the samples match the mixture; no constraints."""
    sde, mixture = VPSDE(), high_dim_mixture(16)
    score_fn = mixture.marginal_score_fn(sde)
    nfes = [sample(score_fn, sde, (500, 16), "adaptive_sde", rtol=rtol, generator=torch.Generator().manual_seed(0))[1]
            for rtol in (0.2, 0.05)]
    assert nfes[0] < nfes[1]
    with pytest.raises(ValueError, match="constraint"):
        sample(score_fn, sde, (4, 16), "adaptive_sde", constraint=lambda x, t, t_prev, s, g: x)
    with pytest.raises(ValueError, match="rtol"):
        sample(score_fn, sde, (4, 16), "adaptive_sde", rtol=0.0)


# --------------------------------------------------------------------------------------------------
# NFE budgets and tuned grids
# --------------------------------------------------------------------------------------------------
def test_steps_for_nfe():
    sde = VPSDE()
    assert steps_for_nfe(sde, "dpm_solver", 5) == 5
    assert steps_for_nfe(sde, "dpm_solver", 5, denoise=True) == 4
    assert steps_for_nfe(sde, "heun", 5) == 3  # 2·3 − 1
    assert steps_for_nfe(sde, "heun", 6) == 3
    assert steps_for_nfe(sde, "pc", 9, corrector="langevin") == 4
    assert steps_for_nfe(sde, "unipc", 6, grid="edm") == steps_for_nfe(sde, "unipc", 6, grid="auto") == 6
    with pytest.raises(ValueError, match="own number"):
        steps_for_nfe(sde, "ode", 10)
    with pytest.raises(ValueError, match="more than"):
        steps_for_nfe(sde, "heun", 0)


@pytest.mark.parametrize("sde_name", ["vp", "ve"])
def test_tuned_grid_beats_the_uniform_logsnr_grid_at_nfe_5(sde_name):
    """Tuned on 256 draws, checked on 2000 fresh ones against a tight ODE solution (d = 16 mixture)."""
    sde, mixture = SDES[sde_name](), high_dim_mixture(16)
    score_fn = mixture.marginal_score_fn(sde)
    report = {}
    times = tune_grid(score_fn, sde, (256, 16), "dpm_solver", 5, dtype=torch.float64, report=report)
    assert times.dtype == torch.float64 and len(times) == 6
    assert times[0].item() == sde.T and abs(times[-1].item() - sde.default_eps) < 1e-12
    assert bool((times[1:] < times[:-1]).all())
    z = sde.prior_sampling((2000, 16), generator=torch.Generator().manual_seed(99), dtype=torch.float64)
    reference, _ = sampling.ode_decode(score_fn, sde, z, rtol=1e-9, atol=1e-9)

    def rms(**kw):
        x, nfe = sample(score_fn, sde, z.shape, "dpm_solver", x_T=z, dtype=torch.float64, denoise=False, **kw)
        assert nfe == 5
        return (x - reference).pow(2).mean().sqrt().item()
    tuned, uniform = rms(grid=times), rms(steps=5, grid="logsnr")
    assert tuned < 0.8 * uniform, (tuned, uniform)
    assert report["rms_tuned"] <= report["rms_start"]


def test_grid_files(tmp_path):
    sde = VPSDE()
    times = sampling.solver_grid(sde, sampling.time_grid(sde, 6, sde.default_eps), "logsnr")
    path = sampling.save_grid(tmp_path / "g.json", times, method="dpm_solver", nfe=6)
    assert json.loads(path.read_text())["method"] == "dpm_solver"
    score_fn = default_mixture().marginal_score_fn(sde)
    z = sde.prior_sampling((32, 2), generator=torch.Generator().manual_seed(0))
    a = sample(score_fn, sde, z.shape, "dpm_solver", grid=str(path), x_T=z)
    b = sample(score_fn, sde, z.shape, "dpm_solver", steps=6, grid="logsnr", x_T=z)
    assert a[1] == b[1] == 7 and torch.equal(a[0], b[0])
    (tmp_path / "bad.json").write_text(json.dumps({"times": [1.0]}))
    for bad, message in [(tmp_path / "missing.json", "does not exist"), (tmp_path / "bad.json", "at least two")]:
        with pytest.raises(ValueError, match=message):
            sample(score_fn, sde, z.shape, "dpm_solver", grid=str(bad))
    from sde_diffusion.config import default_config
    config = default_config()
    config.sampling.method, config.sampling.grid = "dpm_solver", str(path)
    settings = sampling.settings_from_config(config, sde)
    assert sample(score_fn, sde, z.shape, x_T=z, **settings)[1] == 7
    config.sampling.grid = "nonsense"
    with pytest.raises(ConfigError, match="grid file"):
        sampling.check_config(config)
    config.sampling.grid = str(tmp_path / "missing.json")
    with pytest.raises(ConfigError, match="does not exist"):
        sampling.check_config(config)


def test_config_keys_reach_only_their_own_builtin_sampler():
    """sampling.order (3) is dpm_solver's; ipndm keeps its own default order 4, adaptive_sde its rtol."""
    from sde_diffusion.config import default_config
    config = default_config()
    for method in ("ipndm", "adaptive_sde", "dpm_solver_sde"):
        config.sampling.method = method
        assert sampling.options_from_config(config) == {}
    config.sampling.method, config.sampling.options = "ipndm", "order=2"
    assert sampling.options_from_config(config) == {"order": 2}
    config.sampling.method, config.sampling.options = "dpm_solver", ""
    assert sampling.options_from_config(config) == {"order": 3}


def test_sech_grid_concentrates_steps_at_the_data_scale():
    """Steps are shortest in λ where σ/α = SECH_CENTER_SIGMA, growing ~e^{|λ − λ_d|/width} away from it; the ends are
    T and eps exactly; width comes from sample's keyword, else the sampler's registration, else SECH_WIDTH."""
    sde = VPSDE()
    base = sampling.time_grid(sde, 20, sde.default_eps)
    centre = -math.log(sampling.grids.SECH_CENTER_SIGMA)
    ratios = {}
    for width in (1.0, 2.0):
        times = sampling.solver_grid(sde, base, "sech", width=width)
        assert times[0] == base[0] and times[-1] == base[-1] and bool((times[1:] < times[:-1]).all())
        lam = sde.log_snr(times)
        steps = lam[1:] - lam[:-1]
        shortest = int(torch.argmin(steps))
        assert abs(0.5 * (lam[shortest] + lam[shortest + 1]).item() - centre) < steps[shortest].item()
        ratios[width] = (steps.max() / steps.min()).item()
    assert ratios[1.0] > 10 and ratios[2.0] < ratios[1.0]
    # (noisy, clean) widths: each side is the symmetric spacing of its own width, rescaled to its share of the steps
    for noisy, clean in ((3.0, 1.0), (1.0, 2.0)):
        lam = sde.log_snr(sampling.solver_grid(sde, base, "sech", width=(noisy, clean)))
        g = torch.where(lam < centre, noisy * torch.atan(torch.sinh((lam - centre) / noisy)),
                        clean * torch.atan(torch.sinh((lam - centre) / clean)))
        assert torch.allclose(g[1:] - g[:-1], (g[-1] - g[0]) / 20, rtol=1e-9, atol=0)
        steps = lam[1:] - lam[:-1]
        assert (steps[0] < steps[-1]) == (noisy > clean)  # the wider side gets more, hence shorter, steps
    assert sampling.sech_widths(2) == (2.0, 2.0) and sampling.sech_widths("3/1") == (3.0, 1.0)
    for bad in (0.0, (1.0, -1.0), (1.0, 2.0, 3.0), "wide", float("nan")):
        with pytest.raises(ValueError, match="width"):
            sampling.sech_widths(bad)
    score_fn = default_mixture().marginal_score_fn(sde)
    z = sde.prior_sampling((8, 2), generator=torch.Generator().manual_seed(0))
    seen = []
    sample(score_fn, sde, z.shape, "heun", steps=4, grid="sech", x_T=z, callback=lambda i, t, x: seen.append(t.item()))
    expected = sampling.solver_grid(sde, sampling.time_grid(sde, 4, sde.default_eps), "sech",
                                    width=sampling.SECH_WIDTH)  # heun registers no width of its own
    assert seen == pytest.approx(expected[1:].tolist(), rel=1e-12)
    with pytest.raises(ValueError, match="width"):
        sample(score_fn, sde, z.shape, "dpm_solver", steps=4, width=0.0)
    assert sampling.parse_spec("dpm_solver:grid=sech,width=2")[1] == {"grid": "sech", "width": (2.0, 2.0)}
    assert sampling.parse_spec("dpm_solver:width=4/0.5")[1] == {"width": (4.0, 0.5)}
    with pytest.raises(ValueError, match="width"):
        sampling.parse_spec("dpm_solver:width=0/1")
    with pytest.raises(ValueError, match="width"):
        sampling.register_sampler("bad_width", width=(1.0, 0.0))


def test_sampling_width_from_the_config():
    from sde_diffusion.config import default_config
    config = default_config()
    config.sampling.method, config.sampling.grid = "dpm_solver", "sech"
    assert "width" not in sampling.settings_from_config(config, VPSDE())
    config.sampling.width = 2.0
    assert sampling.settings_from_config(config, VPSDE())["width"] == 2.0
    config.sampling.width = (4.0, 1.0)
    sampling.check_config(config)
    assert sampling.settings_from_config(config, VPSDE())["width"] == (4.0, 1.0)
    for bad in (-1.0, (1.0, 0.0), "x"):
        config.sampling.width = bad
        with pytest.raises(ConfigError, match="width"):
            sampling.check_config(config)
