"""Predictor–corrector samplers of the reverse SDE (Song et al. 2021, Algorithms 2–5) and ancestral sampling
(Ho et al. 2020, Algorithm 2)."""
from __future__ import annotations

from typing import Callable, Dict, Literal

import torch

from ..sdes import SDE, ScoreFn, batch_time, per_sample
from .registry import register_sampler
from .terms import evaluated, langevin_step_scale, like, noise

PREDICTORS: Dict[str, Callable] = {}
CORRECTORS: Dict[str, Callable] = {}
PredictorName = Literal["euler_maruyama", "reverse_diffusion", "ancestral_sampling", "none"]
CorrectorName = Literal["langevin", "ald", "none"]
ANCESTRAL_IS_STOCHASTIC = ("the ancestral_sampling predictor is stochastic by construction: use euler_maruyama or "
                           "reverse_diffusion with probability_flow=True")


def _add(table: Dict[str, Callable], name: str):
    def decorate(fn):
        table[name] = fn
        return fn
    return decorate


def ancestral_step(score_fn: ScoreFn, sde: SDE, x: torch.Tensor, t: torch.Tensor, s: torch.Tensor,
                   generator, add_noise: bool = True) -> torch.Tensor:
    """x_s = (x_t + σ_{t|s}²·∇log p_t(x_t)) / α_{t|s} + std·z: the mean is E[x_s | x_t] exactly (for the
    kernel x_t | x_s ~ N(α_{t|s} x_s, σ_{t|s}²)); std = sde.ancestral_noise_std(t, s) (DDPM: √β, SMLD: posterior)."""
    a, sigma_ts = sde.transition(t, s)
    x_mean = (x + like(sigma_ts**2, x) * score_fn(x, t.to(x.dtype))) / like(a, x)
    if not add_noise:
        return x_mean
    return x_mean + like(sde.ancestral_noise_std(t, s), x) * noise(x, generator)


@_add(PREDICTORS, "euler_maruyama")
def euler_maruyama_predictor(score_fn, sde, x, t, t_next, generator, probability_flow=False):
    """x ← x + drift·Δt + g·√|Δt|·z for the reverse SDE (or the probability-flow ODE), Δt = t_next − t < 0."""
    dt = (t_next - t).to(x.dtype)
    t = t.to(x.dtype)
    drift, diffusion = sde.reverse(evaluated(score_fn, x, t), probability_flow).sde(x, t)
    return x + drift * dt + per_sample(diffusion, x) * torch.sqrt(-dt) * noise(x, generator)


@_add(PREDICTORS, "reverse_diffusion")
def reverse_diffusion_predictor(score_fn, sde, x, t, t_next, generator, probability_flow=False):
    """Reverse of the forward chain's step from t_next to t: x ← x − f + G²·s + G·z (DDPM-/SMLD-style)."""
    rev_f, rev_G = sde.reverse(evaluated(score_fn, x, t.to(x.dtype)), probability_flow).discretize_interval(
        x, t.to(x.dtype), t_next)
    return x - rev_f + per_sample(rev_G, x) * noise(x, generator)


@_add(PREDICTORS, "ancestral_sampling")
def ancestral_sampling_predictor(score_fn, sde, x, t, t_next, generator, probability_flow=False):
    """One ancestral step t → t_next (DDPM for VP, SMLD for VE, the exact Gaussian posterior for sub-VP)."""
    if probability_flow:
        raise ValueError(ANCESTRAL_IS_STOCHASTIC)
    return ancestral_step(score_fn, sde, x, t, t_next, generator)


@_add(PREDICTORS, "none")
def no_predictor(score_fn, sde, x, t, t_next, generator, probability_flow=False):
    return x


