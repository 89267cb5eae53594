"""Stochastic samplers for few score evaluations: `dpm_solver_sde` (DPM-Solver++ 2M/3M SDE), `edm_sde` (EDM's
stochastic sampler, Karras et al. 2022 Algorithm 2), `restart` (Xu et al. 2023) and `adaptive_sde` (the
error-controlled reverse-SDE solver of Jolicoeur-Martineau et al. 2021).

Notation as in terms.py: x̃ = x/α, σ̃ = σ/α = e^{−λ}; in (x̃, σ̃) the probability-flow ODE is dx̃/dσ̃ = ε̂ and adding
noise of variance σ̃_b² − σ̃_a² to x̃ moves a sample of p at σ̃_a to one of p at σ̃_b (the forward process).
"""
from __future__ import annotations

from typing import List, Literal, Optional

import torch

from ..sdes import SDE, ScoreFn, batch_time, per_sample
from .fast import dpm_solver_pp_update, heun_segment, time_of
from .grids import EDM_RHO
from .registry import register_sampler
from .terms import denoised_and_noise, like, noise


@register_sampler("dpm_solver_sde", steps=40)
def dpm_solver_sde_sampler(score_fn: ScoreFn, sde: SDE, x: torch.Tensor, timesteps: torch.Tensor, *,
                           order: Literal[1, 2, 3] = 2, eta: float = 1.0, lower_order_final: bool = True,
                           generator=None) -> torch.Tensor:
    """DPM-Solver++ SDE multistep (2M SDE: Lu et al. 2022; 3M SDE as in k-diffusion): the exact integral of the
    linear part of the reverse SDE with the x̂_0 history extrapolated in λ (`dpm_solver_pp_update` with η), plus
    σ_s·√(1 − e^{−2ηh})·z. eta = 1 integrates the reverse SDE, 0 the probability-flow ODE (`dpm_solver`). Warm start
    and lower_order_final as in `dpm_solver`. One score call per step.
    """
    if eta < 0:
        raise ValueError(f"eta must be ≥ 0, got {eta}")
    lam = sde.log_snr(timesteps)
    n = len(timesteps) - 1
    x0_history: List[torch.Tensor] = []
    for i in range(n):
        t, s = timesteps[i], timesteps[i + 1]
        x0_history = (x0_history + [denoised_and_noise(score_fn, sde, x, t)[0]])[-order:]
        known = len(x0_history)
        step_order = min(order, known, n - i) if lower_order_final else min(order, known)
        x = dpm_solver_pp_update(x, x0_history, list(lam[i + 1 - known:i + 1]), lam[i + 1],
                                 sde.sigma(s) / sde.sigma(t), sde.alpha(s), step_order, eta=eta)
        if eta > 0:
            h = lam[i + 1] - lam[i]
            x = x + like(sde.sigma(s) * torch.sqrt(-torch.expm1(-2 * eta * h)), x) * noise(x, generator)
    return x


@register_sampler("edm_sde", grid="edm", steps=120, few_step_grid=None)
def edm_sde_sampler(score_fn: ScoreFn, sde: SDE, x: torch.Tensor, timesteps: torch.Tensor, *,
                    s_churn: float = 40.0, s_min: float = 0.05, s_max: float = 50.0, s_noise: float = 1.0,
                    generator=None) -> torch.Tensor:
    """EDM's stochastic sampler (Karras et al. 2022, Algorithm 2) for any α(t), σ(t): Heun steps on the σ̃^{1/ρ}
    grid, each preceded by "churn" noise where s_min ≤ σ̃ ≤ s_max (σ̃ = σ/α, in data units). s_churn = 0 is `heun`.
    Defaults: EDM's ImageNet-64 setting (S_churn 40, S_min 0.05, S_max 50) with s_noise 1 (S_noise > 1 offsets a
    network's over-smoothing; an exact score needs none). 2·steps − 1 score calls.
    """
    if s_churn < 0 or s_noise < 0 or s_min > s_max:
        raise ValueError(f"need s_churn ≥ 0, s_noise ≥ 0 and s_min ≤ s_max, got {s_churn}, {s_noise}, {s_min}, {s_max}")
    return heun_segment(score_fn, sde, x, timesteps, euler_last=True, churn=s_churn, s_min=s_min, s_max=s_max,
                        s_noise=s_noise, generator=generator)


