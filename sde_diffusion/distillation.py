"""Few-step students of any trained model: consistency distillation and training (Song et al. 2023; Song & Dhariwal
2023), progressive distillation (Salimans & Ho 2022), and the exact probability-flow map they are checked against.

Everything lives in EDM's frame of the SDE: x̃ = x_t/α(t) at noise level s(t) = σ(t)/α(t), where the
probability-flow ODE is dx̃/ds = (x̃ − D(x̃, s))/s with D = x̂₀ = (x + σ²·∇log p_t(x))/α (Tweedie). Models enter as
score functions (x, t (batch,)) → score; a consistency model's f is its Tweedie estimate
(parameterization "consistency"). Shapes: x (batch, ...), t (batch,); grids of times are float64.

* Consistency losses: n ~ a level distribution, x_{n+1} = α·x0 + σ·z at t_{n+1}, and x_n at t_n from one step of the
  teacher's ODE (distillation) or from the same z (training, no teacher); the loss is
  λ(n)·d(f(x_{n+1}, t_{n+1}), stopgrad f(x_n, t_n)) with d iCT's pseudo-Huber distance.
* Progressive distillation: the student's one DDIM step from t_i to t_{i+1} of an N-step grid matches the teacher's
  two DDIM steps over the 2N-step grid; the target is the x̂₀ that makes one DDIM step land where the two did.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Tuple

import torch

from .students import DISTILL_METHODS
from .distributed import global_rows
from .errors import ConfigError, choice
from .parameterization import resolved_names
from .sampling.consistency import noise_level
from .sampling.flow import integrate_pf_ode
from .sampling.grids import EDM_RHO, make_grid
from .sampling.registry import get_sampler
from .sampling.stochastic import edm_times
from .sampling.terms import tweedie_denoise
from .sdes import SDE, ScoreFn, per_sample

Tensor = torch.Tensor
Shard = Tuple[int, int]  # (rank, world size)
ConsistencyFn = Callable[[Tensor, Tensor], Tensor]  # (x_t, t (batch,)) -> the state at eps over α(eps)

# Tolerance of the exact probability-flow map (relative and absolute, data units).
FLOW_MAP_RTOL = 1e-6
# iCT's pseudo-Huber scale (Song & Dhariwal 2023): c = 0.00054·√d for d numbers per example.
PSEUDO_HUBER_SCALE = 0.00054
# iCT's discretization curriculum: N(k) = min(s0·2^⌊k/K'⌋, s1) levels at step k of K, K' = K/(log2(s1/s0) + 1).
ICT_START_LEVELS, ICT_END_LEVELS = 10, 1280
# iCT's log-normal level distribution: p(n) ∝ erf((ln s_{n+1} − P_mean)/(√2·P_std)) − erf((ln s_n − P_mean)/(√2·P_std)).
ICT_P_MEAN, ICT_P_STD = -1.1, 2.0
# How consistency distillation draws and weights its levels (distill.level_sampling): Song et al.'s, or iCT's.
LEVEL_SAMPLINGS = ("uniform", "lognormal")
# The teacher's ODE step between adjacent levels (consistency distillation): EDM's Heun, vectorized over levels.
DEFAULT_SOLVER = "heun"


# --------------------------------------------------------------------------------------------------
# Time levels and the exact flow map
# --------------------------------------------------------------------------------------------------
def karras_times(sde: SDE, N: int, eps: Optional[float] = None, rho: float = EDM_RHO) -> Tensor:
    """N + 1 times eps = t_0 < t_1 < … < t_N = T (sde.t_max), uniform in s^{1/ρ} (EDM's spacing), float64."""
    if N < 1:
        raise ValueError(f"need N ≥ 1 levels, got {N}")
    eps = sde.default_eps if eps is None else float(eps)
    ends = torch.tensor([eps, sde.t_max], dtype=torch.float64)
    s_min, s_max = noise_level(sde, ends)
    times = edm_times(sde, s_min, s_max, N, rho)
    times[0], times[-1] = ends[0], ends[1]  # pin the ends exactly
    return times


def flow_map(score_fn: ScoreFn, sde: SDE, x: Tensor, t_from, t_to, rtol: float = FLOW_MAP_RTOL,
             atol: Optional[float] = None) -> Tensor:
    """Φ_{t_from→t_to}(x): x (batch, ...) at time t_from moved along the probability-flow ODE to t_to (floats or
    0-d tensors, either direction) by the package's adaptive Dormand–Prince; atol defaults to rtol. With an exact
    score (a mixture's `marginal_score_fn`) it is the exact consistency map up to the tolerance."""
    atol = rtol if atol is None else atol
    with torch.no_grad():
        return integrate_pf_ode(score_fn, sde, x, float(t_from), float(t_to), rtol=rtol, atol=atol, backend="torch")


def ict_level_count(step: int, total_steps: int, start: int = ICT_START_LEVELS, end: int = ICT_END_LEVELS) -> int:
    """iCT's number of levels N at training step `step` (0-based) of `total_steps`: doubling from `start` to `end`."""
    stages = int(math.log2(end / start)) + 1
    per_stage = max(total_steps // stages, 1)
    return min(start * 2 ** (step // per_stage), end)


def ict_level_probabilities(sde: SDE, levels: Tensor, p_mean: float = ICT_P_MEAN, p_std: float = ICT_P_STD
                            ) -> Tensor:
    """p(n), n = 0 … N−1, for levels t_0 < … < t_N: the mass of iCT's log-normal over ln s between s_n and s_{n+1}."""
    cdf = torch.erf((torch.log(noise_level(sde, levels)) - p_mean) / (math.sqrt(2.0) * p_std))
    mass = cdf.diff().clamp(min=0)
    return mass / mass.sum()


# --------------------------------------------------------------------------------------------------
# One step of the teacher's probability-flow ODE, per example
# --------------------------------------------------------------------------------------------------
def _frame(sde: SDE, t: Tensor, x: Tensor) -> Tuple[Tensor, Tensor]:
    """(s, α) at per-example times t (batch,), shaped to broadcast against x, in x's dtype."""
    return per_sample(noise_level(sde, t), x).to(x.dtype), per_sample(sde.alpha(t), x).to(x.dtype)


def heun_step(score_fn: ScoreFn, sde: SDE, x: Tensor, t_from: Tensor, t_to: Tensor) -> Tensor:
    """One Heun step of dx̃/ds = (x̃ − D(x̃, s))/s from t_from to t_to (both (batch,)): x at t_from → the state at
    t_to (two score calls)."""
    (s_from, alpha_from), (s_to, alpha_to) = _frame(sde, t_from, x), _frame(sde, t_to, x)

    def slope(x_tilde: Tensor, s: Tensor, alpha: Tensor, t: Tensor) -> Tensor:
        return (x_tilde - tweedie_denoise(score_fn, sde, alpha * x_tilde, t.to(x.dtype))) / s

    x_tilde = x / alpha_from
    d_from = slope(x_tilde, s_from, alpha_from, t_from)
    d_to = slope(x_tilde + (s_to - s_from) * d_from, s_to, alpha_to, t_to)
    return alpha_to * (x_tilde + (s_to - s_from) * 0.5 * (d_from + d_to))


def ddim_step(score_fn: ScoreFn, sde: SDE, x: Tensor, t_from: Tensor, t_to: Tensor) -> Tensor:
    """One deterministic DDIM step (Euler in x̃ over s) from t_from to t_to (both (batch,)):
    x̃' = x̂₀ + (s'/s)·(x̃ − x̂₀). One score call."""
    (s_from, alpha_from), (s_to, alpha_to) = _frame(sde, t_from, x), _frame(sde, t_to, x)
    x0 = tweedie_denoise(score_fn, sde, x, t_from.to(x.dtype))
    return alpha_to * (x0 + (s_to / s_from) * (x / alpha_from - x0))


def solver_step(score_fn: ScoreFn, sde: SDE, x: Tensor, t_from: Tensor, t_to: Tensor,
                solver: str = DEFAULT_SOLVER) -> Tensor:
    """One step of the probability-flow ODE from t_from to t_to (both (batch,)) by `solver`: "heun" (default) and
    "ddim" per example; any other registered deterministic fixed-step sampler (`check_solver`) runs once per
    distinct pair of times on its two-point grid."""
    if solver == "heun":
        return heun_step(score_fn, sde, x, t_from, t_to)
    if solver == "ddim":
        return ddim_step(score_fn, sde, x, t_from, t_to)
    sampler = get_sampler(solver)
    out = torch.empty_like(x)
    pairs = torch.stack([t_from, t_to], 1)
    for pair in torch.unique(pairs, dim=0):
        rows = (pairs == pair).all(1)
        out[rows] = sampler(score_fn, sde, x[rows], pair.to(torch.float64))
    return out


def check_solver(name: str, key: str = "distill.solver") -> None:
    """The solver of a teacher step must be a registered deterministic fixed-step sampler for any score (one that
    draws no noise); ValueError otherwise."""
    if name in ("heun", "ddim"):
        return
    sampler = get_sampler(name)
    if sampler.adaptive or sampler.takes_generator or sampler.parameterization is not None:
        raise ValueError(f"{key}={name!r}: one step of the teacher's ODE between two levels needs a deterministic "
                         "fixed-step sampler for any score, e.g. 'heun' (the default), 'ddim', 'dpm_solver' or 'unipc'")


def _draw(x0: Tensor, count: int, generator: Optional[torch.Generator], shard: Shard,
          probabilities: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """(n, z): level indices in 0 … count−1 (uniform, or by `probabilities`) and Gaussian noise like x0, drawn on
    the generator's device for the global batch (distributed.global_rows), this rank's rows on x0's device."""
    total, mine = global_rows(x0.shape[0], *shard)
    device = generator.device if generator is not None else x0.device
    if probabilities is None:
        n = torch.randint(0, count, (total,), generator=generator, device=device)
    else:
        n = torch.multinomial(probabilities.to(device), total, replacement=True, generator=generator)
    z = torch.randn((total, *x0.shape[1:]), generator=generator, device=device, dtype=x0.dtype)
    return n[mine].to(x0.device), z[mine].to(x0.device)


# --------------------------------------------------------------------------------------------------
# Consistency distillation and training
# --------------------------------------------------------------------------------------------------
def pseudo_huber(a: Tensor, b: Tensor, c: float) -> Tensor:
    """√(‖a − b‖² + c²) − c per example, (batch,), the norm over all but the first axis (iCT's metric)."""
    squared = (a - b).flatten(1).pow(2).sum(1)
    return torch.sqrt(squared + c**2) - c


def default_huber_c(x: Tensor) -> float:
    """iCT's c = 0.00054·√d for examples of d numbers."""
    return PSEUDO_HUBER_SCALE * math.sqrt(x[0].numel())


def consistency_fn(score_fn: ScoreFn, sde: SDE) -> ConsistencyFn:
    """f(x, t) of a consistency model given as a score function: its Tweedie estimate (x + σ²·score)/α."""
    return lambda x, t: tweedie_denoise(score_fn, sde, x, t)


def consistency_loss(student: ConsistencyFn, sde: SDE, x0: Tensor, levels: Tensor,
                     generator: Optional[torch.Generator], *, teacher: Optional[ScoreFn] = None,
                     target: Optional[ConsistencyFn] = None, solver: str = DEFAULT_SOLVER,
                     level_probabilities: Optional[Tensor] = None, weighted: bool = False,
                     huber_c: Optional[float] = None, shard: Shard = (0, 1)) -> Tensor:
    """The consistency loss, a scalar: n ~ level_probabilities (default uniform on 0 … N−1) per example,
    x_{n+1} = α·x0 + σ·z at t_{n+1} and x_n at t_n by one `solver` step of the teacher's ODE (consistency
    distillation, Song et al. 2023 Alg. 2) or, without a teacher, α·x0 + σ·z with the same z (consistency
    training, Alg. 3); the mean of λ(n)·d(f_student(x_{n+1}), stopgrad f_target(x_n)) with d pseudo-Huber of scale
    huber_c (default 0.00054·√d) and λ = 1/(s_{n+1} − s_n) when `weighted` (iCT), else 1.

    levels: N + 1 increasing times eps → T (`karras_times`); target: default the student (iCT's stop-gradient
    target). x0 (batch, ...); shard: (rank, world size), whose rows of the global batch's draws are this rank's."""
    n, z = _draw(x0, len(levels) - 1, generator, shard, level_probabilities)
    levels = levels.to(x0.device)
    t_now, t_next = levels[n], levels[n + 1]
    alpha, sigma = (per_sample(v(t_next), x0).to(x0.dtype) for v in (sde.alpha, sde.sigma))
    x_next = alpha * x0 + sigma * z
    with torch.no_grad():
        if teacher is None:
            alpha, sigma = (per_sample(v(t_now), x0).to(x0.dtype) for v in (sde.alpha, sde.sigma))
            x_now = alpha * x0 + sigma * z
        else:
            x_now = solver_step(teacher, sde, x_next, t_next, t_now, solver)
        anchor = (target or student)(x_now, t_now.to(x0.dtype))
    distance = pseudo_huber(student(x_next, t_next.to(x0.dtype)), anchor,
                            default_huber_c(x0) if huber_c is None else huber_c)
    if weighted:
        distance = distance / (noise_level(sde, t_next) - noise_level(sde, t_now)).to(distance)
    return distance.mean()


# --------------------------------------------------------------------------------------------------
# Progressive distillation
# --------------------------------------------------------------------------------------------------
def progressive_grid(sde: SDE, steps: int, rho: float = EDM_RHO, eps: Optional[float] = None) -> Tensor:
    """The `steps`-step grid T → eps of the "edm" spacing (ρ), as `sample(..., "ddim", grid="edm")` builds it: the
    2N-step grid holds the N-step one at its even indices."""
    eps = sde.default_eps if eps is None else float(eps)
    return make_grid(sde, "edm", "edm", steps, eps, rho)


def progressive_loss(student: ScoreFn, teacher: ScoreFn, sde: SDE, x0: Tensor, teacher_grid: Tensor,
                     generator: Optional[torch.Generator], shard: Shard = (0, 1)) -> Tensor:
    """Progressive distillation (Salimans & Ho 2022, Alg. 2), a scalar. teacher_grid: the teacher's 2N + 1 times
    T → eps; per example i ~ U{0 … N−1}, x_t = α·x0 + σ·z at t = teacher_grid[2i]; two teacher DDIM steps reach x″
    at t″ = teacher_grid[2i + 2]; the target x̂₀ = (x̃″ − (s″/s)·x̃)/(1 − s″/s) makes one DDIM step t → t″ land on x″.
    The loss is the mean of (1 + 1/s²)·mean‖x̂₀_student − target‖² (the paper's 'SNR + 1' weight, the v-loss)."""
    i, z = _draw(x0, (len(teacher_grid) - 1) // 2, generator, shard)
    teacher_grid = teacher_grid.to(x0.device)
    t, t_mid, t_end = teacher_grid[2 * i], teacher_grid[2 * i + 1], teacher_grid[2 * i + 2]
    alpha, sigma = (per_sample(v(t), x0).to(x0.dtype) for v in (sde.alpha, sde.sigma))
    x = alpha * x0 + sigma * z
    s, (s_end, alpha_end) = _frame(sde, t, x)[0], _frame(sde, t_end, x)
    with torch.no_grad():
        x_end = ddim_step(teacher, sde, ddim_step(teacher, sde, x, t, t_mid), t_mid, t_end)
        ratio = s_end / s
        target = (x_end / alpha_end - ratio * x / alpha) / (1 - ratio)
    error = (tweedie_denoise(student, sde, x, t.to(x0.dtype)) - target).flatten(1).pow(2).mean(1)
    return ((1 + 1 / s.flatten() ** 2) * error).mean()




# --------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------
def check_config(config) -> None:
    """The distill section alone (the teacher is checked by --mode distill, which reads it): ConfigError naming the
    key. A consistency method needs the consistency parameterization ("auto" gives it)."""
    d = config.distill
    if d.method is None:
        return
    choice("distill.method", d.method, DISTILL_METHODS)
    for key in ("levels", "steps", "teacher_steps"):
        if isinstance(d[key], bool) or not d[key] >= 1:
            raise ConfigError(f"distill.{key} must be a whole number ≥ 1, got {d[key]}")
    choice("distill.level_sampling", d.level_sampling, LEVEL_SAMPLINGS)
    if not 0 <= d.target_ema < 1:
        raise ConfigError(f"distill.target_ema must lie in [0, 1) (0: the student itself), got {d.target_ema}")
    if d.huber_c is not None and not d.huber_c > 0:
        raise ConfigError(f"distill.huber_c must be > 0 (or None: 0.00054·√d), got {d.huber_c}")
    try:
        check_solver(d.solver)
    except ValueError as err:
        raise ConfigError(f"distill.solver={d.solver!r}: {err}") from None
    if d.method == "progressive":
        rounds = progressive_rounds(d.teacher_steps, d.steps)
        if config.training.n_iters < len(rounds):
            raise ConfigError(f"training.n_iters={config.training.n_iters} is fewer than the {len(rounds)} rounds of "
                              f"progressive distillation from {d.teacher_steps} to {d.steps} steps")
    wanted = DISTILL_METHODS[d.method][0]
    if wanted is not None and resolved_names(config)[0] != wanted:
        raise ConfigError(f"distill.method={d.method!r} trains a {wanted!r} model, and model.parameterization="
                          f"{config.model.parameterization!r}: set model.parameterization='auto' (or {wanted!r})")
    if not config.training.continuous:
        raise ConfigError(f"distill.method={d.method!r} evaluates the networks at any time of the ODE: set "
                          "training.continuous=True (a discrete-time teacher cannot be distilled)")


def progressive_rounds(teacher_steps: int, steps: int) -> list:
    """The student step counts of progressive distillation's rounds, teacher_steps/2 … steps; ValueError unless
    teacher_steps = steps·2^k, k ≥ 1."""
    rounds, count = [], teacher_steps
    while count > steps and count % 2 == 0:
        count //= 2
        rounds.append(count)
    if count != steps or not rounds:
        raise ConfigError(f"distill.teacher_steps={teacher_steps} must be distill.steps={steps} times a power of 2 "
                          "(≥ 2): each round halves the teacher's steps")
    return rounds


__all__ = ["karras_times", "flow_map", "ict_level_count", "ict_level_probabilities", "heun_step", "ddim_step",
           "solver_step", "check_solver", "pseudo_huber", "default_huber_c", "consistency_fn", "consistency_loss",
           "progressive_grid", "progressive_loss", "progressive_rounds", "check_config", "FLOW_MAP_RTOL",
           "PSEUDO_HUBER_SCALE", "DEFAULT_SOLVER", "LEVEL_SAMPLINGS"]
