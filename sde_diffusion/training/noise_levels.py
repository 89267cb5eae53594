"""Noise-level distributions: where an objective draws its training times t.

    @register_time_sampling("name")
    def fn(sde, n, *, generator=None, option=default, ...) -> t          # n times in (0, T], shape (n,)

The framework also passes, to a function that declares them, `eps` (training.eps, the smallest time), `device`
and `dtype` (of the batch). It draws once for the global batch and hands each process its rows. A function may
return (t, r) instead of t: r (n,) is a per-draw importance ratio multiplying the loss, so the draw changes the
variance of the objective and not its value (`importance`). Otherwise the distribution is part of the objective:
its density over λ multiplies the weighting (losses.effective_weighting).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..options import Registry
from ..sdes import SDE

TIME_SAMPLINGS = Registry("time sampling", leading=("sde", "n"), passed=("generator", "eps", "device", "dtype"),
                          how="@losses.register_time_sampling('name')")
register_time_sampling = TIME_SAMPLINGS.register

# EDM's log-normal noise levels: ln σ̃ ~ N(EDM_P_MEAN, EDM_P_STD²) (Karras et al. 2022, Table 1)
EDM_P_MEAN, EDM_P_STD = -1.2, 1.2


def log_snr_range(sde: SDE, eps: float) -> Tuple[float, float]:
    """(λ(eps), λ(T)), λ the log-SNR."""
    return tuple(float(sde.log_snr(torch.tensor(v, dtype=torch.float64))) for v in (eps, sde.T))


@register_time_sampling("uniform")
def uniform(sde: SDE, n: int, *, generator: Optional[torch.Generator] = None, eps: float = 1e-5, device=None,
            dtype=None) -> torch.Tensor:
    """t ~ U(eps, T)."""
    return torch.rand(n, generator=generator, device=device, dtype=dtype) * (sde.T - eps) + eps


@register_time_sampling("log_normal")
def log_normal(sde: SDE, n: int, *, generator: Optional[torch.Generator] = None, eps: float = 1e-5, device=None,
               dtype=None, p_mean: float = EDM_P_MEAN, p_std: float = EDM_P_STD) -> torch.Tensor:
    """ln σ̃ ~ N(p_mean, p_std²) with σ̃ = σ/α (EDM), as t = λ⁻¹(−ln σ̃) clamped to [eps, T]."""
    log_sigma = torch.randn(n, generator=generator, device=device, dtype=dtype) * p_std + p_mean
    return sde.t_from_log_snr(-log_sigma.double()).clamp(min=eps, max=sde.T).to(log_sigma)


@register_time_sampling("logit_normal")
def logit_normal(sde: SDE, n: int, *, generator: Optional[torch.Generator] = None, eps: float = 1e-5, device=None,
                 dtype=None, mean: float = 0.0, std: float = 1.0) -> torch.Tensor:
    """t/T = sigmoid(u), u ~ N(mean, std²) (Esser et al. 2024, SD3's rectified flow), clamped to [eps, T]."""
    u = torch.randn(n, generator=generator, device=device, dtype=dtype) * std + mean
    return (torch.sigmoid(u) * sde.T).clamp(min=eps, max=sde.T)


@register_time_sampling("uniform_log_snr")
def uniform_log_snr(sde: SDE, n: int, *, generator: Optional[torch.Generator] = None, eps: float = 1e-5,
                    device=None, dtype=None) -> torch.Tensor:
    """λ ~ U(λ(T), λ(eps)), as t = λ⁻¹(λ): density ∝ g²/σ² in t, the ELBO's own (VDM's schedule-free form)."""
    lam_eps, lam_T = log_snr_range(sde, eps)
    u = torch.rand(n, generator=generator, device=device, dtype=torch.float64)
    t = sde.t_from_log_snr(lam_eps + u * (lam_T - lam_eps)).clamp(min=eps, max=sde.T)
    return t.to(dtype if dtype is not None else torch.get_default_dtype())


@register_time_sampling("importance")
def importance(sde: SDE, n: int, *, generator: Optional[torch.Generator] = None, eps: float = 1e-5, device=None,
               dtype=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """t ~ q ∝ g²/σ² (λ uniform, as `uniform_log_snr`) with the ratio r = U(eps, T)'s density / q(t) =
    Z/((T − eps)·g²/σ²), Z = 2(λ(eps) − λ(T)): the objective stays the uniform-t one (Song et al. 2021b's
    importance sampling; with the "elbo" weighting every draw weighs Z/(T − eps))."""
    lam_eps, lam_T = log_snr_range(sde, eps)
    u = torch.rand(n, generator=generator, device=device, dtype=torch.float64)
    t = sde.t_from_log_snr(lam_eps + u * (lam_T - lam_eps)).clamp(min=eps, max=sde.T)
    density = sde.diffusion_squared(t) / sde.sigma(t) ** 2
    ratio = 2.0 * (lam_eps - lam_T) / ((sde.T - eps) * density)
    dtype = dtype if dtype is not None else torch.get_default_dtype()
    return t.to(dtype), ratio.to(dtype)


@register_time_sampling("discrete")
def discrete(sde: SDE, n: int, *, generator: Optional[torch.Generator] = None, device=None,
             dtype=None) -> torch.Tensor:
    """The grid time t_i = i/(N−1)·T of a step i ~ U{0..N−1} of the SDE's N-step chain (DDPM, SMLD; the loss then
    uses the chain's α_i, σ_i: training.continuous=False)."""
    i = torch.randint(0, sde.N, (n,), generator=generator, device=device)
    return i.to(dtype if dtype is not None else torch.get_default_dtype()) / (sde.N - 1) * sde.T
