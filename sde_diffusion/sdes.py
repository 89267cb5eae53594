"""Forward diffusion processes written as SDEs  dx = f(t)·x dt + g(t) dw,  t ∈ [0, T].

Every SDE here has a Gaussian perturbation kernel  x_t = α(t)·x_0 + σ(t)·z,  z ~ N(0, I),  and this module
holds the process only: α(t), σ(t), drift and diffusion, the prior, the log-SNR λ(t) and its inverse, transition
kernels and the reverse-time process. What a network predicts lives in `parameterization`; the DDPM/SMLD discrete
chains in `discrete`. Samplers, losses and likelihoods see only an `SDE` and a score function.

A new SDE subclasses `SDE` and defines `T`, `alpha(t)` and `sigma(t)`; `@register_sde("name")` makes
`training.sde="name"` work in every mode, its `__init__` keywords (with defaults) being its options
(`training.sde_options="k=v,..."`). The rest is derived from α and σ:
f = d log α/dt,  g² = dσ²/dt − 2f·σ²  (by float64 autograd), the prior N(0, (α(T)² + σ(T)²)·I), λ = log(α/σ) and
its inverse by bisection. The built-in SDEs override these with closed forms.

Shapes: `x` is (batch, ...); `t` is a Python float or a tensor of shape (batch,).
Per-sample quantities (α, σ, f, g) are returned with shape (batch,).
"""
from __future__ import annotations

import abc
import math
from typing import Callable, Dict, Optional, Sequence, Tuple, Type

import torch

from .errors import ConfigError
from .generators import Generator, randn
from .options import Registry, did_you_mean, parse_options

Tensor = torch.Tensor
ScoreFn = Callable[[Tensor, Tensor], Tensor]

# A time t lies on point i of the N-point grid t_i = i/(N−1)·T when t·(N−1)/T lies in [i − slack, i + 1 − slack):
# float round-off of t = i/(N−1)·T never drops to point i − 1, and any other t is truncated (as DDPM/SMLD code does).
GRID_INDEX_SLACK = 1e-4


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


def grid_index(t, N: int, T: float) -> Tensor:
    """Index i ∈ {0..N−1} of the point t_i = i/(N−1)·T of the uniform N-point time grid that t falls on (long)."""
    t = torch.as_tensor(t)
    return torch.floor(t * (N - 1) / T + GRID_INDEX_SLACK).long().clamp(0, N - 1)


def time_derivative(fn: Callable[[Tensor], Tensor], t) -> Tensor:
    """d fn/dt elementwise at t, by autograd in float64 (also inside torch.no_grad); returns t's dtype and shape."""
    t = as_time(t)
    with torch.enable_grad():
        t64 = t.detach().double().requires_grad_(True)
        y = fn(t64)
        if not y.requires_grad:  # fn does not depend on t (e.g. α = 1)
            return torch.zeros_like(t)
        (grad,) = torch.autograd.grad(y.sum(), t64, allow_unused=True)
    return torch.zeros_like(t) if grad is None else grad.to(t.dtype)


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