def edm_times(sde: SDE, sig_from: torch.Tensor, sig_to: torch.Tensor, steps: int, rho: float = EDM_RHO
              ) -> torch.Tensor:
    """steps + 1 times from σ̃ = sig_from down to sig_to, uniform in σ̃^{1/ρ} (float64)."""
    fraction = torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64, device=sig_from.device)
    root_from, root_to = sig_from ** (1 / rho), sig_to ** (1 / rho)
    return time_of(sde, (root_from + fraction * (root_to - root_from)) ** rho)


@register_sampler("restart", grid="edm", steps=70, few_step_grid=None)
def restart_sampler(score_fn: ScoreFn, sde: SDE, x: torch.Tensor, timesteps: torch.Tensor, *,
                    restart_min: float = 0.06, restart_max: float = 0.3, restarts: int = 2,
                    restart_steps: Optional[int] = None, generator=None) -> torch.Tensor:
    """Restart sampling (Xu et al. 2023): Heun along the grid; on reaching the first grid time t_min with
    σ̃ ≤ restart_min it `restarts` times adds forward noise taking x̃ from σ̃(t_min) up to σ̃ = restart_max
    (x̃ += √(σ̃_max² − σ̃_min²)·z) and solves the probability-flow ODE back to t_min with `restart_steps` Heun steps
    (σ̃^{1/ρ} spacing), then continues. The noise contracts the accumulated error; the ODE steps add little.
    restart_steps=None takes as many steps as the grid spends between σ̃ = restart_max and t_min (at least 1), so
    the loops' error shrinks with the grid's like the rest (a fixed number leaves a bias no step count removes).
    Defaults: the paper's CIFAR-10 VP interval [0.06, 0.30]. Score calls: 2·steps − 1 + restarts·2·restart_steps
    (no restarts when no grid time below T has σ̃ ≤ restart_min).
    """
    if not 0 < restart_min < restart_max or restarts < 0 or (restart_steps is not None and restart_steps < 1):
        raise ValueError(f"need 0 < restart_min < restart_max, restarts ≥ 0 and restart_steps ≥ 1, got "
                         f"{restart_min}, {restart_max}, {restarts}, {restart_steps}")
    sig = torch.exp(-sde.log_snr(timesteps))
    sig_host = sig.tolist()  # where to restart is decided on the host, from one read of the grid
    below = [i for i in range(1, len(timesteps)) if sig_host[i] <= restart_min]
    if not below or restarts == 0:
        return heun_segment(score_fn, sde, x, timesteps, euler_last=True)
    k, n = below[0], len(timesteps) - 1
    x = heun_segment(score_fn, sde, x, timesteps[:k + 1], euler_last=k == n)
    sig_top = torch.exp(-sde.log_snr(torch.tensor(sde.t_max, dtype=torch.float64, device=timesteps.device)))
    sig_max = torch.clamp(torch.tensor(restart_max, dtype=torch.float64, device=timesteps.device), max=sig_top)
    if restart_steps is None:
        top = float(sig_max)  # one read per call
        restart_steps = max(1, sum(sig_host[k] < value <= top for value in sig_host[:k]))
    loop = edm_times(sde, sig_max, sig[k], restart_steps)
    loop[-1] = timesteps[k]
    for _ in range(restarts):
        spread = torch.sqrt((sig_max**2 - sig[k] ** 2).clamp(min=0))
        x_tilde = x / like(sde.alpha(timesteps[k]), x) + like(spread, x) * noise(x, generator)
        x = heun_segment(score_fn, sde, like(sde.alpha(loop[0]), x) * x_tilde, loop, euler_last=False)
    if k == n:
        return x
    return heun_segment(score_fn, sde, x, timesteps[k:], euler_last=True)


