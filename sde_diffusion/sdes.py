"""Forward diffusion processes written as SDEs  dx = f(x, t) dt + g(t) dw,  t ∈ [0, T].

Every SDE here has a Gaussian perturbation kernel  x_t = α(t)·x_0 + σ(t)·z,  z ~ N(0, I),
and this module is the only place that knows how VP, sub-VP and VE differ: drift and
diffusion, α(t), σ(t), log-SNR λ(t), prior, the DDPM/SMLD discretizations, and how a
network's noise-conditioning input and output relate to t and to the score.
Samplers, losses and likelihoods only ever see an `SDE` and a score function.

Shapes: `x` is (batch, ...); `t` is a Python float or a tensor of shape (batch,).
Per-sample quantities (α, σ, β, g) are returned with shape (batch,).
"""
from __future__ import annotations

import abc
import math
from typing import Callable, Optional, Sequence, Tuple

import torch

Tensor = torch.Tensor
ScoreFn = Callable[[Tensor, Tensor], Tensor]

# Continuous-time VP networks see t scaled to DDPM's step indices 0..999 (as in score_sde),
# whatever the number of discretization steps N.
DDPM_TIME_SCALE = 999.0

# A time t counts as discrete step i when t·(N−1)/T lies in [i − slack, i + 1 − slack): float round-off of
# t = i/(N−1) never drops to step i − 1, and any other t is truncated as in the DDPM/SMLD reference code.
STEP_INDEX_SLACK = 1e-4


def as_time(t) -> Tensor:
    """A float or tensor time as a tensor (floats become 0-d tensors of the default dtype)."""
    return t if torch.is_tensor(t) else torch.tensor(float(t), dtype=torch.get_default_dtype())


def batch_time(t, x: Tensor) -> Tensor:
    """Return t as a (batch,) tensor on x's device in x's dtype (a float or 0-d tensor is broadcast)."""
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
    return t.expand(x.shape[0]) if t.ndim == 0 else t


def per_sample(v: Tensor, x: Tensor) -> Tensor:
    """Reshape a (batch,) tensor to broadcast against x of shape (batch, ...)."""
    return v.reshape(-1, *([1] * (x.ndim - 1)))


# Bisection halves the bracket this many times: 2⁻⁶⁴ of the bracket is below float64 resolution on [0, 1].
BISECTION_ITERATIONS = 64


def _bisect_increasing(fn: Callable[[Tensor], Tensor], target: Tensor, lo: float, hi: float) -> Tensor:
    """Elementwise t ∈ [lo, hi] with fn(t) = target for an increasing fn (clamped to the ends), in float64."""
    target = torch.as_tensor(target, dtype=torch.float64)
    low, high = torch.full_like(target, lo), torch.full_like(target, hi)
    for _ in range(BISECTION_ITERATIONS):
        mid = 0.5 * (low + high)
        below = fn(mid) < target
        low, high = torch.where(below, mid, low), torch.where(below, high, mid)
    return 0.5 * (low + high)


# --------------------------------------------------------------------------------------------------
# β schedules for the VP and sub-VP SDEs
# --------------------------------------------------------------------------------------------------
class BetaSchedule(abc.ABC):
    """A noise rate β(t) ≥ 0 on [0, 1], its integral B(t) = ∫_0^t β, and its standard discrete chain."""

    @abc.abstractmethod
    def beta(self, t: Tensor) -> Tensor:
        ...

    @abc.abstractmethod
    def integral(self, t: Tensor) -> Tensor:
        """B(t) = ∫_0^t β(s) ds."""

    @abc.abstractmethod
    def discrete_betas(self, N: int) -> Tensor:
        """β_0..β_{N−1} of the literature's N-step DDPM chain for this schedule (float64)."""

    def inverse_integral(self, B: Tensor) -> Tensor:
        """t ∈ [0, 1] with B(t) = B (B is increasing), by bisection; subclasses with a closed form override it."""
        B = torch.as_tensor(B)
        return _bisect_increasing(self.integral, B, 0.0, 1.0)