class LinearChainSchedule(BetaSchedule):
    """DDPM's N-step chain of linear β_i = linspace(β_min/N, β_max/N, N) (Ho et al.; diffusers' DDPMScheduler) as a
    process on [0, 1]: B(t) interpolates B_i = −Σ_{j≤i} log(1 − β_j) linearly between the grid times t_i = i/(N−1),
    so α(t_i)² = ᾱ_i exactly and any sampler on grid times reproduces the discrete chain; β(t) is piecewise constant.
    As in DDPM, level 0 is already noisy: B(0) = −log(1 − β_0) > 0, σ(0) = √β_0.
    """

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0, N: int = 1000):
        self.beta_min, self.beta_max, self.N = beta_min, beta_max, N
        self.betas = LinearSchedule(beta_min, beta_max).discrete_betas(N)
        self.B = torch.cumsum(-torch.log1p(-self.betas), 0)  # B_i = −log ᾱ_i

    def _interval(self, t: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """(B_i, B_{i+1} − B_i, fraction of the way from t_i to t_{i+1}) of the grid interval holding t ∈ [0, 1]."""
        position = as_time(t).clamp(0.0, 1.0) * (self.N - 1)
        i = torch.floor(position).clamp(max=self.N - 2).long()
        table = self.B.to(position.device)
        start = table[i].to(position.dtype)
        return start, table[i + 1].to(position.dtype) - start, position - i.to(position.dtype)

    def beta(self, t):
        _, rise, _ = self._interval(t)
        return rise * (self.N - 1)

    def integral(self, t):
        start, rise, fraction = self._interval(t)
        return start + fraction * rise

    def discrete_betas(self, N):
        if N != self.N:
            raise ValueError(f"the '{LINEAR_CHAIN}' schedule is the chain of N={self.N} steps, not {N}")
        return self.betas

    def inverse_integral(self, B):
        """The grid interval holding B (searchsorted), then the linear piece; B below B_0 gives t = 0."""
        B = torch.as_tensor(B, dtype=torch.float64)
        table = self.B.to(B.device)
        i = (torch.searchsorted(table, B.contiguous(), right=True) - 1).clamp(0, self.N - 2)
        fraction = ((B - table[i]) / (table[i + 1] - table[i])).clamp(0.0, 1.0)
        return (i + fraction) / (self.N - 1)


LINEAR_CHAIN = "linear_chain"
BETA_SCHEDULES = {"linear": LinearSchedule, "quadratic": QuadraticSchedule, "cosine": CosineSchedule,
                  LINEAR_CHAIN: LinearChainSchedule}


class ZeroTerminalSNR(BetaSchedule):
    """`base` rescaled to zero terminal SNR (Lin et al. 2024): √ᾱ shifted and stretched so that it is unchanged at
    0 and exactly 0 at the end. Continuous: α(t) = (α_b(t) − α_b(1))/(1 − α_b(1)), B = −2 log α, β = β_b·α_b/(α_b −
    α_b(1)) (B(1) = ∞). Discrete: √ᾱ_i = (√ᾱ_b,i − √ᾱ_b,N−1)·√ᾱ_b,0/(√ᾱ_b,0 − √ᾱ_b,N−1), whose last β is 1."""

    def __init__(self, base: BetaSchedule):
        self.base = base
        self.alpha_end = math.exp(-0.5 * float(base.integral(torch.tensor(1.0, dtype=torch.float64))))

    def _base_alpha(self, t):
        return torch.exp(-0.5 * self.base.integral(t))

    def beta(self, t):
        alpha = self._base_alpha(t)
        return self.base.beta(t) * alpha / (alpha - self.alpha_end)

    def integral(self, t):
        return -2.0 * torch.log((self._base_alpha(t) - self.alpha_end).clamp(min=0.0) / (1.0 - self.alpha_end))

    def inverse_integral(self, B):
        """α = e^{−B/2} ⇒ α_b = α_b(1) + (1 − α_b(1))·α, then t = B_b⁻¹(−2 log α_b)."""
        B = torch.as_tensor(B, dtype=torch.float64)
        alpha_base = self.alpha_end + (1.0 - self.alpha_end) * torch.exp(-0.5 * B)
        return self.base.inverse_integral(-2.0 * torch.log(alpha_base))

    def discrete_betas(self, N):
        root = torch.sqrt(torch.cumprod(1.0 - self.base.discrete_betas(N), 0))
        root = (root - root[-1]) * root[0] / (root[0] - root[-1])
        alphas_cumprod = root**2
        return 1.0 - alphas_cumprod / torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])


def make_beta_schedule(name: str, beta_min: float, beta_max: float, N: int = 1000,
                       zero_terminal_snr: bool = False) -> BetaSchedule:
    """The schedule `name` (a key of BETA_SCHEDULES; N is used by the chain schedule only), rescaled to zero terminal
    SNR when asked (`ZeroTerminalSNR`)."""
    if name == "cosine":
        schedule = CosineSchedule()
    elif name == LINEAR_CHAIN:
        schedule = LinearChainSchedule(beta_min, beta_max, N)
    elif name not in BETA_SCHEDULES:
        raise ValueError(f"unknown beta schedule {name!r}: choose one of {sorted(BETA_SCHEDULES)}")
    else:
        schedule = BETA_SCHEDULES[name](beta_min, beta_max)
    return ZeroTerminalSNR(schedule) if zero_terminal_snr else schedule


