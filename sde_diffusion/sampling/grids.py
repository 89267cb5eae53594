"""Time grids T = t_0 > t_1 > … > t_n = eps that the framework hands to samplers (float64, so long grids stay exact)."""
from __future__ import annotations

from typing import Optional, Union

import torch

from ..sdes import SDE
from .registry import GRID_NAMES

GRIDS = GRID_NAMES
# EDM's exponent for the σ/α grid (Karras et al. 2022, eq. 5).
EDM_RHO = 7.0


def time_grid(sde: SDE, steps: int, eps: float, device=None) -> torch.Tensor:
    """steps + 1 times, uniform from T down to eps."""
    return torch.linspace(sde.T, eps, steps + 1, dtype=torch.float64, device=device)


def solver_grid(sde: SDE, timesteps: torch.Tensor, grid: str = "time", rho: float = EDM_RHO) -> torch.Tensor:
    """A grid with the endpoints and number of steps of `timesteps` (T → eps), spaced as `grid` says (float64).

    "time": the given grid (uniform in t). "logsnr": uniform in λ = log(α/σ) (DPM-Solver). "edm": uniform in
    (σ/α)^{1/ρ}, i.e. σ̃_i = (σ̃_max^{1/ρ} + i/n·(σ̃_min^{1/ρ} − σ̃_max^{1/ρ}))^ρ with σ̃ = σ/α = e^{−λ}
    (Karras et al.). Times come back through the SDE's inverse of λ(t).
    """
    if grid not in GRIDS:
        raise ValueError(f"unknown time grid {grid!r}; available: {sorted(GRIDS)}")
    if grid == "time":
        return timesteps
    n = len(timesteps)
    lam_start, lam_end = sde.log_snr(timesteps[0]), sde.log_snr(timesteps[-1])
    fraction = torch.linspace(0.0, 1.0, n, dtype=torch.float64, device=timesteps.device)
    if grid == "logsnr":
        lam = lam_start + fraction * (lam_end - lam_start)
    else:
        root_max, root_min = torch.exp(-lam_start / rho), torch.exp(-lam_end / rho)  # σ̃^{1/ρ}
        lam = -rho * torch.log(root_max + fraction * (root_min - root_max))
    t = sde.t_from_log_snr(lam).to(timesteps)
    t[0], t[-1] = timesteps[0], timesteps[-1]  # pin the ends exactly
    return t


def explicit_grid(sde: SDE, times, steps: Optional[int], device=None) -> torch.Tensor:
    """Given times as a float64 tensor, checked: 1-D, at least 2 points, strictly decreasing, within [0, T], the
    last with σ > 0."""
    ts = torch.as_tensor(times, dtype=torch.float64, device=device).detach().clone()
    if ts.ndim != 1 or len(ts) < 2:
        raise ValueError(f"grid must be a 1-D sequence of at least 2 times from T down to eps, got shape "
                         f"{tuple(ts.shape)}")
    if not bool((ts[1:] < ts[:-1]).all()):
        raise ValueError("grid times must decrease strictly (from T down to eps)")
    if not (0.0 <= ts[-1].item() and ts[0].item() <= sde.T) or not sde.sigma(ts[-1]).item() > 0:
        raise ValueError(f"grid times must lie in [0, T={sde.T}] and end where σ(t) > 0 (t > 0 unless the process "
                         f"is noisy at 0), got {ts[-1].item()} … {ts[0].item()}")
    if steps is not None and steps != len(ts) - 1:
        raise ValueError(f"steps={steps} disagrees with the given grid of {len(ts)} times ({len(ts) - 1} steps): "
                         "leave steps unset")
    return ts


def make_grid(sde: SDE, grid: Union[str, torch.Tensor, None], default: str, steps: int, eps: float,
              rho: float = EDM_RHO, device=None) -> torch.Tensor:
    """The grid a sampler runs on: `grid` names a spacing (None: the sampler's default) of steps + 1 times."""
    return solver_grid(sde, time_grid(sde, steps, eps, device), default if grid is None else grid, rho)
