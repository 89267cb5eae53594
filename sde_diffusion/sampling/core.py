"""`sample`: the framework around every sampler.

It draws x from the prior (or takes `x_T`), builds the time grid, and runs the sampler with a score function that
does the bookkeeping, so that samplers only do their arithmetic:

* **NFE**: every score evaluation is counted (constraint's own score calls and the final Tweedie step included).
* **Constraints** (inpainting, colorization: sde_diffusion/controllable.py): before every score evaluation at time t
  the constraint is applied to the state being evaluated, in place (`x.copy_(...)`), so a sampler that passes its
  own state tensor carries the constrained state on. t_prev is None for the first evaluation; for an evaluation
  that completes a grid step (t at or past the next grid time) it is the time of the evaluation that completed the
  step before, so RePaint's jump back spans one step; for any other evaluation (a corrector's repeat, the inner
  stages of a Runge–Kutta step, a second evaluation at the same time) it equals t: replacement only. The returned x
  gets the constraint at eps with the last step's t_prev; then the optional Tweedie step and `constraint.finish`.
  So a sampler should evaluate the score before computing anything else from x in an update (see
  `terms.evaluated`). A multistep sampler can read `score_fn.state_jumps`: True when the constraint also moves the
  coordinates it does not fix (RePaint's rounds), so that earlier evaluations no longer lie on the trajectory.
* **Progress and callback**: the bar advances and callback(i, t, x, x0) fires when an evaluation reaches the next
  grid time t = timesteps[i + 1], after it: x is the (constrained) state evaluated, x0 = (x + σ²·s)/α the
  denoised estimate of its score s. The last step's call gets the state at eps and, as x0, the returned sample
  (the final Tweedie step's, or that state itself without one). A callback taking three positional arguments
  (read once from its signature) is called as callback(i, t, x).
* **Controls on x̂₀** (`clip_x0`, `threshold`; sampling/controls.py) wrap the score function inside the counting:
  every evaluation of every sampler, the final Tweedie step and a constraint's own calls included, returns the
  score of the clipped or thresholded x̂₀, at no extra NFE.
* **Seeds**: `generator` is a torch.Generator for the whole batch, or `SampleGenerators` (one per sample: sample
  i then depends only on its seed, sde_diffusion/generators.py). Samplers draw through `terms.noise`. Three
  depend on the batch all the same: torchsde's Brownian tree (`sde`) serves the batch and takes one seed from all
  the generators, the adaptive `ode` chooses its steps by the whole batch's error, and `pc`'s Langevin corrector
  takes its step size from batch means (score_sde's rule). So does the "auto" grid, measured on a batch.
* **No host round trips** unless asked for: finding which grid step an evaluation completes means reading its time
  back from the device, so the framework does it only for a constraint or a callback (every evaluation), and for
  a progress bar at most every PROGRESS_READ_SECONDS; otherwise it only counts, and a fixed-grid sampler runs
  without a single host synchronisation per step.

Escape hatch: a sampler whose evaluation points are not its accepted states (an adaptive solver: replacement noise
at every Runge–Kutta stage would wreck its error control) declares a `constraint=None` parameter. It then gets
`constrain(x, t, t_prev) -> x` (times as floats or 0-d tensors; None without a constraint) and applies it where it
wants; the framework applies none itself (but still calls `finish`).

A constraint is any object with

    constraint(x, t, t_prev, score_fn, generator) -> x   x has just been moved from t_prev to t (0-d float64 times;
                                                         t_prev None for the prior draw, = t for a repeat);
                                                         score_fn: the counted score (its calls count in nfe)
    constraint.finish(x) -> x                            optional: applied once to the returned sample
    constraint.moves_free_coordinates                    optional bool (default True), see `state_jumps`
"""
from __future__ import annotations

import inspect
import time as time_module
from pathlib import Path
from typing import Callable, Dict, Optional, Protocol, Sequence, Tuple, Union

import torch
from ..progress import Progress

from ..generators import Generator, SampleGenerators
from ..sdes import SDE, ScoreFn, batch_time
from .auto_grid import auto_centre
from .controls import controlled
from .grids import EDM_RHO, GRIDS, SECH_WIDTH, Width, explicit_grid, load_grid, make_grid, sech_widths
from .registry import Sampler, get_sampler
from .terms import denoised, tweedie_denoise

