"""Likelihoods of score-based models: the exact one by the probability-flow ODE, and two variational bounds.

Units: every log-density and bound is in **nats** per example (summed over dimensions), shape (batch,), unless
a name says `bits_per_dim` / `bpd`: nats / (D·ln 2), D = number of dimensions of one example.

  exact      log p_eps(x) = log p_T(z) + ∫_eps^T ∇·v(x_t, t) dt,  v = f − ½g²·s,  z = x_T   (`log_likelihood`)
             with the prior π in place of p_T (as everyone does); the divergence exactly or by Hutchinson–Skilling
  discrete   K-level data, uniform dequantization and the change of variables to the model's scale  (`bits_per_dim`)
  DDPM VLB   L_T + Σ L_{i−1} + L_0 on a chain of n noise levels, discretized-Gaussian decoder       (`ddpm_vlb`)
  ELBO       the continuous-time bound of Song et al. (2021) behind likelihood-weighted score matching,
             with importance sampling of t                                                            (`elbo`)

Like the samplers, everything here sees only a score function `score_fn(x, t)` and an `SDE`: an exact analytic
score (`sde_diffusion.toy`) tests it as well as a network.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, NamedTuple, Optional, Tuple

import torch

from . import ode, sampling
from .discrete import chain_for
from .errors import ConfigError, choice, positive
from .sdes import SDE, ScoreFn, batch_time, per_sample

Tensor = torch.Tensor
Scaler = Callable[[Tensor], Tensor]

LN2 = math.log(2.0)
DIVERGENCES = ("exact", "rademacher", "gaussian")
BPD_SPLITS = ("test", "train")  # eval.bpd_dataset
DEFAULT_RTOL = DEFAULT_ATOL = 1e-5  # score_sde's likelihood tolerances
DEFAULT_EPS = 1e-5  # the time the data lives at (score_sde's likelihood eps)
# The ODE solvers of sde_diffusion/ode.py: Dormand–Prince RK45 on the device or on the host (scipy).
ODE_SOLVERS = ode.SOLVERS
# A scaler must be affine: to_model(½) may differ from the midpoint of to_model(0), to_model(1) by this much.
AFFINE_TOLERANCE = 1e-6


def _check_eps(sde: SDE, eps: float) -> None:
    if not 0.0 < eps < sde.likelihood_t_max:
        raise ValueError(f"eps must lie in (0, T={sde.likelihood_t_max}), got {eps}")


def num_dims(x: Tensor) -> int:
    """D: the number of dimensions of one example of x (batch, ...)."""
    return x[0].numel()


def nats_to_bits_per_dim(nats: Tensor, dims: int) -> Tensor:
    """nats per example → bits per dimension: nats / (D·ln 2)."""
    return nats / (dims * LN2)


# --------------------------------------------------------------------------------------------------
# The probability-flow ODE on the augmented state [x, Δlog p]
# --------------------------------------------------------------------------------------------------
def probability_flow_drift(score_fn: ScoreFn, sde: SDE, x: Tensor, t) -> Tensor:
    """v(x, t) = f(x, t) − ½g(t)²·∇log p_t(x): the velocity of the probability-flow ODE dx/dt = v (like x)."""
    return sde.reverse(score_fn, probability_flow=True).sde(x, batch_time(t, x))[0]


def draw_probe(kind: str, like: Tensor, generator: Optional[torch.Generator]) -> Optional[Tensor]:
    """The Hutchinson probe ε (like `like`): ±1 entries (rademacher) or N(0, 1) (gaussian); None for exact.

    Both have E[ε εᵀ] = I, so E[εᵀ J ε] = tr J. One probe serves the whole ODE solve.
    """
    choice("divergence", kind, DIVERGENCES, ValueError)
    if kind == "exact":
        return None
    if kind == "gaussian":
        return torch.randn(like.shape, generator=generator, device=like.device, dtype=like.dtype)
    bits = torch.randint(0, 2, like.shape, generator=generator, device=like.device)
    return (2 * bits - 1).to(like.dtype)


def basis_probes(x: Tensor) -> Tensor:
    """The D standard basis vectors for every example of x: (D·batch, ...), block i (batch rows) holds e_i."""
    b, d = x.shape[0], num_dims(x)
    eye = torch.eye(d, dtype=x.dtype, device=x.device)
    return eye[:, None, :].expand(d, b, d).reshape(d * b, *x.shape[1:])


def probe_quadratic_form(v: Tensor, x: Tensor, probe: Tensor) -> Tensor:
    """εᵀ (∂v/∂x) ε per row by one vector–Jacobian product (v computed from x with autograd on): (rows,)."""
    (grad,) = torch.autograd.grad((v * probe).sum(), x)
    return (grad * probe).flatten(1).sum(1)


def pack(x: Tensor, delta_logp: Tensor) -> Tensor:
    """[x, Δlog p] as one flat state (batch·D + batch,), as the ODE solvers want it."""
    return torch.cat([x.reshape(-1), delta_logp.reshape(-1)])


def unpack(state: Tensor, shape) -> Tuple[Tensor, Tensor]:
    """Inverse of `pack`: x of `shape` and Δlog p of shape (batch,)."""
    size = math.prod(shape)
    return state[:size].reshape(shape), state[size:]


def drift_and_divergence(score_fn: ScoreFn, sde: SDE, x: Tensor, t: float,
                         probe: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    """v(x, t) (like x) and ∇·v (batch,): Hutchinson's εᵀJε with the given probe, or, with probe None, the exact
    trace Σ_i e_iᵀ J e_i from one evaluation on a D-fold batch (each example once per basis vector e_i)."""
    b = x.shape[0]
    if probe is None:
        x, probe = x.repeat(num_dims(x), *([1] * (x.ndim - 1))), basis_probes(x)
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        v = probability_flow_drift(score_fn, sde, x, t)
        quadratic = probe_quadratic_form(v, x, probe)
    return v[:b].detach(), quadratic.detach().reshape(-1, b).sum(0)


def augmented_dynamics(score_fn: ScoreFn, sde: SDE, shape, probe: Optional[Tensor]):
    """fn(t, state) for d[x, Δlog p]/dt = [v(x, t), ∇·v(x, t)] on the packed state (t a Python float)."""

    def fn(t: float, state: Tensor) -> Tensor:
        return pack(*drift_and_divergence(score_fn, sde, unpack(state, shape)[0], t, probe))

    return fn


def log_likelihood(score_fn: ScoreFn, sde: SDE, x: Tensor, *, divergence: str = "rademacher",
                   rtol: float = DEFAULT_RTOL, atol: float = DEFAULT_ATOL, eps: float = DEFAULT_EPS,
                   generator: Optional[torch.Generator] = None, backend: str = "torch") -> Tuple[Tensor, Tensor, int]:
    """log p_eps(x) in nats by the probability-flow ODE; returns (logp (batch,), z (like x), nfe).

    Integrates [x, Δlog p] from eps to T with d(Δlog p)/dt = ∇·v, then log p_eps(x) = log π(z) + Δlog p(T),
    where π = the SDE's prior stands in for p_T (the two differ by log π(z) − log p_T(z), negligible for a
    well-chosen T). `divergence`: "exact" (each evaluation on a D-fold batch: small D only), or
    Hutchinson–Skilling with a "rademacher" or "gaussian" probe drawn once from `generator` and kept for the
    whole solve, which makes logp an unbiased estimate (the x-trajectory does not depend on the probe). The
    whole batch shares one adaptive step size (error norm over the packed state, as score_sde's solve_ivp).
    `backend`: "torch" (`ode.dopri5`, the state stays on x's device), "torchdiffeq" (its dopri5, on the device) or
    "scipy" (RK45 on the host in float64, the state copied at every evaluation).
    nfe = score evaluations (each one batched call and one backward pass).
    """
    choice("ODE backend", backend, ODE_SOLVERS, ValueError)
    _check_eps(sde, eps)
    probe = draw_probe(divergence, x, generator)
    counted = sampling.CountingScore(score_fn)
    fn = augmented_dynamics(counted, sde, x.shape, probe)
    state0 = pack(x, torch.zeros(x.shape[0], dtype=x.dtype, device=x.device))
    with torch.no_grad():
        state = ODE_SOLVERS[backend](fn, state0, float(eps), sde.likelihood_t_max, rtol=rtol, atol=atol)
    z, delta_logp = unpack(state, x.shape)
    return prior_logp(sde, z) + delta_logp, z, counted.calls


def prior_std(sde: SDE) -> float:
    """The prior's std where likelihoods end: sde.prior_std, or where α(T) = 0 the prior carried to
    sde.likelihood_t_max (the samplers' prior is carried to sde.t_max)."""
    return sde.marginal_std(sde.likelihood_t_max) if sde.singular_end else sde.prior_std


def prior_logp(sde: SDE, z: Tensor) -> Tensor:
    """log N(z; 0, prior_std(sde)² I) in nats, (batch,)."""
    if not sde.singular_end:
        return sde.prior_logp(z)
    s2, d = prior_std(sde) ** 2, z[0].numel()
    return -0.5 * d * math.log(2 * math.pi * s2) - z.flatten(1).pow(2).sum(1) / (2 * s2)


# --------------------------------------------------------------------------------------------------
# K-level discrete data: dequantization and the change of variables
# --------------------------------------------------------------------------------------------------
def scaler_slope(to_model: Scaler) -> float:
    """a in to_model(y) = a·y + b, the map from [0, 1] to the model's scale; a ValueError unless affine, a > 0."""
    y = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    lo, mid, hi = to_model(y).tolist()
    if abs(mid - 0.5 * (lo + hi)) > AFFINE_TOLERANCE * max(1.0, abs(hi - lo)) or not hi > lo:
        raise ValueError(f"the data scaler must be an increasing affine map of [0, 1]; it sends 0, ½, 1 to "
                         f"{lo}, {mid}, {hi}")
    return hi - lo


def dequantization_offset_bits(num_levels: int, to_model: Scaler) -> float:
    """log2(K / a): bits per dimension from the model's density to K-level data, a = `scaler_slope(to_model)`.

    Levels k ∈ {0..K−1} become y = (k + u)/K ∈ [0, 1) with u ~ U[0, 1)^D, and the model sees x = a·y + b.
    A cell of the integer lattice has volume 1, and its image in x has volume (a/K)^D, so by Jensen

        −log2 P(k) ≤ E_u[−log2 p(x)] − D·log2(a/K),  i.e.  bpd = −log p(x)/(D·ln 2) + log2(K/a).

    CIFAR-10 (K = 256): 8 bits on [0, 1] (a = 1), 7 on [−1, 1] (a = 2); digits (K = 17) on [−1, 1]: log2 8.5.
    """
    if num_levels < 2:
        raise ValueError(f"num_levels must be ≥ 2, got {num_levels}")
    return math.log2(num_levels / scaler_slope(to_model))


def dequantize(levels: Tensor, num_levels: int, generator: Optional[torch.Generator] = None,
               dtype: torch.dtype = torch.float32) -> Tensor:
    """Integer levels k (batch, ...) → y = (k + u)/K ∈ [0, 1), u ~ U[0, 1) drawn from `generator`."""
    if levels.is_floating_point():
        raise ValueError(f"levels must be integers 0..K−1 (e.g. the dataset's uint8 pixels), got {levels.dtype}")
    if int(levels.min()) < 0 or int(levels.max()) >= num_levels:
        raise ValueError(f"levels must lie in 0..{num_levels - 1}, got {int(levels.min())}..{int(levels.max())}")
    u = torch.rand(levels.shape, generator=generator, device=levels.device, dtype=dtype)
    return (levels.to(dtype) + u) / num_levels


def bits_per_dim(score_fn: ScoreFn, sde: SDE, levels: Tensor, *, num_levels: int, to_model: Scaler,
                 divergence: str = "rademacher", rtol: float = DEFAULT_RTOL, atol: float = DEFAULT_ATOL,
                 eps: float = DEFAULT_EPS, generator: Optional[torch.Generator] = None,
                 dtype: torch.dtype = torch.float32, backend: str = "torch") -> Tuple[Tensor, Tensor, int]:
    """Bits per dimension of K-level data `levels` (batch, ...): returns (bpd (batch,), z, nfe).

        bpd = −log p_eps(x)/(D·ln 2) + log2(K/a),   x = to_model((k + u)/K),  u ~ U[0, 1)^D

    with log p_eps from `log_likelihood` (same options) and the offset from `dequantization_offset_bits`; an
    upper bound on −log2 P(k)/D in expectation over u. The dequantization noise is drawn from `generator`
    before the probe.
    """
    offset = dequantization_offset_bits(num_levels, to_model)
    x = to_model(dequantize(levels, num_levels, generator, dtype))
    logp, z, nfe = log_likelihood(score_fn, sde, x, divergence=divergence, rtol=rtol, atol=atol, eps=eps,
                                  generator=generator, backend=backend)
    return nats_to_bits_per_dim(-logp, num_dims(x)) + offset, z, nfe


# --------------------------------------------------------------------------------------------------
# Bits/dim over a dataset split (what `--mode eval` reports)
# --------------------------------------------------------------------------------------------------
def _split_batches(dataset, split: str, batch_size: int):
    """Batches of integer levels (image data) or of model-space points (vector data) over the split."""
    if getattr(dataset, "is_image", False):
        data = dataset.test if split == "test" else dataset.train
        for start in range(0, len(data), batch_size):
            yield data[start:start + batch_size]
    else:
        yield from dataset.eval_batches(batch_size, split)


def evaluate_bpd(score_fn: ScoreFn, sde: SDE, dataset, config, device,
                 generator: Optional[torch.Generator] = None) -> Dict[str, object]:
    """Bits/dim of `config.eval.bpd_dataset` ("test" | "train") by the probability-flow ODE.

    Image data: `bits_per_dim` on the stored integer levels (dataset.num_levels, dataset.to_model). Vector
    data: −log p_eps(x)/(D·ln 2) of the points themselves (continuous, no offset). `eval.bpd_repeats` passes,
    each over the first `eval.bpd_num_batches` batches of `eval.batch_size` (None: all), with fresh
    dequantization noise and probes. Returns
      bpd: mean over all per-example values of all passes;
      bpd_std: its standard error, std/√n over those n values;
      bpd_nfe: mean score evaluations per batch;
      bpd_passes: the mean of each pass;  bpd_count: n.
    """
    e = config.eval
    choice("eval.bpd_dataset", e.bpd_dataset, BPD_SPLITS, ValueError)
    if e.bpd_repeats < 1:
        raise ValueError(f"eval.bpd_repeats must be ≥ 1, got {e.bpd_repeats}")
    options = dict(divergence=e.bpd_divergence, rtol=e.bpd_rtol, atol=e.bpd_atol, eps=e.bpd_eps,
                   generator=generator)
    values, passes, nfes = [], [], []
    for _ in range(e.bpd_repeats):
        pass_values = []
        for b, batch in enumerate(_split_batches(dataset, e.bpd_dataset, e.batch_size)):
            if e.bpd_num_batches is not None and b >= e.bpd_num_batches:
                break
            batch = batch.to(device)
            if getattr(dataset, "is_image", False):
                bpd, _, nfe = bits_per_dim(score_fn, sde, batch, num_levels=dataset.num_levels,
                                           to_model=dataset.to_model, **options)
            else:
                logp, _, nfe = log_likelihood(score_fn, sde, batch.float(), **options)
                bpd = nats_to_bits_per_dim(-logp, num_dims(batch))
            pass_values.append(bpd.detach().double().cpu())
            nfes.append(nfe)
        pass_values = torch.cat(pass_values)
        passes.append(pass_values.mean().item())
        values.append(pass_values)
    values = torch.cat(values)
    std_error = values.std().item() / math.sqrt(len(values)) if len(values) > 1 else float("nan")
    return {"bpd": values.mean().item(), "bpd_std": std_error, "bpd_nfe": sum(nfes) / len(nfes),
            "bpd_passes": passes, "bpd_count": len(values)}


# --------------------------------------------------------------------------------------------------
# The DDPM variational bound (Ho et al. 2020, eq. 5) on a chain of noise levels
# --------------------------------------------------------------------------------------------------
VLB_VARIANCES = ("large", "small")


class NoiseChain(NamedTuple):
    """Levels i = 1..n of a forward chain x_i = α_i x_0 + σ_i z (float64 (n,) each), and the time the score
    is asked at for each level. Level 0 is the data itself (α_0 = 1, σ_0 = 0)."""

    times: Tensor
    alphas: Tensor
    sigmas: Tensor


def noise_chain(sde: SDE, steps: Optional[int] = None, discrete: bool = False) -> NoiseChain:
    """The chain the VLB is computed on.

    discrete=False: n = steps levels at t_i = i/n·T with the SDE's α(t), σ(t) (default n = sde.N).
    discrete=True: the SDE's own N-step chain (DDPM's for VP: α_j = √ᾱ_j at t_j = j/(N−1)·T), or `steps` of its
    levels j evenly spaced from 0 to N−1 (the marginals of a sub-chain are exact, as in improved DDPM's respacing).
    """
    n = sde.N if steps is None else int(steps)
    if n < 2:
        raise ValueError(f"the VLB needs ≥ 2 steps, got {n}")
    if discrete:
        chain = chain_for(sde)
        if chain is None:
            raise ValueError(f"{type(sde).__name__} has no discrete chain: use discrete=False")
        if n > sde.N:
            raise ValueError(f"steps={n} exceeds the chain's N={sde.N} levels")
        j = torch.linspace(0, sde.N - 1, n, dtype=torch.float64).round()
        times = j / (sde.N - 1) * sde.T
        alphas, sigmas = chain.alpha_sigma(times)
    else:
        times = torch.arange(1, n + 1, dtype=torch.float64) / n * sde.T
        alphas, sigmas = sde.alpha(times), sde.sigma(times)
    return NoiseChain(times, alphas.double(), sigmas.double())


class StepCoefficients(NamedTuple):
    """For the step from level i−1 to level i (float64 scalars):
    x_i | x_{i−1} ~ N(a·x_{i−1}, v);  q(x_{i−1} | x_i, x_0) = N(c0·x_0 + ci·x_i, posterior_var)."""

    a: float
    v: float
    c0: float
    ci: float
    posterior_var: float


def step_coefficients(chain: NoiseChain, i: int) -> StepCoefficients:
    """Coefficients of level i ≥ 1 (1-based; level 0 is the data)."""
    alpha_prev = 1.0 if i == 1 else chain.alphas[i - 2].item()
    sigma_prev = 0.0 if i == 1 else chain.sigmas[i - 2].item()
    alpha, sigma = chain.alphas[i - 1].item(), chain.sigmas[i - 1].item()
    a = alpha / alpha_prev
    v = sigma**2 - a**2 * sigma_prev**2
    return StepCoefficients(a=a, v=v, c0=alpha_prev * v / sigma**2, ci=a * sigma_prev**2 / sigma**2,
                            posterior_var=v * sigma_prev**2 / sigma**2)


def model_variance(chain: NoiseChain, i: int, variance: str) -> float:
    """Variance of p(x_{i−1} | x_i), i ≥ 2: "large" = v_i (DDPM's β_t), "small" = the posterior variance β̃_t."""
    choice("VLB variance", variance, VLB_VARIANCES, ValueError)
    c = step_coefficients(chain, i)
    return c.v if variance == "large" else c.posterior_var


def gaussian_kl(mean_diff: Tensor, var_q: float, var_p: float) -> Tensor:
    """KL(N(μ_q, var_q I) ‖ N(μ_p, var_p I)) in nats, summed over dims: mean_diff = μ_q − μ_p (batch, ...)."""
    ratio = var_q / var_p
    per_dim = 0.5 * (ratio - 1.0 - math.log(ratio)) + 0.5 * mean_diff**2 / var_p
    return per_dim.flatten(1).sum(1)


def gaussian_log_likelihood(x: Tensor, mean: Tensor, var: float) -> Tensor:
    """log N(x; mean, var I) in nats, summed over dims: (batch,)."""
    per_dim = -0.5 * math.log(2 * math.pi * var) - 0.5 * (x - mean) ** 2 / var
    return per_dim.flatten(1).sum(1)


def log_normal_mass(lower: Tensor, upper: Tensor) -> Tensor:
    """log(Φ(upper) − Φ(lower)) elementwise, stable in both tails (lower may be −∞, upper +∞)."""
    upper_tail = (lower + upper) > 0  # mirror to the left tail, where log Φ is accurate: Φ(b) − Φ(a) = Φ(−a) − Φ(−b)
    lo = torch.where(upper_tail, -upper, lower)
    hi = torch.where(upper_tail, -lower, upper)
    log_hi, log_lo = torch.special.log_ndtr(hi), torch.special.log_ndtr(lo)
    return log_hi + torch.log1p(-torch.exp(log_lo - log_hi))


class GaussianDecoder:
    """p(x_0 | x_1) = N(x̂_0, σ_1²/α_1² I) for continuous data: the variance of x_0 given x_1 for a smooth density
    in the small-noise limit, so the bound becomes tight as the chain's steps shrink. Bounds −log p(x_0)."""

    def variance(self, chain: NoiseChain) -> float:
        return (chain.sigmas[0] / chain.alphas[0]).item() ** 2

    def nll(self, x0: Tensor, mean: Tensor, var: float) -> Tensor:
        """−log N(x0; mean, var I) in nats: (batch,)."""
        return -gaussian_log_likelihood(x0, mean, var)


class DiscretizedGaussianDecoder:
    """DDPM's decoder for K-level data: p(x_0 | x_1) = Π_d ∫_bin N(x; x̂_0, s²) dx over the level's bin, with DDPM's
    s² = β̃ of level 2 (the posterior variance is 0 at level 1; DDPM's code borrows the next one).

    Level k sits at to_model(k/(K−1)); its bin is to_model((k ± ½)/(K−1)), the outermost bins extend to ±∞.
    So the decoder is a distribution over levels and the VLB bounds −log P(k) directly, with no offset.
    """

    def __init__(self, num_levels: int, to_model: Scaler):
        self.num_levels, self.to_model = num_levels, to_model
        self.slope = scaler_slope(to_model)
        self.origin = to_model(torch.zeros((), dtype=torch.float64)).item()
        self.half_width = 0.5 * self.slope / (num_levels - 1)

    def centers(self, levels: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
        """Integer levels k → their model-scale values to_model(k/(K−1))."""
        return self.to_model(levels.to(dtype) / (self.num_levels - 1))

    def levels(self, x0: Tensor) -> Tensor:
        """Inverse of `centers` (nearest level)."""
        k = torch.round((x0 - self.origin) / self.slope * (self.num_levels - 1))
        return k.clamp(0, self.num_levels - 1).long()

    def variance(self, chain: NoiseChain) -> float:
        return step_coefficients(chain, 2).posterior_var

    def nll(self, x0: Tensor, mean: Tensor, var: float) -> Tensor:
        """−log P(level of x0 | mean, var) in nats, summed over dims: (batch,)."""
        levels, std = self.levels(x0), math.sqrt(var)
        inf = torch.full_like(mean, math.inf)
        lower = torch.where(levels == 0, -inf, (x0 - self.half_width - mean) / std)
        upper = torch.where(levels == self.num_levels - 1, inf, (x0 + self.half_width - mean) / std)
        return -log_normal_mass(lower, upper).flatten(1).sum(1)


class VLBTerms(NamedTuple):
    """The DDPM bound's parts in nats, each (batch,): prior = L_T, transitions = Σ_{i≥2} L_{i−1},
    decoder = L_0 = −log p(x_0 | x_1); total = their sum ≥ −log p(x_0) (in expectation over the noise)."""

    total: Tensor
    prior: Tensor
    transitions: Tensor
    decoder: Tensor


def prior_kl(sde: SDE, x0: Tensor, alpha: float, sigma: float) -> Tensor:
    """L_T = KL(N(α x_0, σ² I) ‖ π) in nats for the prior π = N(0, prior_std² I): (batch,)."""
    var_p = prior_std(sde) ** 2
    per_dim = 0.5 * ((sigma**2 + alpha**2 * x0**2) / var_p - 1.0 - math.log(sigma**2 / var_p))
    return per_dim.flatten(1).sum(1)


def denoised_mean(score_fn: ScoreFn, x: Tensor, t: float, alpha: float, sigma: float) -> Tensor:
    """x̂_0 = (x + σ²·s(x, t))/α (Tweedie), the ε-prediction mean of DDPM written with the score."""
    return (x + sigma**2 * score_fn(x, batch_time(t, x))) / alpha


def ddpm_vlb(score_fn: ScoreFn, sde: SDE, x0: Tensor, *, steps: Optional[int] = None, discrete: bool = False,
             variance: str = "large", decoder=None, generator: Optional[torch.Generator] = None) -> VLBTerms:
    """The DDPM variational bound on −log p(x_0) in nats (Ho et al. 2020, eq. 5) on `noise_chain(sde, steps,
    discrete)`:

        L_T     = KL(q(x_n | x_0) ‖ π)
        L_{i−1} = KL(q(x_{i−1} | x_i, x_0) ‖ p(x_{i−1} | x_i)),  i = 2..n,  x_i ~ q(x_i | x_0) (one draw each)
        L_0     = −log p(x_0 | x_1)

    p(x_{i−1} | x_i) = N(c0·x̂_0 + ci·x_i, s_i²) with x̂_0 = (x_i + σ_i²·s(x_i, t_i))/α_i (the ε-parametrization
    written with the score) and s_i² from `model_variance`. `decoder`: `GaussianDecoder()` (default; continuous x_0,
    a bound on −log density) or `DiscretizedGaussianDecoder` (x_0 at level centers, a bound on −log P(levels)).
    One score evaluation per level. Written for any SDE with α x_0 + σ z marginals; for VE, whose first level
    already carries σ_min of noise, the discretized decoder's DDPM variance is too small to be useful.
    """
    decoder = GaussianDecoder() if decoder is None else decoder
    chain = noise_chain(sde, steps, discrete)

    def denoised_at_level(i: int) -> Tensor:
        """x̂_0 from one draw x_i ~ q(x_i | x_0) (level i ≥ 1)."""
        alpha, sigma = chain.alphas[i - 1].item(), chain.sigmas[i - 1].item()
        x_i = alpha * x0 + sigma * torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        return denoised_mean(score_fn, x_i, chain.times[i - 1].item(), alpha, sigma)

    with torch.no_grad():
        prior = prior_kl(sde, x0, chain.alphas[-1].item(), chain.sigmas[-1].item())
        transitions = torch.zeros_like(prior)
        for i in range(2, len(chain.times) + 1):
            c = step_coefficients(chain, i)
            mean_diff = c.c0 * (x0 - denoised_at_level(i))
            transitions = transitions + gaussian_kl(mean_diff, c.posterior_var, model_variance(chain, i, variance))
        decoder_nll = decoder.nll(x0, denoised_at_level(1), decoder.variance(chain))
    return VLBTerms(prior + transitions + decoder_nll, prior, transitions, decoder_nll)


def ddpm_vlb_bpd(score_fn: ScoreFn, sde: SDE, levels: Tensor, *, num_levels: int, to_model: Scaler,
                 steps: Optional[int] = None, discrete: bool = True, variance: str = "large",
                 generator: Optional[torch.Generator] = None, dtype: torch.dtype = torch.float32) -> Tensor:
    """DDPM's bound in bits/dim for K-level data `levels` (batch, ...): `ddpm_vlb` with the discretized decoder.

    The data sit at their level centers to_model(k/(K−1)); no dequantization and no offset (the decoder is a
    distribution over levels): bpd = VLB/(D·ln 2) ≥ −log2 P(k)/D. discrete=True (default) uses the SDE's DDPM
    chain, as a discrete-time VP model was trained on; discrete=False the continuous α(t), σ(t) on n uniform times.
    """
    decoder = DiscretizedGaussianDecoder(num_levels, to_model)
    x0 = decoder.centers(levels, dtype)
    terms = ddpm_vlb(score_fn, sde, x0, steps=steps, discrete=discrete, variance=variance, decoder=decoder,
                     generator=generator)
    return nats_to_bits_per_dim(terms.total, num_dims(x0))


# --------------------------------------------------------------------------------------------------
# The continuous-time ELBO (Song, Durkan, Murray & Ermon 2021, Theorem 1) with importance sampling of t
# --------------------------------------------------------------------------------------------------
# The ELBO's t-integral is written in u = w², w = σ_{t|eps}/α_{t|eps} (the noise-to-signal std of the kernel from
# eps; u runs from 0 at eps to u_T at T): g(t)²/σ_{t|eps}² dt = d log u, so ∫ g²/σ² (…) dt = ∫ (…) d log u, and
# a sample u ~ q_u has weight 1/(u·q_u(u)). q_u is an even mixture of
#   ∝ 1/(c² + u)  (log-uniform in u above the floor c², as Song et al.'s t ∝ g²/σ², and normalizable), and
#   ∝ v/(v + u)²  (uniform in r = u/(v + u), where Gaussian data of per-dimension variance v put their integrand),
# so no weight exceeds twice that of either (defensive importance sampling).
ELBO_NOISE_FLOOR = 1e-2  # c
ELBO_DATA_VARIANCE = 0.25  # v, in the model's scale (σ_data = 0.5 as in EDM)


class ELBOEstimate(NamedTuple):
    """elbo: the Monte Carlo estimate of the bound, (batch,) nats; stderr: its standard error (batch,);
    nfe: score evaluations per example (2 per draw of t: the antithetic pair, made as one call on a doubled batch)."""

    elbo: Tensor
    stderr: Tensor
    nfe: int


def kernel_from(sde: SDE, t: Tensor, s: float) -> Tuple[Tensor, Tensor]:
    """α_{t|s}, σ_{t|s} of x_t = α_{t|s}·x_s + σ_{t|s}·z (float64, shape of t)."""
    return sde.transition(t, torch.tensor(float(s), dtype=torch.float64))


def noise_to_signal(sde: SDE, t: Tensor, eps: float) -> Tensor:
    """u(t) = σ_{t|eps}²/α_{t|eps}² (float64), increasing from 0 at t = eps."""
    a, s = kernel_from(sde, t, eps)
    return (s / a) ** 2


def time_of_noise_to_signal(sde: SDE, u: Tensor, eps: float) -> Tensor:
    """The t with u(t) = u: since u = α_eps²·(e^{−2λ(t)} − e^{−2λ(eps)}), λ(t) = −½ log(u/α_eps² + e^{−2λ(eps)})."""
    eps_t = torch.tensor(eps, dtype=torch.float64)
    lam = -0.5 * torch.log(u / sde.alpha(eps_t) ** 2 + torch.exp(-2 * sde.log_snr(eps_t)))
    return sde.t_from_log_snr(lam).clamp(min=eps, max=sde.likelihood_t_max)


def importance_density(u: Tensor, u_T: float) -> Tensor:
    """q_u(u) on (0, u_T]: ½/((c² + u)·log(1 + u_T/c²)) + ½·v/((v + u)²·r_T), r_T = u_T/(v + u_T)."""
    c2, v = ELBO_NOISE_FLOOR**2, ELBO_DATA_VARIANCE
    log_part = 1.0 / ((c2 + u) * math.log1p(u_T / c2))
    r_part = v / ((v + u) ** 2 * (u_T / (v + u_T)))
    return 0.5 * (log_part + r_part)


def sample_noise_to_signal(n: int, u_T: float, generator: Optional[torch.Generator]) -> Tensor:
    """n draws of u from `importance_density` (float64)."""
    c2, v = ELBO_NOISE_FLOOR**2, ELBO_DATA_VARIANCE
    device = generator.device if generator is not None else None
    pick, f = torch.rand(2, n, generator=generator, device=device, dtype=torch.float64).cpu()
    pick_log = pick < 0.5
    u_log = c2 * torch.expm1(f * math.log1p(u_T / c2))
    r = f * (u_T / (v + u_T))
    return torch.where(pick_log, u_log, v * r / (1 - r))


def sample_elbo_times(sde: SDE, n: int, eps: float, importance_sampling: bool = True,
                      generator: Optional[torch.Generator] = None) -> Tuple[Tensor, Tensor]:
    """n times in (eps, T] and their weights g(t)²/(σ_{t|eps}²·q(t)) for the ELBO's t-integral (float64 (n,) each).

    Importance sampling: u ~ `importance_density`, t = the time of u, weight 1/(u·q_u(u)). Uniform: t ~ U(eps, T],
    weight (T − eps)·g²/σ_{t|eps}² (for comparison: its variance is much larger).
    """
    u_T = noise_to_signal(sde, torch.tensor([sde.likelihood_t_max], dtype=torch.float64), eps).item()
    if importance_sampling:
        t = time_of_noise_to_signal(sde, sample_noise_to_signal(n, u_T, generator), eps)
        u = noise_to_signal(sde, t, eps)
        return t, 1.0 / (u * importance_density(u, u_T))
    device = generator.device if generator is not None else None
    t = eps + torch.rand(n, generator=generator, device=device, dtype=torch.float64).cpu() * (sde.likelihood_t_max - eps)
    return t, (sde.likelihood_t_max - eps) * diffusion_squared(sde, t) / kernel_from(sde, t, eps)[1] ** 2


def diffusion_squared(sde: SDE, t: Tensor) -> Tensor:
    """g(t)² (float64, shape of t)."""
    return sde.sde(torch.zeros(len(t), 1, dtype=torch.float64), t)[1] ** 2


def control_variate_weight(u: Tensor) -> Tensor:
    """κ = 2r − r², r = u/(v + u): the coefficient of ‖z‖² in the integrand for Gaussian data of variance v."""
    r = u / (ELBO_DATA_VARIANCE + u)
    return 2 * r - r**2


def control_variate_integral(u_T: float) -> float:
    """∫_0^{u_T} κ d log u = log(1 + u_T/v) + u_T/(v + u_T)."""
    v = ELBO_DATA_VARIANCE
    return math.log1p(u_T / v) + u_T / (v + u_T)


def expected_prior_logp(sde: SDE, x: Tensor, a_T: float, s_T: float) -> Tensor:
    """E[log π(x_T)] in nats for x_T = a_T·x + s_T·z and π = N(0, prior_std² I): (batch,)."""
    d, var_p = num_dims(x), prior_std(sde) ** 2
    return -0.5 * d * math.log(2 * math.pi * var_p) - (a_T**2 * x.flatten(1).pow(2).sum(1) + s_T**2 * d) / (2 * var_p)


def elbo(score_fn: ScoreFn, sde: SDE, x: Tensor, *, eps: float = DEFAULT_EPS, num_times: int = 16,
         importance_sampling: bool = True, generator: Optional[torch.Generator] = None) -> ELBOEstimate:
    """A lower bound on log p_eps(x) in nats (Song et al. 2021, Theorem 1, for the process started at eps):

        log p_eps(x) ≥ E[log π(x_T)] + D·log α_{T|eps}
                       − ½ ∫_eps^T g(t)² E_z[‖s − ∇log p_{t|eps}‖² − ‖∇log p_{t|eps}‖²] dt

    with x_t = α_{t|eps}·x + σ_{t|eps}·z, s = s(x_t, t), ∇log p_{t|eps}(x_t | x) = −z/σ_{t|eps}; Theorem 1's
    ∫ −2∇·f dt is −2D·log α_{T|eps} exactly (f = (d log α/dt)·x for every SDE here), and E[log π(x_T)] is Gaussian.
    With ε̂ = −σ_{t|eps}·s and u = σ_{t|eps}²/α_{t|eps}² the integral is ∫ E[‖z − ε̂‖² − ‖z‖²] d log u, estimated as

        mean over draws of  weight·(‖z − ε̂‖² − (1 − κ)‖z‖²)  −  D·∫κ d log u

    (the same z in both norms, plus the mean-zero control variate κ(u)·(‖z‖² − D) integrated exactly; see
    `control_variate_weight`), with `num_times` draws of t per example from `sample_elbo_times`, each with an
    antithetic pair ±z (two score evaluations per draw, one call on a doubled batch). For the exact score the
    bound is tight up to the prior mismatch: ELBO = log p_eps(x) + E_{x_T|x}[log π(x_T) − log p_T(x_T)].
    stderr: the standard error over the draws.
    """
    _check_eps(sde, eps)
    d, b = num_dims(x), x.shape[0]
    a_T, s_T = (v.item() for v in kernel_from(sde, torch.tensor([sde.likelihood_t_max], dtype=torch.float64), eps))
    draws = []
    with torch.no_grad():
        for _ in range(num_times):
            t, weight = sample_elbo_times(sde, b, eps, importance_sampling, generator)
            a, s = kernel_from(sde, t, eps)
            z = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            z = torch.cat([z, -z])  # antithetic pair: the part of the integrand odd in z cancels
            a2, s2 = (per_sample(v.to(x).repeat(2), z) for v in (a, s))
            eps_hat = -s2 * score_fn(a2 * torch.cat([x, x]) + s2 * z, t.to(x).repeat(2))
            kappa = control_variate_weight((s / a) ** 2).to(x).repeat(2)
            inner = (z - eps_hat).flatten(1).pow(2).sum(1) - (1 - kappa) * z.flatten(1).pow(2).sum(1)
            draws.append(weight.to(x) * 0.5 * (inner[:b] + inner[b:]))
    draws = torch.stack(draws)  # (num_times, batch): estimates of ∫ E[‖z − ε̂‖² − ‖z‖²] d log u + D·∫κ d log u
    integral = draws.mean(0) - d * control_variate_integral((s_T / a_T) ** 2)
    stderr = 0.5 * draws.std(0) / math.sqrt(num_times) if num_times > 1 else torch.full_like(integral, math.nan)
    bound = expected_prior_logp(sde, x, a_T, s_T) + d * math.log(a_T) - 0.5 * integral
    return ELBOEstimate(bound, stderr, 2 * num_times)


def elbo_bits_per_dim(score_fn: ScoreFn, sde: SDE, levels: Tensor, *, num_levels: int, to_model: Scaler,
                      eps: float = DEFAULT_EPS, num_times: int = 16, importance_sampling: bool = True,
                      generator: Optional[torch.Generator] = None, dtype: torch.dtype = torch.float32) -> Tensor:
    """An upper bound in bits/dim for K-level data: −ELBO(x)/(D·ln 2) + log2(K/a) with x dequantized as in
    `bits_per_dim` (the dequantization noise drawn first)."""
    offset = dequantization_offset_bits(num_levels, to_model)
    x = to_model(dequantize(levels, num_levels, generator, dtype))
    estimate = elbo(score_fn, sde, x, eps=eps, num_times=num_times, importance_sampling=importance_sampling,
                    generator=generator)
    return nats_to_bits_per_dim(-estimate.elbo, num_dims(x)) + offset


def check_config(config) -> None:
    """The eval.bpd_* keys of `evaluate_bpd`. Raises ConfigError naming the key."""
    e = config.eval
    choice("eval.bpd_dataset", e.bpd_dataset, BPD_SPLITS)
    choice("eval.bpd_divergence", e.bpd_divergence, DIVERGENCES)
    for key in ("bpd_repeats", "bpd_rtol", "bpd_atol"):
        positive(f"eval.{key}", e[key])
    if e.bpd_num_batches is not None:
        positive("eval.bpd_num_batches", e.bpd_num_batches)
    if not 0.0 < e.bpd_eps < 1.0:
        raise ConfigError(f"eval.bpd_eps must lie in (0, 1), got {e.bpd_eps}")
