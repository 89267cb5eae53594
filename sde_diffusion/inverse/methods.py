"""Posterior scores for linear inverse problems: ∇log p_t(x_t | y) = ∇log p_t(x_t) + ∇log p_t(y | x_t).

The prior's score is the model's; the likelihood p_t(y | x_t) = ∫ p(y | x_0) p(x_0 | x_t) dx_0 has no closed form,
and each method replaces p(x_0 | x_t) by a Gaussian around Tweedie's mean x̂_0 = (x_t + σ²·s)/α:

    p_t(y | x_t) ≈ N(y; A·x̂_0, σ_y²·I + A·V·Aᵀ),   ∇log p_t(y | x_t) ≈ Jᵀ·Aᵀ·(σ_y²·I + A·V·Aᵀ)⁻¹·(y − A·x̂_0)

with J = ∂x̂_0/∂x_t (a vector-Jacobian product through the network) and V held fixed:

| method  | V = Cov[x_0 | x_t] taken as                   | paper                        | cost per score call     |
|---------|-----------------------------------------------|------------------------------|-------------------------|
| `dps`   | 0, and a step ζ/‖y − A·x̂_0‖ instead of 1/σ_y² | Chung et al. 2023            | 1 forward + 1 backward  |
| `pigdm` | r_t²·I, r_t² = s²·σ̃²/(s² + σ̃²), σ̃ = σ/α       | Song et al. 2023 (ΠGDM)      | 1 forward + 1 backward  |
| `mmps`  | (σ²/α)·J: Tweedie's covariance, exact         | Rozet et al. 2024 (MMPS)     | 1 forward + 1 + cg_steps backward |

The solve is by conjugate gradients (CG); MMPS multiplies by A·V·Aᵀ with one more vector-Jacobian product per CG
step (J is a Hessian, symmetric, so J·v = Jᵀ·v). For a Gaussian prior with exact score, Tweedie's covariance is the
exact Cov[x_0 | x_t] and p_t(y | x_t) is exactly Gaussian, so `mmps` with cg_steps ≥ rank(A) gives the exact
posterior score (and `pigdm` too, for an isotropic N(μ, s²·I) prior with data_std = s).

A method is `fn(lin: Linearization, *, option=default, ...) -> ∇log p_t(y | x_t)` (like x), registered with
`@register_method("name")`; `posterior_score(score_fn, sde, obs, method="name", option=value)` makes the score
function every sampler takes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Literal, Optional

import torch

from ..options import Registry
from ..sdes import SDE, ScoreFn, batch_time, per_sample
from .observation import LinearObservation

# DPS's step ζ′/‖y − A·x̂_0‖ is per step of the paper's 1000-step DDPM chain; as a score it is divided by that
# chain's score coefficient g(t)²·Δt with Δt = (T − eps)/DPS_REFERENCE_STEPS on the SDE's own clock.
DPS_REFERENCE_STEPS = 1000


def dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample inner products, (n,)."""
    return (a * b).flatten(1).sum(1)


def conjugate_gradient(apply: Callable[[torch.Tensor], torch.Tensor], b: torch.Tensor, steps: int,
                       tol: float = 0.0) -> torch.Tensor:
    """Approximate u with apply(u) = b for a symmetric positive (semi)definite per-sample map, after `steps` CG
    iterations from u = 0 (fewer when every sample's residual falls to tol·‖b‖). b: (n, ...).

    A sample stops where its search direction meets curvature pᵀ·apply(p) ≤ 0 (truncated CG): a learned network's
    Jacobian is neither exactly symmetric nor positive, and a step along such a direction is unbounded."""
    u, r = torch.zeros_like(b), b.clone()
    p, rr = r.clone(), dot(r, r)
    active = rr > 0
    for _ in range(steps):
        Ap = apply(p)
        pAp = dot(p, Ap)
        active = active & (pAp > 0)
        a = torch.where(active, rr / pAp.clamp_min(torch.finfo(pAp.dtype).tiny), torch.zeros_like(rr))
        u, r = u + per_sample(a, p) * p, r - per_sample(a, p) * Ap
        rr_next = dot(r, r)
        active = active & (rr_next > tol**2 * dot(b, b))
        if tol > 0 and not bool(active.any()):  # a host read: only when asked to stop early
            break
        beta = torch.where(active, rr_next / rr.clamp_min(torch.finfo(rr.dtype).tiny), torch.zeros_like(rr))
        p, rr = r + per_sample(beta, p) * p, rr_next
    return u