# --------------------------------------------------------------------------------------------------
# The SDE base class: a process given by its kernel x_t = α(t)·x_0 + σ(t)·z
# --------------------------------------------------------------------------------------------------
SDE_REGISTRY = Registry("SDE", leading=(), passed=(), how="@sdes.register_sde('name')")
SDES: Dict[str, Type["SDE"]] = {}  # training.sde names → classes: the built-ins and every register_sde


def register_sde(name: str, *, replace: bool = False) -> Callable[[type], type]:
    """Class decorator: make an `SDE` subclass `training.sde="name"` in every mode (train, eval, sample, compare,
    tune_grid). Its `__init__` keyword parameters with defaults are its options (`training.sde_options`); a
    parameter `N` takes model.num_scales unless the options set it. Returns the class unchanged."""
    def decorate(cls: type) -> type:
        if not (isinstance(cls, type) and issubclass(cls, SDE)):
            raise TypeError(f"register_sde({name!r}) decorates a subclass of sdes.SDE, got {cls!r}")
        SDE_REGISTRY.register(name, replace=replace)(cls)
        SDES[name] = cls
        return cls

    return decorate


# Where α(T) = 0 (λ(T) = −∞: rectified flow), samplers start at the time of this log-SNR (below VP's λ(1) = −5.0),
# with the prior carried there (SDE.prior_std), and likelihoods end this fraction of T below T.
SINGULAR_END_GAP = 1e-5
SINGULAR_END_LOG_SNR = -6.0
# A generic SDE's default_eps as a fraction of T (VP's 1e-3 at T = 1).
DEFAULT_EPS_FRACTION = 1e-3


