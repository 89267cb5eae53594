"""The package's losses as they were written before objectives became parts, each as its paper writes it: the
oracles that `losses.Objective` must reproduce on the same random stream (tests/test_objectives.py), and the
formulas the closed-form loss tests check (tests/test_losses.py, test_likelihood.py, test_parameterization.py)."""
from typing import Optional, Tuple

import torch

from sde_diffusion import discrete
from sde_diffusion.distributed import global_rows
from sde_diffusion.parameterization import EDM_SIGMA_DATA
from sde_diffusion.sdes import SDE, ScoreFn, per_sample
from sde_diffusion.training.noise_levels import EDM_P_MEAN, EDM_P_STD, log_snr_range

Shard = Tuple[int, int]
SINGLE = (0, 1)


def _reduce(per_element: torch.Tensor, reduce_mean: bool) -> torch.Tensor:
    flat = per_element.flatten(1)
    return flat.mean(1) if reduce_mean else flat.sum(1)


def _gaussian(x0: torch.Tensor, generator, total: int, mine) -> torch.Tensor:
    return torch.randn((total, *x0.shape[1:]), generator=generator, device=x0.device, dtype=x0.dtype)[mine]


def dsm_loss(score_fn: ScoreFn, sde: SDE, x0: torch.Tensor, *, eps: float = 1e-5, reduce_mean: bool = True,
             likelihood_weighting: bool = False, generator: Optional[torch.Generator] = None,
             shard: Shard = SINGLE) -> torch.Tensor:
    """score_sde's continuous-time denoising score matching, t ~ U(eps, T); returns the batch mean (a scalar).

    Unweighted: ‖σ(t)·s(x_t, t) + z‖². With likelihood weighting: g(t)²·‖s(x_t, t) + z/σ(t)‖², i.e. the
    unweighted term multiplied by g(t)²/σ(t)², which makes the loss an upper bound on the negative ELBO.
    """
    total, mine = global_rows(x0.shape[0], *shard)
    t = torch.rand(total, generator=generator, device=x0.device, dtype=x0.dtype)[mine] * (sde.T - eps) + eps
    z = _gaussian(x0, generator, total, mine)
    mean, std = sde.marginal_prob(x0, t)
    score = score_fn(mean + per_sample(std, x0) * z, t)
    losses = _reduce((per_sample(std, x0) * score + z) ** 2, reduce_mean)
    if likelihood_weighting:
        g2 = sde.sde(torch.zeros_like(x0), t)[1] ** 2
        losses = losses * g2 / std**2
    return losses.mean()


def importance_normalizer(sde: SDE, eps: float) -> float:
    """Z = ∫_eps^T g²/σ² dt = 2(λ(eps) − λ(T)), λ the log-SNR."""
    lam_eps, lam_T = log_snr_range(sde, eps)
    return 2.0 * (lam_eps - lam_T)


def importance_sampled_dsm_loss(score_fn: ScoreFn, sde: SDE, x0: torch.Tensor, *, eps: float = 1e-5,
                                reduce_mean: bool = True, generator: Optional[torch.Generator] = None,
                                shard: Shard = SINGLE) -> torch.Tensor:
    """Likelihood-weighted DSM with t ~ q ∝ g²/σ² (λ uniform) instead of uniform t (Song et al. 2021b); returns the
    batch mean. Per example Z/(T − eps)·‖σ(t)·s(x_t, t) + z‖²: the same expectation as
    `dsm_loss(..., likelihood_weighting=True)` with the weight g²/σ², which spans orders of magnitude, moved into
    the sampling of t."""
    lam_eps, lam_T = log_snr_range(sde, eps)
    total, mine = global_rows(x0.shape[0], *shard)
    u = torch.rand(total, generator=generator, device=x0.device, dtype=torch.float64)[mine]
    t = sde.t_from_log_snr(lam_eps + u * (lam_T - lam_eps)).clamp(min=eps, max=sde.T).to(x0.dtype)
    z = _gaussian(x0, generator, total, mine)
    mean, std = sde.marginal_prob(x0, t)
    score = score_fn(mean + per_sample(std, x0) * z, t)
    losses = _reduce((per_sample(std, x0) * score + z) ** 2, reduce_mean)
    return losses.mean() * importance_normalizer(sde, eps) / (sde.T - eps)


