"""Fast solvers of the probability-flow ODE (and DDIM's stochastic family), in terms of α, σ, λ: `ddim`,
`dpm_solver` (DPM-Solver++ multistep) and `heun` (EDM's 2nd-order sampler)."""
from __future__ import annotations

import math
from typing import List, Literal, Tuple

import torch

from ..sdes import SDE, ScoreFn
from .registry import register_sampler
from .terms import denoised_and_noise, like, noise




@register_sampler("ddim", steps=200)
def ddim_sampler(score_fn: ScoreFn, sde: SDE, x: torch.Tensor, timesteps: torch.Tensor, *, eta: float = 0.0,
                 generator=None) -> torch.Tensor:
    """DDIM (Song, Meng & Ermon 2021) from t to s < t:

        x_s = α_s·x̂_0 + √(σ_s² − c²)·ε̂ + c·z,   c = η·σ_{t|s}·σ_s/σ_t  (the posterior std times η)

    η = 0 is deterministic (a first-order probability-flow ODE solver, equal to DPM-Solver++ order 1 on the
    same grid); η = 1 is ancestral sampling with the posterior variance. One score call per step.
    """
    if eta < 0:
        raise ValueError(f"eta must be ≥ 0, got {eta}")
    for t, s in zip(timesteps[:-1], timesteps[1:]):
        x0, eps_hat = denoised_and_noise(score_fn, sde, x, t)
        sigma_s = sde.sigma(s)
        c = eta * sde.transition(t, s)[1] * sigma_s / sde.sigma(t)
        x = like(sde.alpha(s), x) * x0 + like(torch.sqrt((sigma_s**2 - c**2).clamp(min=0)), x) * eps_hat
        if eta > 0:
            x = x + like(c, x) * noise(x, generator)
    return x


def dpm_solver_pp_update(x: torch.Tensor, x0_history: List[torch.Tensor], lam_history: List[torch.Tensor],
                         lam_next: torch.Tensor, sigma_ratio: torch.Tensor, alpha_next: torch.Tensor,
                         order: int, eta: float = 0.0) -> torch.Tensor:
    """One DPM-Solver++ multistep update (Lu et al. 2022, data prediction), from λ_0 = lam_history[-1] to lam_next.

    x0_history[-1], [-2], [-3] are x̂_0 at λ_0, λ_{-1}, λ_{-2} (newest last); h = lam_next − λ_0, r_k = h_k/h.
        order 1:  x' = (σ'/σ)·x − α'·φ₁·m_0,                 φ₁ = e^{−h} − 1
        order 2:  x' = (σ'/σ)·x − α'·φ₁·(m_0 + D₁/2),        D₁ = (m_0 − m_{−1})/r_0
        order 3:  x' = (σ'/σ)·x − α'·φ₁·m_0 + α'·φ₂·D₁ − α'·φ₃·D₂,  φ₂ = φ₁/h + 1, φ₃ = φ₂/h − ½,
                  with D₁, D₂ the first and second divided differences of m on the λ grid (as in DPM-Solver's code).
    eta > 0 gives the SDE variant's mean (DPM-Solver++ SDE, Lu et al. 2022, §5; 3M as in k-diffusion): the φ's take
    H = (1 + η)·h and x is scaled by (σ'/σ)·e^{−ηh}; the caller adds σ'·√(1 − e^{−2ηh})·z (η = 1: the reverse SDE).
    Coefficients are float64 0-d tensors.
    """
    h = lam_next - lam_history[-1]
    big_h = (1.0 + eta) * h
    phi_1 = torch.expm1(-big_h)
    m0 = x0_history[-1]
    out = like(sigma_ratio * torch.exp(-eta * h), x) * x - like(alpha_next * phi_1, x) * m0
    if order == 1:
        return out
    r0 = (lam_history[-1] - lam_history[-2]) / h
    d1_0 = (m0 - x0_history[-2]) / like(r0, x)
    if order == 2:
        return out - 0.5 * like(alpha_next * phi_1, x) * d1_0
    r1 = (lam_history[-2] - lam_history[-3]) / h
    d1_1 = (x0_history[-2] - x0_history[-3]) / like(r1, x)
    d1 = d1_0 + like(r0 / (r0 + r1), x) * (d1_0 - d1_1)
    d2 = (d1_0 - d1_1) / like(r0 + r1, x)
    phi_2 = phi_1 / big_h + 1.0
    phi_3 = phi_2 / big_h - 0.5
    return out + like(alpha_next * phi_2, x) * d1 - like(alpha_next * phi_3, x) * d2