class SDE(abc.ABC):
    """A linear diffusion defined by its kernel; subclasses give `T`, `alpha(t)` and `sigma(t)`.

    Attributes: `T` (end time), `N` (number of discretization steps of `discretize` and the default number of
    sampler steps), `default_eps` (smallest time a sampler integrates to: 10⁻³·T unless a subclass sets it).
    Generic defaults (subclasses with closed forms override them): f(t) = d log α/dt and g(t)² = dσ²/dt − 2f·σ²
    by float64 autograd of α and σ, so α and σ must be written in torch operations that autograd can follow.
    """

    T: float = 1.0
    # The spacing that "time"-grid samplers (the SDE chains pc, ancestral, sde and any sampler registered with
    # grid="time") run on when the caller names no grid: uniform t where t is a good clock (score_sde's VP and VE
    # discretisations); a process whose t crowds the steps where little happens names another of
    # sampling.grids.GRID_NAMES (EDM, t = σ: "logsnr").
    sampling_clock: str = "time"

    def __init__(self, N: int = 1000):
        if N < 2:
            raise ValueError(f"N (number of discretization steps) must be ≥ 2, got {N}")
        self.N = N

    @property
    def default_eps(self) -> float:
        """The smallest time samplers and likelihoods integrate to: DEFAULT_EPS_FRACTION·T."""
        return DEFAULT_EPS_FRACTION * self.T

    @property
    def t_max(self) -> float:
        """The time samplers start from (with a prior draw) and likelihoods integrate to: T, or where α(T) = 0 the
        time of λ = SINGULAR_END_LOG_SNR. At T, λ = −∞ and the score (−x/σ² for any data) carries nothing of x₀,
        so x̂₀ = (x + σ²s)/α is 0/0; at t_max (where the prior is drawn: `prior_std`) every quantity is finite and
        the marginal differs from the prior by ~e^{2λ} ≈ 6e-6 in variance for unit-variance data."""
        return float(self.T) if not self.singular_end else float(self.t_from_log_snr(SINGULAR_END_LOG_SNR))

    @property
    def singular_end(self) -> bool:
        """α(T) = 0: λ(T) = −∞ (rectified flow)."""
        return not float(self.alpha(torch.tensor(float(self.T), dtype=torch.float64))) > 0

    @property
    def likelihood_t_max(self) -> float:
        """The time likelihoods integrate to: T, or (1 − SINGULAR_END_GAP)·T where α(T) = 0 (the prior carried
        there is the marginal to ~1e-5 per dimension, where the samplers' t_max would leave O(α(t_max)) per point)."""
        return float(self.T) if not self.singular_end else (1.0 - SINGULAR_END_GAP) * float(self.T)

    def marginal_std(self, t: float) -> float:
        """√(α(t)² + σ(t)²): the std at t of the marginal of data with unit variance per dimension."""
        t = torch.tensor(float(t), dtype=torch.float64)
        return math.sqrt(float(self.alpha(t)) ** 2 + float(self.sigma(t)) ** 2)

    # --- the process ------------------------------------------------------------------------------
    @abc.abstractmethod
    def alpha(self, t) -> Tensor:
        """Mean coefficient α(t) of p(x_t | x_0) = N(α(t)·x_0, σ(t)²I)."""

    @abc.abstractmethod
    def sigma(self, t) -> Tensor:
        """Standard deviation σ(t) of p(x_t | x_0)."""

    def drift_coefficient(self, t) -> Tensor:
        """f(t) = d log α/dt of the drift f(t)·x (float64 autograd unless overridden)."""
        return time_derivative(lambda s: torch.log(self.alpha(s)), t)

    def diffusion_squared(self, t) -> Tensor:
        """g(t)² = dσ²/dt − 2f(t)·σ(t)², which makes Var[x_t | x_0] = σ(t)² (float64 autograd unless overridden)."""
        t = as_time(t)
        dvar = time_derivative(lambda s: self.sigma(s) ** 2, t)
        return (dvar - 2 * self.drift_coefficient(t) * self.sigma(t) ** 2).clamp(min=0.0)

    def sde(self, x: Tensor, t) -> Tuple[Tensor, Tensor]:
        """Drift f(t)·x (like x) and diffusion g(t) (batch,)."""
        t = batch_time(t, x)
        f = self.drift_coefficient(t).to(x.dtype)
        return per_sample(f, x) * x, torch.sqrt(self.diffusion_squared(t)).to(x.dtype)

    @property
    def prior_std(self) -> float:
        """The prior, drawn at t_max (T unless α(T) = 0), is N(0, prior_std² I). Default √(α² + σ²) at t_max: the std
        there of the marginal of data with unit variance per dimension (1 for VP, ≈ σ(T) when σ(T) ≫ α(T))."""
        return self.marginal_std(self.t_max)

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
        state-independent diffusion. Returns (α_{t|s}, σ_{t|s}) with the shape of t.
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

    def discretize(self, x: Tensor, t) -> Tuple[Tensor, Tensor]:
        """One step x_{i+1} = x_i + f + G·z of the N-step forward chain. Default: Euler–Maruyama with Δt = T/N."""
        dt = self.T / self.N
        drift, diffusion = self.sde(x, t)
        return drift * dt, diffusion * math.sqrt(dt)

    # --- prior --------------------------------------------------------------------------------------
    def prior_sampling(self, shape: Sequence[int], generator: Generator = None, device=None, dtype=None) -> Tensor:
        """prior_std·z, z ~ N(0, I) of `shape`, from a torch.Generator or per sample from `SampleGenerators`
        (generators.randn; an override should draw through it too)."""
        return self.prior_std * randn(shape, generator, device=device, dtype=dtype)

    def prior_logp(self, z: Tensor) -> Tensor:
        """log N(z; 0, prior_std² I) in nats, summed over all but the batch dimension: shape (batch,)."""
        d = z[0].numel()
        s2 = self.prior_std**2
        return -0.5 * d * math.log(2 * math.pi * s2) - z.flatten(1).pow(2).sum(1) / (2 * s2)

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
# The SDEs of Song et al. (2021) and of Karras et al. (2022)
# --------------------------------------------------------------------------------------------------
class BetaScheduleSDE(SDE):
    """An SDE driven by a β schedule (VP and sub-VP): `schedule.beta(t)` and its integral B(t); α(t) = exp(−½B(t)).

    `schedule`: "linear" and "quadratic" use beta_min/beta_max; "cosine" (Nichol & Dhariwal) ignores them.
    """

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0, N: int = 1000, schedule: str = "linear",
                 zero_terminal_snr: bool = False):
        super().__init__(N)
        self.beta_min, self.beta_max, self.schedule_name = beta_min, beta_max, schedule
        self.zero_terminal_snr = zero_terminal_snr
        self.schedule = make_beta_schedule(schedule, beta_min, beta_max, N, zero_terminal_snr)

    default_eps = 1e-3

    def alpha(self, t):
        return torch.exp(-0.5 * self.schedule.integral(as_time(t)))

    def drift_coefficient(self, t):
        """f(t) = −½β(t)."""
        return -0.5 * self.schedule.beta(as_time(t))

    @property
    def prior_std(self):
        return 1.0


