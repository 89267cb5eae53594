"""Rectified flow / flow matching as an SDE (α = 1 − t, σ = t, T = 1, prior N(0, I) exactly): closed forms against
the generic ones, the singular end α(T) = 0 (samplers start and likelihoods end at `t_max`), every sampler from the
prior without NaN, the flow-matching target, the exact likelihood, and the config path."""
import math

import pytest
import torch

from sde_diffusion import likelihood, parameterization, sampling, sdes
from sde_diffusion.config import ConfigError
from sde_diffusion.toy import random_mixture

pytestmark = pytest.mark.usefixtures("one_thread")
SDE = sdes.RectifiedFlowSDE()


def test_closed_forms_agree_with_the_generic_ones():
    t = torch.tensor([1e-3, 0.2, 0.5, 0.9, 0.99], dtype=torch.float64)
    torch.testing.assert_close(SDE.drift_coefficient(t), sdes.SDE.drift_coefficient(SDE, t))
    torch.testing.assert_close(SDE.diffusion_squared(t), sdes.SDE.diffusion_squared(SDE, t))
    torch.testing.assert_close(SDE.t_from_log_snr(SDE.log_snr(t)), t)
    assert SDE.T == 1.0 and SDE.alpha(torch.tensor(1.0)).item() == 0.0 and SDE.sigma(torch.tensor(1.0)).item() == 1.0
    t_max = torch.tensor(SDE.t_max, dtype=torch.float64)
    assert SDE.prior_std == pytest.approx(math.hypot(SDE.alpha(t_max).item(), SDE.sigma(t_max).item()), rel=1e-12)
    assert SDE.t_max == pytest.approx(1 / (1 + math.exp(sdes.SINGULAR_END_LOG_SNR))) and sdes.VPSDE().t_max == 1.0
    assert math.isfinite(SDE.log_snr(torch.tensor(SDE.t_max, dtype=torch.float64)).item())
    # the probability-flow ODE's drift is the flow-matching velocity E[ε − x0 | x_t]: for Gaussian data exactly
    mixture = random_mixture(1000)
    x0, _ = mixture.sample(4, torch.Generator().manual_seed(0))
    param = parameterization.resolve(SDE, True, "auto")
    assert type(param).__name__ == "VelocityPrediction"
    x0, z, t = x0.double(), torch.randn(4, mixture.dim, dtype=torch.float64), torch.full((4,), 0.3, dtype=torch.float64)
    x_t = 0.7 * x0 + 0.3 * z
    score = -(x_t - 0.7 * x0) / 0.09  # the conditional score: its velocity is ε − x0 exactly
    torch.testing.assert_close(param.output(score, x_t, t), z - x0)


