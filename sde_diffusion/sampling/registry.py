"""The sampler registry: `register_sampler`, the options a sampler takes (read from its signature), and the text
form `method[:option=value,...][@steps]` that configs and `--mode compare` use.

A sampler is a function

    fn(score_fn, sde, x, timesteps, *, option=default, ..., generator=None) -> x

x: the prior draw (batch, ...); timesteps: 1-D float64 tensor from T down to eps; every keyword parameter with a
default is an option, except the framework's names: `generator` (declared by samplers that draw noise: the
framework passes the caller's generator) and `constraint` (declared only by samplers that apply constraints
themselves, see sde_diffusion/sampling/core.py). An option annotated `Literal[...]` only takes those values.
Draw noise with `terms.noise(x, generator)`: the generator may be per-sample (`SampleGenerators`), which
torch.randn does not take.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from dataclasses import replace as replace_fields
from typing import Any, Callable, Dict, Optional, Tuple

from ..options import Option, check_option, literal_choices, type_hints
from ..options import coerce as _coerce
from ..options import parse_options as _parse_options
from ..sdes import SDE
from .controls import check_clip_x0, check_threshold
from .grids import DEFAULT_GRID, FEW_STEP_GRID, GRID_NAMES, Width, default_spacing, sech_widths

# Keywords of `sample` (the framework's); a sampler may not use them as option names.
RESERVED = ("steps", "eps", "denoise", "device", "dtype", "progress", "callback", "grid", "rho", "width", "x_T", "method",
            "shape", "clip_x0", "threshold")
# Framework values a sampler receives by declaring a parameter of this name.
PASSED = ("generator", "constraint")
SPEC_FORMAT = "'method[:option=value,...]', e.g. 'dpm_solver:order=2'"


@dataclass(frozen=True)
class Sampler:
    """A registered sampler: `fn`, its options, whether it takes the generator and the constraint, its default
    time grid (GRID_NAMES), the one it takes up to grids.FEW_STEPS steps (`few_step_grid`; None: `grid` at any
    count; `grid_for(steps)` says which applies), the (noisy-side, clean-side) widths of its "sech" spacing (None:
    grids.SECH_WIDTH),
    its documented step count `steps` (`sample`'s default; None: the SDE's N), whether it is adaptive (chooses
    its own steps and score calls; only the grid's ends matter), whether it returns the clean estimate itself
    (`returns_x0`: `sample` then adds no Tweedie step) and the parameterization its score must come from
    (`parameterization`, e.g. "consistency"; None: any score). Calling it runs `fn` directly (no framework: no
    constraint, counting, progress or callback) with checked options."""

    name: str
    fn: Callable
    grid: str = DEFAULT_GRID
    options: Dict[str, Option] = field(default_factory=dict)
    takes_generator: bool = False
    takes_constraint: bool = False
    adaptive: bool = False
    width: Optional[Tuple[float, float]] = None
    steps: Optional[int] = None
    few_step_grid: Optional[str] = FEW_STEP_GRID
    returns_x0: bool = False
    parameterization: Optional[str] = None

    def grid_for(self, steps: int, sde: Optional[SDE] = None) -> str:
        """The spacing of a `steps`-step grid when the caller names none: "time" means the SDE's own clock
        (`sde.sampling_clock`; uniform t when no SDE is given)."""
        spacing = default_spacing(steps, self.grid, self.few_step_grid)
        if spacing == "time" and sde is not None:
            spacing = sde.sampling_clock
            if spacing not in GRID_NAMES or spacing == "auto":
                raise ValueError(f"{type(sde).__name__}.sampling_clock={spacing!r} must be one of "
                                 f"{[g for g in GRID_NAMES if g != 'auto']}")
        return spacing

    def check_options(self, options: Dict[str, Any]) -> Dict[str, Any]:
        """options with config-string values converted; ValueError naming the sampler, option and valid options."""
        return {key: self.check_option(key, value) for key, value in options.items()}

    def check_option(self, key: str, value: Any) -> Any:
        hint = f" (and sample's {list(SPEC_KEYWORDS)} in text specs)" if key in RESERVED else ""
        return check_option("sampler", self.name, self.options, key, value, hint)

    def describe_options(self) -> str:
        return ", ".join(o.describe() for o in self.options.values()) or "none"

    def __call__(self, score_fn, sde, x, timesteps, *, generator=None, **options):
        passed = {"generator": generator} if self.takes_generator else {}
        return self.fn(score_fn, sde, x, timesteps, **self.check_options(options), **passed)


SAMPLERS: Dict[str, Sampler] = {}


def register_sampler(name: str, *, grid: str = DEFAULT_GRID, steps: Optional[int] = None,
                     width: Optional[Width] = None, adaptive: bool = False,
                     few_step_grid: Optional[str] = FEW_STEP_GRID, returns_x0: bool = False,
                     parameterization: Optional[str] = None,
                     replace: bool = False) -> Callable[[Callable], Callable]:
    """Decorator: make `fn(score_fn, sde, x, timesteps, **options) -> x` the sampling method `name` everywhere
    (`sample`, `--mode sample/eval/compare`). grid: the default spacing of its time grid (grids.DEFAULT_GRID, the
    built-in solvers' spacing, unless it says otherwise); steps: its documented step count, `sample`'s default
    (None: the SDE's N); few_step_grid: its spacing up to grids.FEW_STEPS steps (grids.FEW_STEP_GRID, as the
    built-ins'; None: `grid` at every count); width: that of its "sech" spacing (None: grids.SECH_WIDTH).
    adaptive: it picks its own steps (steps and NFE budgets do not apply). returns_x0: its result is the clean
    estimate already (`sample` adds no Tweedie step). parameterization: the one its score must come from (the
    `consistency` sampler: "consistency"; jobs refuse other models). Registering a taken name is a ValueError
    unless replace=True. Returns fn unchanged."""
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"a sampler name must be an identifier such as 'my_euler', got {name!r}")
    if grid not in GRID_NAMES:
        raise ValueError(f"sampler {name!r}: default grid {grid!r} is not one of {list(GRID_NAMES)}")
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise ValueError(f"sampler {name!r}: steps={steps!r} must be a whole number ≥ 1 (or None: the SDE's N)")
    if few_step_grid is not None and few_step_grid not in GRID_NAMES:
        raise ValueError(f"sampler {name!r}: few_step_grid {few_step_grid!r} is not one of {list(GRID_NAMES)} "
                         "(or None)")
    if width is not None:
        sech_widths(width)

    def decorate(fn: Callable) -> Callable:
        if name in SAMPLERS and not replace:
            raise ValueError(f"a sampler named {name!r} is already registered ({_where(SAMPLERS[name].fn)}): pick "
                             "another name or pass replace=True")
        sampler = sampler_from_function(name, fn, grid, adaptive, width, steps, few_step_grid)
        SAMPLERS[name] = replace_fields(sampler, returns_x0=returns_x0, parameterization=parameterization)
        return fn
    return decorate


def _where(fn: Callable) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', fn)}"


def sampler_from_function(name: str, fn: Callable, grid: str = DEFAULT_GRID, adaptive: bool = False,
                          width: Optional[Width] = None, steps: Optional[int] = None,
                          few_step_grid: Optional[str] = FEW_STEP_GRID) -> Sampler:
    """Read the options from fn's signature; a ValueError for a signature the framework cannot call."""
    params = list(inspect.signature(fn).parameters.values())
    positional = [p for p in params[:4] if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(positional) < 4:
        raise ValueError(f"sampler {name!r}: the signature must start with (score_fn, sde, x, timesteps), got "
                         f"{inspect.signature(fn)}")
    hints = type_hints(fn)
    options = {}
    for p in params[4:]:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            raise ValueError(f"sampler {name!r}: *{p.name}/**{p.name} cannot be checked; list each option as a "
                             "keyword parameter with a default")
        if p.name in RESERVED:
            raise ValueError(f"sampler {name!r}: {p.name!r} is the framework's (sample's keyword); rename the option "
                             f"(reserved: {list(RESERVED)})")
        if p.default is p.empty:
            raise ValueError(f"sampler {name!r}: parameter {p.name!r} needs a default (options are keyword parameters "
                             "with defaults)")
        if p.name not in PASSED:
            options[p.name] = Option(p.name, p.default, literal_choices(hints.get(p.name)))
    names = {p.name for p in params}
    width = None if width is None else sech_widths(width)
    return Sampler(name, fn, grid, options, "generator" in names, "constraint" in names, adaptive, width, steps,
                   few_step_grid)


def get_sampler(method: str) -> Sampler:
    if method not in SAMPLERS:
        raise ValueError(f"unknown sampling method {method!r}; available: {sorted(SAMPLERS)}")
    return SAMPLERS[method]


# --------------------------------------------------------------------------------------------------
# Values from text
# --------------------------------------------------------------------------------------------------
def parse_options(text: str, where: str = "options") -> Dict[str, str]:
    """'k=v,k2=v2' → {'k': 'v', 'k2': 'v2'} (values stay text until the sampler's signature converts them)."""
    return _parse_options(text, where, SPEC_FORMAT)


# Keywords of `sample` that a text spec may set next to the sampler's options (the default gives the type).
SPEC_KEYWORDS = {"denoise": True, "grid": DEFAULT_GRID, "rho": 7.0, "width": "3/1", "eps": 1e-3, "clip_x0": 1.0,
                 "threshold": 0.995}


def parse_spec(text: str) -> Tuple[str, Dict[str, Any]]:
    """'method[:option=value,...]' → (method, checked options); the options are the sampler's own and `sample`'s
    SPEC_KEYWORDS (denoise, grid, rho, width, eps, clip_x0, threshold). ValueError for an unknown method, option or
    bad value."""
    method, _, opts = text.strip().partition(":")
    sampler = get_sampler(method.strip())
    options = {}
    for key, value in parse_options(opts, f"sampler {text!r}").items():
        options[key] = _spec_keyword(sampler, key, value) if key in SPEC_KEYWORDS else sampler.check_option(key, value)
    return sampler.name, options


def _spec_keyword(sampler: Sampler, key: str, value: str):
    try:
        value = sech_widths(value) if key == "width" else _coerce(value, SPEC_KEYWORDS[key])
    except (TypeError, ValueError) as err:
        raise ValueError(f"sampler {sampler.name!r}: {key}={value!r} {err}") from None
    if key == "grid" and value not in GRID_NAMES and not value.endswith(".json"):
        raise ValueError(f"sampler {sampler.name!r}: grid={value!r} is neither one of {list(GRID_NAMES)} nor a grid "
                         "file (.json, from --mode tune_grid)")
    check = {"clip_x0": check_clip_x0, "threshold": check_threshold}.get(key)
    if check is not None:
        check(value, f"sampler {sampler.name!r}: {key}")
    return value


def parse_entry(text: str) -> Tuple[str, Dict[str, Any], int]:
    """'method[:option=value,...]@steps' → (method, checked options, steps)."""
    head, at, steps = text.strip().rpartition("@")
    if not at or not steps.strip().isdigit() or int(steps) < 1:
        raise ValueError(f"sampler entry {text!r}: expected 'method[:option=value,...]@steps', e.g. "
                         "'dpm_solver:order=2@20'")
    method, options = parse_spec(head)
    return method, options, int(steps)
