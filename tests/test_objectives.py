"""Objectives as parts (noise-level distribution, weighting, target), each paper's loss reproduced as the paper writes
it, the effective weighting per unit log-SNR against closed forms, and the registries' extension points and errors.

A "network" here is a fixed random function of (input, condition); every objective sees it through the package's
parameterizations, and the paper's formula is computed directly from the same draws (t, ε) in the paper's own
variables (ᾱ, σ, D, v, the flow's velocity).
"""
import math

import pytest
import torch

import paper_losses  # tests/: the losses as the papers write them

from sde_diffusion import losses, parameterization
from sde_diffusion.errors import ConfigError
from sde_diffusion.sdes import EDMSDE, RectifiedFlowSDE, VESDE, VPSDE

B, D = 256, 6


def network(seed: int = 0):
    """A fixed smooth random map (input (B, D), condition (B,)) → (B, D)."""
    g = torch.Generator().manual_seed(seed)
    weight, bias, gain = (torch.randn(D, D, generator=g, dtype=torch.float64) / math.sqrt(D),
                          torch.randn(D, generator=g, dtype=torch.float64), torch.randn(D, generator=g,
                                                                                      dtype=torch.float64))
    return lambda x, c: torch.tanh(x @ weight + bias) + gain * torch.cos(c.double())[:, None]


def data(seed: int = 1) -> torch.Tensor:
    return 0.5 + 0.7 * torch.randn(B, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def ours(sde, target, *, continuous=True, **parts):
    """(objective value, (t, z), the network's raw output at x_t) for one draw."""
    objective = losses.Objective(sde, continuous=continuous, reduce_mean=True, **parts)
    param = parameterization.resolve(sde, continuous, target)
    net, x0 = network(), data()
    t, z, w = objective.draw(x0, torch.Generator().manual_seed(2))
    value = objective(param.score_fn(net), x0, noise=(t, z, w)).item()
    alpha, sigma = (v[:, None] for v in objective.alpha_sigma(t))
    x_t = alpha * x0 + sigma * z
    return value, t, z, x0, x_t, net(param.network_input(x_t, t), param.condition(t))


def mse(a, b):
    return ((a - b) ** 2).mean(1)


def test_ddpm_l_simple():
    """Ho et al. 2020: E_{i, ε}‖ε − ε_θ(√ᾱ_i·x0 + √(1 − ᾱ_i)·ε, i)‖², ᾱ_i = Π_{j ≤ i}(1 − β_j), β linear 1e-4 … 0.02."""
    sde = VPSDE(N=1000, schedule="linear_chain")
    value, t, z, x0, _, _ = ours(sde, "eps", continuous=False, time_sampling="discrete", weighting="eps")
    i = torch.round(t * (sde.N - 1)).long()
    alpha_bar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)[i][:, None]
    x_i = alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * z
    param = parameterization.resolve(sde, False, "eps")
    eps_hat = network()(x_i, param.condition(t))
    assert value == pytest.approx(mse(z, eps_hat).mean().item(), rel=1e-10)


@pytest.mark.parametrize("sde", [VPSDE(), VESDE()], ids=["vp", "ve"])
def test_score_sde_dsm_and_likelihood_weighting(sde):
    """Song et al. 2021: E_t λ(t)·E‖s_θ(x_t, t) + z/σ‖² with λ = σ² (uniform t) and λ = g² (likelihood weighting,
    uniform t or t ~ g²/σ² importance-sampled with the ratio Z/((T − ε)·g²/σ²))."""
    target = "score" if isinstance(sde, VESDE) else "eps"
    for sampling, weighting in (("uniform", "eps"), ("uniform", "elbo"), ("importance", "elbo")):
        value, t, z, x0, x_t, output = ours(sde, target, time_sampling=sampling, weighting=weighting)
        param = parameterization.resolve(sde, True, target)
        score = param.score(output, x_t, t)
        sigma = sde.sigma(t)[:, None]
        g2 = 2 * sde.sde(x_t, t)[1][:, None] ** 2 / 2
        per_example = (score + z / sigma).pow(2).mean(1)
        if weighting == "eps":
            expected = (sigma[:, 0] ** 2 * per_example).mean()
        elif sampling == "uniform":
            expected = (g2[:, 0] * per_example).mean()
        else:
            eps = 1e-5
            z_norm = 2 * (sde.log_snr(torch.tensor(eps, dtype=torch.float64)) - sde.log_snr(torch.tensor(1.0)))
            expected = (z_norm / (1 - eps) * sigma[:, 0] ** 2 * per_example).mean()
        assert value == pytest.approx(expected.item(), rel=1e-6), (sampling, weighting)


