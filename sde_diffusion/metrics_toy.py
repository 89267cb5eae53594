"""Distances between point clouds for the low-dimensional oracles: sliced 2-Wasserstein distance, its noise floor
for a Gaussian mixture, per-mode statistics and the checks built on them (mixture_failures), and the moment errors
of samples against a Gaussian. Used by the sampler, guidance and inpainting tests and benchmarks."""
from __future__ import annotations

import math
from typing import Optional, Tuple

import numpy as np
import torch

from .toy import GaussianMixture

# Random directions averaged over by the sliced distance: enough that the directions' own randomness is small
# next to the sampling noise of a few thousand points.
DEFAULT_PROJECTIONS = 256


def random_directions(dim: int, n_projections: int = DEFAULT_PROJECTIONS,
                      generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """(dim, n_projections) unit vectors, uniform on the sphere, float64."""
    v = torch.randn(dim, n_projections, generator=generator, dtype=torch.float64)
    return v / v.norm(dim=0, keepdim=True)


def sliced_w2(x: torch.Tensor, y: torch.Tensor, directions: Optional[torch.Tensor] = None,
              generator: Optional[torch.Generator] = None) -> float:
    """Sliced 2-Wasserstein distance between two equally sized point clouds x, y of shape (n, d).

    SW₂(x, y)² = mean over unit directions θ of W₂(θᵀx, θᵀy)², where the 1-D W₂ between two empirical measures with
    n atoms each pairs the sorted projections. `directions` (d, P) defaults to DEFAULT_PROJECTIONS random ones
    (from `generator`; a fixed seed if None, so that repeated calls compare like with like).
    """
    if x.shape != y.shape or x.ndim != 2:
        raise ValueError(f"need two (n, d) point clouds of the same shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    if directions is None:
        generator = torch.Generator().manual_seed(0) if generator is None else generator
        directions = random_directions(x.shape[1], generator=generator)
    # (P, n) projections sorted along the contiguous last axis; numpy's sort is several times faster than torch's
    px = np.sort((directions.T @ x.double().cpu().T).numpy(), axis=1)
    py = np.sort((directions.T @ y.double().cpu().T).numpy(), axis=1)
    return float(np.sqrt(np.mean((px - py) ** 2)))


def sliced_w2_noise_floor(mixture: GaussianMixture, n: int, repeats: int = 32, seed: int = 12345) -> float:
    """Mean sliced W₂ between two independent exact samples of size n: what a perfect sampler scores on average.

    One such distance scatters widely around its mean (±50 % at the 5/95 % points for the test mixtures, mostly
    from the multinomial mode counts), hence the average over `repeats` pairs.
    """
    generator = torch.Generator().manual_seed(seed)
    values = [sliced_w2(mixture.sample(n, generator)[0], mixture.sample(n, generator)[0]) for _ in range(repeats)]
    return sum(values) / len(values)


def sliced_w2_ratio(x: torch.Tensor, mixture: GaussianMixture, chunk: int, floor: Optional[float] = None,
                    seed: int = 54321) -> float:
    """Sliced W₂ of samples x (m·chunk, d) to the mixture in units of the noise floor (≈ 1 for a perfect sampler).

    x is cut into m chunks of `chunk` points; each is compared with its own fresh exact sample of the same size and
    the m distances are averaged, which narrows the ratio's scatter by √m. `floor` defaults to
    sliced_w2_noise_floor(mixture, chunk).
    """
    if len(x) % chunk:
        raise ValueError(f"{len(x)} samples do not split into chunks of {chunk}")
    floor = sliced_w2_noise_floor(mixture, chunk) if floor is None else floor
    generator = torch.Generator().manual_seed(seed)
    values = [sliced_w2(part, mixture.sample(chunk, generator)[0]) for part in x.split(chunk)]
    return sum(values) / len(values) / floor


def mode_statistics(mixture: GaussianMixture, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-mode statistics of samples x (n, d), each point assigned to its most probable component under the clean
    mixture: empirical weights (K,), means (K, d) and stds (K,) (RMS deviation from the mode's empirical mean,
    pooled over the d coordinates, comparable to the mixture's isotropic s_k). An empty mode gets NaN mean and std."""
    x = x.double().cpu()
    labels = mixture.posterior(x).argmax(1)
    K = len(mixture.weights)
    counts = torch.bincount(labels, minlength=K).double()
    means = torch.zeros(K, x.shape[1], dtype=torch.float64).index_add_(0, labels, x) / counts[:, None]
    squares = torch.zeros(K, dtype=torch.float64).index_add_(0, labels, (x - means[labels]).pow(2).sum(1))
    return counts / len(x), means, (squares / (counts * x.shape[1])).sqrt()


# Tolerances of mixture_failures: a correct sampler passes them with a few thousand samples.
MAX_SW2_RATIO = 1.5  # sliced W₂ / noise floor
WEIGHT_Z, WEIGHT_SLACK = 4.0, 0.01  # |ŵ_k − w_k| ≤ 4·√(w(1−w)/n) + 0.01
MEAN_Z, MEAN_SLACK = 5.0, 0.1  # ‖μ̂_k − μ_k‖∞ ≤ 5·s_k/√n_k + 0.1·s_k  (the slack admits a solver's O(h^p) bias)
STD_TOLERANCE = 0.15  # |ŝ_k/s_k − 1|


def mixture_failures(mixture: GaussianMixture, x: torch.Tensor, chunk: int, floor: float) -> list:
    """What samples x (n, d) of `mixture` get wrong, as messages (empty: all checks passed): the sliced W₂ in units
    of its noise floor `floor` (chunks of `chunk` points), and the per-mode weights, means and stds."""
    if not torch.isfinite(x).all():
        return ["non-finite samples"]
    failures = []
    ratio = sliced_w2_ratio(x, mixture, chunk, floor)
    if not ratio <= MAX_SW2_RATIO:
        failures.append(f"sliced W2 = {ratio:.2f} × noise floor > {MAX_SW2_RATIO}")
    weights, means, stds = mode_statistics(mixture, x)
    n = len(x)
    w_tol = WEIGHT_Z * torch.sqrt(mixture.weights * (1 - mixture.weights) / n) + WEIGHT_SLACK
    if not torch.all((weights - mixture.weights).abs() <= w_tol):
        failures.append(f"mode weights {weights.numpy().round(3)} vs {mixture.weights.numpy().round(3)}")
    mean_err = (means - mixture.means).abs().max(1).values
    mean_tol = MEAN_Z * mixture.stds / torch.sqrt(weights * n) + MEAN_SLACK * mixture.stds
    if not torch.all(mean_err <= mean_tol):
        failures.append(f"mode mean errors {mean_err.numpy().round(3)} > {mean_tol.numpy().round(3)}")
    std_err = (stds / mixture.stds - 1).abs()
    if not torch.all(std_err <= STD_TOLERANCE):
        failures.append(f"mode std relative errors {std_err.numpy().round(3)} > {STD_TOLERANCE}")
    return failures


def gaussian_moment_errors(x: torch.Tensor, mean: torch.Tensor, cov: torch.Tensor) -> Tuple[float, float]:
    """How far the sample moments of x (n, k) are from N(mean, cov), relative to its size:
    ‖m̂ − μ‖ / √tr Σ  and  ‖Ĉ − Σ‖_F / ‖Σ‖_F  (Ĉ with the 1/(n − 1) normalization)."""
    x, mean, cov = x.double(), mean.double(), cov.double()
    mean_error = (x.mean(0) - mean).norm() / cov.trace().sqrt()
    cov_error = (torch.cov(x.T).reshape(cov.shape) - cov).norm() / cov.norm()
    return mean_error.item(), cov_error.item()


def gaussian_moment_noise_floor(cov: torch.Tensor, n: int) -> Tuple[float, float]:
    """Root-mean-square values of `gaussian_moment_errors` for n exact samples: 1/√n and
    √((‖Σ‖_F² + (tr Σ)²)/(n − 1)) / ‖Σ‖_F  (E‖m̂ − μ‖² = tr Σ/n; Var Ĉ_ij = (Σ_ij² + Σ_ii Σ_jj)/(n − 1))."""
    cov = cov.double()
    return 1.0 / math.sqrt(n), math.sqrt((cov.norm() ** 2 + cov.trace() ** 2).item() / (n - 1)) / cov.norm().item()


# Exact draws behind the Monte-Carlo entropy of a mixture: its standard error is std(log p)/√n, about 1e-3 nats per
# dimension for the test mixtures.
ENTROPY_SAMPLES = 200_000


def mixture_entropy(mixture: GaussianMixture, n: int = ENTROPY_SAMPLES, seed: int = 2024) -> float:
    """H(p) = −E_p[log p(x)] in nats per dimension, by Monte Carlo over n exact draws (a mixture's entropy has no
    closed form)."""
    x = mixture.sample(n, torch.Generator().manual_seed(seed))[0].double()
    return -torch.cat([mixture.log_prob(part) for part in x.split(20_000)]).mean().item() / mixture.dim


def cross_entropy_gap(x: torch.Tensor, mixture: GaussianMixture, entropy: Optional[float] = None) -> float:
    """−(1/n)Σ log p(x_i)/d − H(p)/d in nats per dimension, for samples x (n, d) of a sampler targeting p.

    For exact samples it scatters around 0 (≈ std(log p)/(d·√n)); it is positive when samples stray into low
    density (over-dispersion, missing detail) and negative when they crowd the modes (under-dispersion), so its sign
    says which way a sampler errs. `entropy` (per dimension) defaults to `mixture_entropy(mixture)`.
    """
    entropy = mixture_entropy(mixture) if entropy is None else entropy
    log_p = torch.cat([mixture.log_prob(part) for part in x.double().split(20_000)])
    return -log_p.mean().item() / mixture.dim - entropy
