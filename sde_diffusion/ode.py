"""Adaptive ODE solvers for dy/dt = fn(t, y) on tensors: the probability-flow ODE of the samplers and the augmented
likelihood ODE both run on these.

Backends (`SOLVERS`), all Dormand–Prince 5(4) with the RMS error norm over every element of
err / (atol + rtol·max(|y|, |y_new|)) (one step size for the whole batch):

| backend       | where the state lives                   | constraint projection | step callback |
|---------------|-----------------------------------------|-----------------------|---------------|
| `torch`       | `dopri5` here, on the state's device     | yes                   | yes           |
| `scipy`       | scipy's RK45, float64 on the host        | yes                   | yes           |
| `torchdiffeq` | torchdiffeq's `dopri5`, on the device    | no (clear error)      | yes           |

Every solver has the signature

    solve(fn, y0, t0, t1, *, rtol, atol, callback=None, project=None) -> y(t1)

with fn(t, y) getting t as a Python float, callback(i, t, y) after accepted steps, and project(t, t_prev, y) -> y
replacing the state after every accepted step from t_prev to t (a constraint; the solver then restarts from it).
The backends are compared (NFE, bits/dim, samples) by benchmarks/ode_solvers.py, recorded in BENCHMARKS.md.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

OdeFn = Callable[[float, torch.Tensor], torch.Tensor]
StepCallback = Callable[[int, float, torch.Tensor], None]
Projection = Callable[[float, float, torch.Tensor], torch.Tensor]

# score_sde's tolerances for the probability-flow ODE.
ODE_RTOL = ODE_ATOL = 1e-5
ODE_MAX_STEPS = 100_000

# Dormand–Prince 5(4) tableau (the one in scipy's RK45 and torchdiffeq's dopri5): nodes c, stages a, 5th-order
# weights b (also the last stage row: FSAL), and the difference e = b − b̂ to the embedded 4th-order solution.
_DOPRI_C = (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0)
_DOPRI_A = ((),
            (1 / 5,),
            (3 / 40, 9 / 40),
            (44 / 45, -56 / 15, 32 / 9),
            (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
            (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
            (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84))
_DOPRI_E = (71 / 57600, 0.0, -71 / 16695, 71 / 1920, -17253 / 339200, 22 / 525, -1 / 40)
# Step-size control as in scipy's RK45: safety factor, bounds on the change per step, exponent −1/(4+1).
_SAFETY, _MIN_FACTOR, _MAX_FACTOR = 0.9, 0.2, 10.0
_ERROR_EXPONENT = -1.0 / 5.0


def _rms(v: torch.Tensor) -> float:
    return v.pow(2).mean().sqrt().item()


def _initial_step(fn: OdeFn, t: float, y: torch.Tensor, f: torch.Tensor, span: float, direction: float,
                  rtol: float, atol: float) -> float:
    """Hairer, Nørsett & Wanner, Solving ODEs I, II.4 (as scipy): one extra evaluation."""
    scale = atol + rtol * y.abs()
    d0, d1 = _rms(y / scale), _rms(f / scale)
    h0 = 1e-6 if d0 < 1e-5 or d1 < 1e-5 else 0.01 * d0 / d1
    h0 = min(h0, span)
    f1 = fn(t + direction * h0, y + direction * h0 * f)
    d2 = _rms((f1 - f) / scale) / h0
    h1 = max(1e-6, h0 * 1e-3) if max(d1, d2) <= 1e-15 else (0.01 / max(d1, d2)) ** (1 / 5)
    return min(100 * h0, h1)


def dopri5(fn: OdeFn, y0: torch.Tensor, t0: float, t1: float, *, rtol: float = ODE_RTOL, atol: float = ODE_ATOL,
           callback: Optional[StepCallback] = None, project: Optional[Projection] = None) -> torch.Tensor:
    """Solve dy/dt = fn(t, y) from t0 to t1 (either direction) with adaptive Dormand–Prince RK45.

    The state stays a tensor on its device; step control follows scipy's RK45, including Hairer's initial step.
    With `project`, the first-same-as-last derivative is re-evaluated at the projected state (one more fn call per
    accepted step, none after the last).
    """
    direction = 1.0 if t1 > t0 else -1.0
    t, y = float(t0), y0
    f = fn(t, y)
    h = _initial_step(fn, t, y, f, abs(t1 - t0), direction, rtol, atol)
    for accepted in range(ODE_MAX_STEPS):
        if direction * (t1 - t) <= 0:
            return y
        h = min(h, abs(t1 - t))
        last = h >= abs(t1 - t)
        rejected = False
        while True:
            step = direction * h
            k = [f]
            for c, row in zip(_DOPRI_C[1:], _DOPRI_A[1:]):
                y_stage = y + step * sum(a * k_j for a, k_j in zip(row, k) if a != 0.0)
                k.append(fn(t1 if (last and c == 1.0) else t + step * c, y_stage))
            y_new = y_stage  # the 7th stage is evaluated at the 5th-order solution (FSAL)
            err = step * sum(e * k_j for e, k_j in zip(_DOPRI_E, k) if e != 0.0)
            err_norm = _rms(err / (atol + rtol * torch.maximum(y.abs(), y_new.abs())))
            if err_norm < 1.0:
                factor = _MAX_FACTOR if err_norm == 0 else min(_MAX_FACTOR, _SAFETY * err_norm**_ERROR_EXPONENT)
                if rejected:
                    factor = min(1.0, factor)
                t_prev, t = t, t1 if last else t + step
                y, f, h = y_new, k[-1], h * factor
                break
            h *= max(_MIN_FACTOR, _SAFETY * err_norm**_ERROR_EXPONENT)
            last, rejected = False, True
        if project is not None:
            y = project(t, t_prev, y)
            if not last:
                f = fn(t, y)
        if callback is not None:
            callback(accepted, t, y)
    raise RuntimeError(f"dopri5 did not reach t1={t1} in {ODE_MAX_STEPS} steps (stopped at t={t})")


def scipy_rk45(fn: OdeFn, y0: torch.Tensor, t0: float, t1: float, *, rtol: float = ODE_RTOL,
               atol: float = ODE_ATOL, callback: Optional[StepCallback] = None,
               project: Optional[Projection] = None) -> torch.Tensor:
    """The same problem with scipy's RK45 one accepted step at a time: float64 on the host, copied every call.

    With `project`, a new stepper starts at the projected state with the last step size after each accepted step
    (its first evaluation is the derivative there, like dopri5's re-evaluation).
    """
    from scipy import integrate

    shape, dtype, device = y0.shape, y0.dtype, y0.device

    def to_torch(y):
        return torch.from_numpy(y).reshape(shape).to(device=device, dtype=dtype)

    def rhs(t, y):
        return fn(t, to_torch(y)).detach().cpu().double().numpy().reshape(-1)

    def stepper(t, y, first_step=None):
        return integrate.RK45(rhs, t, y.detach().cpu().double().numpy().reshape(-1), t1, rtol=rtol, atol=atol,
                              first_step=first_step)

    solver, y = stepper(t0, y0), y0
    for accepted in range(ODE_MAX_STEPS):
        t_prev = solver.t
        message = solver.step()
        if solver.status == "failed":
            raise RuntimeError(f"RK45 failed at t={solver.t}: {message}")
        y = to_torch(solver.y)
        if project is not None:
            y = project(solver.t, t_prev, y)
        if callback is not None:
            callback(accepted, solver.t, y)
        if solver.status == "finished":
            return y
        if project is not None:
            solver = stepper(solver.t, y, first_step=min(solver.step_size, abs(t1 - solver.t)))
    raise RuntimeError(f"RK45 did not reach t1={t1} in {ODE_MAX_STEPS} steps")


class _TorchdiffeqField(torch.nn.Module):
    """fn as torchdiffeq's func(t, y), with its accepted-step hook forwarding to callback(i, t, y)."""

    def __init__(self, fn: OdeFn, callback: Optional[StepCallback]):
        super().__init__()
        self.fn, self.callback, self.accepted = fn, callback, 0

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.fn(float(t), y)

    def callback_accept_step(self, t0: torch.Tensor, y: torch.Tensor, dt: torch.Tensor) -> None:
        """torchdiffeq reports the step's start t0 and the state there; the step ends at t0 + dt (state not given),
        so the callback sees the state at the start of each accepted step after the first."""
        if self.callback is not None and self.accepted > 0:
            self.callback(self.accepted - 1, float(t0), y)
        self.accepted += 1


def torchdiffeq_dopri5(fn: OdeFn, y0: torch.Tensor, t0: float, t1: float, *, rtol: float = ODE_RTOL,
                       atol: float = ODE_ATOL, callback: Optional[StepCallback] = None,
                       project: Optional[Projection] = None) -> torch.Tensor:
    """torchdiffeq's adaptive dopri5 (its own step control, same error norm). It has no hook to replace the state
    between steps, so a `project` (a constraint) is a ValueError that names the backends which have one."""
    if project is not None:
        raise ValueError("the torchdiffeq ODE backend cannot apply a constraint after each step: use backend "
                         "'torch' or 'scipy'")
    try:
        import torchdiffeq
    except ModuleNotFoundError as err:
        raise ValueError("the torchdiffeq ODE backend needs the torchdiffeq package (pip install torchdiffeq==0.2.5), "
                         "or use backend 'torch'") from err
    field = _TorchdiffeqField(fn, callback)
    times = torch.tensor([t0, t1], dtype=torch.float64, device=y0.device)
    # step_t: the last step ends at t1 exactly (by default torchdiffeq steps past t1 and interpolates back, which
    # evaluates the field beyond the interval, e.g. at t < 0 where the probability-flow ODE is undefined).
    y = torchdiffeq.odeint(field, y0, times, rtol=rtol, atol=atol, method="dopri5",
                           options={"max_num_steps": ODE_MAX_STEPS, "step_t": times})[-1]
    if callback is not None:
        callback(max(field.accepted - 1, 0), float(t1), y)
    return y


SOLVERS = {"torch": dopri5, "scipy": scipy_rk45, "torchdiffeq": torchdiffeq_dopri5}
BACKENDS = tuple(SOLVERS)


def solve(fn: OdeFn, y0: torch.Tensor, t0: float, t1: float, *, backend: str = "torch", rtol: float = ODE_RTOL,
          atol: float = ODE_ATOL, callback: Optional[StepCallback] = None,
          project: Optional[Projection] = None) -> torch.Tensor:
    """y(t1) for dy/dt = fn(t, y), y(t0) = y0 with the named backend (see the module table)."""
    if backend not in SOLVERS:
        raise ValueError(f"unknown ODE backend {backend!r}; available: {sorted(SOLVERS)}")
    return SOLVERS[backend](fn, y0, float(t0), float(t1), rtol=rtol, atol=atol, callback=callback, project=project)