class LinearSchedule(BetaSchedule):
    """β(t) = β_min + t(β_max − β_min)  (Ho et al. 2020; Song et al. 2021)."""

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0):
        self.beta_min, self.beta_max = beta_min, beta_max

    def beta(self, t):
        return self.beta_min + t * (self.beta_max - self.beta_min)

    def integral(self, t):
        return self.beta_min * t + 0.5 * t**2 * (self.beta_max - self.beta_min)

    def discrete_betas(self, N):
        return torch.linspace(self.beta_min / N, self.beta_max / N, N, dtype=torch.float64)

    def inverse_integral(self, B):
        """Root of ½Δ·t² + β_min·t − B = 0 (Δ = β_max − β_min), written without cancellation."""
        B = torch.as_tensor(B)
        delta = self.beta_max - self.beta_min
        return 2 * B / (self.beta_min + torch.sqrt(self.beta_min**2 + 2 * delta * B))


class QuadraticSchedule(BetaSchedule):
    """√β(t) linear in t, from √β_min to √β_max (DDPM's "quad" schedule)."""

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0):
        self.a = math.sqrt(beta_min)
        self.b = math.sqrt(beta_max) - math.sqrt(beta_min)
        self.beta_min, self.beta_max = beta_min, beta_max

    def beta(self, t):
        return (self.a + self.b * t) ** 2

    def integral(self, t):
        a, b = self.a, self.b
        return a * a * t + a * b * t**2 + b * b * t**3 / 3.0

    def discrete_betas(self, N):
        return torch.linspace(math.sqrt(self.beta_min / N), math.sqrt(self.beta_max / N), N, dtype=torch.float64) ** 2


class CosineSchedule(BetaSchedule):
    """Nichol & Dhariwal (2021):  ᾱ(t) = cos²(φ(t)) / cos²(φ(0)),  φ(t) = (t + s)/(1 + s)·π/2.

    β(t) = −d log ᾱ/dt = π/(1+s)·tan φ(t) diverges at t = 1, so it is clipped at `max_beta`: past the
    time t* where the clip starts, log ᾱ decreases linearly at rate max_beta. B(t) and β(t) stay exact
    antiderivatives of each other, so α(t) and σ(t) < 1 are finite and consistent on all of [0, 1].
    The default clip, 999, is Nichol & Dhariwal's per-step cap β_i ≤ 0.999 at N = 1000 steps.
    """

    def __init__(self, s: float = 0.008, max_beta: float = 999.0):
        self.s, self.max_beta = s, max_beta
        self.rate = math.pi / (2 * (1 + s))  # dφ/dt
        phi_star = math.atan(max_beta / (2 * self.rate))  # where 2·rate·tan φ = max_beta
        self.t_star = phi_star / self.rate - s
        self.log_cos_phi0 = math.log(math.cos(self._phi(0.0)))
        self.B_star = -2.0 * math.log(math.cos(phi_star)) + 2.0 * self.log_cos_phi0

    def _phi(self, t):
        return (t + self.s) * self.rate

    def beta(self, t):
        clipped = t >= self.t_star
        tc = torch.where(clipped, torch.zeros_like(t), t)
        return torch.where(clipped, torch.full_like(t, self.max_beta), 2 * self.rate * torch.tan(self._phi(tc)))

    def integral(self, t):
        clipped = t >= self.t_star
        tc = torch.where(clipped, torch.zeros_like(t), t)
        smooth = (-2.0 * torch.log(torch.cos(self._phi(tc))) + 2.0 * self.log_cos_phi0).clamp(min=0)  # −log ᾱ(t)
        return torch.where(clipped, self.B_star + self.max_beta * (t - self.t_star), smooth)

    def inverse_integral(self, B):
        """Smooth part: cos φ(t) = cos φ(0)·exp(−B/2); past t*: t = t* + (B − B*)/max_beta."""
        B = torch.as_tensor(B)
        clipped = B >= self.B_star
        cos_phi = math.exp(self.log_cos_phi0) * torch.exp(-0.5 * torch.where(clipped, torch.zeros_like(B), B))
        smooth = torch.arccos(cos_phi.clamp(max=1.0)) / self.rate - self.s
        return torch.where(clipped, self.t_star + (B - self.B_star) / self.max_beta, smooth.clamp(min=0.0))

    def discrete_betas(self, N):
        # β_i = 1 − ᾱ(t_{i+1})/ᾱ(t_i) on t_i = i/N, capped at 0.999 (Nichol & Dhariwal's improved-DDPM chain).
        t = torch.linspace(0, 1, N + 1, dtype=torch.float64)
        B = self.integral(t)
        return torch.clamp(-torch.expm1(-(B[1:] - B[:-1])), max=0.999)