@register_sampler("dpm_solver", steps=50)
def dpm_solver_sampler(score_fn: ScoreFn, sde: SDE, x: torch.Tensor, timesteps: torch.Tensor, *,
                       order: Literal[1, 2, 3] = 3, lower_order_final: bool = True) -> torch.Tensor:
    """DPM-Solver++ multistep (Lu et al. 2022) of order 1–3, on a grid uniform in λ by default.

    The first steps use the orders their history allows; with lower_order_final the last steps drop to order
    min(order, steps left), so the final step is first order. One score call per step.
    When the framework's constraint moves the free coordinates between evaluations (`score_fn.state_jumps`:
    RePaint's rounds), the x̂_0 history lies on a trajectory the solver has left, and its divided differences would
    extrapolate across the jump; as ODE solvers do after a discontinuity, the history then restarts at every step,
    so every step is first order (DDIM on the chosen grid; measured on the Gaussian oracle in BENCHMARKS.md).
    Replacement only overwrites the coordinates it fixes, so the history is kept.
    """
    lam = sde.log_snr(timesteps)
    n = len(timesteps) - 1
    restart = bool(getattr(score_fn, "state_jumps", False))
    x0_history: List[torch.Tensor] = []
    for i in range(n):
        t, s = timesteps[i], timesteps[i + 1]
        x0_history = ([] if restart else x0_history)[-(order - 1):] if order > 1 else []
        x0_history.append(denoised_and_noise(score_fn, sde, x, t)[0])
        known = len(x0_history)
        step_order = min(order, known, n - i) if lower_order_final else min(order, known)
        x = dpm_solver_pp_update(x, x0_history, list(lam[i + 1 - known:i + 1]), lam[i + 1],
                                 sde.sigma(s) / sde.sigma(t), sde.alpha(s), step_order)
    return x




def time_of(sde: SDE, sig: torch.Tensor) -> torch.Tensor:
    """The time at which σ/α = sig (0-d float64)."""
    return sde.t_from_log_snr(-torch.log(sig))


def host_sigmas(sig: torch.Tensor, sig_top: torch.Tensor) -> Tuple[List[float], float]:
    """σ̃ along a grid and σ̃(T) as Python floats, read from the device at once."""
    values = torch.cat([sig, sig_top.reshape(1)]).tolist()
    return values[:-1], values[-1]


def heun_segment(score_fn: ScoreFn, sde: SDE, x: torch.Tensor, times: torch.Tensor, *, euler_last: bool,
                 churn: float = 0.0, s_min: float = 0.0, s_max: float = math.inf, s_noise: float = 1.0,
                 generator=None) -> torch.Tensor:
    """EDM's Heun steps along `times` (float64, decreasing), with Algorithm 2's churn: at each t_i with
    s_min ≤ σ̃_i ≤ s_max, x̃ first gets noise raising σ̃_i to σ̂ = σ̃_i·(1 + γ) (at most σ̃(T)),
    γ = min(churn/steps, √2 − 1), the noise scaled by s_noise; then Euler to t_{i+1} and the trapezoid correction
    (skipped on the last step when euler_last). Score calls: 2 per step (one fewer with euler_last). Each update
    continues from the states the score saw, so a constraint applied there carries over.
    """
    sig = torch.exp(-sde.log_snr(times))
    sig_top = torch.exp(-sde.log_snr(torch.tensor(sde.t_max, dtype=torch.float64, device=times.device)))
    n = len(times) - 1
    gamma = min(churn / n, math.sqrt(2.0) - 1.0) if churn > 0 else 0.0
    # which steps churn is decided on host copies of σ̃: one read for the whole segment, none per step
    sig_host, sig_top_host = host_sigmas(sig, sig_top) if gamma > 0 else (None, None)
    for i in range(n):
        t, s = times[i], times[i + 1]
        x_hat, sig_hat, t_hat = x, sig[i], t
        if gamma > 0 and s_min <= sig_host[i] <= s_max:
            sig_hat = torch.minimum(sig[i] * (1.0 + gamma), sig_top)
            if min(sig_host[i] * (1.0 + gamma), sig_top_host) > sig_host[i]:
                t_hat = time_of(sde, sig_hat)
                spread = s_noise * torch.sqrt(sig_hat**2 - sig[i] ** 2)
                x_hat = like(sde.alpha(t_hat), x) * (x / like(sde.alpha(t), x) + like(spread, x) * noise(x, generator))
        d = denoised_and_noise(score_fn, sde, x_hat, t_hat)[1]  # a constraint acts on x_hat here: read it after
        dsig, alpha_s = like(sig[i + 1] - sig_hat, x), like(sde.alpha(s), x)
        x = alpha_s * (x_hat / like(sde.alpha(t_hat), x) + dsig * d)
        if not (euler_last and i == n - 1):
            d_next = denoised_and_noise(score_fn, sde, x, s)[1]
            x = x + alpha_s * dsig * 0.5 * (d_next - d)
    return x


@register_sampler("heun", grid="edm", steps=60, few_step_grid=None)
def heun_sampler(score_fn: ScoreFn, sde: SDE, x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """EDM's deterministic 2nd-order sampler (Karras et al. 2022, Algorithm 1) for any α(t), σ(t), on a grid
    spaced in (σ/α)^{1/ρ} by default: `heun_segment` without churn, the last step Euler. 2·steps − 1 score calls.
    """
    return heun_segment(score_fn, sde, x, timesteps, euler_last=True)
