"""SDEs against independent answers: Euler–Maruyama simulation, the variance ODE, DDPM's β recursion, scipy."""
import math

import numpy as np
import pytest
import scipy.stats
import torch

from sde_diffusion.discrete import DDPMChain, chain_for, require_chain
from sde_diffusion.sdes import EDMSDE, SDE, SubVPSDE, VESDE, VPSDE, grid_index

ALL_SDES = {
    "vp_linear": lambda: VPSDE(),
    "vp_cosine": lambda: VPSDE(schedule="cosine"),
    "vp_quadratic": lambda: VPSDE(schedule="quadratic"),
    "subvp": lambda: SubVPSDE(),
    "subvp_cosine": lambda: SubVPSDE(schedule="cosine"),
    "ve": lambda: VESDE(),
    "edm": lambda: EDMSDE(),
}


def simulate_forward(sde, x0, times, n_paths, max_dt, generator, stiffness=0.02):
    """Euler–Maruyama paths of the forward SDE from x0 at t = 0; returns {t: (n_paths, d) states}.

    The step is max_dt, shortened where the drift rate |f(x, t)/x| is large so that rate·dt ≤ stiffness, which keeps
    EM's variance bias (≈ rate·dt/4) near 0.5% (the cosine schedule's β reaches 999 near T, where a fixed step would bias the variance).
    """
    x = x0.double().expand(n_paths, -1).clone()
    if isinstance(sde, VESDE):  # the VE kernel N(x0, σ(t)²) starts from x0 + σ_min z at t = 0
        x = x + sde.sigma_min * torch.randn(x.shape, generator=generator, dtype=torch.float64)
    out, t, one = {}, 0.0, torch.ones(1, 1, dtype=torch.float64)
    for target in sorted(times):
        while t < target - 1e-12:
            rate = sde.sde(one, torch.tensor([t], dtype=torch.float64))[0].abs().item()
            dt = min(max_dt, target - t, stiffness / rate if rate > 0 else max_dt)
            drift = sde.sde(x, torch.full((n_paths,), t, dtype=torch.float64))[0]
            g = sde.sde(one, torch.tensor([t + dt / 2], dtype=torch.float64))[1]
            noise = torch.randn(x.shape, generator=generator, dtype=torch.float64)
            x = x + drift * dt + g * math.sqrt(dt) * noise
            t += dt
        out[target] = x.clone()
    return out


@pytest.mark.parametrize("name", ALL_SDES)
def test_marginal_prob_matches_euler_maruyama(name):
    sde = ALL_SDES[name]()
    x0 = torch.tensor([[-1.5, 0.0, 0.7, 2.0]], dtype=torch.float64)
    n = 20000
    paths = simulate_forward(sde, x0, [0.05, 0.5, 1.0], n, max_dt=2e-3,
                             generator=torch.Generator().manual_seed(0))
    for t, xt in paths.items():
        mean, std = sde.marginal_prob(x0, torch.tensor([t], dtype=torch.float64))
        s = std.item()
        # Monte-Carlo tolerance: 5 standard errors of the mean and of the variance, plus a small EM bias allowance
        assert torch.allclose(xt.mean(0), mean[0], atol=5 * s / math.sqrt(n) + 2e-3 * (1 + s)), (name, t)
        rel_var = xt.var(0) / s**2
        assert torch.all((rel_var - 1).abs() < 5 * math.sqrt(2 / n) + 5e-3), (name, t, rel_var)