BETA_SCHEDULES = {"linear": LinearSchedule, "quadratic": QuadraticSchedule, "cosine": CosineSchedule}


def make_beta_schedule(name: str, beta_min: float, beta_max: float) -> BetaSchedule:
    if name == "cosine":
        return CosineSchedule()
    if name not in BETA_SCHEDULES:
        raise ValueError(f"unknown beta schedule {name!r}: choose one of {sorted(BETA_SCHEDULES)}")
    return BETA_SCHEDULES[name](beta_min, beta_max)


# --------------------------------------------------------------------------------------------------
# The SDE base class
# --------------------------------------------------------------------------------------------------
class SDE(abc.ABC):
    """Base class: subclasses give drift/diffusion, α(t), σ(t) and the prior's std; the rest is generic.

    Attributes: `T` (end time, 1.0), `N` (number of discretization steps), `default_eps` (smallest time
    a sampler integrates to), `has_discrete_chain` (whether DDPM/SMLD-style discrete losses apply).
    """

    T: float = 1.0
    default_eps: float = 1e-3
    has_discrete_chain: bool = False

    def __init__(self, N: int = 1000):
        if N < 2:
            raise ValueError(f"N (number of discretization steps) must be ≥ 2, got {N}")
        self.N = N

    # --- the process ------------------------------------------------------------------------------
    @abc.abstractmethod
    def sde(self, x: Tensor, t) -> Tuple[Tensor, Tensor]:
        """Drift f(x, t) (like x) and diffusion g(t) (batch,)."""

    @abc.abstractmethod
    def alpha(self, t) -> Tensor:
        """Mean coefficient α(t) of p(x_t | x_0) = N(α(t)·x_0, σ(t)²I)."""

    @abc.abstractmethod
    def sigma(self, t) -> Tensor:
        """Standard deviation σ(t) of p(x_t | x_0)."""

    @property
    @abc.abstractmethod
    def prior_std(self) -> float:
        """The prior p_T is N(0, prior_std² I)."""

    def marginal_prob(self, x: Tensor, t) -> Tuple[Tensor, Tensor]:
        """Mean (like x) and std (batch,) of p(x_t | x_0 = x)."""
        t = batch_time(t, x)
        return per_sample(self.alpha(t), x) * x, self.sigma(t)

    def log_snr(self, t) -> Tensor:
        """λ(t) = log α(t) − log σ(t), decreasing in t."""
        return torch.log(self.alpha(t)) - torch.log(self.sigma(t))

    def t_from_log_snr(self, lam) -> Tensor:
        """The inverse of λ(t): the time t ∈ [0, T] with λ(t) = lam (float64; bisection unless overridden).

        Fast solvers use it to place steps uniformly in λ (DPM-Solver) or in σ/α = exp(−λ) (EDM's Heun).
        """
        lam = torch.as_tensor(lam, dtype=torch.float64)
        return _bisect_increasing(lambda t: -self.log_snr(t), -lam, 0.0, self.T)

    def transition(self, t, s) -> Tuple[Tensor, Tensor]:
        """Kernel of the forward process from time s to a later time t:  x_t | x_s ~ N(α_{t|s}·x_s, σ_{t|s}² I).

        α_{t|s} = α(t)/α(s) and σ_{t|s}² = σ(t)² − α_{t|s}²·σ(s)², which holds for every linear SDE with a
        state-independent diffusion (all three here). Returns (α_{t|s}, σ_{t|s}) with the shape of t.
        """
        t, s = as_time(t), as_time(s)
        a = self.alpha(t) / self.alpha(s)
        var = self.sigma(t) ** 2 - a**2 * self.sigma(s) ** 2
        return a, torch.sqrt(var.clamp(min=0.0))

    def discretize_interval(self, x: Tensor, s, t) -> Tuple[Tensor, Tensor]:
        """One forward-chain step from s to t > s as x_t = x_s + f + G·z: f = (α_{t|s} − 1)·x_s, G = σ_{t|s}.

        Uses the exact Gaussian transition, so on the DDPM grid it is the DDPM step (β = 1 − α_{t|s}²) and on the
        SMLD grid the SMLD step (G² = σ_t² − σ_s²), for any number of steps. G has shape (batch,).
        """
        a, G = self.transition(batch_time(t, x).double(), batch_time(s, x).double())
        return per_sample(a - 1.0, x).to(x) * x, G.to(x)

    def ancestral_noise_std(self, t, s) -> Tensor:
        """Noise std of one ancestral step from t down to s < t (the mean is E[x_s | x_t]; see `transition`).

        Default: the exact Gaussian posterior q(x_s | x_t, x_0), std σ_{t|s}·σ(s)/σ(t) — SMLD's ancestral step for VE.
        """
        t, s = as_time(t), as_time(s)
        return self.transition(t, s)[1] * self.sigma(s) / self.sigma(t)

    # --- prior --------------------------------------------------------------------------------------
    def prior_sampling(self, shape: Sequence[int], generator: Optional[torch.Generator] = None,
                       device=None, dtype=None) -> Tensor:
        return self.prior_std * torch.randn(*shape, generator=generator, device=device, dtype=dtype)

    def prior_logp(self, z: Tensor) -> Tensor:
        """log N(z; 0, prior_std² I) in nats, summed over all but the batch dimension: shape (batch,)."""
        d = z[0].numel()
        s2 = self.prior_std**2
        return -0.5 * d * math.log(2 * math.pi * s2) - z.flatten(1).pow(2).sum(1) / (2 * s2)

    # --- discretization -----------------------------------------------------------------------------
    def step_index(self, t) -> Tensor:
        """Index i ∈ {0..N−1} of the discrete step that time t belongs to (t = i/(N−1)·T)."""
        t = torch.as_tensor(t)
        i = torch.floor(t * (self.N - 1) / self.T + STEP_INDEX_SLACK).long()
        return i.clamp(0, self.N - 1)

    def discretize(self, x: Tensor, t) -> Tuple[Tensor, Tensor]:
        """One step x_{i+1} = x_i + f + G·z of the forward chain. Default: Euler–Maruyama with Δt = T/N."""
        dt = self.T / self.N
        drift, diffusion = self.sde(x, t)
        return drift * dt, diffusion * math.sqrt(dt)

    def discrete_alpha_sigma(self, t) -> Tuple[Tensor, Tensor]:
        """α_i, σ_i of the discrete chain at the step of t (for DDPM/SMLD losses and discrete-time models)."""
        raise ValueError(f"{type(self).__name__} has no discrete (DDPM/SMLD) chain: train it with "
                         "training.continuous=True")

    def langevin_step_scale(self, t) -> Tensor:
        """Factor multiplying the Langevin corrector's step size at time t (1 unless overridden)."""
        return torch.ones_like(as_time(t))

    # --- networks ↔ scores -------------------------------------------------------------------------
    def noise_condition(self, t: Tensor, continuous: bool = True) -> Tensor:
        """The noise-conditioning input a network receives for time t (batch,).

        Default (VP, sub-VP): continuous models see DDPM_TIME_SCALE·t; discrete ones the step index (N−1)·t/T.
        """
        return DDPM_TIME_SCALE * t if continuous else (self.N - 1) * t / self.T

    def score_from_network(self, output: Tensor, t: Tensor, continuous: bool = True) -> Tensor:
        """Turn a network output into a score. Default (VP, sub-VP): the network predicts ε, score = −ε/σ(t)."""
        sigma = self.sigma(t) if continuous else self.discrete_alpha_sigma(t)[1]
        return -output / per_sample(sigma, output)

    # --- reverse time -------------------------------------------------------------------------------
    def reverse(self, score_fn: ScoreFn, probability_flow: bool = False) -> "ReverseSDE":
        """The reverse-time SDE (or, with probability_flow=True, the probability-flow ODE) for a score."""
        return ReverseSDE(self, score_fn, probability_flow)


