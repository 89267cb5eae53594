"""Denoising score-matching losses and the optimization step.

All losses take a score function and an SDE, so an exact analytic score tests them as well as a network:

  continuous DSM   E_t E_{x0,z} λ(t) ‖σ(t)·s(x_t, t) + z‖² / σ(t)²·σ(t)² ,  x_t = α(t)x0 + σ(t)z,  t ~ U(eps, T)
                   with λ(t) = σ(t)² (default, "ε-matching") or g(t)² (likelihood weighting, Song et al. 2021b),
                   optionally with t drawn ∝ g²/σ² (importance sampling) instead of uniformly
  discrete DSM     E_i ‖σ_i·s(x_i, t_i) + z‖²,  i ~ U{0..N−1},  x_i = α_i x0 + σ_i z  on the SDE's discrete chain:
                   for VP this is DDPM's L_simple ‖ε̂ − ε‖² (ε̂ = −σ_i s), for VE the SMLD loss σ_i²‖s + z/σ_i‖².
  EDM              E_σ̃ λ(σ̃)‖D(x̃; σ̃) − x0‖²,  ln σ̃ ~ N(P_mean, P_std²),  λ(σ̃) = (σ̃² + σ_d²)/(σ̃·σ_d)²  (Karras et
                   al. 2022) in the scaled variable x̃ = x/α, σ̃ = σ/α of any SDE; D = (x + σ²s)/α is the denoiser
                   the score implies. Per example it equals (σ̃² + σ_d²)/σ_d²·‖σ(t)·s(x_t, t) + z‖².
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
from torch import nn

from . import discrete
from .errors import ConfigError
from .distributed import global_rows
from .parameterization import EDM_SIGMA_DATA
from .sdes import SDE, ScoreFn, per_sample


# EDM's training distribution of the noise level: ln σ̃ ~ N(EDM_P_MEAN, EDM_P_STD²) (Karras et al. 2022, Table 1),
EDM_P_MEAN, EDM_P_STD = -1.2, 1.2
LOSSES = ("dsm", "edm")  # training.loss

Shard = Tuple[int, int]  # (rank, world size): noise is drawn for the global batch, see distributed.global_rows
SINGLE = (0, 1)


def _reduce(per_element: torch.Tensor, reduce_mean: bool) -> torch.Tensor:
    """(batch, ...) → (batch,): mean or sum over all but the batch dimension."""
    flat = per_element.flatten(1)
    return flat.mean(1) if reduce_mean else flat.sum(1)


Noise = Tuple[torch.Tensor, torch.Tensor]  # (t, z): the times (batch,) and the Gaussian noise (batch, ...) of a loss


def uniform_noise(sde: SDE, x0: torch.Tensor, eps: float, generator: Optional[torch.Generator] = None,
                  shard: Shard = SINGLE) -> Noise:
    """t ~ U(eps, T) and z ~ N(0, I), drawn for the global batch (this rank's rows returned)."""
    total, mine = global_rows(x0.shape[0], *shard)
    t = torch.rand(total, generator=generator, device=x0.device, dtype=x0.dtype)[mine] * (sde.T - eps) + eps
    return t, _gaussian(x0, generator, total, mine)


def _gaussian(x0: torch.Tensor, generator, total: int, mine) -> torch.Tensor:
    return torch.randn((total, *x0.shape[1:]), generator=generator, device=x0.device, dtype=x0.dtype)[mine]


def dsm_loss(score_fn: ScoreFn, sde: SDE, x0: torch.Tensor, *, eps: float = 1e-5, reduce_mean: bool = True,
             likelihood_weighting: bool = False, generator: Optional[torch.Generator] = None,
             shard: Shard = SINGLE, noise: Optional[Noise] = None) -> torch.Tensor:
    """Continuous-time denoising score matching; returns the batch mean (a scalar). `noise`: (t, z) drawn
    beforehand by `uniform_noise` (default: drawn here from `generator`).

    Unweighted: ‖σ(t)·s(x_t, t) + z‖². With likelihood weighting: g(t)²·‖s(x_t, t) + z/σ(t)‖², i.e. the
    unweighted term multiplied by g(t)²/σ(t)², which makes the loss an upper bound on the negative ELBO.
    """
    t, z = noise if noise is not None else uniform_noise(sde, x0, eps, generator, shard)
    mean, std = sde.marginal_prob(x0, t)
    score = score_fn(mean + per_sample(std, x0) * z, t)
    losses = _reduce((per_sample(std, x0) * score + z) ** 2, reduce_mean)
    if likelihood_weighting:
        g2 = sde.sde(torch.zeros_like(x0), t)[1] ** 2
        losses = losses * g2 / std**2
    return losses.mean()


def _log_snr_range(sde: SDE, eps: float) -> Tuple[float, float]:
    """(λ(eps), λ(T)), λ the log-SNR."""
    return tuple(float(sde.log_snr(torch.tensor(v, dtype=torch.float64))) for v in (eps, sde.T))


def importance_normalizer(sde: SDE, eps: float) -> float:
    """Z = ∫_eps^T g²/σ² dt = 2(λ(eps) − λ(T)), λ the log-SNR."""
    lam_eps, lam_T = _log_snr_range(sde, eps)
    return 2.0 * (lam_eps - lam_T)


def importance_sampled_times(sde: SDE, n: int, eps: float, generator: Optional[torch.Generator] = None,
                             device=None, shard: Shard = SINGLE) -> Tuple[torch.Tensor, float]:
    """n times in [eps, T] with density q(t) ∝ g(t)²/σ(t)² (Song et al. 2021b), and Z = ∫_eps^T g²/σ² dt.

    g²/σ² = −2 dλ/dt for the log-SNR λ = log(α/σ), so λ is uniform between λ(T) and λ(eps): t = λ⁻¹(λ) and
    Z = 2(λ(eps) − λ(T)). Times are float64 on `device`.
    """
    lam_eps, lam_T = _log_snr_range(sde, eps)
    total, mine = global_rows(n, *shard)
    u = torch.rand(total, generator=generator, device=device, dtype=torch.float64)[mine]
    t = sde.t_from_log_snr(lam_eps + u * (lam_T - lam_eps)).to(device)
    return t.clamp(min=eps, max=sde.T), 2.0 * (lam_eps - lam_T)


def importance_noise(sde: SDE, x0: torch.Tensor, eps: float, generator: Optional[torch.Generator] = None,
                     shard: Shard = SINGLE) -> Noise:
    """t ~ q ∝ g²/σ² (`importance_sampled_times`) and z ~ N(0, I)."""
    t, _ = importance_sampled_times(sde, x0.shape[0], eps, generator, x0.device, shard)
    total, mine = global_rows(x0.shape[0], *shard)
    return t.to(x0.dtype), _gaussian(x0, generator, total, mine)


def importance_sampled_dsm_loss(score_fn: ScoreFn, sde: SDE, x0: torch.Tensor, *, eps: float = 1e-5,
                                reduce_mean: bool = True, generator: Optional[torch.Generator] = None,
                                shard: Shard = SINGLE, noise: Optional[Noise] = None,
                                normalizer: Optional[float] = None) -> torch.Tensor:
    """Likelihood-weighted DSM with t ~ q ∝ g²/σ² instead of uniform t; returns the batch mean (a scalar).
    `noise`: (t, z) from `importance_noise`; `normalizer`: Z (`importance_normalizer`, computed when omitted).

    Per example Z/(T − eps)·‖σ(t)·s(x_t, t) + z‖²: the same expectation as `dsm_loss(..., likelihood_weighting=True)`
    (E_{t~U}[g²/σ²·‖σs + z‖²]) with the weight g²/σ², which spans orders of magnitude, moved into the sampling of t.
    """
    t, z = noise if noise is not None else importance_noise(sde, x0, eps, generator, shard)
    normalizer = importance_normalizer(sde, eps) if normalizer is None else normalizer
    mean, std = sde.marginal_prob(x0, t)
    score = score_fn(mean + per_sample(std, x0) * z, t)
    losses = _reduce((per_sample(std, x0) * score + z) ** 2, reduce_mean)
    return losses.mean() * normalizer / (sde.T - eps)


def discrete_noise(sde: SDE, x0: torch.Tensor, generator: Optional[torch.Generator] = None,
                   shard: Shard = SINGLE) -> Noise:
    """The grid time t_i = i/(N−1)·T of a step i ~ U{0..N−1} of the SDE's N-step chain, and z ~ N(0, I)."""
    total, mine = global_rows(x0.shape[0], *shard)
    i = torch.randint(0, sde.N, (total,), generator=generator, device=x0.device)[mine]
    t = i.to(x0.dtype) / (sde.N - 1) * sde.T
    return t, _gaussian(x0, generator, total, mine)


def discrete_dsm_loss(score_fn: ScoreFn, sde: SDE, x0: torch.Tensor, *, reduce_mean: bool = True,
                      generator: Optional[torch.Generator] = None, shard: Shard = SINGLE,
                      noise: Optional[Noise] = None) -> torch.Tensor:
    """DDPM (VP) / SMLD (VE) loss on the SDE's N-step discrete chain; returns the batch mean (a scalar).

    Step i ~ U{0..N−1} is evaluated at its grid time t_i = i/(N−1)·T with the chain's α_i, σ_i (`noise`: (t_i, z)
    from `discrete_noise`).
    """
    chain = discrete.require_chain(sde, "the DDPM/SMLD loss (training.continuous=False)")
    t, z = noise if noise is not None else discrete_noise(sde, x0, generator, shard)
    alpha, sigma = chain.alpha_sigma(t)
    score = score_fn(per_sample(alpha, x0) * x0 + per_sample(sigma, x0) * z, t)
    return _reduce((per_sample(sigma, x0) * score + z) ** 2, reduce_mean).mean()


def edm_weight(sigma_tilde: torch.Tensor, sigma_data: float = EDM_SIGMA_DATA) -> torch.Tensor:
    """EDM's loss weighting λ(σ̃) = (σ̃² + σ_d²)/(σ̃·σ_d)², which makes the loss of the preconditioned network's raw
    output F unit-weighted (λ·c_out² = 1)."""
    return (sigma_tilde**2 + sigma_data**2) / (sigma_tilde * sigma_data) ** 2


def edm_noise(sde: SDE, x0: torch.Tensor, p_mean: float = EDM_P_MEAN, p_std: float = EDM_P_STD, eps: float = 1e-5,
              generator: Optional[torch.Generator] = None, shard: Shard = SINGLE) -> Noise:
    """ln σ̃ ~ N(p_mean, p_std²) as the time t = λ⁻¹(−ln σ̃) (clamped to [eps, T]), and z ~ N(0, I)."""
    total, mine = global_rows(x0.shape[0], *shard)
    log_sigma = torch.randn(total, generator=generator, device=x0.device, dtype=x0.dtype)[mine] * p_std + p_mean
    t = sde.t_from_log_snr(-log_sigma.double()).clamp(min=eps, max=sde.T).to(x0.dtype)
    return t, _gaussian(x0, generator, total, mine)


def edm_loss(score_fn: ScoreFn, sde: SDE, x0: torch.Tensor, *, sigma_data: float = EDM_SIGMA_DATA,
             p_mean: float = EDM_P_MEAN, p_std: float = EDM_P_STD, eps: float = 1e-5, reduce_mean: bool = True,
             generator: Optional[torch.Generator] = None, shard: Shard = SINGLE,
             noise: Optional[Noise] = None) -> torch.Tensor:
    """EDM's loss (Karras et al. 2022, eq. 2 with Table 1) for any SDE; returns the batch mean (a scalar).

    ln σ̃ ~ N(p_mean, p_std²) gives the time t = λ⁻¹(−ln σ̃) (clamped to [eps, T]; `edm_noise`); with σ̃ = σ(t)/α(t)
    there, x_t = α(t)·x0 + σ(t)·z and the denoiser D = (x_t + σ(t)²·s(x_t, t))/α(t), the loss is λ(σ̃)·‖D − x0‖².
    """
    t, z = noise if noise is not None else edm_noise(sde, x0, p_mean, p_std, eps, generator, shard)
    alpha, sigma = sde.alpha(t), sde.sigma(t)
    x_t = per_sample(alpha, x0) * x0 + per_sample(sigma, x0) * z
    denoised = (x_t + per_sample(sigma**2, x0) * score_fn(x_t, t)) / per_sample(alpha, x0)
    return (edm_weight(sigma / alpha, sigma_data) * _reduce((denoised - x0) ** 2, reduce_mean)).mean()


class Loss:
    """A training objective: `loss(score_fn, x0, generator=None, shard=(0, 1), noise=None)` → the batch mean.

    `loss.draw(x0, generator, shard)` draws the (t, z) the call would draw; passing them back as `noise` gives the
    same value. A compiled step draws outside the graph (torch.compile cannot trace a torch.Generator) and
    compiles the rest whole.
    """

    def __init__(self, evaluate: Callable[..., torch.Tensor], draw: Callable[..., Noise]):
        self.evaluate, self.draw_fn = evaluate, draw

    def draw(self, x0: torch.Tensor, generator: Optional[torch.Generator] = None, shard: Shard = SINGLE) -> Noise:
        return self.draw_fn(x0, generator, shard)

    def __call__(self, score_fn: ScoreFn, x0: torch.Tensor, generator: Optional[torch.Generator] = None,
                 shard: Shard = SINGLE, noise: Optional[Noise] = None) -> torch.Tensor:
        return self.evaluate(score_fn, x0, self.draw(x0, generator, shard) if noise is None else noise)


def get_loss_fn(sde: SDE, *, continuous: bool = True, reduce_mean: bool = True, likelihood_weighting: bool = False,
                eps: float = 1e-5, importance_sampling: bool = False, loss: str = "dsm",
                sigma_data: float = EDM_SIGMA_DATA) -> Loss:
    """The `Loss` of the configured objective (config.training.*): loss_fn(score_fn, x0, generator=None,
    shard=(0, 1)) → the batch mean.

    loss: "dsm" (denoising score matching, continuous or on the discrete chain) or "edm" (`edm_loss` with
    sigma_data). importance_sampling (with likelihood_weighting): t ~ g²/σ² (`importance_sampled_dsm_loss`).
    """
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}; available: {list(LOSSES)}")
    if loss == "edm":
        if not continuous or likelihood_weighting or importance_sampling:
            raise ValueError("the EDM loss has its own weighting and noise distribution: use it with "
                             "training.continuous=True, likelihood_weighting=False and importance_sampling=False")
        return Loss(lambda score_fn, x0, noise: edm_loss(score_fn, sde, x0, sigma_data=sigma_data, eps=eps,
                                                         reduce_mean=reduce_mean, noise=noise),
                    lambda x0, generator, shard: edm_noise(sde, x0, eps=eps, generator=generator, shard=shard))
    if importance_sampling and not (continuous and likelihood_weighting):
        raise ValueError("importance sampling of t applies to the likelihood-weighted continuous loss: set "
                         "training.likelihood_weighting=True and training.continuous=True, or "
                         "training.importance_sampling=False")
    if importance_sampling:
        normalizer = importance_normalizer(sde, eps)
        return Loss(lambda score_fn, x0, noise: importance_sampled_dsm_loss(
            score_fn, sde, x0, eps=eps, reduce_mean=reduce_mean, noise=noise, normalizer=normalizer),
            lambda x0, generator, shard: importance_noise(sde, x0, eps, generator, shard))
    if continuous:
        return Loss(lambda score_fn, x0, noise: dsm_loss(score_fn, sde, x0, eps=eps, reduce_mean=reduce_mean,
                                                         likelihood_weighting=likelihood_weighting, noise=noise),
                    lambda x0, generator, shard: uniform_noise(sde, x0, eps, generator, shard))
    if likelihood_weighting:
        raise ValueError("likelihood weighting applies to the continuous loss only: set training.continuous=True "
                         "or training.likelihood_weighting=False")
    discrete.require_chain(sde, "the DDPM/SMLD loss (training.continuous=False)")
    return Loss(lambda score_fn, x0, noise: discrete_dsm_loss(score_fn, sde, x0, reduce_mean=reduce_mean, noise=noise),
                lambda x0, generator, shard: discrete_noise(sde, x0, generator, shard))


def check_config(config) -> None:
    """training.loss, training.eps and the weighting keys. Raises ConfigError naming the key."""
    t = config.training
    if t.loss not in LOSSES:
        raise ConfigError(f"training.loss={t.loss!r} is not one of {list(LOSSES)}")
    if not 0.0 < t.eps < 1.0:
        raise ConfigError(f"training.eps must lie in (0, 1), got {t.eps}")
    if not t.continuous and t.likelihood_weighting:
        raise ConfigError("training.likelihood_weighting=True needs training.continuous=True")
    if t.importance_sampling and not t.likelihood_weighting:
        raise ConfigError("training.importance_sampling=True samples t for the likelihood-weighted loss: set "
                          "training.likelihood_weighting=True")
    if t.loss == "edm" and (not t.continuous or t.likelihood_weighting or t.importance_sampling):
        raise ConfigError("training.loss='edm' has its own weighting λ(σ) and log-normal noise levels: set "
                          "training.continuous=True, training.likelihood_weighting=False and "
                          "training.importance_sampling=False")


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