@pytest.mark.parametrize("name", ALL_SDES)
def test_alpha_sigma_solve_the_moment_odes(name):
    """d log α/dt = drift coefficient and dσ²/dt = 2 (d log α/dt) σ² + g², checked by finite differences."""
    sde = ALL_SDES[name]()
    t = torch.linspace(0.02, 0.98, 49, dtype=torch.float64)
    h = 1e-6
    dlog_alpha = (torch.log(sde.alpha(t + h)) - torch.log(sde.alpha(t - h))) / (2 * h)
    dvar = (sde.sigma(t + h) ** 2 - sde.sigma(t - h) ** 2) / (2 * h)
    ones = torch.ones(len(t), 1, dtype=torch.float64)
    drift, g = sde.sde(ones, t)
    torch.testing.assert_close(dlog_alpha, drift[:, 0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dvar, 2 * dlog_alpha * sde.sigma(t) ** 2 + g**2, rtol=1e-5, atol=1e-6)
    mean, std = sde.marginal_prob(3.0 * ones, t)
    torch.testing.assert_close(mean[:, 0], 3.0 * sde.alpha(t))
    torch.testing.assert_close(std, sde.sigma(t))
    torch.testing.assert_close(sde.log_snr(t), torch.log(sde.alpha(t) / sde.sigma(t)))


def test_closed_forms_of_the_schedules():
    t = torch.tensor([0.0, 0.25, 1.0], dtype=torch.float64)
    vp = VPSDE(beta_min=0.1, beta_max=20.0)
    torch.testing.assert_close(vp.alpha(t), torch.exp(-0.5 * (0.1 * t + 0.5 * t**2 * 19.9)))
    quad = VPSDE(beta_min=0.1, beta_max=20.0, schedule="quadratic")
    a, b = math.sqrt(0.1), math.sqrt(20.0) - math.sqrt(0.1)
    torch.testing.assert_close(quad.schedule.beta(t), (a + b * t) ** 2)
    cos = VPSDE(schedule="cosine")
    s = 0.008
    abar = torch.cos((t[:2] + s) / (1 + s) * math.pi / 2) ** 2 / math.cos(s / (1 + s) * math.pi / 2) ** 2
    torch.testing.assert_close(cos.alpha(t[:2]) ** 2, abar)
    assert cos.sigma(torch.tensor(1.0)) < 1 and torch.isfinite(cos.schedule.beta(torch.tensor(1.0)))
    ve = VESDE(sigma_min=0.01, sigma_max=50.0)
    torch.testing.assert_close(ve.sigma(t), 0.01 * (50 / 0.01) ** t)
    sub = SubVPSDE()
    torch.testing.assert_close(sub.sigma(t), 1 - vp.alpha(t) ** 2)


def test_vp_discretize_is_the_ddpm_chain():
    sde = VPSDE(beta_min=0.1, beta_max=20.0, N=1000)
    betas = np.linspace(1e-4, 0.02, 1000)  # Ho et al. (2020)
    chain = chain_for(sde)
    assert isinstance(chain, DDPMChain)
    np.testing.assert_allclose(chain.betas.numpy(), betas, rtol=1e-6)
    i = torch.tensor([0, 1, 500, 998, 999])
    t = i.float() / 999
    x = torch.randn(5, 3)
    f, G = sde.discretize(x, t)
    b = torch.tensor(betas[i.numpy()], dtype=torch.float32)
    torch.testing.assert_close(x + f, torch.sqrt(1 - b)[:, None] * x)
    torch.testing.assert_close(G, torch.sqrt(b))
    # iterating the chain's mean and variance gives ᾱ_i = Π(1 − β_j) and σ_i² = 1 − ᾱ_i
    mean, var = 1.0, 0.0
    for j in range(1000):
        mean, var = math.sqrt(1 - betas[j]) * mean, (1 - betas[j]) * var + betas[j]
        if j in (0, 500, 999):
            alpha_i, sigma_i = chain.alpha_sigma(torch.tensor([j / 999]))
            assert abs(alpha_i.item() - mean) < 1e-6 and abs(sigma_i.item() ** 2 - var) < 1e-6
    # and the chain approximates the continuous SDE
    alpha_c = sde.alpha(t)
    torch.testing.assert_close(chain.alpha_sigma(t)[0], alpha_c, atol=2e-3, rtol=2e-2)
    # the chain's forward step is the SDE's discretize, and one step from level i−1 carries its marginals to level i
    f_chain, G_chain = chain.forward_step(x, t)
    torch.testing.assert_close(f_chain, f)
    torch.testing.assert_close(G_chain, G)
    a, s = chain.alpha_sigma(t.double())
    a_prev, s_prev = chain.alpha_sigma(((i - 1).clamp(min=0).double() / 999))
    a_prev, s_prev = torch.where(i == 0, 1.0, a_prev), torch.where(i == 0, 0.0, s_prev)
    torch.testing.assert_close(torch.sqrt(1 - b.double()) * a_prev, a, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close((1 - b.double()) * s_prev**2 + b.double(), s**2, rtol=1e-6, atol=1e-7)


def test_every_grid_time_maps_to_its_step_even_in_float32():
    for sde in (VPSDE(N=1000), VESDE(N=1000), VPSDE(N=37)):
        i = torch.arange(sde.N)
        chain = chain_for(sde)
        assert torch.equal(chain.step_index(i.float() / (sde.N - 1)), i)
        assert torch.equal(chain.step_index((i.float() + 0.5) / (sde.N - 1)), i)  # truncation between grid points
        assert torch.equal(grid_index(i.float() / (sde.N - 1), sde.N, sde.T), i)


def test_ve_discretize_is_the_smld_chain():
    sde = VESDE(sigma_min=0.01, sigma_max=50.0, N=10)
    sigmas = np.exp(np.linspace(np.log(0.01), np.log(50.0), 10))
    x = torch.zeros(10, 2)
    f, G = sde.discretize(x, torch.arange(10).float() / 9)
    expected = np.sqrt(sigmas**2 - np.concatenate([[0.0], sigmas[:-1]]) ** 2)
    np.testing.assert_allclose(G.numpy(), expected, rtol=1e-5)
    assert torch.all(f == 0)
    # the variance accumulated over steps 0..i is σ_i²
    np.testing.assert_allclose(np.cumsum(G.numpy() ** 2), sigmas**2, rtol=1e-5)
    chain = chain_for(sde)
    np.testing.assert_allclose(chain.sigmas.numpy(), sigmas, rtol=1e-6)
    torch.testing.assert_close(chain.forward_step(x, torch.arange(10).float() / 9)[1], G)
    # SMLD labels count levels from σ_max: label 0 is σ_9 = σ_max
    torch.testing.assert_close(chain.label(torch.arange(10).float() / 9), 9.0 - torch.arange(10).float())


def test_only_vp_and_ve_have_discrete_chains():
    assert chain_for(SubVPSDE()) is None and chain_for(EDMSDE()) is None
    with pytest.raises(ValueError, match="SubVPSDE has none"):
        require_chain(SubVPSDE())
    assert not isinstance(SubVPSDE(), VPSDE)  # sub-VP shares the β schedule, not VP's methods
    # sub-VP's discretize is Euler–Maruyama of its own SDE, not the DDPM step
    sub, x, t = SubVPSDE(), torch.ones(1, 2), torch.tensor([0.5])
    f, G = sub.discretize(x, t)
    drift, g = sub.sde(x, t)
    torch.testing.assert_close(f, drift / 1000)
    torch.testing.assert_close(G, g * math.sqrt(1 / 1000))


@pytest.mark.parametrize("name", ALL_SDES)
def test_closed_forms_equal_the_generic_defaults(name):
    """Every built-in SDE's closed forms equal what SDE derives from α and σ alone (autograd, bisection)."""
    sde = ALL_SDES[name]()
    t = torch.linspace(0.05, 0.95, 19, dtype=torch.float64) * sde.T
    torch.testing.assert_close(sde.drift_coefficient(t), SDE.drift_coefficient(sde, t), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(sde.diffusion_squared(t), SDE.diffusion_squared(sde, t), rtol=1e-8, atol=1e-9)
    lam = sde.log_snr(t)
    torch.testing.assert_close(sde.t_from_log_snr(lam), SDE.t_from_log_snr(sde, lam), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(sde.t_from_log_snr(lam), t, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", ALL_SDES)
def test_prior_logp_matches_scipy_and_sampling(name):
    sde = ALL_SDES[name]()
    z = sde.prior_sampling((5000, 3), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert abs(z.std().item() / sde.prior_std - 1) < 0.03
    expected = scipy.stats.multivariate_normal(mean=np.zeros(3), cov=sde.prior_std**2 * np.eye(3)).logpdf(z[:7].numpy())
    np.testing.assert_allclose(sde.prior_logp(z[:7]).numpy(), expected, rtol=1e-10)
    images = z[:4, :3].reshape(4, 3, 1, 1)
    expected_img = scipy.stats.norm(scale=sde.prior_std).logpdf(images.numpy()).reshape(4, -1).sum(1)
    np.testing.assert_allclose(sde.prior_logp(images).numpy(), expected_img, rtol=1e-10)


@pytest.mark.parametrize("name", ALL_SDES)
def test_reverse_sde_and_probability_flow_drifts(name):
    """For Gaussian data N(μ, s²I) the score of p_t is −(x − αμ)/(α²s² + σ²)."""
    sde = ALL_SDES[name]()
    mu, s = 0.7, 0.4

    def score_fn(x, t):
        a, sig = sde.alpha(t)[:, None], sde.sigma(t)[:, None]
        return -(x - a * mu) / (a**2 * s**2 + sig**2)

    x = torch.randn(6, 3, dtype=torch.float64)
    t = torch.tensor([0.9, 0.5, 0.3, 0.1, 0.01, 1e-3], dtype=torch.float64)
    f, g = sde.sde(x, t)
    score = score_fn(x, t)
    drift, diffusion = sde.reverse(score_fn).sde(x, t)
    torch.testing.assert_close(drift, f - g[:, None] ** 2 * score)
    torch.testing.assert_close(diffusion, g)
    drift, diffusion = sde.reverse(score_fn, probability_flow=True).sde(x, t)
    torch.testing.assert_close(drift, f - 0.5 * g[:, None] ** 2 * score)
    assert torch.all(diffusion == 0)
    fd, Gd = sde.discretize(x, t)
    rev_f, rev_G = sde.reverse(score_fn, probability_flow=True).discretize(x, t)
    torch.testing.assert_close(rev_f, fd - 0.5 * Gd[:, None] ** 2 * score)
    assert torch.all(rev_G == 0)


def test_linear_chain_schedule_is_the_ddpm_chain_at_the_grid_times():
    """α(t_i)² = ᾱ_i = Π_{j≤i}(1 − β_j) for β = linspace(1e-4, 0.02, 1000), t_i = i/999; the log-SNR inverts."""
    sde = VPSDE(0.1, 20.0, 1000, schedule="linear_chain")
    t = torch.arange(1000, dtype=torch.float64) / 999
    alphas_cumprod = torch.cumprod(1.0 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)
    torch.testing.assert_close(sde.alpha(t) ** 2, alphas_cumprod, rtol=1e-12, atol=0)
    torch.testing.assert_close(sde.sigma(t) ** 2, 1.0 - alphas_cumprod, rtol=1e-10, atol=0)
    mid = torch.tensor([0.25, 0.7004], dtype=torch.float64)  # between grid points: log ᾱ interpolates linearly
    i = torch.floor(mid * 999).long()
    w = mid * 999 - i
    expected = (1 - w) * torch.log(alphas_cumprod[i]) + w * torch.log(alphas_cumprod[i + 1])
    torch.testing.assert_close(2 * torch.log(sde.alpha(mid)), expected, rtol=1e-12, atol=0)
    lam = torch.log(sde.alpha(t) / sde.sigma(t))
    torch.testing.assert_close(sde.t_from_log_snr(lam), t, rtol=0, atol=1e-9)
