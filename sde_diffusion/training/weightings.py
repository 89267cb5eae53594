"""Loss weightings: how much each noise level counts, as a weight on the ε-error ‖ε̂ − ε‖² (ε̂ = −σ·s).

Every objective here is E_t[ r(t) · w(λ_t) · ‖ε̂(x_t, t) − ε‖² ] with t from a noise-level distribution
(noise_levels.py; r its importance ratio, 1 for most) and λ = log(α/σ) the log-SNR. A weighting is

    @register_weighting("name")
    def fn(log_snr, *, option=default, ...) -> weight        # shapes (batch,) → (batch,)

and may also declare `t` (the times) and `sde`, which the framework passes: the weights that depend on the
process and not on λ alone (the ELBO's g²/σ², the v- and velocity-errors). Papers that weight another error
convert by the identities below (x̂₀ − x₀ = −(σ/α)(ε̂ − ε), so ‖x̂₀ − x₀‖² = e^{−2λ}‖ε̂ − ε‖²).
"""
from __future__ import annotations

import torch

from ..options import Registry
from ..parameterization import EDM_SIGMA_DATA
from ..sdes import SDE, time_derivative

WEIGHTINGS = Registry("weighting", leading=("log_snr",), passed=("t", "sde"),
                      how="@losses.register_weighting('name')")
register_weighting = WEIGHTINGS.register

MIN_SNR_GAMMA = 5.0  # Hang et al. 2023's γ
SIGMOID_BIAS = 2.0


def snr(log_snr: torch.Tensor) -> torch.Tensor:
    """α²/σ² = e^{2λ}."""
    return torch.exp(2 * log_snr)


@register_weighting("eps")
def eps_weighting(log_snr: torch.Tensor) -> torch.Tensor:
    """1: the plain ε-MSE (DDPM's L_simple; score_sde's DSM with λ(t) = σ²)."""
    return torch.ones_like(log_snr)


@register_weighting("elbo")
def elbo_weighting(log_snr: torch.Tensor, *, t: torch.Tensor, sde: SDE) -> torch.Tensor:
    """g(t)²/σ(t)² = −2 dλ/dt: score_sde's likelihood weighting, the ELBO's density in t (uniform t) —
    constant per unit λ."""
    t = t.double()
    return (sde.diffusion_squared(t) / sde.sigma(t) ** 2).to(log_snr.dtype)


@register_weighting("x0")
def x0_weighting(log_snr: torch.Tensor) -> torch.Tensor:
    """e^{−2λ} = 1/SNR: the plain x₀-MSE ‖x̂₀ − x₀‖²."""
    return torch.exp(-2 * log_snr)


@register_weighting("v")
def v_weighting(log_snr: torch.Tensor, *, t: torch.Tensor, sde: SDE) -> torch.Tensor:
    """((α² + σ²)/α)²: the plain v-MSE ‖v̂ − v‖², v = α·ε − σ·x₀ (Salimans & Ho 2022; for VP it is 1 + e^{−2λ},
    their "SNR + 1" weighting of the x₀-error)."""
    t = t.double()
    alpha, sigma = sde.alpha(t), sde.sigma(t)
    return ((alpha**2 + sigma**2) / alpha).pow(2).to(log_snr.dtype)


@register_weighting("velocity")
def velocity_weighting(log_snr: torch.Tensor, *, t: torch.Tensor, sde: SDE) -> torch.Tensor:
    """(σ′ − α′·σ/α)²: the plain velocity-MSE ‖v̂ − dx_t/dt‖² of flow matching (rectified flow: 1/α²)."""
    t = t.double()
    alpha, sigma = sde.alpha(t), sde.sigma(t)
    d_alpha, d_sigma = time_derivative(sde.alpha, t), time_derivative(sde.sigma, t)
    return (d_sigma - d_alpha * sigma / alpha).pow(2).to(log_snr.dtype)


@register_weighting("edm")
def edm_weighting(log_snr: torch.Tensor, *, sigma_data: float = EDM_SIGMA_DATA) -> torch.Tensor:
    """(σ̃² + σ_d²)/σ_d², σ̃ = σ/α = e^{−λ}: EDM's λ(σ̃) = (σ̃² + σ_d²)/(σ̃·σ_d)² on ‖D − x₀‖² (Karras et al. 2022)."""
    return (torch.exp(-2 * log_snr) + sigma_data**2) / sigma_data**2


@register_weighting("min_snr")
def min_snr_weighting(log_snr: torch.Tensor, *, gamma: float = MIN_SNR_GAMMA) -> torch.Tensor:
    """min(SNR, γ)/SNR: Min-SNR-γ (Hang et al. 2023), min(SNR, γ) on the x₀-error."""
    ratio = snr(log_snr)
    return torch.clamp(ratio, max=gamma) / ratio


@register_weighting("soft_min_snr")
def soft_min_snr_weighting(log_snr: torch.Tensor, *, gamma: float = MIN_SNR_GAMMA) -> torch.Tensor:
    """γ/(SNR + γ): the soft minimum 1/(1/SNR + 1/γ) of SNR and γ on the x₀-error (Crowson et al. 2024)."""
    return gamma / (snr(log_snr) + gamma)


@register_weighting("sigmoid")
def sigmoid_weighting(log_snr: torch.Tensor, *, bias: float = SIGMOID_BIAS) -> torch.Tensor:
    """sigmoid(b − λ) (Kingma & Gao 2023): monotonic in λ, so the objective is an ELBO of noise-augmented data."""
    return torch.sigmoid(bias - log_snr)
