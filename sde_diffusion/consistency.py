"""Consistency models (Song et al. 2023) for any SDE: the `consistency` parameterization, the multistep `consistency`
sampler, the exact probability-flow map `flow_map` (an oracle with an exact score), and consistency distillation.

Everything lives in EDM's frame of the SDE: x̃ = x_t/α(t) at noise level s(t) = σ(t)/α(t) (λ = −ln s), where the
probability-flow ODE is dx̃/ds = (x̃ − D(x̃, s))/s with D = x̂₀ = (x + σ²·∇log p_t(x))/α (Tweedie). A consistency
function f(x_t, t) maps every point of an ODE trajectory to its end at the smallest time eps (in x̃ units), so
f(x, eps) = x̃: the boundary condition, built into the parameterization by c_skip(s_min) = 1, c_out(s_min) = 0.

Importing this module registers the parameterization and the sampler (it is not imported by the package itself).
Shapes: x (batch, ...), t (batch,) or 0-d; times and noise levels float64 where they are grids.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Tuple

import torch

from .parameterization import EDM_SIGMA_DATA, Parameterization, register_parameterization
from .sampling.flow import integrate_pf_ode
from .sampling.grids import EDM_RHO
from .sampling.registry import register_sampler
from .sampling.stochastic import edm_times
from .sampling.terms import denoised_and_noise, like, noise, tweedie_denoise
from .sdes import SDE, ScoreFn, batch_time, per_sample

Tensor = torch.Tensor
ConsistencyFn = Callable[[Tensor, Tensor], Tensor]  # (x_t, t (batch,)) -> x̂₀ in x̃ units at eps
Network = Callable[[Tensor, Tensor], Tensor]  # (network input, noise condition) -> output

# Tolerance of the exact probability-flow map (relative and absolute, data units).
FLOW_MAP_RTOL = 1e-6
# iCT's pseudo-Huber scale (Song & Dhariwal 2023): c = 0.00054·√d for d numbers per example.
PSEUDO_HUBER_SCALE = 0.00054


def noise_level(sde: SDE, t) -> Tensor:
    """s(t) = σ(t)/α(t), EDM's noise level of the SDE (same shape as t)."""
    return sde.sigma(t) / sde.alpha(t)


