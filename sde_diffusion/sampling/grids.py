"""Time grids T = t_0 > t_1 > … > t_n = eps that the framework hands to samplers (float64, so long grids stay exact)."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple, Union

import torch

from ..sdes import SDE

# The spacings a grid may be named by (`solver_grid`).
GRID_NAMES = ("time", "logsnr", "edm", "quadratic", "sech", "auto")
GRIDS = GRID_NAMES
# The spacings shaped by a sech density, the ones that take a `width` ("auto" fits its centre to the model).
SECH_SPACINGS = ("sech", "auto")
# The spacing a sampler runs on unless it registers another or the caller names one (built-in and user samplers
# alike), and that of every `--mode compare` entry that names none. λ-uniform makes no assumption about the data's
# scale; with the papers' other grid (EDM's ρ = 7, which heun, edm_sde, restart and ipndm register) it passed the
# worst case of a family of random mixtures where a spacing centred on a fixed data scale did not
# (benchmarks/default_grids.py, BENCHMARKS.md).
DEFAULT_GRID = "logsnr"
# EDM's exponent for the σ/α grid (Karras et al. 2022, eq. 5).
EDM_RHO = 7.0
# The σ/α on which the "sech" spacing centres its steps unless given a centre (λ_d = −log 0.35 ≈ 1.05): the best
# single centre over the few-step selection family ("auto" fits one to the model instead).
SECH_CENTER_SIGMA = 0.35
# Up to this many steps a sampler runs on FEW_STEP_GRID unless it registers otherwise or the caller names a grid:
# with a handful of steps no spacing is free of the data's scale; λ-uniform and ρ = 7 grids put a step where the ODE
# is nearly linear (σ/α ≫ 1) and one where the data are resolved (σ/α ≪ 0.1), and miss the modes forming in
# between. "auto" is the "sech" spacing centred at the model's own data scale, measured on first use
# (sampling/auto_grid.py). Chosen by the worst ratio, over random mixtures with data scales from 0.1 to 3, of sliced
# W₂ to diffusers' best scheduler at NFE 5 and 6; it beats λ-uniform by that worst case up to 9 steps, and from 9
# on the two are within a few per cent of each other on both families, so λ-uniform, which assumes nothing about
# the data, takes over after 8 (benchmarks/few_step_grids.py, BENCHMARKS.md).
FEW_STEPS = 8
FEW_STEP_GRID = "auto"
# Widths (in λ) of the "sech" spacing on its noisy (λ < λ_d) and clean (λ > λ_d) sides unless a sampler registers
# its own (`register_sampler(width=...)`) or the caller gives them: those of the few-step default, chosen with it
# (30 % more or less on either side, or on the centre, loses on some member; a clean side of 0.7 starves narrow
# modes of steps).
SECH_WIDTH = (4.0, 1.0)
Width = Union[float, Sequence[float], str]


def sech_widths(width: Width) -> Tuple[float, float]:
    """The sech spacing's (noisy-side, clean-side) widths from one number (both sides), a pair, or text "w" or
    "noisy/clean" (config strings); ValueError unless both are finite and > 0."""
    try:
        if isinstance(width, str):
            parts = [float(part) for part in width.split("/")]
        elif isinstance(width, (int, float)) and not isinstance(width, bool):
            parts = [float(width)]
        else:
            parts = [float(part) for part in width]
    except (TypeError, ValueError):
        parts = []
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or not all(0 < part < float("inf") for part in parts):
        raise ValueError(f"the sech spacing's width must be a number > 0 or a pair (noisy side, clean side) of them, "
                         f"e.g. 3.0 or (3.0, 1.0) or '3/1', got {width!r}")
    return parts[0], parts[1]
GRID_FILE_VERSION = 1


def time_grid(sde: SDE, steps: int, eps: float, device=None) -> torch.Tensor:
    """steps + 1 times, uniform from T (sde.t_max) down to eps."""
    return torch.linspace(sde.t_max, eps, steps + 1, dtype=torch.float64, device=device)


def solver_grid(sde: SDE, timesteps: torch.Tensor, grid: str = "time", rho: float = EDM_RHO,
                width: Width = SECH_WIDTH, centre: Optional[float] = None) -> torch.Tensor:
    """A grid with the endpoints and number of steps of `timesteps` (T → eps), spaced as `grid` says (float64).

    "time": the given grid (uniform in t). "logsnr": uniform in λ = log(α/σ) (DPM-Solver). "edm": uniform in
    (σ/α)^{1/ρ}, i.e. σ̃_i = (σ̃_max^{1/ρ} + i/n·(σ̃_min^{1/ρ} − σ̃_max^{1/ρ}))^ρ with σ̃ = σ/α = e^{−λ}
    (Karras et al.). "quadratic": t_i = eps + (T − eps)·(1 − i/n)², dense near eps (DDIM's quadratic spacing).
    "sech": steps spread in λ with density ∝ sech((λ − λ_d)/w), λ_d = −log centre, w = width's noisy
    side for λ < λ_d and its clean side above (one number: both): most steps where σ/α is near the data's scale,
    exponentially fewer where the ODE is near-linear (σ/α ≫ 1) or where the data are already resolved (σ/α ≪ 1);
    i.e. uniform in G(λ) = w·gd((λ − λ_d)/w), with gd(u) = atan(sinh u) the Gudermannian; centre: a σ/α
    (default SECH_CENTER_SIGMA). "auto": "sech" with the centre fitted to a model (`auto_grid.auto_centre`), which
    must be given here. Times come back through the SDE's inverse of λ(t).
    """
    if grid not in GRIDS:
        raise ValueError(f"unknown time grid {grid!r}; available: {sorted(GRIDS)}")
    if grid == "auto" and centre is None:
        raise ValueError("the 'auto' spacing is fitted to a model: `sample` and `tune_grid` resolve it, or pass "
                         "centre=sampling.auto_centre(score_fn, sde, shape)")
    if grid == "time":
        return timesteps
    n = len(timesteps)
    if grid == "quadratic":
        start, end = timesteps[0], timesteps[-1]
        fraction = torch.linspace(1.0, 0.0, n, dtype=torch.float64, device=timesteps.device)
        t = end + (start - end) * fraction**2
        t[0], t[-1] = start, end
        return t
    lam_start, lam_end = sde.log_snr(timesteps[0]), sde.log_snr(timesteps[-1])
    fraction = torch.linspace(0.0, 1.0, n, dtype=torch.float64, device=timesteps.device)
    if grid == "logsnr":
        lam = lam_start + fraction * (lam_end - lam_start)
    elif grid in SECH_SPACINGS:
        lam = _sech_spacing(lam_start, lam_end, fraction, *sech_widths(width),
                            SECH_CENTER_SIGMA if centre is None else centre)
    else:
        root_max, root_min = torch.exp(-lam_start / rho), torch.exp(-lam_end / rho)  # σ̃^{1/ρ}
        lam = -rho * torch.log(root_max + fraction * (root_min - root_max))
    t = sde.t_from_log_snr(lam).to(timesteps)
    t[0], t[-1] = timesteps[0], timesteps[-1]  # pin the ends exactly
    return t


def _sech_spacing(lam_start: torch.Tensor, lam_end: torch.Tensor, fraction: torch.Tensor, noisy: float,
                  clean: float, centre_sigma: float) -> torch.Tensor:
    """λ at the given fractions of G(λ_start) → G(λ_end), G(λ) = w·gd((λ − λ_d)/w) with λ_d = −log centre_sigma
    and w = noisy below λ_d and clean above (G is continuous and increasing, G(λ_d) = 0, so it inverts side by
    side)."""
    if not 0 < centre_sigma < float("inf"):
        raise ValueError(f"the sech spacing's centre must be a σ/α > 0, got {centre_sigma}")
    centre = -torch.log(torch.tensor(centre_sigma, dtype=torch.float64))

    def forward(lam):
        w = noisy if lam < centre else clean
        return w * torch.atan(torch.sinh((lam - centre) / w))

    g = forward(lam_start) + fraction * (forward(lam_end) - forward(lam_start))
    w = torch.where(g < 0, torch.full_like(g, noisy), torch.full_like(g, clean))
    return centre + w * torch.asinh(torch.tan(g / w))


def explicit_grid(sde: SDE, times, steps: Optional[int], device=None) -> torch.Tensor:
    """Given times as a float64 tensor, checked: 1-D, at least 2 points, strictly decreasing, within [0, T], the
    last with σ > 0."""
    ts = torch.as_tensor(times, dtype=torch.float64, device=device).detach().clone()
    if ts.ndim != 1 or len(ts) < 2:
        raise ValueError(f"grid must be a 1-D sequence of at least 2 times from T down to eps, got shape "
                         f"{tuple(ts.shape)}")
    if not bool((ts[1:] < ts[:-1]).all()):
        raise ValueError("grid times must decrease strictly (from T down to eps)")
    if not (0.0 <= ts[-1].item() and ts[0].item() <= sde.t_max) or not sde.sigma(ts[-1]).item() > 0:
        raise ValueError(f"grid times must lie in [0, T={sde.t_max}] and end where σ(t) > 0 (t > 0 unless the process "
                         f"is noisy at 0), got {ts[-1].item()} … {ts[0].item()}")
    if steps is not None and steps != len(ts) - 1:
        raise ValueError(f"steps={steps} disagrees with the given grid of {len(ts)} times ({len(ts) - 1} steps): "
                         "leave steps unset")
    return ts


def default_spacing(steps: int, grid: str = DEFAULT_GRID, few_step_grid: Optional[str] = FEW_STEP_GRID) -> str:
    """The spacing a sampler registered with (grid, few_step_grid) runs `steps` steps on when the caller names none:
    few_step_grid up to FEW_STEPS steps (unless None), grid above."""
    return few_step_grid if few_step_grid is not None and steps <= FEW_STEPS else grid


def make_grid(sde: SDE, grid: Union[str, torch.Tensor, None], default: str, steps: int, eps: float,
              rho: float = EDM_RHO, device=None, width: Width = SECH_WIDTH,
              centre: Optional[float] = None) -> torch.Tensor:
    """The grid a sampler runs on: `grid` names a spacing (None: the sampler's default) of steps + 1 times."""
    return solver_grid(sde, time_grid(sde, steps, eps, device), default if grid is None else grid, rho, width,
                       centre)


def save_grid(path: Union[str, Path], times: torch.Tensor, **record) -> Path:
    """Write times (and what they were tuned for: method, nfe, SDE, errors …) to a JSON file, atomically."""
    path = Path(path)
    data = dict(version=GRID_FILE_VERSION, **record, times=[float(t) for t in times])
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def load_grid(path: Union[str, Path]) -> Dict:
    """A grid file's contents, checked: a dict with 'times', a list of at least two decreasing numbers. ValueError
    naming the file otherwise (the times are checked against the SDE where the grid is used)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"grid file {path} does not exist: write one with `python main.py --mode tune_grid` or "
                         "sampling.save_grid, or name a spacing (time, logsnr, edm, quadratic)")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"grid file {path} is not valid JSON ({err}); re-create it with --mode tune_grid") from None
    times = data.get("times") if isinstance(data, dict) else None
    if not isinstance(times, list) or len(times) < 2 or not all(isinstance(t, (int, float)) for t in times):
        raise ValueError(f"grid file {path} needs 'times': a list of at least two numbers from T down to eps")
    return data
