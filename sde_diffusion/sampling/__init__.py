"""Samplers behind one interface, and the extension point for new ones.

`sample(score_fn, sde, shape, method, ...)` draws from the prior, runs the registered sampler `method` over the
time grid T = t_0 > t_1 > … > t_steps = eps, optionally takes a final denoising (Tweedie) step, and returns
`(x, nfe)` with `nfe` the number of score evaluations made. NFE counting, constraints (inpainting, colorization),
the progress bar, callbacks and the time grid are the framework's (sampling/core.py); a sampler is only

    @register_sampler("name")                      # grid="logsnr"/"edm"/"sech"… for another default spacing
    def fn(score_fn, sde, x, timesteps, *, option=default, ..., generator=None) -> x

with x the prior draw and timesteps a 1-D float64 tensor from T down to eps; its keyword parameters are its
options (`sample(..., option=value)`, config strings "name:option=value@steps", `sampling.options`).

| method       | module         | what it integrates                                        | score calls (`steps`)    |
|--------------|----------------|-----------------------------------------------------------|--------------------------|
| `pc`         | pc.py          | reverse SDE, predictor + corrector (Song et al. Alg. 2–3) | steps·(1 + n_steps)      |
| `ancestral`  | pc.py          | DDPM/SMLD ancestral chain (Ho et al. Alg. 2)              | steps                    |
| `ode`        | flow.py        | probability-flow ODE, adaptive Dormand–Prince RK45        | adaptive (steps unused)  |
| `sde`        | reverse_sde.py | reverse SDE with torchsde (euler, milstein, srk)          | steps × stages (1, 1, 4) |
| `ddim`       | fast.py        | DDIM (η = 0: deterministic, η > 0: stochastic)            | steps                    |
| `dpm_solver` | fast.py        | DPM-Solver++ multistep, order 1–3                         | steps                    |
| `heun`       | fast.py        | EDM's 2nd-order Heun in σ/α                               | 2·steps − 1              |
| `unipc`      | multistep.py   | UniPC predictor–corrector (bh1/bh2, order 1–3)            | steps                    |
| `ipndm`      | multistep.py   | improved PNDM (Adams–Bashforth in σ/α, order 1–4)          | steps                    |
| `deis`       | multistep.py   | DEIS tAB (ε polynomial in t, exact weights, order 1–3)     | steps                    |
| `dpm_solver_sde` | stochastic.py | DPM-Solver++ 2M/3M SDE (η = 1: reverse SDE)            | steps                    |
| `edm_sde`    | stochastic.py  | EDM's stochastic Heun (S_churn, S_noise, S_min/S_max)      | 2·steps − 1              |
| `restart`    | stochastic.py  | Restart sampling: Heun + K noise-and-resolve loops        | 2·steps − 1 + 2·K·restart_steps |
| `adaptive_sde` | stochastic.py | reverse SDE, EM/improved-Euler pair, error control (Gotta Go Fast) | adaptive (rtol, atol) |

`denoise=True` adds one call. Nothing here asks which SDE it has; the SDE classes answer α, σ, λ, drift, diffusion.

Default grid of every fixed-step solver above: "sech", steps spread in log-SNR around the data's scale, wide on the
noisy side (images need steps there) and narrow on the clean side (each sampler registers its widths). At these
documented step counts every SDE is within ±0.03 nats/dim of the exact density on the Gaussian-mixture oracles
(tests/test_samplers.py): ddim 50, dpm_solver 20, heun 18, unipc 12, ipndm 15, deis 20, dpm_solver_sde 50,
edm_sde 60, restart 18; on the digits model FID is within 5% of the papers' grids (uniform t, λ-uniform, EDM's ρ,
all still available by name) except DDIM's (8%; BENCHMARKS.md). Below these counts a grid tuned for the budget (`tune_grid`) is the
better lever.
Grids: "time", "logsnr", "edm" (ρ), "quadratic", "sech" (width: one number or (noisy, clean); `sample`'s, else the
sampler's), explicit times,
or a grid file; `tune_grid(score_fn, sde, shape,
method, nfe)` fits the times to a model and budget (tuning.py), `steps_for_nfe` converts a budget into steps.
"""
from ..ode import BACKENDS as ODE_BACKENDS
from ..ode import ODE_ATOL, ODE_RTOL, dopri5, scipy_rk45
from . import fast, flow, multistep, pc, reverse_sde, stochastic  # noqa: F401  (registers the built-in samplers)
from .core import Constraint, CountingScore, FrameworkScore, sample
from .fast import dpm_solver_pp_update
from .flow import ode_decode, ode_encode
from .grids import EDM_RHO, GRIDS, SECH_WIDTH, load_grid, save_grid, sech_widths, solver_grid, time_grid
from .pc import CORRECTORS, PREDICTORS
from .registry import SAMPLERS, Sampler, parse_entry, parse_spec, register_sampler
from .reverse_sde import SDE_METHODS
from .settings import check_config, options_from_config, settings_from_config
from .terms import tweedie_denoise
from .tuning import steps_for_nfe, tune_grid

__all__ = ["sample", "register_sampler", "SAMPLERS", "Sampler", "parse_spec", "parse_entry", "options_from_config",
           "settings_from_config", "check_config", "Constraint", "CountingScore", "FrameworkScore", "time_grid",
           "solver_grid", "GRIDS", "SECH_WIDTH", "sech_widths", "tune_grid", "steps_for_nfe", "load_grid", "save_grid", "EDM_RHO", "tweedie_denoise", "ode_encode", "ode_decode", "dpm_solver_pp_update",
           "PREDICTORS", "CORRECTORS", "SDE_METHODS", "ODE_BACKENDS", "ODE_RTOL", "ODE_ATOL", "dopri5", "scipy_rk45"]