@dataclass
class Linearization:
    """The prior at (x_t, t) as the methods see it. x: x_t (n, ...), with gradients; t: (n,) times; alpha, sigma:
    (n,) float64; score: the prior's score at x (detached); x0: Tweedie's x̂_0 (differentiable in x); Ax0: A·x̂_0;
    residual: y − A·x̂_0 (detached)."""

    x: torch.Tensor
    t: torch.Tensor
    alpha: torch.Tensor
    sigma: torch.Tensor
    score: torch.Tensor
    x0: torch.Tensor
    Ax0: torch.Tensor
    residual: torch.Tensor
    obs: LinearObservation
    sde: SDE

    def vjp(self, u: torch.Tensor) -> torch.Tensor:
        """Jᵀ·Aᵀ·u = ∇_{x_t}⟨A·x̂_0(x_t), u⟩ for u like y, (n, *x.shape[1:])."""
        return torch.autograd.grad(self.Ax0, self.x, u, retain_graph=True)[0]

    def covariance_product(self, v: torch.Tensor) -> torch.Tensor:
        """A·Cov[x_0 | x_t]·Aᵀ·v with Tweedie's Cov = (σ²/α)·J (J symmetric: J·Aᵀv = Jᵀ·Aᵀv)."""
        return self.per_y(self.sigma**2 / self.alpha, v) * self.obs.A(self.vjp(v))

    @staticmethod
    def per_y(c: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The per-sample coefficient c (n,) shaped to multiply v (n, ...), in v's dtype."""
        return per_sample(c.to(v), v)


METHODS = Registry("inverse method", leading=("lin",), passed=(), how="@inverse.register_method")
# method name → predicate on its options: True when it needs noise_std > 0.
NEEDS_NOISE: Dict[str, Callable[[Dict[str, Any]], bool]] = {}


def register_method(name: str, *, needs_noise: Callable[[Dict[str, Any]], bool] = lambda options: False,
                    replace: bool = False) -> Callable[[Callable], Callable]:
    """Decorator: make `fn(lin, *, option=default, ...) -> ∇log p_t(y | x_t)` the inverse-problem method `name`
    (`posterior_score(..., method=name)`, `sampling.inverse_method`). needs_noise(options): whether it divides by
    σ_y² with those options (posterior_score refuses noise_std = 0 then)."""
    def decorate(fn: Callable) -> Callable:
        METHODS.register(name, replace=replace)(fn)
        NEEDS_NOISE[name] = needs_noise
        return fn
    return decorate


def linearize(score_fn: ScoreFn, sde: SDE, obs: LinearObservation, x: torch.Tensor, t) -> Linearization:
    """One prior score call at (x, t) with the graph kept for vector-Jacobian products (grad mode is switched on)."""
    t = batch_time(t, x)
    x = x.detach().requires_grad_(True)
    score = score_fn(x, t)
    alpha, sigma = sde.alpha(t).double(), sde.sigma(t).double()
    x0 = (x + per_sample(sigma.to(x) ** 2, x) * score) / per_sample(alpha.to(x), x)
    Ax0 = obs.A(x0)
    return Linearization(x, t, alpha, sigma, score.detach(), x0, Ax0, (obs.y_like(x) - Ax0).detach(), obs, sde)


def posterior_score(score_fn: ScoreFn, sde: SDE, obs: LinearObservation, method: str = "mmps",
                    **options) -> ScoreFn:
    """score_fn(x, t) ↦ ∇log p_t(x | y) ≈ score_fn(x, t) + ∇log p_t(y | x) by the registered `method` (table in the
    module docstring) with its options; every sampler takes it. ValueError for an unknown method or option, or
    noise_std = 0 with a method that divides by it."""
    part, spec_options = METHODS.parse(method) if ":" in method else (METHODS.get(method), {})
    options = {**spec_options, **part.check_options(options)}
    if NEEDS_NOISE[part.name](options) and obs.noise_std <= 0:
        raise ValueError(f"inverse method {part.spec(options)!r} divides by the noise variance and the observation's "
                         "noise_std is 0: give noise_std > 0 or another method (mmps, pigdm, dps)")

    def posterior(x: torch.Tensor, t) -> torch.Tensor:
        with torch.enable_grad():
            lin = linearize(score_fn, sde, obs, x, t)
            guidance = part.fn(lin, **options)
        return (lin.score + guidance.detach()).to(x.dtype)

    posterior.method = part.spec(options)  # type: ignore[attr-defined]
    return posterior


@register_method("dps", needs_noise=lambda options: options.get("step") == "likelihood")
def dps(lin: Linearization, *, zeta: float = 1.0, step: Literal["normalized", "likelihood"] = "normalized"
        ) -> torch.Tensor:
    """DPS: −ρ·∇‖y − A·x̂_0‖² = 2ρ·Jᵀ·Aᵀ·r. step="normalized" (the paper's algorithm): ρ = ζ/‖r‖ per step of a
    DPS_REFERENCE_STEPS-step chain (ζ = 1 within the paper's 0.1–1 range for images); "likelihood": ρ = 1/(2σ_y²),
    the Gaussian likelihood around x̂_0 with V = 0 (its eq. 16)."""
    r = lin.residual
    if step == "likelihood":
        return lin.vjp(r) / lin.obs.noise_std**2
    sde = lin.sde
    chain_step = sde.diffusion_squared(lin.t.double()) * (sde.t_max - sde.default_eps) / DPS_REFERENCE_STEPS
    rho = zeta / (r.flatten(1).norm(dim=1).double().clamp_min(1e-12) * chain_step)
    return lin.per_y(2 * rho, lin.x) * lin.vjp(r)


@register_method("pigdm")
def pigdm(lin: Linearization, *, data_std: float = 1.0, cg_steps: int = 50) -> torch.Tensor:
    """ΠGDM: V = r_t²·I with r_t² = s²σ̃²/(s² + σ̃²), σ̃ = σ/α, s = data_std (the posterior variance of an N(0, s²)
    prior; the paper's s = 1); (σ_y²·I + r_t²·A·Aᵀ)⁻¹ by CG (exact in one step for masks and pooling)."""
    s2, noisy = data_std**2, (lin.sigma / lin.alpha) ** 2
    r2 = s2 * noisy / (s2 + noisy)
    A, var_y = lin.obs.A, lin.obs.noise_std**2

    def apply(v: torch.Tensor) -> torch.Tensor:
        return var_y * v + lin.per_y(r2, v) * A(A.adjoint(v))

    return lin.vjp(conjugate_gradient(apply, lin.residual, cg_steps, tol=1e-6))


@register_method("mmps")
def mmps(lin: Linearization, *, cg_steps: int = 3) -> torch.Tensor:
    """MMPS: V = Tweedie's covariance (σ²/α)·J; (σ_y²·I + A·V·Aᵀ)⁻¹ by `cg_steps` CG iterations, one vector-Jacobian
    product each. The paper finds 1–3 iterations enough; on random mixtures 1 fails at small σ_y (a gap of 6 nats/dim
    where 3 give 0.06, BENCHMARKS.md), so the default is 3."""
    var_y = lin.obs.noise_std**2

    def apply(v: torch.Tensor) -> torch.Tensor:
        return var_y * v + lin.covariance_product(v)

    return lin.vjp(conjugate_gradient(apply, lin.residual, cg_steps))
