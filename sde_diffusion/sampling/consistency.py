"""Multistep consistency sampling (Song et al. 2023, Algorithm 1) for a consistency model of any SDE.

A consistency model (parameterization "consistency") gives f(x_t, t), the end at eps of the probability-flow
trajectory through x_t, as its Tweedie estimate x̂₀ (x̃ units: the state at eps over α(eps)). One call at T gives a
sample; each further grid time t_i re-noises it forward from eps, x̃ = x̂₀ + √(s(t_i)² − s(eps)²)·z with s = σ/α,
and maps it back. The result is x̂₀ itself: no final Tweedie step.
"""
from __future__ import annotations

import torch

from ..sdes import SDE, ScoreFn
from .registry import register_sampler
from .terms import denoised_and_noise, like, noise


def noise_level(sde: SDE, t: torch.Tensor) -> torch.Tensor:
    """s(t) = σ(t)/α(t), EDM's noise level of the SDE (same shape as t)."""
    return sde.sigma(t) / sde.alpha(t)


@register_sampler("consistency", grid="edm", steps=1, few_step_grid=None, returns_x0=True,
                  parameterization="consistency")
def consistency_sampler(score_fn: ScoreFn, sde: SDE, x: torch.Tensor, timesteps: torch.Tensor, *,
                        generator=None) -> torch.Tensor:
    """x̂₀ = f(x_T, T), then for each grid time t_i before eps: x̂₀ = f(α(t_i)·(x̂₀ + √(s_i² − s_eps²)·z), t_i).
    One score call per step; returns x̂₀ (sample's `denoise` adds nothing)."""
    s_end = noise_level(sde, timesteps[-1])
    x0 = denoised_and_noise(score_fn, sde, x, timesteps[0])[0]
    for t in timesteps[1:-1]:
        spread = torch.sqrt((noise_level(sde, t) ** 2 - s_end**2).clamp(min=0))
        x_tilde = x0 + like(spread, x0) * noise(x0, generator)
        x0 = denoised_and_noise(score_fn, sde, like(sde.alpha(t), x0) * x_tilde, t)[0]
    return x0
