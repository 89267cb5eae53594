"""config.sampling → the keyword arguments of `sample`, and the checks of that section.

Options of the chosen `sampling.method` come from two places, later ones winning:

1. score_sde's per-method keys (`CONFIG_KEYS`: sampling.predictor, corrector, snr, n_steps_each → n_steps,
   probability_flow, rtol, atol, ode_backend → backend, sde_method, eta, order), each given to the built-in
   method it was made for (`CONFIG_KEY_OWNERS`: sampling.eta reaches ddim, sampling.order dpm_solver) and to a
   user sampler with an option of that name. Other built-ins with an option of the same name (unipc's `order`,
   adaptive_sde's `rtol`) keep their own defaults, set through sampling.options. Keys the method does not take are
   ignored.
2. `sampling.options`: "option=value,option2=value2", converted by the type of each option's default. Every
   option there must be one the method takes (a user sampler's options usually come from here).
"""
from __future__ import annotations

from typing import Any, Dict

from ..students import AUTO, DISTILL_METHODS, student_method
from ..errors import ConfigError
from .registry import SAMPLERS, get_sampler, parse_options
from .controls import check_clip_x0, check_threshold
from .core import default_steps
from .grids import GRIDS, SECH_SPACINGS, load_grid, sech_widths

# score_sde's per-method keys of config.sampling → the sampler option each sets.
CONFIG_KEYS = {"predictor": "predictor", "corrector": "corrector", "snr": "snr", "n_steps_each": "n_steps",
               "probability_flow": "probability_flow", "rtol": "rtol", "atol": "atol", "ode_backend": "backend",
               "sde_method": "sde_method", "eta": "eta", "order": "order"}


# Keys of config.sampling that are `sample`'s controls on x̂₀ (sampling/controls.py), for every method.
CONTROL_KEYS = ("clip_x0", "threshold")

# The built-in sampler each of score_sde's keys belongs to.
CONFIG_KEY_OWNERS = {"predictor": "pc", "corrector": "pc", "snr": "pc", "n_steps_each": "pc", "probability_flow": "pc",
                     "rtol": "ode", "atol": "ode", "ode_backend": "ode", "sde_method": "sde", "eta": "ddim",
                     "order": "dpm_solver"}


def _is_builtin(sampler) -> bool:
    return sampler.fn.__module__.startswith(__package__ + ".")


def _config_key_applies(sampler, key: str) -> bool:
    return CONFIG_KEYS[key] in sampler.options and (not _is_builtin(sampler) or CONFIG_KEY_OWNERS[key] == sampler.name)


def resolved_method(config) -> str:
    """sampling.method, with "auto" replaced by the sampler of the distilled student's method (distill.method:
    students.DISTILL_METHODS); ValueError for "auto" without one."""
    method = config.sampling.method
    if method != AUTO:
        return method
    student = student_method(config)
    if student is None:
        raise ValueError("sampling.method='auto' samples a distilled student with its own sampler, and distill.method "
                         f"is not set: name a sampler (one of {sorted(SAMPLERS)}) or set distill.method")
    return DISTILL_METHODS[student][1]


def student_options(config) -> Dict[str, Any]:
    """`sample`'s keywords a distilled student's own sampler runs with (sampling.method="auto"): the "edm" grid it
    was distilled on, and no final Tweedie step for a progressive student (its last DDIM step lands on x̂₀)."""
    return {"grid": "edm", "denoise": False} if student_method(config) == "progressive" else {"grid": "edm"}


def expand_auto_entry(config, text: str) -> str:
    """A compare entry 'auto[:option=value,...]@steps' as the student's own sampler with its grid (and denoise), the
    entry's options winning; other entries unchanged. ValueError when the config is no student's."""
    head, at, counts = text.strip().partition("@")
    method, _, opts = head.partition(":")
    if method.strip() != AUTO:
        return text
    options = {key: str(value) for key, value in student_options(config).items()}
    options.update(parse_options(opts, f"compare entry {text!r}"))
    listed = ",".join(f"{key}={value}" for key, value in options.items())
    return f"{resolved_method(config)}:{listed}{at}{counts}"


def options_from_config(config) -> Dict[str, Any]:
    """The options of sampling.method from config.sampling (module docstring), checked against its signature;
    ValueError naming the key for an unknown method, option or bad value."""
    s = config.sampling
    sampler = get_sampler_for_config(resolved_method(config))
    options = {}
    for key, name in CONFIG_KEYS.items():
        if key in s and _config_key_applies(sampler, key):
            options[name] = _checked(sampler, name, s[key], f"sampling.{key}")
    for name, value in parse_options(s.get("options", "") or "", "sampling.options").items():
        options[name] = _checked(sampler, name, value, "sampling.options")
    return options