# callback(i, t, x, x0), or callback(i, t, x): see the module docstring
Callback = Callable[..., None]
# Evaluation times within this relative distance of a grid time are that grid time (float32 rounding of t).
GRID_SNAP = 1e-5
# A progress bar alone reads an evaluation's time back from the device at most this often (seconds).
PROGRESS_READ_SECONDS = 0.5


class Constraint(Protocol):
    """What `sample(..., constraint=c)` applies to the state (see the module docstring); `finish` is optional."""

    def __call__(self, x: torch.Tensor, t: torch.Tensor, t_prev: Optional[torch.Tensor], score_fn: ScoreFn,
                 generator: Generator) -> torch.Tensor:
        ...


class CountingScore:
    """Wraps a score function and counts its calls (one call on a batch is one function evaluation)."""

    def __init__(self, score_fn: ScoreFn):
        self.score_fn, self.calls = score_fn, 0

    def __call__(self, x: torch.Tensor, t) -> torch.Tensor:
        self.calls += 1
        return self.score_fn(x, batch_time(t, x))


def _time(t, device=None) -> torch.Tensor:
    """The time as a 0-d float64 tensor on `device`, from a float, a 0-d or a (batch,) tensor: for per-sample times
    (an adaptive solver's) the largest, i.e. that of the least advanced sample."""
    return torch.as_tensor(t, dtype=torch.float64).reshape(-1).max().to(device)


def takes_x0(callback: Callback) -> bool:
    """Whether callback takes a fourth positional argument (x0), read from its signature (False: callback(i, t, x))."""
    parameters = inspect.signature(callback).parameters.values()
    if any(p.kind is p.VAR_POSITIONAL for p in parameters):
        return True
    return sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in parameters) >= 4


def bind(constraint: Constraint, counted: CountingScore, generator: Generator
         ) -> Callable[[torch.Tensor, object, object], torch.Tensor]:
    """constrain(x, t, t_prev) -> x: the constraint with the counted score and the generator filled in, times (floats
    or tensors) as 0-d float64 tensors on x's device. What a sampler that declares `constraint` receives."""
    def constrain(x: torch.Tensor, t, t_prev) -> torch.Tensor:
        t_prev = None if t_prev is None else _time(t_prev, x.device)
        return constraint(x, _time(t, x.device), t_prev, counted, generator)
    return constrain


class FrameworkScore:
    """The score function a sampler gets from `sample`: counts, constrains, reports progress (module docstring)."""

    def __init__(self, counted: CountingScore, sde: SDE, timesteps: torch.Tensor, constraint: Optional[Constraint],
                 generator: Generator, bar, callback: Optional[Callback]):
        self.counted, self.sde, self.constraint, self.generator = counted, sde, constraint, generator
        self.grid = timesteps.cpu()  # float64; evaluation times are compared on the host
        self.bar, self.callback = bar, callback
        self.callback_x0 = callback is not None and takes_x0(callback)
        self.t_prev: Optional[torch.Tensor] = None  # time of the evaluation that completed the last grid step
        self.reached = 0  # grid steps completed, as seen from the evaluation times
        self.state_jumps = constraint is not None and bool(getattr(constraint, "moves_free_coordinates", True))
        self.every_step = constraint is not None or callback is not None  # needs the step of every evaluation
        self.progress = getattr(bar, "enabled", False)
        self.last_read = -float("inf")

    def snap(self, t) -> torch.Tensor:
        """t as a 0-d float64 tensor, replaced by the nearest grid time when within GRID_SNAP of it."""
        time = _time(t, "cpu")
        i = int(torch.argmin((self.grid - time).abs()))
        return self.grid[i].clone() if abs(self.grid[i] - time) <= GRID_SNAP * abs(self.grid[i]) else time

    def constrain(self, x: torch.Tensor, t, t_prev) -> torch.Tensor:
        return x if self.constraint is None else bind(self.constraint, self.counted, self.generator)(x, t, t_prev)

    def __call__(self, x: torch.Tensor, t) -> torch.Tensor:
        if not self.every_step:
            now = time_module.monotonic()
            if not self.progress or now - self.last_read < PROGRESS_READ_SECONDS:
                return self.counted(x, t)  # no bookkeeping: nothing read back from the device
            self.last_read = now
        time = self.snap(t)
        reached = int((self.grid[1:-1] >= time).sum())  # grid steps completed once the state is at `time`
        new_step = reached > self.reached or self.t_prev is None
        if self.constraint is not None:
            x.copy_(self.constrain(x, time, self.t_prev if new_step else time))
        if new_step:
            self.t_prev = time
        score = self.counted(x, t)
        self._advance(reached, x, lambda: denoised(self.sde, x, t, score))
        return score

    def _advance(self, reached: int, x: torch.Tensor, x0: Callable[[], torch.Tensor]) -> None:
        """Progress and callback up to grid step `reached`; x0() gives the denoised estimate (made only when the
        callback takes it)."""
        if reached <= self.reached:
            return
        self.bar.update(reached - self.reached)
        self.reached = reached
        if self.callback is not None:
            t = self.grid[reached].to(x.device)
            if self.callback_x0:
                self.callback(reached - 1, t, x, x0())
            else:
                self.callback(reached - 1, t, x)

    def at_eps(self, x: torch.Tensor) -> torch.Tensor:
        """The sampler's returned state, constrained at eps."""
        return x if self.constraint is None else self.constrain(x, self.grid[-1], self.t_prev)

    def finish(self, x: torch.Tensor, x0: torch.Tensor) -> None:
        """The last progress step and callback (x: the state at eps, x0: the returned sample), and the bar closed."""
        self._advance(len(self.grid) - 1, x, lambda: x0)
        self.bar.close()


