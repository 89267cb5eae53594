"""Denoising score-matching losses and the optimization step.

All losses take a score function and an SDE, so an exact analytic score tests them as well as a network:

  continuous DSM   E_t E_{x0,z} λ(t) ‖σ(t)·s(x_t, t) + z‖² / σ(t)²·σ(t)² ,  x_t = α(t)x0 + σ(t)z,  t ~ U(eps, T)
                   with λ(t) = σ(t)² (default, "ε-matching") or g(t)² (likelihood weighting, Song et al. 2021b),
                   optionally with t drawn ∝ g²/σ² (importance sampling) instead of uniformly
  discrete DSM     E_i ‖σ_i·s(x_i, t_i) + z‖²,  i ~ U{0..N−1},  x_i = α_i x0 + σ_i z  on the SDE's discrete chain:
                   for VP this is DDPM's L_simple ‖ε̂ − ε‖² (ε̂ = −σ_i s), for VE the SMLD loss σ_i²‖s + z/σ_i‖².
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
from torch import nn

from .distributed import global_rows
from .sdes import SDE, ScoreFn, per_sample


Shard = Tuple[int, int]  # (rank, world size): noise is drawn for the global batch, see distributed.global_rows
SINGLE = (0, 1)


def _reduce(per_element: torch.Tensor, reduce_mean: bool) -> torch.Tensor:
    """(batch, ...) → (batch,): mean or sum over all but the batch dimension."""
    flat = per_element.flatten(1)
    return flat.mean(1) if reduce_mean else flat.sum(1)


def dsm_loss(score_fn: ScoreFn, sde: SDE, x0: torch.Tensor, *, eps: float = 1e-5, reduce_mean: bool = True,
             likelihood_weighting: bool = False, generator: Optional[torch.Generator] = None,
             shard: Shard = SINGLE) -> torch.Tensor:
    """Continuous-time denoising score matching; returns the batch mean (a scalar).

    Unweighted: ‖σ(t)·s(x_t, t) + z‖². With likelihood weighting: g(t)²·‖s(x_t, t) + z/σ(t)‖², i.e. the
    unweighted term multiplied by g(t)²/σ(t)², which makes the loss an upper bound on the negative ELBO.
    """
    total, mine = global_rows(x0.shape[0], *shard)
    t = torch.rand(total, generator=generator, device=x0.device, dtype=x0.dtype)[mine] * (sde.T - eps) + eps
    z = torch.randn((total, *x0.shape[1:]), generator=generator, device=x0.device, dtype=x0.dtype)[mine]
    mean, std = sde.marginal_prob(x0, t)
    score = score_fn(mean + per_sample(std, x0) * z, t)
    losses = _reduce((per_sample(std, x0) * score + z) ** 2, reduce_mean)
    if likelihood_weighting:
        g2 = sde.sde(torch.zeros_like(x0), t)[1] ** 2
        losses = losses * g2 / std**2
    return losses.mean()


def importance_sampled_times(sde: SDE, n: int, eps: float, generator: Optional[torch.Generator] = None,
                             device=None, shard: Shard = SINGLE) -> Tuple[torch.Tensor, float]:
    """n times in [eps, T] with density q(t) ∝ g(t)²/σ(t)² (Song et al. 2021b), and Z = ∫_eps^T g²/σ² dt.

    g²/σ² = −2 dλ/dt for the log-SNR λ = log(α/σ), so λ is uniform between λ(T) and λ(eps): t = λ⁻¹(λ) and
    Z = 2(λ(eps) − λ(T)). Times are float64 on `device`.
    """
    lam_eps, lam_T = (float(sde.log_snr(torch.tensor(v, dtype=torch.float64))) for v in (eps, sde.T))
    total, mine = global_rows(n, *shard)
    u = torch.rand(total, generator=generator, device=device, dtype=torch.float64)[mine]
    t = sde.t_from_log_snr(lam_eps + u * (lam_T - lam_eps)).to(device)
    return t.clamp(min=eps, max=sde.T), 2.0 * (lam_eps - lam_T)


def importance_sampled_dsm_loss(score_fn: ScoreFn, sde: SDE, x0: torch.Tensor, *, eps: float = 1e-5,
                                reduce_mean: bool = True, generator: Optional[torch.Generator] = None,
                                shard: Shard = SINGLE) -> torch.Tensor:
    """Likelihood-weighted DSM with t ~ q ∝ g²/σ² instead of uniform t; returns the batch mean (a scalar).

    Per example Z/(T − eps)·‖σ(t)·s(x_t, t) + z‖²: the same expectation as `dsm_loss(..., likelihood_weighting=True)`
    (E_{t~U}[g²/σ²·‖σs + z‖²]) with the weight g²/σ², which spans orders of magnitude, moved into the sampling of t.
    """
    t, normalizer = importance_sampled_times(sde, x0.shape[0], eps, generator, x0.device, shard)
    t = t.to(x0.dtype)
    total, mine = global_rows(x0.shape[0], *shard)
    z = torch.randn((total, *x0.shape[1:]), generator=generator, device=x0.device, dtype=x0.dtype)[mine]
    mean, std = sde.marginal_prob(x0, t)
    score = score_fn(mean + per_sample(std, x0) * z, t)
    losses = _reduce((per_sample(std, x0) * score + z) ** 2, reduce_mean)
    return losses.mean() * normalizer / (sde.T - eps)


def discrete_dsm_loss(score_fn: ScoreFn, sde: SDE, x0: torch.Tensor, *, reduce_mean: bool = True,
                      generator: Optional[torch.Generator] = None, shard: Shard = SINGLE) -> torch.Tensor:
    """DDPM (VP) / SMLD (VE) loss on the SDE's N-step discrete chain; returns the batch mean (a scalar).

    Step i ~ U{0..N−1} is evaluated at its grid time t_i = i/(N−1)·T with the chain's α_i, σ_i.
    """
    total, mine = global_rows(x0.shape[0], *shard)
    i = torch.randint(0, sde.N, (total,), generator=generator, device=x0.device)[mine]
    t = i.to(x0.dtype) / (sde.N - 1) * sde.T
    alpha, sigma = sde.discrete_alpha_sigma(t)
    z = torch.randn((total, *x0.shape[1:]), generator=generator, device=x0.device, dtype=x0.dtype)[mine]
    score = score_fn(per_sample(alpha, x0) * x0 + per_sample(sigma, x0) * z, t)
    return _reduce((per_sample(sigma, x0) * score + z) ** 2, reduce_mean).mean()


def get_loss_fn(sde: SDE, *, continuous: bool = True, reduce_mean: bool = True, likelihood_weighting: bool = False,
                eps: float = 1e-5, importance_sampling: bool = False) -> Callable[..., torch.Tensor]:
    """loss_fn(score_fn, x0, generator=None, shard=(0, 1)) for the configured objective (config.training.*).

    importance_sampling (with likelihood_weighting): t ~ g²/σ² (`importance_sampled_dsm_loss`).
    """
    if importance_sampling and not (continuous and likelihood_weighting):
        raise ValueError("importance sampling of t applies to the likelihood-weighted continuous loss: set "
                         "training.likelihood_weighting=True and training.continuous=True, or "
                         "training.importance_sampling=False")
    if importance_sampling:
        return lambda score_fn, x0, generator=None, shard=SINGLE: importance_sampled_dsm_loss(
            score_fn, sde, x0, eps=eps, reduce_mean=reduce_mean, generator=generator, shard=shard)
    if continuous:
        return lambda score_fn, x0, generator=None, shard=SINGLE: dsm_loss(
            score_fn, sde, x0, eps=eps, reduce_mean=reduce_mean, likelihood_weighting=likelihood_weighting,
            generator=generator, shard=shard)
    if likelihood_weighting:
        raise ValueError("likelihood weighting applies to the continuous loss only: set training.continuous=True "
                         "or training.likelihood_weighting=False")
    if not sde.has_discrete_chain:
        raise ValueError(f"{type(sde).__name__} has no discrete chain, so no DDPM/SMLD loss: set "
                         "training.continuous=True")
    return lambda score_fn, x0, generator=None, shard=SINGLE: discrete_dsm_loss(
        score_fn, sde, x0, reduce_mean=reduce_mean, generator=generator, shard=shard)


# --------------------------------------------------------------------------------------------------
# Optimization
# --------------------------------------------------------------------------------------------------
def make_optimizer(params, optim_config) -> torch.optim.Optimizer:
    """Adam / AdamW from config.optim (lr, beta1, eps, weight_decay)."""
    o = optim_config
    kinds = {"Adam": torch.optim.Adam, "AdamW": torch.optim.AdamW}
    if o.optimizer not in kinds:
        raise ValueError(f"optim.optimizer={o.optimizer!r} is not one of {sorted(kinds)}")
    # fused: one kernel for the whole update (about 3× faster than the per-tensor loop on CPU, as on GPU)
    return kinds[o.optimizer](params, lr=o.lr, betas=(o.beta1, 0.999), eps=o.eps, weight_decay=o.weight_decay,
                              fused=True)


def learning_rate(step: int, optim_config) -> float:
    """Linear warm-up from 0 to optim.lr over optim.warmup steps, then constant."""
    o = optim_config
    return o.lr * min(step / o.warmup, 1.0) if o.warmup > 0 else o.lr


def optimization_step(optimizer: torch.optim.Optimizer, params, step: int, optim_config) -> torch.Tensor:
    """Set the warm-up learning rate, clip the gradient norm (if optim.grad_clip ≥ 0), and step.

    Returns the gradient norm before clipping.
    """
    for group in optimizer.param_groups:
        group["lr"] = learning_rate(step, optim_config)
    max_norm = optim_config.grad_clip if optim_config.grad_clip >= 0 else float("inf")
    grad_norm = clip_grad_norm(params, max_norm)
    optimizer.step()
    return grad_norm


def clip_grad_norm(params, max_norm: float) -> torch.Tensor:
    """Scale the gradients of `params` in place by min(1, max_norm / (‖g‖ + 1e-6)), ‖g‖ the 2-norm of all of
    them together; returns ‖g‖ before scaling (a 0-d tensor). Exactly ``nn.utils.clip_grad_norm_``."""
    return nn.utils.clip_grad_norm_(params, max_norm=max_norm)