class ReverseSDE:
    """Reverse-time process of `forward` driven by `score_fn`, integrated from T down to 0.

    SDE:  dx = [f − g²·∇log p_t] dt + g dw̄      ODE (probability flow):  dx = [f − ½g²·∇log p_t] dt
    `sde` and `discretize` return the drift for a *negative* time step (as score_sde does): a solver moves
    x ← x − drift·|Δt| + diffusion·√|Δt|·z.
    """

    def __init__(self, forward: SDE, score_fn: ScoreFn, probability_flow: bool = False):
        self.forward, self.score_fn, self.probability_flow = forward, score_fn, probability_flow
        self.T, self.N = forward.T, forward.N
        self.weight = 0.5 if probability_flow else 1.0

    def sde(self, x: Tensor, t) -> Tuple[Tensor, Tensor]:
        t = batch_time(t, x)
        f, g = self.forward.sde(x, t)
        drift = f - per_sample(g**2, x) * self.score_fn(x, t) * self.weight
        return drift, torch.zeros_like(g) if self.probability_flow else g

    def discretize(self, x: Tensor, t) -> Tuple[Tensor, Tensor]:
        t = batch_time(t, x)
        f, G = self.forward.discretize(x, t)
        rev_f = f - per_sample(G**2, x) * self.score_fn(x, t) * self.weight
        return rev_f, torch.zeros_like(G) if self.probability_flow else G

    def discretize_interval(self, x: Tensor, t, s) -> Tuple[Tensor, Tensor]:
        """Reverse of the forward chain step from s to t (> s) at x = x_t: x_s = x_t − rev_f + rev_G·z.

        rev_f = f − G²·∇log p_t(x_t)·weight with (f, G) = forward.discretize_interval(x, s, t); works on any grid.
        """
        t = batch_time(t, x)
        f, G = self.forward.discretize_interval(x, s, t)
        rev_f = f - per_sample(G**2, x) * self.score_fn(x, t) * self.weight
        return rev_f, torch.zeros_like(G) if self.probability_flow else G