def _prior(sde: SDE, shape: Sequence[int], x_T: Optional[torch.Tensor], generator, device, dtype) -> torch.Tensor:
    if x_T is None:
        return sde.prior_sampling(shape, generator=generator, device=device, dtype=dtype)
    if tuple(x_T.shape) != tuple(shape):
        raise ValueError(f"x_T has shape {tuple(x_T.shape)} but shape={tuple(shape)}: pass x_T.shape")
    return x_T.to(device=device or x_T.device, dtype=dtype).clone()  # samplers may write into their state


def default_steps(sampler: Sampler, sde: SDE) -> int:
    """The steps `sample` takes when none are given: the sampler's documented count, else the SDE's N."""
    return sampler.steps if sampler.steps is not None else sde.N


def _timesteps(sde: SDE, sampler: Sampler, steps: Optional[int], eps: Optional[float], grid, rho: float,
               width: Optional[Width], device, probe: Callable[[float], float]) -> torch.Tensor:
    """The grid of a `sample` call; probe(eps) gives the "auto" spacing's centre (run only when that is used)."""
    if rho <= 0:
        raise ValueError(f"rho must be > 0, got {rho}")
    width = sech_widths(width if width is not None else sampler.width if sampler.width is not None else SECH_WIDTH)
    if isinstance(grid, (str, Path)) and str(grid) not in GRIDS:
        grid = load_grid(grid)["times"]  # a grid file (tune_grid's)
    if grid is not None and not isinstance(grid, str):
        ts = explicit_grid(sde, grid, steps, device)
        if eps is not None and abs(float(eps) - ts[-1].item()) > 1e-12:
            raise ValueError(f"eps={eps} disagrees with the given grid, which ends at {ts[-1].item()}: leave eps unset")
        return ts
    steps = default_steps(sampler, sde) if steps is None else int(steps)
    if steps < 1:
        raise ValueError(f"steps must be ≥ 1, got {steps}")
    eps = sde.default_eps if eps is None else float(eps)
    if not (0.0 <= eps < sde.t_max and sde.sigma(torch.tensor(eps, dtype=torch.float64)).item() > 0):
        raise ValueError(f"eps must lie in [0, T={sde.t_max}) where σ(eps) > 0 (so eps > 0 unless the process is noisy "
                         f"at 0, as the 'linear_chain' VP), got {eps}")
    spacing = sampler.grid_for(steps, sde) if grid is None else grid
    if sampler.adaptive and spacing == "auto":
        spacing = sampler.grid  # it uses only the ends: nothing to measure
    centre = probe(eps) if spacing == "auto" else None
    return make_grid(sde, spacing, spacing, steps, eps, rho, device, width, centre)