def test_edm_loss_of_the_preconditioned_denoiser():
    """Karras et al. 2022: ln σ ~ N(−1.2, 1.2²), λ(σ) = (σ² + σ_d²)/(σσ_d)², E λ(σ)‖D_θ(x0 + σε; σ) − x0‖² with
    D_θ = c_skip·x + c_out·F_θ(c_in·x; ¼ ln σ)."""
    sde, sd = EDMSDE(), 0.5
    value, sigma, z, x0, x, output = ours(sde, "edm", time_sampling="log_normal", weighting="edm")
    assert abs(torch.log(sigma).mean().item() + 1.2) < 0.25  # the draw is EDM's
    s = sigma[:, None]
    c_skip, c_out, c_in = sd**2 / (s**2 + sd**2), s * sd / (s**2 + sd**2).sqrt(), 1 / (s**2 + sd**2).sqrt()
    F = network()(c_in * x, torch.log(sigma) / 4)
    torch.testing.assert_close(F, output)
    denoised = c_skip * x + c_out * F
    weight = (s[:, 0] ** 2 + sd**2) / (s[:, 0] * sd) ** 2
    assert value == pytest.approx((weight * mse(denoised, x0)).mean().item(), rel=1e-9)


@pytest.mark.parametrize("target", ["eps", "v"])
def test_min_snr_5_for_eps_and_v_targets(target):
    """Hang et al. 2023 as implemented for each target: ε: min(SNR, 5)/SNR·‖ε̂ − ε‖²; v: min(SNR, 5)/(SNR + 1)·
    ‖v̂ − v‖² with v = α·ε − σ·x0 (VP)."""
    sde = VPSDE()
    value, t, z, x0, x_t, output = ours(sde, target, time_sampling="uniform", weighting="min_snr:gamma=5")
    alpha, sigma = sde.alpha(t), sde.sigma(t)
    snr = alpha**2 / sigma**2
    if target == "eps":
        expected = torch.clamp(snr, max=5) / snr * mse(output, z)
    else:
        v = alpha[:, None] * z - sigma[:, None] * x0
        expected = torch.clamp(snr, max=5) / (snr + 1) * mse(output, v)
    assert value == pytest.approx(expected.mean().item(), rel=1e-9)


def test_v_prediction_with_snr_plus_one_weighting():
    """Salimans & Ho 2022: (1 + SNR)·‖x̂0 − x0‖² = ‖v̂ − v‖² for a v-network on VP."""
    sde = VPSDE(schedule="cosine")
    value, t, z, x0, x_t, output = ours(sde, "v", time_sampling="uniform", weighting="v")
    alpha, sigma = sde.alpha(t)[:, None], sde.sigma(t)[:, None]
    x0_hat = alpha * x_t - sigma * output
    snr = (alpha / sigma)[:, 0] ** 2
    assert value == pytest.approx(((1 + snr) * mse(x0_hat, x0)).mean().item(), rel=1e-8)
    assert value == pytest.approx(mse(output, alpha * z - sigma * x0).mean().item(), rel=1e-8)


def test_rectified_flow_with_logit_normal_times():
    """Esser et al. 2024 (SD3): t = sigmoid(u), u ~ N(0, 1), x_t = (1 − t)·x0 + t·ε, E‖v_θ(x_t, t) − (ε − x0)‖²."""
    sde = RectifiedFlowSDE()
    value, t, z, x0, x_t, output = ours(sde, "velocity", time_sampling="logit_normal:mean=0,std=1",
                                        weighting="velocity")
    g = torch.Generator().manual_seed(2)
    expected_t = torch.sigmoid(torch.randn(B, generator=g, dtype=torch.float64))
    torch.testing.assert_close(t, expected_t.clamp(min=1e-5))
    torch.testing.assert_close(x_t, (1 - t[:, None]) * x0 + t[:, None] * z)
    assert value == pytest.approx(mse(output, z - x0).mean().item(), rel=1e-8)


