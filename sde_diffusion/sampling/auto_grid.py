"""The "auto" spacing: the "sech" spacing centred at the data scale of the model being sampled.

With a handful of steps the best place for them depends on the data's scale (BENCHMARKS.md, few-step grids): a
mixture of modes of std 0.1 wants them near σ/α ≈ 0.05, one spread over ±3 near σ/α ≈ 0.7. The model says which:
along probability-flow paths the denoiser D(x, λ) = (x + σ²·score)/α moves from the data mean to a sample, and the
σ/α by which most of that motion is done is the data's scale. So on first use:

1. solve the probability-flow ODE with AUTO_PROBE_STEPS λ-uniform steps of DPM-Solver++(2M) (data prediction) on
   prior draws of the caller's shape (fixed seed AUTO_SEED, not the caller's generator), recording D at each step;
   S = RMS spread of the endpoints x/α about their mean over the batch (over all elements for a batch of one);
2. m_k = RMS(D_{k+1} − D_k) · S/√(S² + σ̃_k²), σ̃_k = σ/α at step k's middle: D's motion, weighted by how much of
   it still moves the endpoint (for Gaussian data a change of D at σ̃ reaches the end shrunk by s/√(s² + σ̃²); a
   network's D is dominated by its error where σ̃ ≫ S, and this keeps that out);
3. σ̃_q = σ/α at which a fraction AUTO_QUANTILE of Σ m_k is done (linear in λ within a step);
   centre = AUTO_CENTRE_FACTOR · σ̃_q, to AUTO_DIGITS significant digits. For data N(μ, s²I):
   σ̃_q = s·√(1/q − 1) = s/3, centre 0.4·s.

Cost: AUTO_PROBE_STEPS score calls on one batch of the caller's shape, once per (score function, SDE, eps, sample
shape, dtype, device): the result is cached on the score-function object (a bound method: on its object), which
must stay the same object for the cache to apply (jobs that rebuild it per batch resolve the grid once with
`sampling.resolve_auto`); weights changed in place are not noticed. These calls are not counted in `sample`'s nfe. AUTO_QUANTILE and AUTO_CENTRE_FACTOR were chosen on the selection family of random
mixtures by the worst ratio to diffusers' best scheduler at NFE 5 and 6, and verified on other members
(benchmarks/few_step_grids.py, BENCHMARKS.md).
"""
from __future__ import annotations

import inspect
import math
import warnings
import weakref
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import torch

from ..sdes import SDE, ScoreFn, batch_time
from .grids import SECH_CENTER_SIGMA

AUTO_PROBE_STEPS = 48
AUTO_QUANTILE = 0.9
AUTO_CENTRE_FACTOR = 1.2
AUTO_SEED = 0
# The centre is rounded to this many significant digits (≤ 5 % apart), so that processes whose model outputs differ
# in the last bits (GPU kernels, ranks, a resumed run) fit the same grid.
AUTO_DIGITS = 2

# score function (a bound method's object) → {(its function if a method, SDE class and parameters, eps, shape, dtype,
# device): σ̃_q}; entries die with the score function. Weights changed in place are not noticed.
_CACHE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def denoiser_motion(score_fn: ScoreFn, sde: SDE, x: torch.Tensor, eps: float, steps: int = AUTO_PROBE_STEPS):
    """(λ, m): the first `steps` of steps + 1 λ-uniform nodes T → eps (float64) and, for k < steps − 1, D's weighted
    motion m_k = RMS(D(λ_{k+1}) − D(λ_k)) · S/√(S² + σ̃_k²) along DPM-Solver++(2M) paths from x (module docstring)."""
    lam = torch.linspace(float(sde.log_snr(torch.tensor(sde.t_max, dtype=torch.float64))),
                         float(sde.log_snr(torch.tensor(eps, dtype=torch.float64))), steps + 1, dtype=torch.float64)
    times = sde.t_from_log_snr(lam)
    times[0], times[-1] = sde.t_max, eps
    alpha, sigma = sde.alpha(times).numpy(), sde.sigma(times).numpy()  # host floats: no device reads per step
    decay = -float(np.expm1(-(lam[1] - lam[0]).numpy()))  # 1 − e^{−h}
    device_times = times.to(x.device, x.dtype)
    denoised, motion = None, []
    for k in range(steps):
        score = score_fn(x, batch_time(device_times[k], x))
        d = (x + float(sigma[k]) ** 2 * score) / float(alpha[k])
        if denoised is not None:
            motion.append((d - denoised).double().pow(2).mean().sqrt())
        slope = d if denoised is None else 1.5 * d - 0.5 * denoised  # 2M on a uniform λ grid (r = 1)
        x = float(sigma[k + 1] / sigma[k]) * x + float(alpha[k + 1]) * decay * slope
        denoised = d
    end = x.double() / float(alpha[-1])
    spread = (end - (end.mean(0) if len(end) > 1 else end.mean())).pow(2).mean().sqrt().cpu()
    sigma_middle = torch.exp(-0.5 * (lam[:steps - 1] + lam[1:steps]))
    return lam[:steps], torch.stack(motion).cpu() * spread / torch.sqrt(spread**2 + sigma_middle**2)


