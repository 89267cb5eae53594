"""A user SDE is a subclass of sdes.SDE defining only T, alpha(t) and sigma(t) (the two below, in this file and
no package edit): its derived drift, diffusion, prior and log-SNR inverse match closed forms, it samples the
Gaussian-mixture oracle with every registered sampler, and its probability-flow likelihood is the oracle's."""
import math

import pytest
import torch

from sde_diffusion import likelihood, sampling
from sde_diffusion.metrics_toy import mixture_failures, sliced_w2_noise_floor
from sde_diffusion.sdes import SDE, as_time
from sde_diffusion.toy import default_mixture

# ---- the user's SDEs: nothing but T, α(t) and σ(t) ---------------------------------------------------------


class CubicBetaVP(SDE):
    """VP with β(t) = 0.1 + 30t², i.e. B(t) = 0.1t + 10t³:  α = exp(−B/2), σ = √(1 − exp(−B))."""

    T = 1.0

    def alpha(self, t):
        t = as_time(t)
        return torch.exp(-0.5 * (0.1 * t + 10.0 * t**3))

    def sigma(self, t):
        t = as_time(t)
        return torch.sqrt(-torch.expm1(-(0.1 * t + 10.0 * t**3)))


class LinearSigma(SDE):
    """α = 1, σ(t) = t on [0, 40]."""

    T = 40.0

    def alpha(self, t):
        return torch.ones_like(as_time(t))

    def sigma(self, t):
        return as_time(t).clone()

# -------------------------------------------------------------------------------------------------------------


USER_SDES = {"cubic_beta_vp": CubicBetaVP, "linear_sigma": LinearSigma}
MIXTURE, CHUNK, CHUNKS = default_mixture(), 500, 4
# sampler → (steps, options) at the budgets of tests/test_samplers.py
BUDGETS = {"pc": (100, {}), "ancestral": (100, {}), "ode": (1, {}), "sde": (100, {}), "ddim": (50, {}),
           "dpm_solver": (20, dict(order=2)), "heun": (25, {}), "unipc": (20, {}), "ipndm": (20, {}),
           "deis": (20, {}), "dpm_solver_sde": (50, {}), "edm_sde": (40, {}), "restart": (18, {}),
           "adaptive_sde": (1, {})}
# σ(t) = t makes a uniform time grid spend most steps at high noise: fixed-step samplers use the λ-uniform grid
GRIDS = {"linear_sigma": dict(grid="logsnr")}
FIXED_STEP = ("pc", "ancestral", "sde", "ddim")

pytestmark = pytest.mark.usefixtures("one_thread")  # small tensors (see conftest.py)


@pytest.fixture(scope="module")
def floor():
    return sliced_w2_noise_floor(MIXTURE, CHUNK)