def sample(score_fn: ScoreFn, sde: SDE, shape: Sequence[int], method: str = "pc", *, steps: Optional[int] = None,
           eps: Optional[float] = None, denoise: bool = True, generator: Generator = None,
           device=None, dtype: torch.dtype = torch.float32, progress: bool = False,
           callback: Optional[Callback] = None, constraint: Optional[Constraint] = None,
           grid: Union[str, Path, Sequence[float], torch.Tensor, None] = None, rho: float = EDM_RHO,
           width: Optional[Width] = None, x_T: Optional[torch.Tensor] = None, clip_x0: Optional[float] = None,
           threshold: Optional[float] = None, **options) -> Tuple[torch.Tensor, int]:
    """Draw `shape[0]` samples with the registered sampler `method`; returns (x, nfe).

    steps: grid steps (default: the sampler's documented count `SAMPLERS[method].steps`, else sde.N). eps: last
    time (default sde.default_eps). grid: a spacing of the steps + 1
    times ("time", "logsnr", "edm" with exponent rho, "quadratic", "sech" with `width` (None: the sampler's),
    "auto": sech centred at the model's data scale, measured on first use (auto_grid.py: AUTO_PROBE_STEPS score
    calls, cached on score_fn, not counted in nfe); None: the sampler's default for that many steps), the times
    themselves (1-D, T → eps; steps and eps then follow from it) or a grid file's path (`tune_grid`, `save_grid`). x_T: start from this prior draw (not modified). denoise: finish with
    a Tweedie step at eps (counted in nfe; never for a sampler that returns x̂₀ itself, `Sampler.returns_x0`).
    generator: a torch.Generator, or SampleGenerators with one generator per sample (shape[0] of them).
    callback(i, t, x, x0) (or (i, t, x)) after every grid step. constraint: see the module docstring. clip_x0 = c:
    x̂₀ clipped to [−c, c] at every score evaluation; threshold = p ∈ (0, 1): Imagen's dynamic thresholding at the
    p-quantile of |x̂₀| (sampling/controls.py; None: off). options: the sampler's own (its signature; a ValueError
    names the valid ones).
    """
    sampler = get_sampler(method)
    options = sampler.check_options(options)
    if isinstance(generator, SampleGenerators) and len(generator) != shape[0]:
        raise ValueError(f"{len(generator)} per-sample generators for {shape[0]} samples: give one per sample")
    controlled_score = controlled(score_fn, sde, clip_x0, threshold)
    timesteps = _timesteps(sde, sampler, steps, eps, grid, rho, width, device,
                           lambda end: auto_centre(score_fn, sde, shape, end, dtype=dtype,
                                                   device=device if device is not None or x_T is None else x_T.device))
    counted = CountingScore(controlled_score)
    bar = Progress(total=len(timesteps) - 1, desc=method, enabled=progress)
    with torch.no_grad():
        x = _prior(sde, shape, x_T, generator, device, dtype)
        timesteps = timesteps.to(x.device)
        framework = FrameworkScore(counted, sde, timesteps, None if sampler.takes_constraint else constraint,
                                   generator, bar, callback)
        passed = {"generator": generator} if sampler.takes_generator else {}
        if sampler.takes_constraint:
            passed["constraint"] = None if constraint is None else bind(constraint, counted, generator)
        x = sampler.fn(framework, sde, x, timesteps, **options, **passed)
        if not torch.is_tensor(x) or tuple(x.shape) != tuple(shape):
            raise ValueError(f"sampler {method!r} returned {type(x).__name__} of shape "
                             f"{tuple(getattr(x, 'shape', ()))}; it must return the state, shaped {tuple(shape)}")
        x = framework.at_eps(x)
        x0 = tweedie_denoise(counted, sde, x, timesteps[-1].to(dtype)) if denoise and not sampler.returns_x0 else x
        framework.finish(x, x0)
        x = x0
        finish = getattr(constraint, "finish", None)
        if finish is not None:
            x = finish(x)
    return x, counted.calls


def resolve_auto(settings: Dict, score_fn: ScoreFn, sde: SDE, shape: Sequence[int], *, device=None,
                 dtype: torch.dtype = torch.float32) -> Dict:
    """`sample` keyword arguments with an "auto" grid (named, or the sampler's default for its steps) replaced by
    its times, measured on score_fn at `shape`: for jobs that build a new score function per batch. Others come
    back as they are (a copy)."""
    sampler = get_sampler(settings["method"])
    steps, grid = settings.get("steps"), settings.get("grid")
    if grid is None and not sampler.adaptive:
        grid = sampler.grid_for(default_steps(sampler, sde) if steps is None else int(steps), sde)
    if not (isinstance(grid, str) and grid == "auto") or sampler.adaptive:
        return dict(settings)
    times = _timesteps(sde, sampler, steps, settings.get("eps"), "auto", settings.get("rho", EDM_RHO),
                       settings.get("width"), None,
                       lambda end: auto_centre(score_fn, sde, shape, end, device=device, dtype=dtype))
    return {**settings, "grid": times, "steps": None, "eps": None}