@pytest.mark.parametrize("method", sorted(name for name, s in sampling.SAMPLERS.items() if s.parameterization is None))
def test_every_sampler_runs_from_the_prior(method):
    """At its documented count (a tenth of it for the SDE chains), finite samples near the data (the mixture's
    density at them is not vanishing)."""
    mixture = random_mixture(1006)
    sampler = sampling.SAMPLERS[method]
    steps = None if sampler.adaptive else (sampler.steps or SDE.N // 10)
    x, nfe = sampling.sample(mixture.marginal_score_fn(SDE), SDE, (256, mixture.dim), method, steps=steps,
                             generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(x).all() and nfe > 0
    assert mixture.log_prob(x.double()).mean().item() > -5 * mixture.dim


def test_likelihood_is_the_exact_density():
    """The probability-flow log-likelihood of the exact score against the mixture's log p_eps: within 2e-4 bits/dim
    on average (the prior drawn at t_max differs from p_{t_max} by ~e^{−12} in variance)."""
    mixture = random_mixture(1006)
    x = mixture.sample(64, torch.Generator().manual_seed(1))[0].double()
    eps = likelihood.DEFAULT_EPS
    logp, _, _ = likelihood.log_likelihood(mixture.marginal_score_fn(SDE), SDE, x, divergence="exact", eps=eps)
    exact = mixture.log_prob(x, *(v(torch.tensor(eps, dtype=torch.float64)) for v in (SDE.alpha, SDE.sigma)))
    error_bits = (logp - exact) / (mixture.dim * math.log(2))
    assert abs(error_bits.mean().item()) < 2e-4 and error_bits.abs().max().item() < 2e-3, error_bits


def test_trains_from_a_config():
    from sde_diffusion.cli import load_config_file
    from sde_diffusion.config import validate_config
    digits = load_config_file("configs/rf_digits.py")
    validate_config(digits)
    assert (digits.training.sde, digits.training.weighting, digits.model.parameterization) == \
        ("rectified_flow", "velocity", "velocity")
    from configs import toy_gmm
    config = toy_gmm.get_config()
    config.training.sde = "rectified_flow"
    config.training.time_sampling, config.training.weighting = "logit_normal", "velocity"
    sdes.check_config(config)
    parameterization.check_config(config)
    assert isinstance(sdes.sde_from_config(config), sdes.RectifiedFlowSDE)
    assert parameterization.resolved_names(config) == ("velocity", "time")
    config.training.continuous = False
    with pytest.raises(ConfigError, match="has no discrete chain"):
        parameterization.check_config(config)
    config.training.continuous, config.training.sde_options = True, "N=10"
    with pytest.raises(ConfigError, match="leave training.sde_options empty"):
        sdes.check_config(config)


# --------------------------------------------------------------------------------------------------
# VP rescaled to zero terminal SNR: the other process with α(T) = 0
# --------------------------------------------------------------------------------------------------
def test_zero_terminal_snr_schedule_is_lin_et_als():
    """The continuous α(t) = (α_b(t) − α_b(1))/(1 − α_b(1)) with closed-form f, g², λ⁻¹ against the generic ones, and
    the discrete chain against diffusers' rescale_zero_terminal_snr of the same β (when diffusers is installed)."""
    sde = sdes.VPSDE(zero_terminal_snr=True)
    base = sdes.VPSDE()
    t = torch.tensor([1e-3, 0.2, 0.5, 0.9, 0.99], dtype=torch.float64)
    alpha_end = base.alpha(torch.tensor(1.0, dtype=torch.float64))
    torch.testing.assert_close(sde.alpha(t), (base.alpha(t) - alpha_end) / (1 - alpha_end))
    torch.testing.assert_close(sde.alpha(t) ** 2 + sde.sigma(t) ** 2, torch.ones_like(t))
    torch.testing.assert_close(sde.drift_coefficient(t), sdes.SDE.drift_coefficient(sde, t))
    torch.testing.assert_close(sde.diffusion_squared(t), sdes.SDE.diffusion_squared(sde, t))
    torch.testing.assert_close(sde.t_from_log_snr(sde.log_snr(t)), t)
    assert sde.alpha(torch.tensor(1.0)).item() == 0.0 and sde.sigma(torch.tensor(1.0)).item() == 1.0
    assert sde.singular_end and sde.t_max < 1.0 and sde.prior_std == 1.0
    betas = sde.schedule.discrete_betas(sde.N)
    assert betas[-1].item() == pytest.approx(1.0) and betas[0].item() == pytest.approx(1e-4)
    ddim = pytest.importorskip("diffusers.schedulers.scheduling_ddim")
    theirs = ddim.rescale_zero_terminal_snr(base.schedule.discrete_betas(sde.N))  # float64 in, float64 out
    torch.testing.assert_close(betas, theirs, rtol=1e-9, atol=1e-12)


def test_zero_terminal_snr_needs_a_v_target_and_samples():
    from configs import vp_digits
    config = vp_digits.get_config()
    config.model.zero_terminal_snr = True
    with pytest.raises(ConfigError, match="zero_terminal_snr=True makes α.T. = 0.*set model.parameterization='v'"):
        parameterization.check_config(config)
    config.model.parameterization = "v"
    parameterization.check_config(config)
    sde = sdes.sde_from_config(config)
    assert isinstance(sde, sdes.VPSDE) and sde.zero_terminal_snr
    config.training.sde = "vesde"
    with pytest.raises(ConfigError, match="rescales a VP schedule"):
        sdes.check_config(config)
    mixture = random_mixture(1006)
    for method in ("dpm_solver", "heun", "ancestral"):
        x, _ = sampling.sample(mixture.marginal_score_fn(sde), sde, (1000, mixture.dim), method,
                               generator=torch.Generator().manual_seed(0))
        assert torch.isfinite(x).all() and mixture.log_prob(x.double()).mean().item() > -3 * mixture.dim, method