# --------------------------------------------------------------------------------------------------
# The three SDEs of Song et al. (2021)
# --------------------------------------------------------------------------------------------------
class VPSDE(SDE):
    """Variance preserving:  dx = −½β(t)x dt + √β(t) dw  (the continuous limit of DDPM).

    α(t) = exp(−½B(t)),  σ(t) = √(1 − exp(−B(t))),  B(t) = ∫_0^t β.  Prior N(0, I).
    `schedule`: "linear" and "quadratic" use beta_min/beta_max; "cosine" (Nichol & Dhariwal) ignores them.
    """

    has_discrete_chain = True

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0, N: int = 1000, schedule: str = "linear"):
        super().__init__(N)
        self.beta_min, self.beta_max, self.schedule_name = beta_min, beta_max, schedule
        self.schedule = make_beta_schedule(schedule, beta_min, beta_max)
        betas = self.schedule.discrete_betas(N)
        self.discrete_betas = betas.float()
        self.alphas = (1.0 - betas).float()
        self.alphas_cumprod = torch.cumprod(1.0 - betas, 0)  # float64: ᾱ_i of the DDPM chain

    def sde(self, x, t):
        t = batch_time(t, x)
        beta = self.schedule.beta(t)
        return -0.5 * per_sample(beta, x) * x, torch.sqrt(beta)

    def alpha(self, t):
        return torch.exp(-0.5 * self.schedule.integral(as_time(t)))

    def sigma(self, t):
        return torch.sqrt(-torch.expm1(-self.schedule.integral(as_time(t))))

    @property
    def prior_std(self):
        return 1.0

    def discretize(self, x, t):
        """DDPM step: x_{i+1} = √(1 − β_i)·x_i + √β_i·z."""
        i = self.step_index(batch_time(t, x)).cpu()
        beta = self.discrete_betas[i].to(x)
        return per_sample(torch.sqrt(1.0 - beta), x) * x - x, torch.sqrt(beta)

    def discrete_alpha_sigma(self, t):
        abar = self.alphas_cumprod[self.step_index(t).cpu()]
        like = as_time(t)
        return torch.sqrt(abar).to(like), torch.sqrt(1.0 - abar).to(like)

    def langevin_step_scale(self, t):
        i = self.step_index(t).cpu()
        like = as_time(t)
        return self.alphas[i].to(like)

    def t_from_log_snr(self, lam):
        """λ = −½·log(e^B − 1), so B = log(1 + e^{−2λ}) = softplus(−2λ) and t = B⁻¹(B)."""
        lam = torch.as_tensor(lam, dtype=torch.float64)
        return self.schedule.inverse_integral(torch.nn.functional.softplus(-2.0 * lam))

    def transition(self, t, s):
        """α_{t|s} = exp(−½ΔB), σ_{t|s}² = 1 − exp(−ΔB) with ΔB = B(t) − B(s) (no cancellation for short steps)."""
        dB = self.schedule.integral(as_time(t)) - self.schedule.integral(as_time(s))
        return torch.exp(-0.5 * dB), torch.sqrt(-torch.expm1(-dB))

    def ancestral_noise_std(self, t, s):
        """DDPM's choice σ² = β (Ho et al. 2020, Algorithm 2) with the step's β = 1 − α_{t|s}² = σ_{t|s}²."""
        return self.transition(t, s)[1]