def get_sampler_for_config(method: str):
    if method not in SAMPLERS:
        raise ValueError(f"sampling.method={method!r} is not a registered sampler; available: {sorted(SAMPLERS)} "
                         "(a sampler of your own must be registered, with @sampling.register_sampler, before the "
                         "config is used: e.g. import its module in your config file)")
    return get_sampler(method)


def _checked(sampler, name: str, value, key: str):
    try:
        return sampler.check_option(name, value)
    except ValueError as err:
        raise ValueError(f"{key}: {err}") from None


def settings_from_config(config, sde) -> Dict[str, Any]:
    """Keyword arguments for `sample` from config.sampling: method (`resolved_method`; a progressive student's
    "auto" samples on the "edm" grid at distill.steps without a final Tweedie step, as it was distilled), steps (None → the sampler's documented count,
    else sde.N; with a grid file, its length), eps, denoise, the grid (sampling.grid or the sampler's default for
    that count; ρ when it is "edm", the width when it is "sech" or "auto" and sampling.width is set), clip_x0 and
    threshold when set, and the method's options."""
    s = config.sampling
    method = resolved_method(config)
    sampler = get_sampler_for_config(method)
    steps = s.steps if s.steps is not None else default_steps(sampler, sde)
    grid = s.grid or sampler.grid_for(steps, sde)
    denoise = s.noise_removal
    if s.method == AUTO:  # the grid (steps, denoise) it was distilled for
        own = student_options(config)
        grid, denoise = s.grid or own["grid"], own.get("denoise", denoise)
        if student_method(config) == "progressive":
            steps = s.steps or config.distill.steps
    settings = dict(method=method, steps=steps, eps=s.eps, denoise=denoise, grid=grid)
    if s.grid is not None and s.grid not in GRIDS:  # a grid file: its times fix the steps and eps
        settings.update(steps=None if s.steps is None else s.steps, eps=None)
    if grid == "edm":
        settings["rho"] = s.rho
    if grid in SECH_SPACINGS and s.width is not None:
        settings["width"] = s.width
    settings.update(controls_from_config(config))
    settings.update(options_from_config(config))
    return settings


def controls_from_config(config) -> Dict[str, float]:
    """sampling.clip_x0 and sampling.threshold as `sample`'s keywords, those that are set (None: off)."""
    return {key: config.sampling[key] for key in CONTROL_KEYS if config.sampling.get(key) is not None}


def _check_builtin_keys(s) -> None:
    """score_sde's per-method keys are checked whichever method is chosen (against the built-in sampler that takes
    each), so that a wrong value fails before a later run switches method."""
    for sampler in SAMPLERS.values():
        if _is_builtin(sampler):
            for key, name in CONFIG_KEYS.items():
                if key in s and _config_key_applies(sampler, key):
                    _checked(sampler, name, s[key], f"sampling.{key}")


def check_config(config) -> None:
    """The sampling section's values: ConfigError naming the key and what to do."""
    try:
        _check_sampling_section(config)
    except ValueError as err:
        raise err if isinstance(err, ConfigError) else ConfigError(str(err)) from None


def _check_sampling_section(config) -> None:
    s = config.sampling
    options_from_config(config)
    _check_builtin_keys(s)
    if s.grid is not None and s.grid not in GRIDS:
        if not str(s.grid).endswith(".json"):
            raise ValueError(f"sampling.grid={s.grid!r} is neither a spacing ({sorted(GRIDS)}) nor a grid file "
                             "(.json, written by --mode tune_grid)")
        load_grid(s.grid)
    if s.steps is not None and s.steps < 1:
        raise ValueError(f"sampling.steps must be ≥ 1 (or None: the sampler's documented count, "
                         f"sampling.SAMPLERS[method].steps), got {s.steps}")
    if s.get("width") is not None:
        sech_widths(s.width)
    check_clip_x0(s.get("clip_x0"), "sampling.clip_x0")
    check_threshold(s.get("threshold"), "sampling.threshold")
    for key in ("rtol", "atol", "rho", "snr"):
        if key in s and s[key] is not None and not s[key] > 0:
            raise ValueError(f"sampling.{key} must be > 0, got {s[key]}")
    if "eta" in s and s.eta < 0:
        raise ValueError(f"sampling.eta must be ≥ 0, got {s.eta}")
    if s.get("n_steps_each", 1) < 1:
        raise ValueError(f"sampling.n_steps_each must be ≥ 1, got {s.n_steps_each}")
    if s.method == "pc" and s.predictor == "ancestral_sampling" and s.probability_flow:
        raise ValueError("sampling.predictor='ancestral_sampling' is stochastic: with sampling.probability_flow=True "
                         "use euler_maruyama or reverse_diffusion")
