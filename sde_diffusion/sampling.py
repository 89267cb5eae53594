"""Samplers behind one interface.

`sample(score_fn, sde, shape, method, ...)` draws from the prior, runs the named sampler over the time grid
T = t_0 > t_1 > … > t_steps = eps, optionally takes a final denoising (Tweedie) step, and returns
`(x, nfe)` with `nfe` the number of score evaluations actually made. Every sampler is a function

    sampler(score_fn, sde, x, timesteps, *, generator, progress, callback, **options) -> x

that knows nothing about networks: it sees a score function and the SDE (α, σ, drift, diffusion).
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
from tqdm.auto import tqdm

from .sdes import SDE, ScoreFn, batch_time, per_sample

SAMPLERS: Dict[str, Callable] = {}
PREDICTORS: Dict[str, Callable] = {}
CORRECTORS: Dict[str, Callable] = {}


def _register(table: Dict[str, Callable], name: str):
    def decorate(fn):
        table[name] = fn
        return fn
    return decorate


def _lookup(table: Dict[str, Callable], kind: str, name: str) -> Callable:
    if name not in table:
        raise ValueError(f"unknown {kind} {name!r}; available: {sorted(table)}")
    return table[name]


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
           **options) -> Tuple[torch.Tensor, int]:
    """Draw `shape[0]` samples; returns (x, nfe).

    steps: number of sampler steps (default sde.N). eps: last time (default sde.default_eps). denoise: finish
    with a Tweedie step at eps (counted in nfe). callback(i, t, x) is called after every step. `options` go to
    the sampler (for "pc": predictor, corrector, snr, n_steps).
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
        x = sampler(counted, sde, x, timesteps, generator=generator, progress=progress, callback=callback, **options)
        if denoise:
            x = tweedie_denoise(counted, sde, x, timesteps[-1].to(dtype))
    return x, counted.calls


# --------------------------------------------------------------------------------------------------
# Predictor–corrector (Song et al. 2021, Algorithms 2–3)
# --------------------------------------------------------------------------------------------------
@_register(PREDICTORS, "euler_maruyama")
def euler_maruyama_predictor(score_fn, sde, x, t, t_next, generator):
    """x ← x + drift·Δt + g·√|Δt|·z for the reverse SDE, Δt = t_next − t < 0."""
    dt = (t_next - t).to(x.dtype)
    drift, diffusion = sde.reverse(score_fn).sde(x, t.to(x.dtype))
    return x + drift * dt + per_sample(diffusion, x) * torch.sqrt(-dt) * _noise(x, generator)


@_register(PREDICTORS, "none")
def no_predictor(score_fn, sde, x, t, t_next, generator):
    return x


@_register(CORRECTORS, "langevin")
def langevin_corrector(score_fn, sde, x, t, generator, snr, n_steps):
    """n_steps of Langevin MCMC at time t; the step size ε = 2·scale·(snr·‖z‖/‖s‖)² per sample (Algorithm 5)."""
    t = batch_time(t.to(x.dtype), x)
    scale = sde.langevin_step_scale(t)
    for _ in range(n_steps):
        grad, z = score_fn(x, t), _noise(x, generator)
        step = 2 * scale * (snr * z.flatten(1).norm(dim=1) / grad.flatten(1).norm(dim=1)) ** 2
        x = x + per_sample(step, x) * grad + per_sample(torch.sqrt(2 * step), x) * z
    return x


@_register(CORRECTORS, "none")
def no_corrector(score_fn, sde, x, t, generator, snr, n_steps):
    return x


@_register(SAMPLERS, "pc")
def pc_sampler(score_fn: ScoreFn, sde: SDE, x: torch.Tensor, timesteps: torch.Tensor, *,
               predictor: str = "euler_maruyama", corrector: str = "none", snr: float = 0.16, n_steps: int = 1,
               generator=None, progress: bool = False, callback=None) -> torch.Tensor:
    """At each grid time t_i: the corrector at t_i, then the predictor from t_i to t_{i+1}."""
    predict = _lookup(PREDICTORS, "predictor", predictor)
    correct = _lookup(CORRECTORS, "corrector", corrector)
    for i in tqdm(range(len(timesteps) - 1), desc=f"pc {predictor}/{corrector}", disable=not progress):
        t, t_next = timesteps[i], timesteps[i + 1]
        x = correct(score_fn, sde, x, t, generator, snr, n_steps)
        x = predict(score_fn, sde, x, t, t_next, generator)
        if callback is not None:
            callback(i, t_next, x)
    return x