class SubVPSDE(VPSDE):
    """Sub-VP:  dx = −½β(t)x dt + √(β(t)(1 − exp(−2B(t)))) dw.

    α(t) = exp(−½B(t)) as for VP, σ(t) = 1 − exp(−B(t)) ≤ the VP σ(t). Prior N(0, I). No discrete chain:
    `discretize` is Euler–Maruyama.
    """

    has_discrete_chain = False

    def sde(self, x, t):
        t = batch_time(t, x)
        beta = self.schedule.beta(t)
        return -0.5 * per_sample(beta, x) * x, torch.sqrt(beta * -torch.expm1(-2.0 * self.schedule.integral(t)))

    def sigma(self, t):
        return -torch.expm1(-self.schedule.integral(as_time(t)))

    discretize = SDE.discretize
    discrete_alpha_sigma = SDE.discrete_alpha_sigma
    transition = SDE.transition  # the general kernel formula (σ_{t|s}² = σ_t² − α_{t|s}² σ_s²)
    ancestral_noise_std = SDE.ancestral_noise_std  # the exact Gaussian posterior (sub-VP has no DDPM chain)

    def t_from_log_snr(self, lam):
        """With a = e^{−λ}: 1/α = (a + √(a² + 4))/2, so B = −2 log α = 2·log1p((a + a²/(√(a² + 4) + 2))/2)."""
        a = torch.exp(-torch.as_tensor(lam, dtype=torch.float64))
        B = 2.0 * torch.log1p(0.5 * (a + a**2 / (torch.sqrt(a**2 + 4.0) + 2.0)))
        return self.schedule.inverse_integral(B)