def consistency_coefficients(s: Tensor, s_min: float, sigma_data: float = EDM_SIGMA_DATA
                             ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(c_skip, c_out, c_in, c_noise) at noise level s with the boundary at s_min (Song et al. 2023, App. C):
    c_skip = σ_d²/((s − s_min)² + σ_d²), c_out = σ_d·(s − s_min)/√(σ_d² + s²), c_in = 1/√(s² + σ_d²),
    c_noise = ¼·ln s. At s = s_min: c_skip = 1 and c_out = 0 exactly."""
    offset = s - s_min
    c_skip = sigma_data**2 / (offset**2 + sigma_data**2)
    c_out = sigma_data * offset / torch.sqrt(sigma_data**2 + s**2)
    c_in = 1.0 / torch.sqrt(s**2 + sigma_data**2)
    return c_skip, c_out, c_in, 0.25 * torch.log(s)


@register_parameterization("consistency")
class ConsistencyParameterization(Parameterization):
    """f(x_t, t) = c_skip(s)·x̃ + c_out(s)·F(c_in(s)·x̃, c_noise(s)), x̃ = x/α, s = σ/α, boundary s_min = s(eps).

    As a score: f is read as Tweedie's x̂₀, score = (α·f − x)/σ². eps: the smallest time (default the SDE's
    `default_eps`, where samplers stop). The noise conditioning defaults to `log_sigma` (¼·ln s = c_noise).
    """

    default_conditioning = "log_sigma"

    def __init__(self, sde: SDE, *, eps: Optional[float] = None, **kw):
        super().__init__(sde, **kw)
        self.eps = sde.default_eps if eps is None else float(eps)
        alpha, sigma = self.alpha_sigma(torch.tensor([self.eps], dtype=torch.float64))
        self.s_min = (sigma / alpha).item()

    def _frame(self, x: Tensor, t: Tensor):
        """α, σ (broadcast against x), x̃ = x/α and the coefficients at s = σ/α."""
        alpha, sigma = (per_sample(v, x) for v in self.alpha_sigma(t))
        s = sigma / alpha
        return alpha, sigma, x / alpha, consistency_coefficients(s, self.s_min, self.sigma_data)

    def network_input(self, x, t):
        _, _, x_tilde, (_, _, c_in, _) = self._frame(x, t)
        return c_in * x_tilde

    def consistency(self, output: Tensor, x: Tensor, t: Tensor) -> Tensor:
        """f(x, t) = c_skip·x̃ + c_out·F from the network output F (x̃ units: the state at eps over α(eps))."""
        _, _, x_tilde, (c_skip, c_out, _, _) = self._frame(x, t)
        return c_skip * x_tilde + c_out * output

    def score(self, output, x, t):
        alpha, sigma, _, _ = self._frame(x, t)
        return (alpha * self.consistency(output, x, t) - x) / sigma**2

    def output(self, score, x, t):
        """F with (α·f − x)/σ² = score; at s = s_min (c_out = 0) f = x̃ whatever F is, and F = 0 is returned."""
        alpha, sigma, x_tilde, (c_skip, c_out, _, _) = self._frame(x, t)
        x0 = (x + sigma**2 * score) / alpha
        safe = torch.where(c_out == 0, torch.ones_like(c_out), c_out)
        return torch.where(c_out == 0, torch.zeros_like(x0), (x0 - c_skip * x_tilde) / safe)

    def consistency_fn(self, network: Network) -> ConsistencyFn:
        """f(x, t) for `network(input, condition) -> F`; t a float or (batch,) tensor."""

        def consistency_fn(x: Tensor, t) -> Tensor:
            t = batch_time(t, x)
            output = network(self.network_input(x, t), self.condition(t))
            return self.consistency(output.to(x.dtype), x, t)

        return consistency_fn


# --------------------------------------------------------------------------------------------------
# Multistep consistency sampling
# --------------------------------------------------------------------------------------------------
@register_sampler("consistency", grid="edm", steps=1, few_step_grid=None)
def consistency_sampler(score_fn: ScoreFn, sde: SDE, x: Tensor, timesteps: Tensor, *, generator=None) -> Tensor:
    """Multistep consistency sampling (Song et al. 2023, Algorithm 1): x̂₀ = Tweedie(x_T) at t_0 = T, then at each
    later grid time t_i before eps: x̃ = x̂₀ + √(s(t_i)² − s(eps)²)·z (forward noise from eps to t_i; x̂₀ is a
    sample at eps in x̃ units), x̂₀ = Tweedie(α(t_i)·x̃, t_i). One score call per step: steps=1 is one call at T.

    Returns the state at eps, α(eps)·x̂₀: `sample`'s final Tweedie step (denoise=True, one more call) gives x̂₀
    back exactly for a consistency model (f(x, eps) = x̃); with denoise=False the result is α(eps)·x̂₀ (x̂₀ on EDM).
    """
    s_end = noise_level(sde, timesteps[-1])
    x0 = denoised_and_noise(score_fn, sde, x, timesteps[0])[0]
    for t in timesteps[1:-1]:
        spread = torch.sqrt((noise_level(sde, t) ** 2 - s_end**2).clamp(min=0))
        x_tilde = x0 + like(spread, x0) * noise(x0, generator)
        x0 = denoised_and_noise(score_fn, sde, like(sde.alpha(t), x0) * x_tilde, t)[0]
    return like(sde.alpha(timesteps[-1]), x0) * x0


# --------------------------------------------------------------------------------------------------
# The exact flow map (oracle) and the time levels of consistency training
# --------------------------------------------------------------------------------------------------
def flow_map(score_fn: ScoreFn, sde: SDE, x: Tensor, t_from, t_to, rtol: float = FLOW_MAP_RTOL,
             atol: Optional[float] = None) -> Tensor:
    """Φ_{t_from→t_to}(x): x (batch, ...) at time t_from moved along the probability-flow ODE to t_to (floats or
    0-d tensors, either direction) by the package's adaptive Dormand–Prince (`ode.solve`); atol defaults to rtol.
    With an exact score (a mixture's `marginal_score_fn`) it is the exact consistency map up to the tolerance."""
    atol = rtol if atol is None else atol
    with torch.no_grad():
        return integrate_pf_ode(score_fn, sde, x, float(t_from), float(t_to), rtol=rtol, atol=atol, backend="torch")


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


# --------------------------------------------------------------------------------------------------
# Consistency distillation
# --------------------------------------------------------------------------------------------------
def teacher_heun_step(teacher_score_fn: ScoreFn, sde: SDE, x: Tensor, t_from: Tensor, t_to: Tensor) -> Tensor:
    """One Heun step of the teacher's probability-flow ODE from t_from to t_to (both (batch,)) in EDM's frame:
    dx̃/ds = (x̃ − D(x̃, s))/s, D the teacher's x̂₀. x (batch, ...) at t_from; returns the state at t_to."""
    s_from, s_to = (per_sample(noise_level(sde, t), x).to(x.dtype) for t in (t_from, t_to))
    alpha_from, alpha_to = (per_sample(sde.alpha(t), x).to(x.dtype) for t in (t_from, t_to))

    def slope(x_tilde: Tensor, s: Tensor, alpha: Tensor, t: Tensor) -> Tensor:
        return (x_tilde - tweedie_denoise(teacher_score_fn, sde, alpha * x_tilde, t.to(x.dtype))) / s

    x_tilde = x / alpha_from
    step = s_to - s_from
    d_from = slope(x_tilde, s_from, alpha_from, t_from)
    x_euler = x_tilde + step * d_from
    d_to = slope(x_euler, s_to, alpha_to, t_to)
    return alpha_to * (x_tilde + step * 0.5 * (d_from + d_to))


def pseudo_huber(a: Tensor, b: Tensor, c: float) -> Tensor:
    """√(‖a − b‖² + c²) − c per example, (batch,), the norm over all but the first axis (iCT's metric)."""
    squared = (a - b).flatten(1).pow(2).sum(1)
    return torch.sqrt(squared + c**2) - c


def default_huber_c(x: Tensor) -> float:
    """iCT's c = 0.00054·√d for examples of d numbers."""
    return PSEUDO_HUBER_SCALE * math.sqrt(x[0].numel())


def consistency_distillation_loss(student: ConsistencyFn, target: ConsistencyFn, teacher_score_fn: ScoreFn,
                                  sde: SDE, x0: Tensor, levels: Tensor, generator: Optional[torch.Generator], *,
                                  huber_c: Optional[float] = None) -> Tensor:
    """Consistency distillation (Song et al. 2023, Algorithm 2), a scalar: with n ~ U{0, …, N−1} per example,
    x_{t_{n+1}} = α·x0 + σ·z, x̂_{t_n} = one teacher Heun step back to t_n, the mean of
    d(f_student(x_{t_{n+1}}, t_{n+1}), stopgrad f_target(x̂_{t_n}, t_n)) with d pseudo-Huber of scale huber_c
    (default iCT's 0.00054·√d). levels: karras_times(sde, N), N + 1 increasing times eps → T. x0 (batch, ...)."""
    batch = x0.shape[0]
    n = torch.randint(0, len(levels) - 1, (batch,), generator=generator).to(levels.device)
    t_now, t_next = levels[n], levels[n + 1]
    z = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)
    x_next = per_sample(sde.alpha(t_next), x0).to(x0.dtype) * x0 + per_sample(sde.sigma(t_next), x0).to(x0.dtype) * z
    with torch.no_grad():
        x_now = teacher_heun_step(teacher_score_fn, sde, x_next, t_next, t_now)
        anchor = target(x_now, t_now.to(x0.dtype))
    prediction = student(x_next, t_next.to(x0.dtype))
    c = default_huber_c(x0) if huber_c is None else huber_c
    return pseudo_huber(prediction, anchor, c).mean()


__all__ = ["ConsistencyParameterization", "consistency_coefficients", "consistency_sampler", "flow_map",
           "karras_times", "teacher_heun_step", "pseudo_huber", "consistency_distillation_loss", "noise_level",
           "FLOW_MAP_RTOL", "PSEUDO_HUBER_SCALE"]