@register_sampler("adaptive_sde", adaptive=True)
def adaptive_sde_sampler(score_fn: ScoreFn, sde: SDE, x: torch.Tensor, timesteps: torch.Tensor, *,
                         rtol: float = 0.05, atol: float = 0.0078, h_init: float = 0.01, safety: float = 0.9,
                         exponent: float = 0.9, max_evals: int = 100000, generator=None, constraint=None
                         ) -> torch.Tensor:
    """"Gotta Go Fast" (Jolicoeur-Martineau et al. 2021, Algorithm 1): the reverse SDE from timesteps[0] to
    timesteps[-1] with an Euler–Maruyama / improved-Euler pair sharing one noise draw, a step size per sample and
    error control. With K₁ = −h·f̄(x, t) + √h·g(t)·z and K₂ = −h·f̄(x + K₁, t − h) + √h·g(t − h)·z (f̄ the reverse
    drift f − g²s), a step proposes x + (K₁ + K₂)/2, with error E = ‖(K₂ − K₁)/2 / δ‖₂/√d and
    δ = max(atol, rtol·max(|x + K₁|, |x'_prev|)); it is accepted where E ≤ 1, and h ← min(t − eps, safety·h·E^{−exponent}).
    Only the grid's ends are used (steps is unused); rtol/atol are the quality-for-NFE knob (atol in data units: the
    paper's 0.0078 is 1/128 of the [−1, 1] image range). Two score calls per attempt on the whole batch (finished
    samples ride along unchanged); NFE adapts. Constraints are not supported (use `pc` or `sde`).

    Made for images: acceptance depends on the step's own noise draw, and a rejected draw is discarded, which
    biases the samples unless the per-sample error norm averages over many coordinates. Measured on the Gaussian
    oracles: fine at d = 16 (cross-entropy gap ≈ +0.03 nats/dim), biased at d ≤ 2 (spread too wide by up to 2×).

    Step sizes, errors and acceptance are per sample and every attempt draws each sample's noise, so per-sample
    seeds (SampleGenerators) are honoured (up to an acceptance that float round-off tips the other way).
    """
    if constraint is not None:
        raise ValueError("adaptive_sde takes no constraint (its per-sample times have no common grid step): use the "
                         "pc, sde or ddim sampler for inpainting and colorization")
    if rtol <= 0 or atol <= 0 or h_init <= 0 or not 0 < safety <= 1 or exponent <= 0:
        raise ValueError(f"need rtol, atol, h_init, exponent > 0 and 0 < safety ≤ 1, got {rtol}, {atol}, {h_init}, "
                         f"{safety}, {exponent}")
    end = timesteps[-1].item()
    batch = x.shape[0]
    t = torch.full((batch,), timesteps[0].item(), dtype=torch.float64, device=x.device)
    h = torch.full_like(t, h_init).clamp(max=timesteps[0].item() - end)
    x_prev = x.clone()
    reverse = sde.reverse(score_fn)
    evals = 0
    while bool((t > end).any()):
        if evals >= max_evals:
            raise RuntimeError(f"adaptive_sde: {evals} score calls without reaching eps={end}; loosen rtol/atol "
                               "or raise max_evals")
        active = t > end
        z = noise(x, generator)
        drift, g = reverse.sde(x, batch_time(t.to(x.dtype), x))
        step = per_sample(h.to(x.dtype), x)
        shock = per_sample((h.sqrt() * g.double()).to(x.dtype), x) * z
        t_next = t - h
        k1 = -step * drift + shock
        drift_2, g_2 = reverse.sde(x + k1, batch_time(t_next.to(x.dtype), x))
        k2 = -step * drift_2 + per_sample((h.sqrt() * g_2.double()).to(x.dtype), x) * z
        proposal, check, difference = x + 0.5 * (k1 + k2), x + k1, 0.5 * (k2 - k1)
        evals += 2
        tolerance = torch.clamp(rtol * torch.maximum(check.abs(), x_prev.abs()), min=atol)
        error = ((difference / tolerance).flatten(1).pow(2).mean(dim=1)).sqrt().double()
        accept = active & (error <= 1.0)
        x = torch.where(per_sample(accept, x), proposal, x)
        x_prev = torch.where(per_sample(accept, x), check, x_prev)
        t = torch.where(accept, t_next, t)
        factor = safety * error.clamp(min=1e-10) ** (-exponent)
        h = torch.minimum((t - end).clamp(min=0), h * factor)
        t = torch.where(t - end <= 1e-12 * max(abs(end), 1.0), torch.full_like(t, end), t)
    return x
