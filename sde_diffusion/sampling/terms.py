"""Pieces the samplers share: float64 coefficients cast to the state, noise draws, the denoised estimate, and the
discrete chains' step scale. Notation: α(t), σ(t) of the kernel x_t = α x_0 + σ z, λ = log(α/σ);
x̂_0 = (x + σ²·s)/α is the denoised estimate and ε̂ = −σ·s the predicted noise, s = ∇log p_t(x)."""
from __future__ import annotations

from typing import Tuple

import torch

from .. import discrete
from ..generators import Generator, randn
from ..sdes import SDE, ScoreFn, batch_time, per_sample


def like(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A float64 coefficient (0-d or (batch,)) cast to x's dtype and shaped to broadcast against x."""
    v = v.to(device=x.device, dtype=x.dtype)
    return v if v.ndim == 0 else per_sample(v, x)


def noise(x: torch.Tensor, generator: Generator) -> torch.Tensor:
    """z ~ N(0, I) shaped like x, from `generator`: a torch.Generator for the batch, or `SampleGenerators` (row i
    from sample i's generator). Samplers draw all their noise here."""
    return randn(x.shape, generator, device=x.device, dtype=x.dtype)


def denoised_and_noise(score_fn: ScoreFn, sde: SDE, x: torch.Tensor, t: torch.Tensor
                       ) -> Tuple[torch.Tensor, torch.Tensor]:
    """One score evaluation at time t (0-d float64): returns (x̂_0, ε̂), both like x, with x = α·x̂_0 + σ·ε̂."""
    score = score_fn(x, t.to(x.dtype))
    alpha, sigma = like(sde.alpha(t), x), like(sde.sigma(t), x)
    return (x + sigma**2 * score) / alpha, -sigma * score


def denoised(sde: SDE, x: torch.Tensor, t, score: torch.Tensor) -> torch.Tensor:
    """x̂_0 = (x + σ(t)²·s) / α(t) for the score s at (x, t); t a float, 0-d or (batch,) tensor (in x's dtype)."""
    t = batch_time(t, x)
    return (x + per_sample(sde.sigma(t) ** 2, x) * score) / per_sample(sde.alpha(t), x)


def tweedie_denoise(score_fn: ScoreFn, sde: SDE, x: torch.Tensor, t) -> torch.Tensor:
    """E[x_0 | x_t] = (x_t + σ(t)²·∇log p_t(x_t)) / α(t)  (Tweedie's formula); one score evaluation."""
    t = batch_time(t, x)
    return denoised(sde, x, t, score_fn(x, t))


def evaluated(score_fn: ScoreFn, x: torch.Tensor, t) -> ScoreFn:
    """The score at (x, t), evaluated now and returned by a score function for reuse (ignoring its arguments).

    The framework's constraint acts on x when the score is evaluated, so whatever else an update reads from x must
    be computed after that call; `sde.reverse(evaluated(score_fn, x, t))` makes the SDE's f(x) see the constrained x.
    """
    score = score_fn(x, t)
    return lambda y, s: score


def langevin_step_scale(sde: SDE, t: torch.Tensor) -> torch.Tensor:
    """The Langevin correctors' step scale at times t (batch,): α_i of the DDPM chain for VP, 1 without a chain."""
    return discrete.langevin_step_scale(sde, t)