@register_sde("vpsde")
class VPSDE(BetaScheduleSDE):
    """Variance preserving:  dx = −½β(t)x dt + √β(t) dw  (the continuous limit of DDPM).

    α(t) = exp(−½B(t)),  σ(t) = √(1 − exp(−B(t))),  B(t) = ∫_0^t β.  Prior N(0, I). `discretize` is the DDPM step
    with the schedule's N-step β_i.
    """

    def sigma(self, t):
        return torch.sqrt(-torch.expm1(-self.schedule.integral(as_time(t))))

    def diffusion_squared(self, t):
        """g(t)² = β(t)."""
        return self.schedule.beta(as_time(t))

    def discretize(self, x, t):
        """DDPM step: x_{i+1} = √(1 − β_i)·x_i + √β_i·z with i the grid point of t."""
        i = grid_index(batch_time(t, x), self.N, self.T).cpu()
        beta = self.schedule.discrete_betas(self.N)[i].to(x)
        return per_sample(torch.sqrt(1.0 - beta), x) * x - x, torch.sqrt(beta)

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


@register_sde("subvpsde")
class SubVPSDE(BetaScheduleSDE):
    """Sub-VP:  dx = −½β(t)x dt + √(β(t)(1 − exp(−2B(t)))) dw.

    α(t) = exp(−½B(t)) as for VP, σ(t) = 1 − exp(−B(t)) ≤ the VP σ(t). Prior N(0, I). `discretize` is
    Euler–Maruyama.
    """

    def sigma(self, t):
        return -torch.expm1(-self.schedule.integral(as_time(t)))

    def diffusion_squared(self, t):
        """g(t)² = β(t)·(1 − exp(−2B(t)))."""
        t = as_time(t)
        return self.schedule.beta(t) * -torch.expm1(-2.0 * self.schedule.integral(t))

    def t_from_log_snr(self, lam):
        """With a = e^{−λ}: 1/α = (a + √(a² + 4))/2, so B = −2 log α = 2·log1p((a + a²/(√(a² + 4) + 2))/2)."""
        a = torch.exp(-torch.as_tensor(lam, dtype=torch.float64))
        B = 2.0 * torch.log1p(0.5 * (a + a**2 / (torch.sqrt(a**2 + 4.0) + 2.0)))
        return self.schedule.inverse_integral(B)


@register_sde("vesde")
class VESDE(SDE):
    """Variance exploding:  dx = σ(t)·√(2 log(σ_max/σ_min)) dw,  σ(t) = σ_min (σ_max/σ_min)^t  (SMLD / NCSN).

    α(t) = 1. The kernel p(x_t | x_0) = N(x_0, σ(t)²I) is exact when the process starts at t = 0 from
    x_0 + σ_min·z, i.e. σ_min is the noise already present at t = 0 (as in score_sde). Prior N(0, σ_max² I).
    `discretize` is the SMLD step between the levels σ_i = σ(i/(N−1)).
    """

    default_eps = 1e-5

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 50.0, N: int = 1000):
        super().__init__(N)
        self.sigma_min, self.sigma_max = sigma_min, sigma_max
        self.log_ratio = math.log(sigma_max / sigma_min)

    def alpha(self, t):
        return torch.ones_like(as_time(t))

    def sigma(self, t):
        return self.sigma_min * torch.exp(as_time(t) * self.log_ratio)

    def drift_coefficient(self, t):
        return torch.zeros_like(as_time(t))

    def diffusion_squared(self, t):
        """g(t)² = dσ²/dt = 2·log(σ_max/σ_min)·σ(t)²."""
        return 2 * self.log_ratio * self.sigma(t) ** 2

    @property
    def prior_std(self):
        return self.sigma_max

    def level_sigmas(self) -> Tensor:
        """σ_i = σ(i/(N−1)) for i = 0..N−1, increasing: the SMLD noise levels on the time grid (float32)."""
        return torch.exp(torch.linspace(math.log(self.sigma_min), math.log(self.sigma_max), self.N))

    def t_from_log_snr(self, lam):
        """λ = −log σ(t) = −log σ_min − t·log(σ_max/σ_min)."""
        lam = torch.as_tensor(lam, dtype=torch.float64)
        return (-lam - math.log(self.sigma_min)) / self.log_ratio

    def discretize(self, x, t):
        """SMLD step: x_{i+1} = x_i + √(σ_{i+1}² − σ_i²)·z (from σ_{i−1} to σ_i at step i; σ_{−1} = 0)."""
        i = grid_index(batch_time(t, x), self.N, self.T).cpu()
        sigmas = self.level_sigmas()
        sigma = sigmas[i]
        prev = torch.where(i == 0, torch.zeros_like(sigma), sigmas[(i - 1).clamp(min=0)])
        return torch.zeros_like(x), torch.sqrt(sigma**2 - prev**2).to(x)