@_add(CORRECTORS, "langevin")
def langevin_corrector(score_fn, sde, x, t, generator, snr, n_steps):
    """n_steps of Langevin MCMC at time t (Algorithm 5): x ← x + ε·s + √(2ε)·z with ε = 2·scale·(snr·‖z‖/‖s‖)².

    As in score_sde's code, ‖z‖ and ‖s‖ are the batch means of the per-sample norms, so ε is one number per step.
    A per-sample ε(x) ∝ 1/‖s(x)‖² is a state-dependent step, whose Langevin chain does not target p_t; in low
    dimensions, where ‖s(x)‖ is often near 0 at a mode's centre, it throws points far out (tests show it).
    `scale` is the SDE's Langevin step scale (α_i of the DDPM chain for VP, 1 for VE). Through ε a sample depends
    on its batch, also with per-sample seeds (SampleGenerators); "ald" does not.
    """
    t = batch_time(t.to(x.dtype), x)
    scale = langevin_step_scale(sde, t)
    for _ in range(n_steps):
        grad, z = score_fn(x, t), noise(x, generator)
        noise_norm, grad_norm = z.flatten(1).norm(dim=1).mean(), grad.flatten(1).norm(dim=1).mean()
        step = 2 * scale * (snr * noise_norm / grad_norm) ** 2
        x = x + per_sample(step, x) * grad + per_sample(torch.sqrt(2 * step), x) * z
    return x


@_add(CORRECTORS, "ald")
def annealed_langevin_corrector(score_fn, sde, x, t, generator, snr, n_steps):
    """Annealed Langevin dynamics (Song & Ermon 2019): step ε = 2·scale·(snr·σ(t))², x ← x + ε·s + √(2ε)·z."""
    t = batch_time(t.to(x.dtype), x)
    step = per_sample(2 * langevin_step_scale(sde, t) * (snr * sde.sigma(t)) ** 2, x)
    for _ in range(n_steps):
        x = x + step * score_fn(x, t) + torch.sqrt(2 * step) * noise(x, generator)
    return x


@_add(CORRECTORS, "none")
def no_corrector(score_fn, sde, x, t, generator, snr, n_steps):
    return x


@register_sampler("pc", grid="time", few_step_grid=None)
def pc_sampler(score_fn: ScoreFn, sde: SDE, x: torch.Tensor, timesteps: torch.Tensor, *,
               predictor: PredictorName = "euler_maruyama", corrector: CorrectorName = "none", snr: float = 0.16,
               n_steps: int = 1, probability_flow: bool = False, generator=None) -> torch.Tensor:
    """At each grid time t_i: the corrector (n_steps Langevin steps at signal-to-noise ratio snr) at t_i, then the
    predictor from t_i to t_{i+1}. Score calls: steps·(1 + n_steps), steps without a corrector, steps·n_steps
    without a predictor. probability_flow=True makes the predictor integrate the probability-flow ODE (no noise),
    as in score_sde."""
    predict, correct = PREDICTORS[predictor], CORRECTORS[corrector]
    if predictor == "ancestral_sampling" and probability_flow:
        raise ValueError(ANCESTRAL_IS_STOCHASTIC)
    for i in range(len(timesteps) - 1):
        t, t_next = timesteps[i], timesteps[i + 1]
        if corrector != "none":
            x = correct(score_fn, sde, x, t, generator, snr, n_steps)
        x = predict(score_fn, sde, x, t, t_next, generator, probability_flow)
    return x


@register_sampler("ancestral", grid="time", few_step_grid=None)
def ancestral_sampler(score_fn: ScoreFn, sde: SDE, x: torch.Tensor, timesteps: torch.Tensor, *,
                      noise_last: bool = False, generator=None) -> torch.Tensor:
    """x_{i+1} = (x_i + σ_{t|s}²·s(x_i, t_i))/α_{t|s} + std·z along the grid; the last step returns the mean (no
    noise) unless noise_last. For VP on the DDPM grid this is Algorithm 2 with σ_t² = β_t; for VE it is SMLD's
    ancestral sampler. With the 'linear_chain' schedule, the grid i/(N−1) for i = N−1..0, noise_last and the final
    denoising step it is Algorithm 2 exactly, step for step (diffusers' DDPMScheduler with variance_type
    'fixed_large', clip_sample False). One score call per step."""
    n = len(timesteps) - 1
    for i in range(n):
        x = ancestral_step(score_fn, sde, x, timesteps[i], timesteps[i + 1], generator,
                           add_noise=noise_last or i < n - 1)
    return x
