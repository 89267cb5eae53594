"""Time grids chosen for a model, a solver and a budget of score evaluations (`tune_grid`), their JSON files, and
the number of steps a sampler can take within a budget (`steps_for_nfe`).

The tuned grid minimises the RMS distance, at the grid's last time, between the solver's output and a tight
probability-flow ODE solution from the same prior draws (a small batch): the quantity a deterministic solver's
error is made of. The interior times move freely between T and eps: they are the cumulative sums of
softmax-weighted increments of the starting spacing's coordinate (so they stay ordered), optimised by Powell's
derivative-free method (any registered sampler works: nothing needs to be differentiable).
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Sequence

import numpy as np
import torch

from ..sdes import SDE, ScoreFn
from .auto_grid import auto_centre
from .core import sample
from .flow import integrate_pf_ode
from .grids import EDM_RHO, SECH_WIDTH, Width, make_grid
from .registry import get_sampler

# Points of the starting spacing's coordinate table that tuned times are interpolated from.
TABLE_POINTS = 4096


def _zero_score(x: torch.Tensor, t) -> torch.Tensor:
    return torch.zeros_like(x)


def _counting_spacing(grid):
    """The grid steps_for_nfe counts on: any fixed spacing counts alike, so none to measure ("auto" → "sech")."""
    return "logsnr" if grid is None else "sech" if isinstance(grid, str) and grid == "auto" else grid


def steps_for_nfe(sde: SDE, method: str, nfe: int, *, denoise: bool = False, **options) -> int:
    """The most steps whose score calls (plus the final denoising call if denoise) stay within nfe. ValueError for an
    adaptive sampler or a budget too small for one step. Counted by running the sampler on one point with a zero
    score, so any registered sampler's step structure is respected."""
    if get_sampler(method).adaptive:
        raise ValueError(f"{method!r} chooses its own number of score calls; give it a tolerance, not an NFE budget")
    best = None
    for steps in range(1, nfe + 1):
        _, calls = sample(_zero_score, sde, (1, 1), method, steps=steps, denoise=denoise,
                          generator=torch.Generator().manual_seed(0),
                          **{**options, "grid": _counting_spacing(options.get("grid"))})
        if calls > nfe:
            break
        best = steps
    if best is None:
        raise ValueError(f"{method!r} needs more than {nfe} score calls for a single step")
    return best


def _reference(score_fn: ScoreFn, sde: SDE, z: torch.Tensor, t0: float, t1: float, rtol: float) -> torch.Tensor:
    with torch.no_grad():
        return integrate_pf_ode(score_fn, sde, z, t0, t1, rtol=rtol, atol=rtol, backend="torch")


def tune_grid(score_fn: ScoreFn, sde: SDE, shape: Sequence[int], method: str, nfe: int, *,
              denoise: bool = False, eps: Optional[float] = None, start: Optional[str] = None, rho: float = EDM_RHO,
              width: Optional[Width] = None,
              evaluations: Optional[int] = None, reference_rtol: float = 1e-7, seed: int = 0,
              dtype: torch.dtype = torch.float32, device=None, report: Optional[Dict] = None,
              **options) -> torch.Tensor:
    """Times T = t_0 > … > t_steps = eps for `method` within `nfe` score calls (`denoise`: one of them is the final
    Tweedie step), chosen to minimise the RMS distance of the solver's output to the probability-flow solution on
    shape[0] prior draws (seeded by `seed`). 1-D float64; `sample(..., grid=times)` uses them.

    start: the spacing the search starts from (default: the sampler's for that many steps; rho and width as in
    `sample`). evaluations: solver runs allowed to the search (default 60 per free time). report: if a dict,
    receives the start and final RMS errors and the runs made. options: the sampler's own. The tuned grid is never
    worse than the start on this batch (the search keeps the best point); on fresh draws it generalises when
    shape[0] is a few hundred or more.
    """
    sampler = get_sampler(method)
    options = sampler.check_options(options)
    steps = steps_for_nfe(sde, method, nfe, denoise=denoise, **options)
    eps = sde.default_eps if eps is None else float(eps)
    spacing = start or sampler.grid_for(steps, sde)
    width = width if width is not None else sampler.width if sampler.width is not None else SECH_WIDTH
    centre = auto_centre(score_fn, sde, shape, eps, device=device, dtype=dtype) if spacing == "auto" else None
    table = make_grid(sde, spacing, spacing, TABLE_POINTS, eps, rho, width=width,
                      centre=centre).numpy()  # t at u = j/points
    coordinate = np.linspace(0.0, 1.0, TABLE_POINTS + 1)
    z = sde.prior_sampling(tuple(shape), generator=torch.Generator().manual_seed(seed), dtype=dtype)
    z = z.to(device) if device is not None else z
    target = _reference(score_fn, sde, z, sde.t_max, eps, reference_rtol)
    free = steps - 1

    def times_of(theta: np.ndarray) -> torch.Tensor:
        logits = np.concatenate([[0.0], theta])
        weights = np.exp(logits - logits.max())
        u = np.concatenate([[0.0], np.cumsum(weights / weights.sum())])
        u[-1] = 1.0
        t = np.interp(u, coordinate, table)
        return torch.from_numpy(t)

    runs = [0]

    def error(theta: np.ndarray) -> float:
        runs[0] += 1
        times = times_of(theta)
        if not bool((times[1:] < times[:-1]).all()):
            return math.inf
        with torch.no_grad():
            x, _ = sample(score_fn, sde, tuple(shape), method, grid=times, x_T=z, denoise=False, dtype=dtype,
                          generator=torch.Generator(device=z.device).manual_seed(seed + 1), **options)
        value = (x.double() - target.double()).pow(2).mean().sqrt().item()
        return math.log(value) if value > 0 and math.isfinite(value) else math.inf

    theta0 = np.zeros(free)
    start_error = error(theta0)
    best_theta, best_error = theta0, start_error
    if free > 0:
        from scipy.optimize import minimize

        budget = evaluations or 60 * free
        result = minimize(error, theta0, method="Powell", options=dict(maxfev=budget, xtol=1e-3, ftol=1e-4))
        if result.fun < best_error:
            best_theta, best_error = result.x, float(result.fun)
    if report is not None:
        report.update(method=method, nfe=nfe, steps=steps, start=spacing, rms_start=math.exp(start_error),
                      rms_tuned=math.exp(best_error), runs=runs[0], batch=int(shape[0]))
    return times_of(best_theta)