@register_sde("edm")
class EDMSDE(SDE):
    """EDM's process (Karras et al. 2022):  dx = √(2t) dw,  α(t) = 1,  σ(t) = t  on t ∈ [0, σ_max].

    Time is the noise level itself: T = σ_max (80 in the paper), default_eps = σ_min (0.002). Prior N(0, σ_max² I).
    Uniform steps in t = σ would spend nearly all of them at large σ, so the SDE chains step uniformly in log σ
    (geometric noise levels, as VE's uniform t gives) unless told otherwise.
    """

    sampling_clock = "logsnr"

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0, N: int = 1000):
        super().__init__(N)
        if not 0.0 < sigma_min < sigma_max:
            raise ValueError(f"EDM needs 0 < sigma_min < sigma_max, got {sigma_min} and {sigma_max}")
        self.sigma_min, self.sigma_max = sigma_min, sigma_max
        self.T = sigma_max

    @property
    def default_eps(self) -> float:
        return self.sigma_min

    def alpha(self, t):
        return torch.ones_like(as_time(t))

    def sigma(self, t):
        return as_time(t).clone()

    def drift_coefficient(self, t):
        return torch.zeros_like(as_time(t))

    def diffusion_squared(self, t):
        """g(t)² = dσ²/dt = 2t."""
        return 2 * as_time(t)

    @property
    def prior_std(self):
        return self.sigma_max

    def log_snr(self, t):
        return -torch.log(as_time(t))

    def t_from_log_snr(self, lam):
        """σ = t = e^{−λ}."""
        return torch.exp(-torch.as_tensor(lam, dtype=torch.float64))


@register_sde("rectified_flow")
class RectifiedFlowSDE(SDE):
    """Rectified flow / flow matching (Liu et al. 2023; Lipman et al. 2023; Esser et al. 2024):  x_t = (1 − t)·x_0
    + t·ε on t ∈ [0, 1], prior N(0, I) exactly (α(1) = 0). Its probability-flow ODE is the flow-matching ODE
    dx/dt = E[ε − x_0 | x_t]; f = −1/(1 − t) and g² = 2t/(1 − t) are singular at T = 1 (λ = −∞ there), so samplers
    start and likelihoods end at `t_max` = sigmoid(6) ≈ 0.9975 (λ = −6, below VP's λ(1) = −5) with the prior
    carried there, N(0, (α² + σ²)·I) = N(0, 0.9975²·I), which is the marginal to within α² ≈ 6e-6 in variance for
    unit-variance data. The SDE chains step uniformly in λ (uniform
    t would put an Euler step of the stiff drift, f = −1/(1 − t), at t_max).
    """

    sampling_clock = "logsnr"

    def __init__(self, N: int = 1000):
        super().__init__(N)

    def alpha(self, t):
        return 1.0 - as_time(t)

    def sigma(self, t):
        return as_time(t).clone()

    def drift_coefficient(self, t):
        return -1.0 / (1.0 - as_time(t))

    def diffusion_squared(self, t):
        t = as_time(t)
        return 2 * t / (1.0 - t)

    def t_from_log_snr(self, lam):
        """(1 − t)/t = e^λ ⇒ t = sigmoid(−λ)."""
        return torch.sigmoid(-torch.as_tensor(lam, dtype=torch.float64))


