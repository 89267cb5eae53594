"""Samplers behind one interface, and the extension point for new ones.

`sample(score_fn, sde, shape, method, ...)` draws from the prior, runs the registered sampler `method` over the
time grid T = t_0 > t_1 > … > t_steps = eps, optionally takes a final denoising (Tweedie) step, and returns
`(x, nfe)` with `nfe` the number of score evaluations made. NFE counting, constraints (inpainting, colorization),
the progress bar, callbacks and the time grid are the framework's (sampling/core.py); a sampler is only

    @register_sampler("name", steps=20)            # grid="time"/"edm"/…: another default spacing than DEFAULT_GRID
    def fn(score_fn, sde, x, timesteps, *, option=default, ..., generator=None) -> x

with x the prior draw and timesteps a 1-D float64 tensor from T down to eps; its keyword parameters are its
options (`sample(..., option=value)`, config strings "name:option=value@steps", `sampling.options`).

SAMPLER_TABLE

`denoise=True` adds one call. Nothing here asks which SDE it has; the SDE classes answer α, σ, λ, drift, diffusion.
`clip_x0=c` / `threshold=p` clip or dynamically threshold x̂₀ at every score evaluation of any sampler (controls.py);
`generator=SampleGenerators(seeds)` gives each sample its own noise, so it does not depend on its batch.

Each sampler declares its default grid and its documented step count at registration (`register_sampler(name,
grid=..., steps=N)`, read back as `SAMPLERS[name].grid` and `.steps`); `sample` uses them when `grid`/`steps` are
not given, and the table above is built from them. The defaults were chosen on one family of random Gaussian
mixtures by the worst case over every member and built-in SDE, and are verified on a disjoint family
(benchmarks/default_grids.py, tests/test_default_grids.py, BENCHMARKS.md): at its documented count each fixed-step
sampler is within ±0.03 nats/dim (±0.04 below d = 8) of the exact density. A sampler a user registers gets
`grids.DEFAULT_GRID` unless it declares another, so comparisons put it on the built-ins' grid. The "time" grid of
the SDE chains (pc, ancestral, sde) is the SDE's own clock, `SDE.sampling_clock`: uniform t, except on EDM (t = σ),
where it is uniform in log σ (geometric noise levels, as VE's uniform t). Up to
`grids.FEW_STEPS` steps the multistep solvers' (and a user's sampler's) default is `grids.FEW_STEP_GRID`
(`register_sampler(few_step_grid=...)`, `Sampler.grid_for(steps)`; EDM's Heun family and the SDE chains keep their
grid): with a handful of steps no spacing is free of the data's scale, so this one, "auto", is the "sech" spacing
centred at the model's data scale, measured on first use (auto_grid.py: AUTO_PROBE_STEPS score calls on one batch,
cached on the score function; `resolve_auto` fixes it once for jobs that build a score function per batch). Its
rule was chosen by the worst case over the same kind of family against diffusers' schedulers
(benchmarks/few_step_grids.py). A grid tuned for the model and budget (`tune_grid`) goes further.
Grids: "time", "logsnr", "edm" (ρ), "quadratic", "sech" (width: one number or (noisy, clean); `sample`'s, else the
sampler's), "auto", explicit times,
or a grid file; `tune_grid(score_fn, sde, shape,
method, nfe)` fits the times to a model and budget (tuning.py), `steps_for_nfe` converts a budget into steps.
"""
from ..ode import BACKENDS as ODE_BACKENDS
from ..generators import SampleGenerators
from ..ode import ODE_ATOL, ODE_RTOL, dopri5, scipy_rk45
from . import consistency, fast, flow, multistep, pc, reverse_sde, stochastic  # noqa: F401  (registers the built-in samplers)
from .auto_grid import AUTO_CENTRE_FACTOR, AUTO_PROBE_STEPS, AUTO_QUANTILE, auto_centre
from .controls import ControlledScore, controlled, dynamic_threshold
from .core import Constraint, CountingScore, FrameworkScore, resolve_auto, sample
from .fast import dpm_solver_pp_update
from .flow import ode_decode, ode_encode
from .grids import (DEFAULT_GRID, EDM_RHO, FEW_STEP_GRID, FEW_STEPS, GRIDS, SECH_WIDTH, load_grid, save_grid,
                    sech_widths, solver_grid, time_grid)