def quantile_sigma(lam: torch.Tensor, motion: torch.Tensor, q: float = AUTO_QUANTILE) -> float:
    """σ/α = e^{−λ} at which a fraction q of the total motion is done (motion k spans λ_k → λ_{k+1}; linear in λ
    within it)."""
    done = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(motion.double(), 0)])
    done = (done / done[-1]).numpy()
    return math.exp(-float(np.interp(q, done, lam.numpy())))


def _describe(sde: SDE) -> tuple:
    """The SDE's class and parameters (numbers, strings, small tensors): equal for SDEs that give the same grid."""
    items = []
    for name, value in sorted(getattr(sde, "__dict__", {}).items()):
        if torch.is_tensor(value) and value.numel() <= 64:
            value = tuple(value.flatten().tolist())
        if isinstance(value, (int, float, str, bool, tuple, np.number)):
            items.append((name, value))
    return (type(sde).__qualname__, *items)


def _cache_for(score_fn: ScoreFn) -> Tuple[Dict, tuple]:
    """The cache dict of score_fn's centres and a key part: a bound method is cached on its object (each access
    makes a new method object) with its function in the key; a callable that cannot be weakly referenced gets a
    throw-away dict."""
    owner, function = (score_fn.__self__, score_fn.__func__) if inspect.ismethod(score_fn) else (score_fn, None)
    try:
        return _CACHE.setdefault(owner, {}), (function,)
    except TypeError:
        return {}, ()


def auto_centre(score_fn: ScoreFn, sde: SDE, shape: Sequence[int], eps: Optional[float] = None, *,
                device=None, dtype: torch.dtype = torch.float32) -> float:
    """The σ/α the "auto" spacing centres on for this model (module docstring), from the cache when there. Falls
    back to grids.SECH_CENTER_SIGMA, with a warning, when the model's output is not finite."""
    eps = sde.default_eps if eps is None else float(eps)
    device = torch.empty(0, device=device).device  # "cuda" → cuda:0, None → the default device
    cached, owner_key = _cache_for(score_fn)
    key = (*owner_key, _describe(sde), eps, tuple(shape), dtype, str(device))
    if key not in cached:
        with torch.no_grad():
            x = sde.prior_sampling(tuple(shape), generator=torch.Generator(device=device).manual_seed(
                AUTO_SEED), device=device, dtype=dtype)
            lam, motion = denoiser_motion(score_fn, sde, x, eps)
        if not bool(torch.isfinite(motion).all()) or not motion.sum() > 0:
            warnings.warn(f"the 'auto' grid: the probe measured no finite motion of the denoiser (non-finite "
                          f"model output, or a batch of a single number: no spread); using the fixed sech centre "
                          f"σ/α = {SECH_CENTER_SIGMA}", RuntimeWarning)
            cached[key] = SECH_CENTER_SIGMA / AUTO_CENTRE_FACTOR
        else:
            cached[key] = quantile_sigma(lam, motion)
    return float(f"{AUTO_CENTRE_FACTOR * cached[key]:.{AUTO_DIGITS}g}")