BUILTIN_KEYS = {VPSDE: ("beta_min", "beta_max", "beta_schedule", "zero_terminal_snr"), SubVPSDE: ("beta_min", "beta_max", "beta_schedule"),
                VESDE: ("sigma_min", "sigma_max"), EDMSDE: ("sigma_min", "sigma_max"), RectifiedFlowSDE: ()}


def sde_from_config(config) -> SDE:
    """Build the SDE named by `config.training.sde`: the built-ins from score_sde's keys in `config.model` (VP, sub-VP:
    beta_min, beta_max, beta_schedule; VE and EDM: sigma_min, sigma_max; all: num_scales = N), a registered one
    from `training.sde_options` (N defaults to model.num_scales)."""
    cls, m = sde_class(config.training.sde), config.model
    if cls is None:
        raise ValueError(f"training.sde={config.training.sde!r} is not one of {sorted(SDES)}")
    if cls in BUILTIN_KEYS:
        keys = {k: m[k] for k in BUILTIN_KEYS[cls]}
        if "beta_schedule" in keys:
            keys["schedule"] = keys.pop("beta_schedule")
        return cls(N=m.num_scales, **keys)
    part = SDE_REGISTRY.get(_registered_name(cls))
    options = part.check_options(parse_options(config.training.get("sde_options") or "", "training.sde_options"))
    if "N" in part.options and "N" not in options:
        options["N"] = m.num_scales
    return cls(**options)


def sde_class(name: str) -> Optional[Type[SDE]]:
    """The SDE class registered as `name` (built-in names also in any case), or None."""
    return SDES.get(name, SDES.get(str(name).lower()))


def _registered_name(cls: Type[SDE]) -> str:
    return next(name for name, c in SDES.items() if c is cls)


def check_config(config) -> None:
    """The SDE's keys: training.sde, model.beta_schedule/beta_min/beta_max (VP, sub-VP), model.sigma_min/sigma_max
    (VE, EDM), model.num_scales, training.sde_options (registered SDEs). Raises ConfigError naming the key."""
    m, t = config.model, config.training
    cls = sde_class(t.sde)
    if cls is None:
        raise ConfigError(f"training.sde={t.sde!r} is not one of {sorted(SDES)}{did_you_mean(t.sde, list(SDES))} "
                          "(an SDE of your own is registered with @sdes.register_sde('name'); import its module in "
                          "your config file)")
    if m.num_scales < 2:
        raise ConfigError(f"model.num_scales (the SDE's N) must be ≥ 2, got {m.num_scales}")
    options = t.get("sde_options") or ""
    if cls in BUILTIN_KEYS and options:
        raise ConfigError(f"training.sde_options={options!r}: the built-in training.sde={t.sde!r} takes score_sde's "
                          f"keys {''.join(f'model.{k}, ' for k in BUILTIN_KEYS[cls])}model.num_scales: leave "
                          "training.sde_options empty")
    if m.zero_terminal_snr and cls is not VPSDE:
        raise ConfigError(f"model.zero_terminal_snr=True rescales a VP schedule (training.sde='vpsde'), not "
                          f"training.sde={t.sde!r}")
    if issubclass(cls, BetaScheduleSDE) and cls in BUILTIN_KEYS:
        if m.beta_schedule not in BETA_SCHEDULES:
            raise ConfigError(f"model.beta_schedule={m.beta_schedule!r} is not one of {sorted(BETA_SCHEDULES)}")
        if m.beta_schedule != "cosine" and not 0.0 < m.beta_min < m.beta_max:
            raise ConfigError(f"model.beta_min={m.beta_min} and model.beta_max={m.beta_max} must satisfy "
                              "0 < beta_min < beta_max")
    elif "sigma_min" in BUILTIN_KEYS.get(cls, ()) and not 0.0 < m.sigma_min < m.sigma_max:
        raise ConfigError(f"model.sigma_min={m.sigma_min} and model.sigma_max={m.sigma_max} must satisfy "
                          f"0 < sigma_min < sigma_max for training.sde={t.sde!r}")
    if cls not in BUILTIN_KEYS:
        try:
            sde_from_config(config)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"training.sde={t.sde!r} with training.sde_options={options!r}: {err}") from None