from .pc import CORRECTORS, PREDICTORS
from .registry import SAMPLERS, Sampler, parse_entry, parse_spec, register_sampler
from .reverse_sde import SDE_METHODS
from .settings import (check_config, expand_auto_entry, options_from_config, resolved_method, settings_from_config,
                       student_options)
from .terms import tweedie_denoise
from .tuning import steps_for_nfe, tune_grid

# What each built-in does, for the table in this docstring: method → (what it integrates, score calls).
DESCRIPTIONS = {
    "pc": ("reverse SDE, predictor + corrector (Song et al. Alg. 2–3)", "steps·(1 + n_steps)"),
    "ancestral": ("DDPM/SMLD ancestral chain (Ho et al. Alg. 2)", "steps"),
    "ode": ("probability-flow ODE, adaptive Dormand–Prince RK45", "adaptive"),
    "sde": ("reverse SDE with torchsde (euler, milstein, srk)", "steps × stages (1, 1, 4)"),
    "ddim": ("DDIM (η = 0: deterministic, η > 0: stochastic)", "steps"),
    "dpm_solver": ("DPM-Solver++ multistep, order 1–3", "steps"),
    "heun": ("EDM's 2nd-order Heun in σ/α", "2·steps − 1"),
    "unipc": ("UniPC predictor–corrector (bh1/bh2, order 1–3)", "steps"),
    "ipndm": ("improved PNDM (Adams–Bashforth in σ/α, order 1–4)", "steps"),
    "deis": ("DEIS tAB (ε polynomial in t, exact weights, order 1–3)", "steps"),
    "dpm_solver_sde": ("DPM-Solver++ 2M/3M SDE (η = 1: reverse SDE)", "steps"),
    "edm_sde": ("EDM's stochastic Heun (S_churn, S_noise, S_min/S_max)", "2·steps − 1"),
    "consistency": ("multistep consistency sampling (consistency models only)", "steps"),
    "restart": ("Restart sampling: Heun + K noise-and-resolve loops",
                "2·steps − 1 + 2·K·restart_steps"),
    "adaptive_sde": ("reverse SDE, EM/improved-Euler pair, error control (Gotta Go Fast)", "adaptive"),
}


def sampler_table() -> str:
    """The built-in samplers as a Markdown table: module, what each integrates, score calls, and (from the
    registry) default grid and documented steps."""
    rows = ["| method | module | what it integrates | score calls | default grid | documented steps |",
            "|---|---|---|---|---|---|"]
    for name, (what, calls) in DESCRIPTIONS.items():
        sampler = SAMPLERS[name]
        module = sampler.fn.__module__.rsplit(".", 1)[-1] + ".py"
        steps = "adaptive" if sampler.adaptive else "the SDE's N" if sampler.steps is None else sampler.steps
        grid = "(ends only)" if sampler.adaptive else sampler.grid
        if not sampler.adaptive and sampler.few_step_grid not in (None, sampler.grid):
            grid += f"; {sampler.few_step_grid} up to {FEW_STEPS} steps"
        rows.append(f"| `{name}` | {module} | {what} | {calls} | {grid} | {steps} |")
    return "\n".join(rows)


__doc__ = __doc__.replace("SAMPLER_TABLE", sampler_table())

__all__ = ["sample", "register_sampler", "SAMPLERS", "Sampler", "parse_spec", "parse_entry", "options_from_config",
           "settings_from_config", "resolved_method", "expand_auto_entry", "student_options", "check_config", "Constraint", "CountingScore", "FrameworkScore", "time_grid",
           "solver_grid", "GRIDS", "SECH_WIDTH", "sech_widths", "tune_grid", "steps_for_nfe", "sampler_table",
           "auto_centre", "resolve_auto", "AUTO_CENTRE_FACTOR", "AUTO_PROBE_STEPS", "AUTO_QUANTILE",
           "DEFAULT_GRID", "FEW_STEP_GRID", "FEW_STEPS", "load_grid", "save_grid", "EDM_RHO", "tweedie_denoise",
           "ode_encode", "ode_decode", "dpm_solver_pp_update", "SampleGenerators", "ControlledScore", "controlled",
           "dynamic_threshold",
           "PREDICTORS", "CORRECTORS", "SDE_METHODS", "ODE_BACKENDS", "ODE_RTOL", "ODE_ATOL", "dopri5", "scipy_rk45"]