class VESDE(SDE):
    """Variance exploding:  dx = σ(t)·√(2 log(σ_max/σ_min)) dw,  σ(t) = σ_min (σ_max/σ_min)^t  (SMLD / NCSN).

    α(t) = 1. The kernel p(x_t | x_0) = N(x_0, σ(t)²I) is exact when the process starts at t = 0 from
    x_0 + σ_min·z, i.e. σ_min is the noise already present at t = 0 (as in score_sde). Prior N(0, σ_max² I).
    Networks are conditioned on σ(t) and their output divided by σ(t) is the score.
    """

    default_eps = 1e-5
    has_discrete_chain = True

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 50.0, N: int = 1000):
        super().__init__(N)
        self.sigma_min, self.sigma_max = sigma_min, sigma_max
        self.log_ratio = math.log(sigma_max / sigma_min)
        # σ_i = σ(i/(N−1)), increasing in i: the SMLD noise levels on the time grid.
        self.discrete_sigmas = torch.exp(torch.linspace(math.log(sigma_min), math.log(sigma_max), N))

    def sde(self, x, t):
        t = batch_time(t, x)
        return torch.zeros_like(x), self.sigma(t) * math.sqrt(2 * self.log_ratio)

    def alpha(self, t):
        return torch.ones_like(as_time(t))

    def sigma(self, t):
        return self.sigma_min * torch.exp(as_time(t) * self.log_ratio)

    @property
    def prior_std(self):
        return self.sigma_max

    def t_from_log_snr(self, lam):
        """λ = −log σ(t) = −log σ_min − t·log(σ_max/σ_min)."""
        lam = torch.as_tensor(lam, dtype=torch.float64)
        return (-lam - math.log(self.sigma_min)) / self.log_ratio

    def discretize(self, x, t):
        """SMLD step: x_{i+1} = x_i + √(σ_{i+1}² − σ_i²)·z (from σ_{i−1} to σ_i at step i; σ_{−1} = 0)."""
        i = self.step_index(batch_time(t, x)).cpu()
        sigma = self.discrete_sigmas[i]
        prev = torch.where(i == 0, torch.zeros_like(sigma), self.discrete_sigmas[(i - 1).clamp(min=0)])
        return torch.zeros_like(x), torch.sqrt(sigma**2 - prev**2).to(x)

    def discrete_alpha_sigma(self, t):
        like = as_time(t)
        sigma = self.discrete_sigmas[self.step_index(t).cpu()].to(like)
        return torch.ones_like(sigma), sigma

    def noise_condition(self, t, continuous=True):
        """Continuous: σ(t). Discrete: the SMLD level index counted from σ_max (0 = σ_max), as in NCSN."""
        return self.sigma(t) if continuous else (self.N - 1 - self.step_index(t)).to(t)

    def score_from_network(self, output, t, continuous=True):
        """The network output divided by σ (σ(t), or σ_i on the discrete chain) is the score."""
        sigma = self.sigma(t) if continuous else self.discrete_alpha_sigma(t)[1]
        return output / per_sample(sigma, output)


SDES = {"vpsde": VPSDE, "subvpsde": SubVPSDE, "vesde": VESDE}


def sde_from_config(config) -> SDE:
    """Build the SDE named by `config.training.sde` from the score_sde-style keys in `config.model`."""
    name = config.training.sde.lower()
    m = config.model
    if name in ("vpsde", "subvpsde"):
        return SDES[name](beta_min=m.beta_min, beta_max=m.beta_max, N=m.num_scales, schedule=m.beta_schedule)
    if name == "vesde":
        return VESDE(sigma_min=m.sigma_min, sigma_max=m.sigma_max, N=m.num_scales)
    raise ValueError(f"training.sde={config.training.sde!r} is not one of {sorted(SDES)}")


def check_config(config) -> None:
    """The SDE's keys: training.sde, model.beta_schedule, model.num_scales, and whether training.continuous=False
    (a DDPM/SMLD loss) has a discrete chain to use. Raises ConfigError naming the key."""
    from .errors import ConfigError, choice, positive
    t, m = config.training, config.model
    choice("training.sde", t.sde.lower(), SDES)
    choice("model.beta_schedule", m.beta_schedule, BETA_SCHEDULES)
    positive("model.num_scales", m.num_scales)
    if not t.continuous and not SDES[t.sde.lower()].has_discrete_chain:
        raise ConfigError(f"training.sde={t.sde!r} has no discrete chain, so training.continuous=False (DDPM/SMLD "
                          "loss) is impossible: set training.continuous=True")