def test_sigmoid_weighting_is_kingma_and_gaos():
    """Kingma & Gao 2023: L = ½·E_{u ~ U(0,1)}[−dλ/du · w(λ_u)·‖ε̂ − ε‖²], w = sigmoid(b − λ), with the linear
    log-SNR schedule λ_u = λ_max + u(λ_min − λ_max): ours with λ-uniform noise levels is the same up to the constant
    ½·(λ_max − λ_min)."""
    sde, bias = VPSDE(), 1.5
    value, t, z, x0, x_t, output = ours(sde, "eps", time_sampling="uniform_log_snr", weighting=f"sigmoid:bias={bias}")
    lam = sde.log_snr(t)
    lam_max, lam_min = (sde.log_snr(torch.tensor(v, dtype=torch.float64)).item() for v in (1e-5, 1.0))
    theirs = 0.5 * ((lam_max - lam_min) * torch.sigmoid(bias - lam) * mse(output, z)).mean()
    assert value * 0.5 * (lam_max - lam_min) == pytest.approx(theirs.item(), rel=1e-9)
    assert lam.min().item() >= lam_min - 1e-9 and lam.max().item() <= lam_max + 1e-9


# --------------------------------------------------------------------------------------------------
# Effective weighting against closed forms
# --------------------------------------------------------------------------------------------------
def test_effective_weighting_closed_forms():
    sde, eps = VPSDE(), 1e-3
    lam = torch.linspace(-4.5, 3.0, 16, dtype=torch.float64)  # inside (λ(1), λ(eps)) = (−5.0, 4.6)
    # the ELBO: 2/(T − eps) per unit λ whether t is uniform or importance-sampled
    for sampling in ("uniform", "importance"):
        _, w = losses.effective_weighting(losses.Objective(sde, time_sampling=sampling, weighting="elbo", eps=eps),
                                          lam)
        torch.testing.assert_close(w, torch.full_like(w, 2 / (1 - eps)), rtol=0.04, atol=0)
    # plain ε-MSE with uniform t: the density of λ_t, 1/((T − eps)|dλ/dt|) = 2σ²/((T − eps)·g²)
    _, w = losses.effective_weighting(losses.Objective(sde, time_sampling="uniform", weighting="eps", eps=eps), lam)
    t = sde.t_from_log_snr(lam)
    expected = 2 * sde.sigma(t) ** 2 / ((1 - eps) * sde.diffusion_squared(t))
    torch.testing.assert_close(w, expected, rtol=0.06, atol=0)
    # the same from an SDE and specs, and from a config
    _, from_specs = losses.effective_weighting(sde, lam, time_sampling="uniform", weighting="eps", eps=eps)
    torch.testing.assert_close(from_specs, w)
    from configs import vp_digits
    config = vp_digits.get_config()
    config.training.likelihood_weighting, config.training.eps = True, eps
    _, from_config = losses.effective_weighting(config, lam)
    torch.testing.assert_close(from_config, torch.full_like(w, 2 / (1 - eps)), rtol=0.04, atol=0)
    # EDM: λ = −ln σ ~ N(1.2, 1.2²) times (e^{−2λ} + σ_d²)/σ_d²
    _, w = losses.effective_weighting(losses.Objective(EDMSDE(), time_sampling="log_normal", weighting="edm"),
                                      torch.linspace(-2.0, 4.0, 13, dtype=torch.float64))
    lam = torch.linspace(-2.0, 4.0, 13, dtype=torch.float64)
    density = torch.exp(-0.5 * ((lam - 1.2) / 1.2) ** 2) / (1.2 * math.sqrt(2 * math.pi))
    torch.testing.assert_close(w, density * (torch.exp(-2 * lam) + 0.25) / 0.25, rtol=0.06, atol=0)


