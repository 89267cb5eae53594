"""Samplers behind one interface.

`sample(score_fn, sde, shape, method, ...)` draws from the prior, runs the named sampler over the time grid
T = t_0 > t_1 > … > t_steps = eps, optionally takes a final denoising (Tweedie) step, and returns
`(x, nfe)` with `nfe` the number of score evaluations actually made. Every sampler is a function

    sampler(score_fn, sde, x, timesteps, *, generator, progress, callback, constraint, **options) -> x

that knows nothing about networks: it sees a score function and the SDE (α, σ, λ and its inverse, drift,
diffusion, transition kernels). Nothing here asks which SDE it has; the SDE classes answer those questions.

| method       | what it integrates                                          | score calls for `steps`          |
|--------------|-------------------------------------------------------------|----------------------------------|
| `pc`         | reverse SDE, predictor + corrector (Song et al. Alg. 2–3)   | steps·(1 + n_steps); steps if none |
| `ancestral`  | DDPM/SMLD ancestral chain (Ho et al. Alg. 2)                | steps                            |
| `ode`        | probability-flow ODE, adaptive Dormand–Prince RK45          | adaptive (`steps` ignored)       |
| `sde`        | reverse SDE with torchsde (euler, milstein, srk)            | steps × stages of the method     |
| `ddim`       | DDIM (η = 0: deterministic, η > 0: stochastic)              | steps                            |
| `dpm_solver` | DPM-Solver++ multistep, order 1–3, uniform-λ grid           | steps                            |
| `heun`       | EDM's 2nd-order Heun on the σ/α grid with ρ = 7             | 2·steps − 1                      |

`denoise=True` adds one call (Tweedie's formula at eps). Notation: α(t), σ(t) of the kernel x_t = α x_0 + σ z,
λ = log(α/σ); x̂_0 = (x + σ²·s)/α is the denoised estimate and ε̂ = −σ·s the predicted noise, s = ∇log p_t(x).

Constraints (inpainting, colorization: `sde_diffusion.controllable`) act on the sampler's state. A constraint is
any object with

    constraint(x, t, t_prev, score_fn, generator) -> x   the state x has just been moved from t_prev to t (0-d
                                                         float64 times; t_prev is None for the prior draw at T, and
                                                         equals t after a corrector, which does not move time);
                                                         score_fn is the sampler's (counted) score function
    constraint.finish(x) -> x                            optional: applied once to the returned sample
    constraint.moves_free_coordinates                    optional bool (default True): whether it also moves the
                                                         coordinates it does not fix (RePaint's rounds do, plain
                                                         replacement does not); multistep solvers then restart

Every sampler applies it to the prior draw and after every update (pc: after the corrector and after the
predictor; ode: after every accepted adaptive step; sde: after every grid interval; heun: to x = α·x̃), and
`sample` applies `finish` after the final denoising step. `callback` sees the constrained state.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Protocol, Sequence, Tuple

import torch
from tqdm.auto import tqdm

from .discrete import langevin_step_scale
from .sdes import SDE, ScoreFn, batch_time, per_sample

SAMPLERS: Dict[str, Callable] = {}
PREDICTORS: Dict[str, Callable] = {}
CORRECTORS: Dict[str, Callable] = {}

# Time grids the fast solvers can run on (see `solver_grid`).
GRIDS = ("time", "logsnr", "edm")
# EDM's exponent for the σ/α grid (Karras et al. 2022, eq. 5).
EDM_RHO = 7.0
# Tolerances of the adaptive probability-flow ODE solver (score_sde's defaults).
ODE_RTOL = ODE_ATOL = 1e-5
ODE_BACKENDS = ("torch", "scipy")
SDE_METHODS = ("euler", "milstein", "srk")


def _register(table: Dict[str, Callable], name: str):
    def decorate(fn):
        table[name] = fn
        return fn
    return decorate


def _lookup(table: Dict[str, Callable], kind: str, name: str) -> Callable:
    if name not in table:
        raise ValueError(f"unknown {kind} {name!r}; available: {sorted(table)}")
    return table[name]


def _choice(kind: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {kind} {value!r}; available: {sorted(allowed)}")


class Constraint(Protocol):
    """What `sample(..., constraint=c)` calls after every update (see the module docstring); `finish` is optional."""

    def __call__(self, x: torch.Tensor, t: torch.Tensor, t_prev: Optional[torch.Tensor], score_fn: ScoreFn,
                 generator: Optional[torch.Generator]) -> torch.Tensor:
        ...


def _constrain(constraint: Optional[Constraint], x: torch.Tensor, t, t_prev, score_fn: ScoreFn,
               generator) -> torch.Tensor:
    """x after the constraint (x itself without one); times become 0-d float64 tensors."""
    if constraint is None:
        return x
    t = torch.as_tensor(t, dtype=torch.float64)
    t_prev = None if t_prev is None else torch.as_tensor(t_prev, dtype=torch.float64)
    return constraint(x, t, t_prev, score_fn, generator)


class CountingScore:
    """Wraps a score function and counts its calls (one call on a batch is one function evaluation)."""

    def __init__(self, score_fn: ScoreFn):
        self.score_fn, self.calls = score_fn, 0

    def __call__(self, x: torch.Tensor, t) -> torch.Tensor:
        self.calls += 1
        return self.score_fn(x, batch_time(t, x))


def _noise(x: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def time_grid(sde: SDE, steps: int, eps: float, device=None) -> torch.Tensor:
    """steps + 1 times, uniform from T down to eps (float64 so that long grids stay exact)."""
    return torch.linspace(sde.T, eps, steps + 1, dtype=torch.float64, device=device)


def tweedie_denoise(score_fn: ScoreFn, sde: SDE, x: torch.Tensor, t) -> torch.Tensor:
    """E[x_0 | x_t] = (x_t + σ(t)²·∇log p_t(x_t)) / α(t)  (Tweedie's formula); one score evaluation."""
    t = batch_time(t, x)
    return (x + per_sample(sde.sigma(t) ** 2, x) * score_fn(x, t)) / per_sample(sde.alpha(t), x)


def sample(score_fn: ScoreFn, sde: SDE, shape: Sequence[int], method: str = "pc", *, steps: Optional[int] = None,
           eps: Optional[float] = None, denoise: bool = True, generator: Optional[torch.Generator] = None,
           device=None, dtype: torch.dtype = torch.float32, progress: bool = False,
           callback: Optional[Callable[[int, torch.Tensor, torch.Tensor], None]] = None,
           constraint: Optional[Constraint] = None, **options) -> Tuple[torch.Tensor, int]:
    """Draw `shape[0]` samples; returns (x, nfe).

    steps: number of sampler steps (default sde.N; see the module table for the score calls each method makes).
    eps: last time (default sde.default_eps). denoise: finish with a Tweedie step at eps (counted in nfe).
    callback(i, t, x) is called after every step with the time t reached. constraint: applied to the state after
    every update and, through its `finish`, to the returned sample (module docstring; sde_diffusion.controllable);
    its score calls count in nfe. `options` go to the sampler:
    pc: predictor, corrector, snr, n_steps, probability_flow; ode: rtol, atol, backend; sde: sde_method;
    ddim: eta; dpm_solver: order, lower_order_final; heun: rho; and every fixed-step method takes `grid`
    ("time", "logsnr" or "edm", see `solver_grid`; default "time", for dpm_solver "logsnr", for heun "edm").
    """
    sampler = _lookup(SAMPLERS, "sampling method", method)
    steps = sde.N if steps is None else int(steps)
    if steps < 1:
        raise ValueError(f"steps must be ≥ 1, got {steps}")
    eps = sde.default_eps if eps is None else float(eps)
    if not 0.0 < eps < sde.T:
        raise ValueError(f"eps must lie in (0, T={sde.T}), got {eps}")
    counted = CountingScore(score_fn)
    with torch.no_grad():
        x = sde.prior_sampling(shape, generator=generator, device=device, dtype=dtype)
        timesteps = time_grid(sde, steps, eps, device=x.device)
        x = sampler(counted, sde, x, timesteps, generator=generator, progress=progress, callback=callback,
                    constraint=constraint, **options)
        if denoise:
            x = tweedie_denoise(counted, sde, x, timesteps[-1].to(dtype))
        finish = getattr(constraint, "finish", None)
        if finish is not None:
            x = finish(x)
    return x, counted.calls


# --------------------------------------------------------------------------------------------------
# Shared pieces: float64 coefficients, the denoised estimate, grids
# --------------------------------------------------------------------------------------------------
def _like(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A float64 coefficient (0-d or (batch,)) cast to x's dtype and shaped to broadcast against x."""
    v = v.to(device=x.device, dtype=x.dtype)
    return v if v.ndim == 0 else per_sample(v, x)


def _denoised_and_noise(score_fn: ScoreFn, sde: SDE, x: torch.Tensor, t: torch.Tensor):
    """One score evaluation at time t (0-d float64): returns (x̂_0, ε̂), both like x.

    x̂_0 = (x + σ²·s)/α (Tweedie) and ε̂ = −σ·s, so that x = α·x̂_0 + σ·ε̂ holds exactly.
    """
    score = score_fn(x, t.to(x.dtype))
    alpha, sigma = _like(sde.alpha(t), x), _like(sde.sigma(t), x)
    return (x + sigma**2 * score) / alpha, -sigma * score


def solver_grid(sde: SDE, timesteps: torch.Tensor, grid: str = "time", rho: float = EDM_RHO) -> torch.Tensor:
    """A grid with the endpoints and number of steps of `timesteps` (T → eps), spaced as `grid` says (float64).

    "time": the given grid (uniform in t). "logsnr": uniform in λ = log(α/σ) (DPM-Solver). "edm": uniform in
    (σ/α)^{1/ρ}, i.e. σ̃_i = (σ̃_max^{1/ρ} + i/n·(σ̃_min^{1/ρ} − σ̃_max^{1/ρ}))^ρ with σ̃ = σ/α = e^{−λ}
    (Karras et al.).
    Times come back through the SDE's inverse of λ(t).
    """
    _choice("time grid", grid, GRIDS)
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


def _steps(n: int, desc: str, progress: bool):
    return tqdm(range(n), desc=desc, disable=not progress)


def _ancestral_step(score_fn: ScoreFn, sde: SDE, x: torch.Tensor, t: torch.Tensor, s: torch.Tensor,
                    generator, add_noise: bool = True) -> torch.Tensor:
    """x_s = (x_t + σ_{t|s}²·∇log p_t(x_t)) / α_{t|s} + std·z: the mean is E[x_s | x_t] exactly (for the
    kernel x_t | x_s ~ N(α_{t|s} x_s, σ_{t|s}²)); std = sde.ancestral_noise_std(t, s) (DDPM: √β, SMLD: posterior)."""
    a, sigma_ts = sde.transition(t, s)
    x_mean = (x + _like(sigma_ts**2, x) * score_fn(x, t.to(x.dtype))) / _like(a, x)
    if not add_noise:
        return x_mean
    return x_mean + _like(sde.ancestral_noise_std(t, s), x) * _noise(x, generator)


# --------------------------------------------------------------------------------------------------
# Predictor–corrector (Song et al. 2021, Algorithms 2–5)
# --------------------------------------------------------------------------------------------------
@_register(PREDICTORS, "euler_maruyama")
def euler_maruyama_predictor(score_fn, sde, x, t, t_next, generator, probability_flow=False):
    """x ← x + drift·Δt + g·√|Δt|·z for the reverse SDE (or the probability-flow ODE), Δt = t_next − t < 0."""
    dt = (t_next - t).to(x.dtype)
    drift, diffusion = sde.reverse(score_fn, probability_flow).sde(x, t.to(x.dtype))
    return x + drift * dt + per_sample(diffusion, x) * torch.sqrt(-dt) * _noise(x, generator)


@_register(PREDICTORS, "reverse_diffusion")
def reverse_diffusion_predictor(score_fn, sde, x, t, t_next, generator, probability_flow=False):
    """Reverse of the forward chain's step from t_next to t: x ← x − f + G²·s + G·z (DDPM-/SMLD-style)."""
    rev_f, rev_G = sde.reverse(score_fn, probability_flow).discretize_interval(x, t.to(x.dtype), t_next)
    return x - rev_f + per_sample(rev_G, x) * _noise(x, generator)


@_register(PREDICTORS, "ancestral_sampling")
def ancestral_sampling_predictor(score_fn, sde, x, t, t_next, generator, probability_flow=False):
    """One ancestral step t → t_next (DDPM for VP, SMLD for VE, the exact Gaussian posterior for sub-VP)."""
    if probability_flow:
        raise ValueError("the ancestral_sampling predictor is stochastic by construction: use euler_maruyama or "
                         "reverse_diffusion with probability_flow=True")
    return _ancestral_step(score_fn, sde, x, t, t_next, generator)


@_register(PREDICTORS, "none")
def no_predictor(score_fn, sde, x, t, t_next, generator, probability_flow=False):
    return x


@_register(CORRECTORS, "langevin")
def langevin_corrector(score_fn, sde, x, t, generator, snr, n_steps):
    """n_steps of Langevin MCMC at time t (Algorithm 5): x ← x + ε·s + √(2ε)·z with ε = 2·scale·(snr·‖z‖/‖s‖)².

    As in score_sde's code, ‖z‖ and ‖s‖ are the batch means of the per-sample norms, so ε is one number per step.
    A per-sample ε(x) ∝ 1/‖s(x)‖² is a state-dependent step, whose Langevin chain does not target p_t; in low
    dimensions, where ‖s(x)‖ is often near 0 at a mode's centre, it throws points far out (tests show it).
    `scale` is discrete.langevin_step_scale (α_i = 1 − β_i of the DDPM chain for VP, 1 without a chain).
    """
    t = batch_time(t.to(x.dtype), x)
    scale = langevin_step_scale(sde, t)
    for _ in range(n_steps):
        grad, z = score_fn(x, t), _noise(x, generator)
        noise_norm, grad_norm = z.flatten(1).norm(dim=1).mean(), grad.flatten(1).norm(dim=1).mean()
        step = 2 * scale * (snr * noise_norm / grad_norm) ** 2
        x = x + per_sample(step, x) * grad + per_sample(torch.sqrt(2 * step), x) * z
    return x


@_register(CORRECTORS, "ald")
def annealed_langevin_corrector(score_fn, sde, x, t, generator, snr, n_steps):
    """Annealed Langevin dynamics (Song & Ermon 2019): step ε = 2·scale·(snr·σ(t))², x ← x + ε·s + √(2ε)·z."""
    t = batch_time(t.to(x.dtype), x)
    step = per_sample(2 * langevin_step_scale(sde, t) * (snr * sde.sigma(t)) ** 2, x)
    for _ in range(n_steps):
        x = x + step * score_fn(x, t) + torch.sqrt(2 * step) * _noise(x, generator)
    return x


@_register(CORRECTORS, "none")
def no_corrector(score_fn, sde, x, t, generator, snr, n_steps):
    return x


@_register(SAMPLERS, "pc")
def pc_sampler(score_fn: ScoreFn, sde: SDE, x: torch.Tensor, timesteps: torch.Tensor, *,
               predictor: str = "euler_maruyama", corrector: str = "none", snr: float = 0.16, n_steps: int = 1,
               probability_flow: bool = False, grid: str = "time", rho: float = EDM_RHO, generator=None,
               progress: bool = False, callback=None, constraint=None) -> torch.Tensor:
    """At each grid time t_i: the corrector at t_i, then the predictor from t_i to t_{i+1}.

    probability_flow=True makes the predictor integrate the probability-flow ODE (no noise), as in score_sde.
    grid: "time" (uniform, score_sde's), "logsnr" or "edm" (see `solver_grid`).
    """
    predict = _lookup(PREDICTORS, "predictor", predictor)
    correct = _lookup(CORRECTORS, "corrector", corrector)
    timesteps = solver_grid(sde, timesteps, grid, rho)
    x = _constrain(constraint, x, timesteps[0], None, score_fn, generator)
    for i in _steps(len(timesteps) - 1, f"pc {predictor}/{corrector}", progress):
        t, t_next = timesteps[i], timesteps[i + 1]
        if corrector != "none":
            x = _constrain(constraint, correct(score_fn, sde, x, t, generator, snr, n_steps), t, t, score_fn,
                           generator)
        x = predict(score_fn, sde, x, t, t_next, generator, probability_flow)
        x = _constrain(constraint, x, t_next, t, score_fn, generator)
        if callback is not None:
            callback(i, t_next, x)
    return x


# --------------------------------------------------------------------------------------------------
# Ancestral sampling (Ho et al. 2020, Algorithm 2)
# --------------------------------------------------------------------------------------------------
@_register(SAMPLERS, "ancestral")
def ancestral_sampler(score_fn: ScoreFn, sde: SDE, x: torch.Tensor, timesteps: torch.Tensor, *,
                      grid: str = "time", rho: float = EDM_RHO, generator=None, progress: bool = False,
                      callback=None, constraint=None) -> torch.Tensor:
    """x_{i+1} = (x_i + σ_{t|s}²·s(x_i, t_i))/α_{t|s} + std·z along the grid; the last step returns the mean (no noise).

    For VP on the DDPM grid this is Algorithm 2 with σ_t² = β_t; for VE it is SMLD's ancestral sampler.
    """
    timesteps = solver_grid(sde, timesteps, grid, rho)
    x = _constrain(constraint, x, timesteps[0], None, score_fn, generator)
    n = len(timesteps) - 1
    for i in _steps(n, "ancestral", progress):
        t, s = timesteps[i], timesteps[i + 1]
        x = _ancestral_step(score_fn, sde, x, t, s, generator, add_noise=i < n - 1)
        x = _constrain(constraint, x, s, t, score_fn, generator)
        if callback is not None:
            callback(i, s, x)
    return x


# --------------------------------------------------------------------------------------------------
# Probability-flow ODE: adaptive Dormand–Prince RK45, on the device (or scipy's solve_ivp), and its inverse
# --------------------------------------------------------------------------------------------------
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
ODE_MAX_STEPS = 100_000


def _rms(v: torch.Tensor) -> float:
    return v.pow(2).mean().sqrt().item()


def dopri5(fn: Callable[[float, torch.Tensor], torch.Tensor], y0: torch.Tensor, t0: float, t1: float, *,
           rtol: float = ODE_RTOL, atol: float = ODE_ATOL,
           callback: Optional[Callable[[int, float, torch.Tensor], None]] = None,
           project: Optional[Callable[[float, float, torch.Tensor], torch.Tensor]] = None) -> torch.Tensor:
    """Solve dy/dt = fn(t, y) from t0 to t1 (either direction) with adaptive Dormand–Prince RK45.

    The state stays a tensor on its device; one step size serves the whole batch, and the error is the RMS over
    all elements of err / (atol + rtol·max(|y|, |y_new|)), as in scipy's RK45 (whose step control this follows,
    including Hairer's initial step). fn(t, y) gets t as a Python float. callback(i, t, y) after accepted steps.
    project(t, t_prev, y) -> y, if given, replaces the state after every accepted step from t_prev to t (a
    constraint); the first-same-as-last derivative is then re-evaluated at the new state (one more fn call per step,
    none after the last).
    """
    direction = 1.0 if t1 > t0 else -1.0
    t, y = float(t0), y0
    f = fn(t, y)
    # Initial step (Hairer, Nørsett & Wanner, Solving ODEs I, II.4), one extra evaluation.
    scale = atol + rtol * y.abs()
    d0, d1 = _rms(y / scale), _rms(f / scale)
    h0 = 1e-6 if d0 < 1e-5 or d1 < 1e-5 else 0.01 * d0 / d1
    h0 = min(h0, abs(t1 - t0))
    f1 = fn(t + direction * h0, y + direction * h0 * f)
    d2 = _rms((f1 - f) / scale) / h0
    h1 = max(1e-6, h0 * 1e-3) if max(d1, d2) <= 1e-15 else (0.01 / max(d1, d2)) ** (1 / 5)
    h = min(100 * h0, h1)
    accepted = 0
    for _ in range(ODE_MAX_STEPS):
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
        accepted += 1
    raise RuntimeError(f"dopri5 did not reach t1={t1} in {ODE_MAX_STEPS} steps (stopped at t={t})")


def scipy_rk45(fn, y0: torch.Tensor, t0: float, t1: float, *, rtol: float, atol: float, callback=None,
               project=None):
    """The same problem with scipy.integrate.solve_ivp(method="RK45"): float64 on the host, copied every call.

    With `project` (see `dopri5`) scipy's RK45 stepper runs one accepted step at a time; after each, the state is
    projected and a new stepper starts there with the last step size (its first evaluation is the derivative at
    the projected state, like dopri5's re-evaluation).
    """
    from scipy import integrate

    shape, dtype, device = y0.shape, y0.dtype, y0.device

    def to_torch(y):
        return torch.from_numpy(y).reshape(shape).to(device=device, dtype=dtype)

    def rhs(t, y):
        return fn(t, to_torch(y)).detach().cpu().double().numpy().reshape(-1)

    if project is not None:
        return _scipy_rk45_projected(rhs, y0, t0, t1, rtol=rtol, atol=atol, callback=callback, project=project,
                                     to_torch=to_torch)

    solution = integrate.solve_ivp(rhs, (t0, t1), y0.detach().cpu().double().numpy().reshape(-1),
                                   rtol=rtol, atol=atol, method="RK45")
    if not solution.success:
        raise RuntimeError(f"solve_ivp failed: {solution.message}")
    if callback is not None:
        for i, (t, y) in enumerate(zip(solution.t[1:], solution.y.T[1:])):
            callback(i, t, torch.from_numpy(y).reshape(shape).to(device=device, dtype=dtype))
    return torch.from_numpy(solution.y[:, -1]).reshape(shape).to(device=device, dtype=dtype)


def _scipy_rk45_projected(rhs, y0: torch.Tensor, t0: float, t1: float, *, rtol, atol, callback, project, to_torch):
    from scipy import integrate

    def stepper(t, y, first_step=None):
        return integrate.RK45(rhs, t, y.detach().cpu().double().numpy().reshape(-1), t1, rtol=rtol, atol=atol,
                              first_step=first_step)

    solver, y = stepper(t0, y0), y0
    for accepted in range(ODE_MAX_STEPS):
        t_prev = solver.t
        message = solver.step()
        if solver.status == "failed":
            raise RuntimeError(f"RK45 failed at t={solver.t}: {message}")
        y = project(solver.t, t_prev, to_torch(solver.y))
        if callback is not None:
            callback(accepted, solver.t, y)
        if solver.status == "finished":
            return y
        solver = stepper(solver.t, y, first_step=min(solver.step_size, abs(t1 - solver.t)))
    raise RuntimeError(f"RK45 did not reach t1={t1} in {ODE_MAX_STEPS} steps")


def _integrate_pf_ode(score_fn: ScoreFn, sde: SDE, x: torch.Tensor, t0: float, t1: float, *, rtol: float,
                      atol: float, backend: str, callback=None, project=None) -> torch.Tensor:
    """Move x from time t0 to t1 along the probability-flow ODE dx/dt = f(x, t) − ½g(t)²·∇log p_t(x);
    project(t, t_prev, x) -> x after every accepted step, if given."""
    _choice("ODE backend", backend, ODE_BACKENDS)
    flow = sde.reverse(score_fn, probability_flow=True)

    def fn(t: float, y: torch.Tensor) -> torch.Tensor:
        return flow.sde(y, batch_time(t, y))[0]

    solve = dopri5 if backend == "torch" else scipy_rk45
    wrapped = None if callback is None else (lambda i, t, y: callback(i, torch.tensor(t, dtype=torch.float64), y))
    return solve(fn, x, float(t0), float(t1), rtol=rtol, atol=atol, callback=wrapped, project=project)


@_register(SAMPLERS, "ode")
def ode_sampler(score_fn: ScoreFn, sde: SDE, x: torch.Tensor, timesteps: torch.Tensor, *,
                rtol: float = ODE_RTOL, atol: float = ODE_ATOL, backend: str = "torch",
                generator=None, progress: bool = False, callback=None, constraint=None) -> torch.Tensor:
    """Probability-flow ODE from timesteps[0] = T to timesteps[-1] = eps with adaptive RK45 (only the grid's ends
    are used). backend "torch" (default): `dopri5` here, the state stays on its device; "scipy": solve_ivp.

    A constraint acts after every accepted step, as an operator splitting: the solver then restarts from the
    constrained state, re-evaluating the derivative there (one more score call per accepted step).
    """
    bar = tqdm(desc="ode", disable=not progress)
    project = None
    if constraint is not None:
        x = _constrain(constraint, x, timesteps[0], None, score_fn, generator)

        def project(t, t_prev, y):
            return _constrain(constraint, y, t, t_prev, score_fn, generator)

    def on_step(i, t, y):
        bar.update(1)
        if callback is not None:
            callback(i, t, y)

    x = _integrate_pf_ode(score_fn, sde, x, timesteps[0].item(), timesteps[-1].item(), rtol=rtol, atol=atol,
                          backend=backend, callback=on_step, project=project)
    bar.close()
    return x


def ode_encode(score_fn: ScoreFn, sde: SDE, x: torch.Tensor, *, eps: Optional[float] = None,
               rtol: float = ODE_RTOL, atol: float = ODE_ATOL, backend: str = "torch") -> Tuple[torch.Tensor, int]:
    """Data → latent: integrate the probability-flow ODE from eps up to T. Returns (z, nfe); x and z are (batch, ...).

    The inverse of `ode_decode` up to the solver tolerance (the map is a bijection for a fixed score).
    """
    eps = sde.default_eps if eps is None else float(eps)
    counted = CountingScore(score_fn)
    with torch.no_grad():
        z = _integrate_pf_ode(counted, sde, x, eps, sde.T, rtol=rtol, atol=atol, backend=backend)
    return z, counted.calls


def ode_decode(score_fn: ScoreFn, sde: SDE, z: torch.Tensor, *, eps: Optional[float] = None,
               rtol: float = ODE_RTOL, atol: float = ODE_ATOL, backend: str = "torch") -> Tuple[torch.Tensor, int]:
    """Latent → data: integrate the probability-flow ODE from T down to eps (no denoising). Returns (x, nfe)."""
    eps = sde.default_eps if eps is None else float(eps)
    counted = CountingScore(score_fn)
    with torch.no_grad():
        x = _integrate_pf_ode(counted, sde, z, sde.T, eps, rtol=rtol, atol=atol, backend=backend)
    return x, counted.calls


# --------------------------------------------------------------------------------------------------
# Reverse SDE with torchsde
# --------------------------------------------------------------------------------------------------
class _FlippedReverseSDE:
    """The reverse-time SDE in the forward time s = T − t that torchsde integrates, on flattened states (batch, d).

    dx = −[f(x, t) − g(t)²·∇log p_t(x)] ds + g(t) dW_s  (diagonal noise). g depends on t only, so Milstein's
    correction vanishes. Recent drifts are cached by (state identity, s): torchsde's shape check and the first
    stage ask for the same drift, and its diagonal SRK re-evaluates earlier stages; the cache makes each distinct
    (state, time) one score call (torchsde never modifies these tensors in place).
    """

    noise_type, sde_type = "diagonal", "ito"
    CACHE_SIZE = 8  # more than the stages of any torchsde method used here

    def __init__(self, score_fn: ScoreFn, sde: SDE, shape: Sequence[int], T: float):
        self.reverse, self.forward, self.shape, self.T = sde.reverse(score_fn), sde, tuple(shape), T
        self._cache: List[Tuple[torch.Tensor, float, torch.Tensor]] = []

    def f(self, s, y):
        key = float(s)
        for state, time, drift in self._cache:
            if state is y and time == key:
                return drift
        x = y.reshape(self.shape)
        drift = -self.reverse.sde(x, batch_time(self.T - key, x))[0].reshape(y.shape)
        self._cache = (self._cache + [(y, key, drift)])[-self.CACHE_SIZE:]
        return drift

    def g(self, s, y):
        x = y.reshape(self.shape)
        g = self.forward.sde(x, batch_time(self.T - float(s), x))[1]
        return g[:, None].expand_as(y)


@_register(SAMPLERS, "sde")
def torchsde_sampler(score_fn: ScoreFn, sde: SDE, x: torch.Tensor, timesteps: torch.Tensor, *,
                     sde_method: str = "euler", grid: str = "time", rho: float = EDM_RHO, generator=None,
                     progress: bool = False, callback=None, constraint=None) -> torch.Tensor:
    """Reverse SDE with torchsde's fixed-step `euler`, `milstein` (derivative-free) or `srk` on the given grid.

    torchsde integrates forward in time, so the solver runs in s = T − t. The Brownian motion is a
    torchsde.BrownianInterval seeded from `generator` (space-time Lévy area for srk), so samples are reproducible.
    The explicit multi-stage srk needs short steps where β(t) is large: on the cosine schedule (β clipped at 999
    near T) use grid="logsnr", which puts steps there.
    """
    import torchsde

    _choice("sde_method", sde_method, SDE_METHODS)
    timesteps = solver_grid(sde, timesteps, grid, rho)
    T = timesteps[0].item()
    s_grid = (timesteps[0] - timesteps).to(x.dtype)  # 0 = s_0 < s_1 < … < T − eps
    y = _constrain(constraint, x, timesteps[0], None, score_fn, generator).reshape(x.shape[0], -1)
    entropy = None
    if generator is not None:
        entropy = int(torch.randint(2**62, (1,), generator=generator, device=generator.device).item())
    bm = torchsde.BrownianInterval(t0=s_grid[0], t1=s_grid[-1], size=tuple(y.shape), dtype=x.dtype, device=x.device,
                                   entropy=entropy,
                                   levy_area_approximation="space-time" if sde_method == "srk" else "none")
    flipped = _FlippedReverseSDE(score_fn, sde, x.shape, T)
    options = {"grad_free": True} if sde_method == "milstein" else None
    for i in _steps(len(s_grid) - 1, f"sde {sde_method}", progress):
        interval = s_grid[i:i + 2]
        # dt larger than the interval: torchsde clips the step at the interval's end, so exactly one step is taken.
        y = torchsde.sdeint(flipped, y, interval, bm=bm, method=sde_method, dt=2 * (interval[1] - interval[0]).item(),
                            options=options)[-1]
        if constraint is not None:
            y = _constrain(constraint, y.reshape(x.shape), timesteps[i + 1], timesteps[i], score_fn,
                           generator).reshape(y.shape)
        if callback is not None:
            callback(i, timesteps[i + 1], y.reshape(x.shape))
    return y.reshape(x.shape)


# --------------------------------------------------------------------------------------------------
# Fast solvers of the probability-flow ODE (and DDIM's stochastic family), in terms of α, σ, λ
# --------------------------------------------------------------------------------------------------
@_register(SAMPLERS, "ddim")
def ddim_sampler(score_fn: ScoreFn, sde: SDE, x: torch.Tensor, timesteps: torch.Tensor, *, eta: float = 0.0,
                 grid: str = "time", rho: float = EDM_RHO, generator=None, progress: bool = False,
                 callback=None, constraint=None) -> torch.Tensor:
    """DDIM (Song, Meng & Ermon 2021) from t to s < t:

        x_s = α_s·x̂_0 + √(σ_s² − c²)·ε̂ + c·z,   c = η·σ_{t|s}·σ_s/σ_t  (the posterior std times η)

    η = 0 is deterministic (a first-order probability-flow ODE solver, equal to DPM-Solver++ order 1 on the
    same grid); η = 1 is ancestral sampling with the posterior variance. One score call per step.
    """
    if eta < 0:
        raise ValueError(f"eta must be ≥ 0, got {eta}")
    ts = solver_grid(sde, timesteps, grid, rho)
    x = _constrain(constraint, x, ts[0], None, score_fn, generator)
    for i in _steps(len(ts) - 1, f"ddim η={eta}", progress):
        t, s = ts[i], ts[i + 1]
        x0, eps_hat = _denoised_and_noise(score_fn, sde, x, t)
        sigma_s = sde.sigma(s)
        c = eta * sde.transition(t, s)[1] * sigma_s / sde.sigma(t)
        x = _like(sde.alpha(s), x) * x0 + _like(torch.sqrt((sigma_s**2 - c**2).clamp(min=0)), x) * eps_hat
        if eta > 0:
            x = x + _like(c, x) * _noise(x, generator)
        x = _constrain(constraint, x, s, t, score_fn, generator)
        if callback is not None:
            callback(i, s, x)
    return x


def dpm_solver_pp_update(x: torch.Tensor, x0_history: List[torch.Tensor], lam_history: List[torch.Tensor],
                         lam_next: torch.Tensor, sigma_ratio: torch.Tensor, alpha_next: torch.Tensor,
                         order: int) -> torch.Tensor:
    """One DPM-Solver++ multistep update (Lu et al. 2022, data prediction), from λ_0 = lam_history[-1] to lam_next.

    x0_history[-1], [-2], [-3] are x̂_0 at λ_0, λ_{-1}, λ_{-2} (newest last); h = lam_next − λ_0, r_k = h_k/h.
        order 1:  x' = (σ'/σ)·x − α'·φ₁·m_0,                 φ₁ = e^{−h} − 1
        order 2:  x' = (σ'/σ)·x − α'·φ₁·(m_0 + D₁/2),        D₁ = (m_0 − m_{−1})/r_0
        order 3:  x' = (σ'/σ)·x − α'·φ₁·m_0 + α'·φ₂·D₁ − α'·φ₃·D₂,  φ₂ = φ₁/h + 1, φ₃ = φ₂/h − ½,
                  with D₁, D₂ the first and second divided differences of m on the λ grid (as in DPM-Solver's code).
    Coefficients are float64 0-d tensors.
    """
    h = lam_next - lam_history[-1]
    phi_1 = torch.expm1(-h)
    m0 = x0_history[-1]
    out = _like(sigma_ratio, x) * x - _like(alpha_next * phi_1, x) * m0
    if order == 1:
        return out
    r0 = (lam_history[-1] - lam_history[-2]) / h
    d1_0 = (m0 - x0_history[-2]) / _like(r0, x)
    if order == 2:
        return out - 0.5 * _like(alpha_next * phi_1, x) * d1_0
    r1 = (lam_history[-2] - lam_history[-3]) / h
    d1_1 = (x0_history[-2] - x0_history[-3]) / _like(r1, x)
    d1 = d1_0 + _like(r0 / (r0 + r1), x) * (d1_0 - d1_1)
    d2 = (d1_0 - d1_1) / _like(r0 + r1, x)
    phi_2 = phi_1 / h + 1.0
    phi_3 = phi_2 / h - 0.5
    return out + _like(alpha_next * phi_2, x) * d1 - _like(alpha_next * phi_3, x) * d2


@_register(SAMPLERS, "dpm_solver")
def dpm_solver_sampler(score_fn: ScoreFn, sde: SDE, x: torch.Tensor, timesteps: torch.Tensor, *, order: int = 3,
                       grid: str = "logsnr", rho: float = EDM_RHO, lower_order_final: bool = True,
                       generator=None, progress: bool = False, callback=None, constraint=None) -> torch.Tensor:
    """DPM-Solver++ multistep (Lu et al. 2022) of order 1–3 on a grid uniform in λ (by default).

    The first steps use the orders their history allows; with lower_order_final the last steps drop to order
    min(order, steps left), so the final step is first order. One score call per step.
    With a constraint that only overwrites the coordinates it fixes (replacement: `moves_free_coordinates` False),
    the free coordinates stay on one trajectory and the history is kept: the fixed ones are overwritten after
    every step anyway. A constraint that moves the free coordinates too (RePaint's rounds) leaves the x̂_0 history
    on a trajectory the solver has left, whose divided differences would extrapolate across the jump; as ODE
    solvers do after a discontinuity, the history then restarts after every step, so every step is first order
    (DDIM on the chosen grid). Both choices are measured on the Gaussian oracle in BENCHMARKS.md.
    """
    if order not in (1, 2, 3):
        raise ValueError(f"DPM-Solver++ order must be 1, 2 or 3, got {order}")
    ts = solver_grid(sde, timesteps, grid, rho)
    lam = sde.log_snr(ts)
    n = len(ts) - 1
    x = _constrain(constraint, x, ts[0], None, score_fn, generator)
    x0_history: List[torch.Tensor] = []
    for i in _steps(n, f"dpm_solver++ {order}", progress):
        t, s = ts[i], ts[i + 1]
        x0_history = (x0_history + [_denoised_and_noise(score_fn, sde, x, t)[0]])[-order:]
        known = len(x0_history)  # = min(order, i + 1) without a constraint
        step_order = min(order, known, n - i) if lower_order_final else min(order, known)
        x = dpm_solver_pp_update(x, x0_history, list(lam[i + 1 - known:i + 1]), lam[i + 1],
                                 sde.sigma(s) / sde.sigma(t), sde.alpha(s), step_order)
        if constraint is not None:
            x = _constrain(constraint, x, s, t, score_fn, generator)
            if getattr(constraint, "moves_free_coordinates", True):
                x0_history = []
        if callback is not None:
            callback(i, s, x)
    return x


@_register(SAMPLERS, "heun")
def heun_sampler(score_fn: ScoreFn, sde: SDE, x: torch.Tensor, timesteps: torch.Tensor, *, rho: float = EDM_RHO,
                 grid: str = "edm", generator=None, progress: bool = False, callback=None,
                 constraint=None) -> torch.Tensor:
    """EDM's deterministic 2nd-order sampler (Karras et al. 2022, Algorithm 1) for any α(t), σ(t).

    In the scaled state x̃ = x/α with noise level σ̃ = σ/α the probability-flow ODE is dx̃/dσ̃ = ε̂(x, t)
    (EDM's (x̃ − D(x̃; σ̃))/σ̃). Each step is Heun's method (trapezoid of ε̂ at both ends) on the ρ-spaced σ̃ grid;
    the last step is Euler. 2·steps − 1 score calls.
    """
    ts = solver_grid(sde, timesteps, grid, rho)
    sig = torch.exp(-sde.log_snr(ts))  # σ̃_i = σ(t_i)/α(t_i)
    n = len(ts) - 1
    y = _constrain(constraint, x, ts[0], None, score_fn, generator) / _like(sde.alpha(ts[0]), x)
    for i in _steps(n, "heun", progress):
        t, s = ts[i], ts[i + 1]
        d = _denoised_and_noise(score_fn, sde, _like(sde.alpha(t), x) * y, t)[1]
        dsig = _like(sig[i + 1] - sig[i], x)
        y_next = y + dsig * d
        if i < n - 1:
            d_next = _denoised_and_noise(score_fn, sde, _like(sde.alpha(s), x) * y_next, s)[1]
            y_next = y + dsig * 0.5 * (d + d_next)
        y = y_next
        if constraint is not None:  # constraints act on x = α·x̃
            alpha_s = _like(sde.alpha(s), x)
            y = _constrain(constraint, alpha_s * y, s, t, score_fn, generator) / alpha_s
        if callback is not None:
            callback(i, s, _like(sde.alpha(s), x) * y)
    return _like(sde.alpha(ts[-1]), x) * y
