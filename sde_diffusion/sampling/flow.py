"""The probability-flow ODE dx/dt = f(x, t) − ½g(t)²·∇log p_t(x) solved adaptively (sde_diffusion/ode.py): the
`ode` sampler and the exact data ↔ latent maps `ode_encode` / `ode_decode`."""
from __future__ import annotations

from typing import Callable, Literal, Optional, Tuple

import torch

from .. import ode
from ..sdes import SDE, ScoreFn, batch_time
from .core import CountingScore
from .registry import register_sampler

OdeBackend = Literal["torch", "scipy", "torchdiffeq"]


def integrate_pf_ode(score_fn: ScoreFn, sde: SDE, x: torch.Tensor, t0: float, t1: float, *, rtol: float,
                     atol: float, backend: str, project: Optional[Callable] = None) -> torch.Tensor:
    """x moved from time t0 to t1 along the probability-flow ODE; project(t, t_prev, x) -> x after every accepted
    step, if given."""
    flow = sde.reverse(score_fn, probability_flow=True)

    def velocity(t: float, y: torch.Tensor) -> torch.Tensor:
        return flow.sde(y, batch_time(t, y))[0]

    return ode.solve(velocity, x, t0, t1, backend=backend, rtol=rtol, atol=atol, project=project)


@register_sampler("ode", adaptive=True)
def ode_sampler(score_fn: ScoreFn, sde: SDE, x: torch.Tensor, timesteps: torch.Tensor, *,
                rtol: float = ode.ODE_RTOL, atol: float = ode.ODE_ATOL, backend: OdeBackend = "torch",
                constraint=None) -> torch.Tensor:
    """Probability-flow ODE from timesteps[0] = T to timesteps[-1] = eps with adaptive Dormand–Prince RK45 (only
    the grid's ends are used; adaptive NFE). backend: "torch" (the state stays on its device), "scipy" (solve_ivp's
    RK45 on the host) or "torchdiffeq" (no constraints).

    It applies a constraint itself, after every accepted step, as an operator splitting: the solver then restarts
    from the constrained state, re-evaluating the derivative there (one more score call per accepted step).
    Constraining every Runge–Kutta stage instead would put fresh noise into the embedded error estimate.

    Per-sample seeds (SampleGenerators) fix each sample's prior draw, but the step sizes come from one error norm
    over the whole batch, so a sample depends on its batch within the solver's tolerance.
    """
    if rtol <= 0 or atol <= 0:
        raise ValueError(f"rtol and atol must be > 0, got {rtol}, {atol}")
    project = None
    if constraint is not None:
        x = constraint(x, timesteps[0], None)

        def project(t, t_prev, y):
            return constraint(y, t, t_prev)
    return integrate_pf_ode(score_fn, sde, x, timesteps[0].item(), timesteps[-1].item(), rtol=rtol, atol=atol,
                            backend=backend, project=project)


def _check_backend(backend: str) -> None:
    if backend not in ode.SOLVERS:
        raise ValueError(f"unknown ODE backend {backend!r}; available: {sorted(ode.SOLVERS)}")


def ode_encode(score_fn: ScoreFn, sde: SDE, x: torch.Tensor, *, eps: Optional[float] = None,
               rtol: float = ode.ODE_RTOL, atol: float = ode.ODE_ATOL, backend: str = "torch"
               ) -> Tuple[torch.Tensor, int]:
    """Data → latent: integrate the probability-flow ODE from eps up to T. Returns (z, nfe); x and z are (batch, ...).

    The inverse of `ode_decode` up to the solver tolerance (the map is a bijection for a fixed score).
    """
    _check_backend(backend)
    eps = sde.default_eps if eps is None else float(eps)
    counted = CountingScore(score_fn)
    with torch.no_grad():
        z = integrate_pf_ode(counted, sde, x, eps, sde.t_max, rtol=rtol, atol=atol, backend=backend)
    return z, counted.calls


def ode_decode(score_fn: ScoreFn, sde: SDE, z: torch.Tensor, *, eps: Optional[float] = None,
               rtol: float = ode.ODE_RTOL, atol: float = ode.ODE_ATOL, backend: str = "torch"
               ) -> Tuple[torch.Tensor, int]:
    """Latent → data: integrate the probability-flow ODE from T down to eps (no denoising). Returns (x, nfe)."""
    _check_backend(backend)
    eps = sde.default_eps if eps is None else float(eps)
    counted = CountingScore(score_fn)
    with torch.no_grad():
        x = integrate_pf_ode(counted, sde, z, sde.t_max, eps, rtol=rtol, atol=atol, backend=backend)
    return x, counted.calls