# --------------------------------------------------------------------------------------------------
# The parts from the user's own code, and bad input
# --------------------------------------------------------------------------------------------------
def test_user_weighting_and_time_sampling_are_used_with_their_options():
    @losses.register_weighting("test_power")
    def power(log_snr, *, k: float = 1.0):
        return torch.exp(-k * log_snr)

    @losses.register_time_sampling("test_fixed")
    def fixed(sde, n, *, generator=None, where: float = 0.5, device=None):
        return torch.full((n,), where * sde.T, device=device)

    try:
        sde = VPSDE()
        objective = losses.get_loss_fn(sde, time_sampling="test_fixed:where=0.25", weighting="test_power:k=2")
        t, _, w = objective.draw(data())
        assert torch.all(t == 0.25)
        torch.testing.assert_close(w, torch.exp(-2 * sde.log_snr(t)))
        with pytest.raises(ValueError, match=r"weighting 'test_power' has no option 'kk'; did you mean 'k'"):
            losses.get_loss_fn(sde, weighting="test_power:kk=2")
        with pytest.raises(ValueError, match="option k='x' is not a number"):
            losses.get_loss_fn(sde, weighting="test_power:k=x")
        with pytest.raises(ValueError, match=r"puts mass outside \(0, T = 1.0\]"):
            losses.get_loss_fn(sde, time_sampling="test_fixed:where=1.5")
        with pytest.raises(ValueError, match="already registered"):
            losses.register_weighting("test_power")(lambda log_snr: log_snr)
        with pytest.raises(ValueError, match="needs a default"):
            losses.register_weighting("test_bad")(lambda log_snr, k: log_snr)
    finally:
        losses.WEIGHTINGS.parts.pop("test_power", None)
        losses.TIME_SAMPLINGS.parts.pop("test_fixed", None)
        losses.WEIGHTINGS.parts.pop("test_bad", None)


def test_unknown_parts_and_impossible_combinations_are_named():
    with pytest.raises(ValueError, match=r"unknown weighting 'min_snrr'; did you mean 'min_snr'"):
        losses.get_loss_fn(VPSDE(), weighting="min_snrr")
    with pytest.raises(ValueError, match="training.time_sampling='discrete' draws the chain's steps"):
        losses.get_loss_fn(VPSDE(), time_sampling="discrete")
    with pytest.raises(ValueError, match="reads the continuous process"):
        losses.get_loss_fn(VPSDE(), continuous=False, weighting="elbo")
    from configs import vp_digits
    config = vp_digits.get_config()
    config.training.weighting = "min_snr:gamma=5"
    losses.check_config(config)
    config.training.likelihood_weighting = True
    with pytest.raises(ConfigError, match="set the objective by training.time_sampling and training.weighting"):
        losses.check_config(config)
    config.training.likelihood_weighting = False
    config.training.time_sampling = "discrete"  # the parts together are checked on the process
    with pytest.raises(ConfigError, match="training.time_sampling='discrete' draws the chain's steps"):
        losses.check_config(config)
    config.training.time_sampling = None
    config.training.weighting = "min_snr:gama=5"
    with pytest.raises(ConfigError, match=r"training.weighting='min_snr:gama=5': .*did you mean 'gamma'"):
        losses.check_config(config)


@pytest.mark.parametrize("keys", [dict(), dict(likelihood_weighting=True),
                                  dict(likelihood_weighting=True, importance_sampling=True), dict(loss="edm"),
                                  dict(continuous=False)], ids=["dsm", "likelihood", "importance", "edm", "discrete"])
def test_todays_keys_train_exactly_as_before(keys):
    """score_sde's keys and training.loss give the loss the earlier code computed, from the same random stream
    (the papers' functions, kept as they were)."""
    sde, x0, eps = VPSDE(N=100), data(), 1e-5
    score_fn = parameterization.resolve(sde, keys.get("continuous", True), "eps").score_fn(network())
    objective = losses.get_loss_fn(sde, eps=eps, reduce_mean=False, **keys)
    value = objective(score_fn, x0, torch.Generator().manual_seed(5)).item()
    g = torch.Generator().manual_seed(5)
    if keys.get("loss") == "edm":
        before = paper_losses.edm_loss(score_fn, sde, x0, eps=eps, reduce_mean=False, generator=g)
    elif keys.get("importance_sampling"):
        before = paper_losses.importance_sampled_dsm_loss(score_fn, sde, x0, eps=eps, reduce_mean=False, generator=g)
    elif not keys.get("continuous", True):
        before = paper_losses.discrete_dsm_loss(score_fn, sde, x0, reduce_mean=False, generator=g)
    else:
        before = paper_losses.dsm_loss(score_fn, sde, x0, eps=eps, reduce_mean=False, generator=g,
                                 likelihood_weighting=keys.get("likelihood_weighting", False))
    assert value == pytest.approx(before.item(), rel=1e-9)
