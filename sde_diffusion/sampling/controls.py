"""Controls on the denoised estimate at every score evaluation: `sample(..., clip_x0=c, threshold=p)`.

Every score s at (x, t) implies Tweedie's estimate x̂₀ = (x + σ²·s)/α. A control replaces it by x̂₀' and hands the
sampler the score that implies x̂₀' instead,

    s' = (α·x̂₀' − x)/σ²,

so every sampler (whatever it computes from the score: a posterior mean, ε̂, a velocity) sees the modified x̂₀.

* clip_x0 = c: x̂₀' = clamp(x̂₀, −c, c), DDPM's `clip_sample` (c = 1 for images in [−1, 1], data.centered).
* threshold = p: Imagen's dynamic thresholding (Saharia et al. 2022) at percentile p: per sample s = max(1, the
  p-quantile of |x̂₀| over its elements), x̂₀' = clamp(x̂₀, −s, s)/s. p is a fraction in (0, 1) (0.995, diffusers'
  `dynamic_thresholding_ratio`) or a percentile in (1, 100) (99.5, the paper's).

With both, thresholding comes first. `ControlledScore` wraps the user's score function inside the framework's
counting, so the NFE does not change.
"""
from __future__ import annotations

import math
from numbers import Real
from typing import Callable, List, Optional

import torch

from ..sdes import SDE, ScoreFn
from .terms import like


def check_clip_x0(c: Optional[float], key: str = "clip_x0") -> None:
    """ValueError naming `key` unless c is None or > 0."""
    if c is not None and not (isinstance(c, Real) and not isinstance(c, bool) and c > 0):
        raise ValueError(f"{key}={c!r}: the bound c of x̂₀ ∈ [−c, c] must be > 0 (1 for images in [−1, 1], "
                         "data.centered), or None for no clipping")


def check_threshold(p: Optional[float], key: str = "threshold") -> None:
    """ValueError naming `key` unless p is None, a fraction in (0, 1) or a percentile in (1, 100)."""
    if p is not None and not (isinstance(p, Real) and not isinstance(p, bool) and 0 < p < 100 and p != 1):
        raise ValueError(f"{key}={p!r}: dynamic thresholding takes the percentile of |x̂₀| as a fraction in (0, 1), "
                         "e.g. 0.995, or in percent in (1, 100), e.g. 99.5 (Imagen's), or None for no thresholding")


def as_fraction(p: float) -> float:
    """A percentile given as a fraction (0.995) or in percent (99.5), as a fraction."""
    return p if p < 1 else p / 100


def row_quantile(v: torch.Tensor, p: float) -> torch.Tensor:
    """The p-quantile of each row of v (batch, n), linear between order statistics (torch.quantile's default,
    without its size limit): (batch,)."""
    v = v.sort(dim=1).values
    position = p * (v.shape[1] - 1)
    low = math.floor(position)
    high = min(low + 1, v.shape[1] - 1)
    return v[:, low] + (position - low) * (v[:, high] - v[:, low])


def dynamic_threshold(x0: torch.Tensor, p: float) -> torch.Tensor:
    """Imagen's dynamic thresholding of x0 (batch, ...): s = max(1, the p-quantile of |x0|) per sample, then
    clamp(x0, −s, s)/s."""
    s = row_quantile(x0.abs().flatten(1), p).clamp(min=1.0)
    s = s.reshape(-1, *[1] * (x0.ndim - 1))
    return x0.clamp(-s, s) / s


class ControlledScore:
    """score_fn with x̂₀ replaced by control(x̂₀) for each control in turn, and the score consistent with the result:
    s' = (α·x̂₀' − x)/σ² (module docstring). Called as score_fn(x, t), t (batch,) in x's dtype."""

    def __init__(self, score_fn: ScoreFn, sde: SDE, controls: List[Callable[[torch.Tensor], torch.Tensor]]):
        self.score_fn, self.sde, self.controls = score_fn, sde, controls

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        time = torch.as_tensor(t, device=x.device).double()
        alpha, sigma = like(self.sde.alpha(time), x), like(self.sde.sigma(time), x)
        x0 = (x + sigma**2 * self.score_fn(x, t)) / alpha
        for control in self.controls:
            x0 = control(x0)
        return (alpha * x0 - x) / sigma**2


def controlled(score_fn: ScoreFn, sde: SDE, clip_x0: Optional[float] = None,
               threshold: Optional[float] = None) -> ScoreFn:
    """score_fn with dynamic thresholding at quantile `threshold`, then clipping of x̂₀ to [−clip_x0, clip_x0]
    (either None: off); score_fn itself when both are off. ValueError for c ≤ 0 or p outside (0, 1)."""
    check_clip_x0(clip_x0)
    check_threshold(threshold)
    controls = []
    if threshold is not None:
        controls.append(lambda x0: dynamic_threshold(x0, as_fraction(threshold)))
    if clip_x0 is not None:
        controls.append(lambda x0: x0.clamp(-clip_x0, clip_x0))
    return ControlledScore(score_fn, sde, controls) if controls else score_fn