def discrete_dsm_loss(score_fn: ScoreFn, sde: SDE, x0: torch.Tensor, *, reduce_mean: bool = True,
                      generator: Optional[torch.Generator] = None, shard: Shard = SINGLE) -> torch.Tensor:
    """DDPM (VP) / SMLD (VE) loss on the SDE's N-step discrete chain; returns the batch mean (a scalar). Step
    i ~ U{0..N−1} is evaluated at its grid time t_i = i/(N−1)·T with the chain's α_i, σ_i: for VP this is
    DDPM's L_simple ‖ε̂ − ε‖² (ε̂ = −σ_i·s), for VE the SMLD loss σ_i²‖s + z/σ_i‖²."""
    chain = discrete.require_chain(sde, "the DDPM/SMLD loss (training.continuous=False)")
    total, mine = global_rows(x0.shape[0], *shard)
    i = torch.randint(0, sde.N, (total,), generator=generator, device=x0.device)[mine]
    t = i.to(x0.dtype) / (sde.N - 1) * sde.T
    z = _gaussian(x0, generator, total, mine)
    alpha, sigma = chain.alpha_sigma(t)
    score = score_fn(per_sample(alpha, x0) * x0 + per_sample(sigma, x0) * z, t)
    return _reduce((per_sample(sigma, x0) * score + z) ** 2, reduce_mean).mean()


def edm_weight(sigma_tilde: torch.Tensor, sigma_data: float = EDM_SIGMA_DATA) -> torch.Tensor:
    """EDM's loss weighting λ(σ̃) = (σ̃² + σ_d²)/(σ̃·σ_d)², which makes the loss of the preconditioned network's raw
    output F unit-weighted (λ·c_out² = 1)."""
    return (sigma_tilde**2 + sigma_data**2) / (sigma_tilde * sigma_data) ** 2


def edm_loss(score_fn: ScoreFn, sde: SDE, x0: torch.Tensor, *, sigma_data: float = EDM_SIGMA_DATA,
             p_mean: float = EDM_P_MEAN, p_std: float = EDM_P_STD, eps: float = 1e-5, reduce_mean: bool = True,
             generator: Optional[torch.Generator] = None, shard: Shard = SINGLE) -> torch.Tensor:
    """EDM's loss (Karras et al. 2022, eq. 2 with Table 1) for any SDE; returns the batch mean (a scalar).

    ln σ̃ ~ N(p_mean, p_std²) gives the time t = λ⁻¹(−ln σ̃) (clamped to [eps, T]); with σ̃ = σ(t)/α(t) there,
    x_t = α(t)·x0 + σ(t)·z and the denoiser D = (x_t + σ(t)²·s(x_t, t))/α(t), the loss is λ(σ̃)·‖D − x0‖².
    """
    total, mine = global_rows(x0.shape[0], *shard)
    log_sigma = torch.randn(total, generator=generator, device=x0.device, dtype=x0.dtype)[mine] * p_std + p_mean
    t = sde.t_from_log_snr(-log_sigma.double()).clamp(min=eps, max=sde.T).to(x0.dtype)
    z = _gaussian(x0, generator, total, mine)
    alpha, sigma = sde.alpha(t), sde.sigma(t)
    x_t = per_sample(alpha, x0) * x0 + per_sample(sigma, x0) * z
    denoised = (x_t + per_sample(sigma**2, x0) * score_fn(x_t, t)) / per_sample(alpha, x0)
    return (edm_weight(sigma / alpha, sigma_data) * _reduce((denoised - x0) ** 2, reduce_mean)).mean()
