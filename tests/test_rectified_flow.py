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


@pytest.mark.parametrize("method", sorted(sampling.SAMPLERS))
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