def test_derived_drift_diffusion_prior_and_log_snr_inverse_match_closed_forms():
    t = torch.linspace(0.01, 0.99, 50, dtype=torch.float64)
    vp = CubicBetaVP()
    beta = 0.1 + 30.0 * t**2
    x = torch.randn(50, 3, dtype=torch.float64)
    drift, g = vp.sde(x, t)
    torch.testing.assert_close(drift, -0.5 * beta[:, None] * x, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g, torch.sqrt(beta), rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(vp.t_from_log_snr(vp.log_snr(t)), t, rtol=1e-10, atol=1e-12)
    assert vp.prior_std == pytest.approx(1.0, abs=1e-12)  # α² + σ² = 1 at every t
    assert vp.N == 1000 and vp.default_eps == pytest.approx(1e-3)

    lin = LinearSigma()
    s = t * lin.T
    drift, g = lin.sde(x, s)
    assert torch.all(drift == 0)
    torch.testing.assert_close(g, torch.sqrt(2 * s), rtol=1e-10, atol=1e-12)  # g² = dσ²/dt = 2t
    torch.testing.assert_close(lin.t_from_log_snr(-torch.log(s)), s, rtol=1e-10, atol=1e-10)  # λ = −ln t
    assert lin.prior_std == pytest.approx(math.sqrt(1 + 40.0**2))
    a, sig = lin.transition(torch.tensor(3.0), torch.tensor(2.0))
    assert a.item() == 1.0 and sig.item() == pytest.approx(math.sqrt(5.0))


# the package's samplers for any score (other test modules register samplers of their own in the same process;
# the consistency sampler needs a consistency model, tests/test_consistency.py)
BUILT_IN = sorted(name for name, s in sampling.SAMPLERS.items()
                  if s.fn.__module__.startswith("sde_diffusion.") and s.parameterization is None)


# adaptive_sde is biased on 2-D data (its noise-dependent step rejection; see its docstring): it is checked on the
# 16-d mixture in test_samplers.py, and here only that it runs on these SDEs.
TWO_D_OK = [m for m in BUILT_IN if m != "adaptive_sde"]


@pytest.mark.parametrize("name", USER_SDES)
def test_user_sde_runs_adaptive_sde(name):
    x, nfe = sampling.sample(MIXTURE.marginal_score_fn(USER_SDES[name]()), USER_SDES[name](), (256, 2),
                             "adaptive_sde", generator=torch.Generator().manual_seed(1))
    assert torch.isfinite(x).all() and nfe > 10


@pytest.mark.parametrize("method", TWO_D_OK)
@pytest.mark.parametrize("name", USER_SDES)
def test_user_sde_samples_the_mixture_with_every_sampler(name, method, floor):
    assert set(BUDGETS) >= set(BUILT_IN), "give every built-in sampler a budget here"
    sde = USER_SDES[name]()
    steps, options = BUDGETS[method]
    if method in FIXED_STEP:
        options = {**options, **GRIDS.get(name, {})}
    x, nfe = sampling.sample(MIXTURE.marginal_score_fn(sde), sde, (CHUNK * CHUNKS, 2), method, steps=steps,
                             generator=torch.Generator().manual_seed(1), **options)
    failures = mixture_failures(MIXTURE, x, CHUNK, floor)
    assert not failures, f"{method} on {name} (NFE {nfe}): {failures}"


def test_a_wrong_drift_is_caught_by_the_same_checks(floor):
    """A derived drift off by 20% (f = d log α/dt wrongly scaled) fails the checks the correct SDE passes with the
    probability-flow ODE (stochastic samplers partly correct it: the exact score pulls back towards p_t)."""

    class WrongDrift(CubicBetaVP):
        def drift_coefficient(self, t):
            return 1.2 * super().drift_coefficient(t)

    sde = WrongDrift()
    x, _ = sampling.sample(MIXTURE.marginal_score_fn(sde), sde, (CHUNK * CHUNKS, 2), "ode",
                           generator=torch.Generator().manual_seed(1))
    assert mixture_failures(MIXTURE, x, CHUNK, floor)


@pytest.mark.parametrize("name", USER_SDES)
def test_user_sde_log_likelihood_matches_the_oracle(name):
    """log_likelihood with the exact score equals the oracle's log p_eps(x) once the known prior mismatch
    log π(z) − log p_T(z) is removed (see tests/test_likelihood.py), to 0.01 bits/dim."""
    sde, eps = USER_SDES[name](), 1e-5
    x = MIXTURE.sample(16, torch.Generator().manual_seed(0))[0].double()
    logp, z, nfe = likelihood.log_likelihood(MIXTURE.marginal_score_fn(sde), sde, x, divergence="exact", eps=eps)

    def exact_logp(points, t):
        t = torch.tensor(t, dtype=torch.float64)
        return MIXTURE.log_prob(points, sde.alpha(t), sde.sigma(t))

    error = logp - (sde.prior_logp(z) - exact_logp(z, sde.T)) - exact_logp(x, eps)
    assert error.abs().max() / (2 * math.log(2)) < 0.01, (error, nfe)
