"""Low-dimensional distributions with exact answers: Gaussian mixtures (closed-form score and density at every
time of every SDE), mixtures with classes (exact conditional scores and class posteriors, for guidance), two moons
and swiss roll. Used as toy datasets and as test oracles."""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch

from .sdes import SDE, batch_time, per_sample


class GaussianMixture:
    """p(x) = Σ_k w_k N(x; μ_k, s_k² I).  weights (K,), means (K, d), stds (K,) — float64 internally.

    Under any SDE with kernel x_t = α(t)x_0 + σ(t)z the marginal p_t is again such a mixture, with means
    α μ_k and variances α² s_k² + σ², so `marginal_score_fn(sde)` is the exact score of p_t.
    """

    def __init__(self, weights, means, stds):
        self.weights = torch.as_tensor(weights, dtype=torch.float64)
        self.means = torch.as_tensor(means, dtype=torch.float64)
        self.stds = torch.as_tensor(stds, dtype=torch.float64).expand(len(self.weights)).clone()
        if not torch.allclose(self.weights.sum(), torch.tensor(1.0, dtype=torch.float64)):
            raise ValueError(f"mixture weights must sum to 1, got {self.weights.sum().item()}")
        self.dim = self.means.shape[1]

    def sample(self, n: int, generator: Optional[torch.Generator] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """(n, d) float32 points and their (n,) component labels."""
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        return (self.means[k] + self.stds[k, None] * z).float(), k

    def _component_log_probs(self, x: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """(n, K): log w_k + log N(x; α μ_k, (α² s_k² + σ²) I) with per-sample α, σ of shape (n,)."""
        x = x.double()
        var = alpha[:, None] ** 2 * self.stds[None] ** 2 + sigma[:, None] ** 2  # (n, K)
        diff = x[:, None, :] - alpha[:, None, None] * self.means[None]  # (n, K, d)
        return (torch.log(self.weights)[None] - 0.5 * self.dim * torch.log(2 * math.pi * var)
                - 0.5 * diff.pow(2).sum(-1) / var)

    def _coeffs(self, x, alpha=None, sigma=None):
        n = x.shape[0]
        ones = torch.ones(n, dtype=torch.float64, device=x.device)
        alpha = ones if alpha is None else torch.as_tensor(alpha, dtype=torch.float64).expand(n)
        sigma = 0 * ones if sigma is None else torch.as_tensor(sigma, dtype=torch.float64).expand(n)
        return alpha, sigma

    def log_prob(self, x: torch.Tensor, alpha=None, sigma=None) -> torch.Tensor:
        """(n,) log density (nats) of the mixture, or of its perturbation by x = αx_0 + σz."""
        return torch.logsumexp(self._component_log_probs(x, *self._coeffs(x, alpha, sigma)), dim=1)

    def score(self, x: torch.Tensor, alpha=None, sigma=None) -> torch.Tensor:
        """(n, d) ∇ log density, of the mixture or its perturbation (same dtype as x)."""
        alpha, sigma = self._coeffs(x, alpha, sigma)
        post = torch.softmax(self._component_log_probs(x, alpha, sigma), dim=1)  # (n, K)
        var = alpha[:, None] ** 2 * self.stds[None] ** 2 + sigma[:, None] ** 2
        diff = alpha[:, None, None] * self.means[None] - x.double()[:, None, :]
        return (post[..., None] * diff / var[..., None]).sum(1).to(x.dtype)

    def posterior(self, x: torch.Tensor) -> torch.Tensor:
        """(n, K) responsibilities p(k | x) under the clean mixture."""
        return torch.softmax(self._component_log_probs(x, *self._coeffs(x)), dim=1)

    def marginal_score_fn(self, sde: SDE):
        """Exact score function (x, t) ↦ ∇ log p_t(x) of the mixture diffused by `sde`."""
        def score_fn(x, t):
            t = batch_time(t, x)
            return self.score(x, sde.alpha(t).double(), sde.sigma(t).double())
        return score_fn


def default_mixture() -> GaussianMixture:
    """The `gmm` toy dataset: 4 modes with unequal weights on a square of side 4, std 0.3."""
    return GaussianMixture(weights=[0.1, 0.2, 0.3, 0.4],
                           means=[[-2.0, -2.0], [-2.0, 2.0], [2.0, -2.0], [2.0, 2.0]],
                           stds=0.3)


def two_moons(n: int, generator: Optional[torch.Generator] = None, noise: float = 0.05) -> torch.Tensor:
    """Two interleaving half circles, centred and scaled to roughly unit variance: (n, 2)."""
    upper = torch.rand(n, generator=generator) < 0.5
    angle = torch.rand(n, generator=generator) * math.pi
    x = torch.where(upper, torch.cos(angle), 1 - torch.cos(angle))
    y = torch.where(upper, torch.sin(angle), 0.5 - torch.sin(angle))
    pts = torch.stack([x - 0.5, y - 0.25], 1) * 2.0
    return pts + noise * 2.0 * torch.randn(n, 2, generator=generator)


def swiss_roll(n: int, generator: Optional[torch.Generator] = None, noise: float = 0.05) -> torch.Tensor:
    """A 2-D swiss roll (the x–z plane of the 3-D one), scaled to roughly unit variance: (n, 2)."""
    angle = 1.5 * math.pi * (1 + 2 * torch.rand(n, generator=generator))
    pts = torch.stack([angle * torch.cos(angle), angle * torch.sin(angle)], 1) / 7.5
    return pts + noise * torch.randn(n, 2, generator=generator)


def high_dim_mixture(dim: int = 16, seed: int = 0) -> GaussianMixture:
    """A `dim`-dimensional test mixture: 4 modes with weights 0.1..0.4, means drawn once from N(0, I) (a fixed
    seed, so the mixture is the same everywhere; pairwise mean distances ≈ √(2·dim)), and unequal stds 0.3..0.6."""
    means = torch.randn(4, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return GaussianMixture(weights=[0.1, 0.2, 0.3, 0.4], means=means, stds=[0.3, 0.5, 0.4, 0.6])


class Gaussian:
    """N(μ, Σ) on R^d with a full covariance (float64): the exact score of p_t under every SDE and Gaussian
    conditionals, the oracle for inpainting and colorization.

    With Σ = U diag(λ) Uᵀ the marginal p_t = N(α μ, α² Σ + σ² I) has score −U diag(1/(α² λ + σ²)) Uᵀ (x − α μ).
    """

    def __init__(self, mean, cov):
        self.mean = torch.as_tensor(mean, dtype=torch.float64)
        self.cov = torch.as_tensor(cov, dtype=torch.float64)
        self.dim = len(self.mean)
        if self.cov.shape != (self.dim, self.dim) or not torch.allclose(self.cov, self.cov.T):
            raise ValueError(f"cov must be a symmetric {self.dim}×{self.dim} matrix")
        self.eigenvalues, self.eigenvectors = torch.linalg.eigh(self.cov)
        if self.eigenvalues.min() <= 0:
            raise ValueError("cov must be positive definite")

    def sample(self, n: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """(n, d) float64 draws."""
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        return self.mean + (z * self.eigenvalues.sqrt()) @ self.eigenvectors.T

    def score(self, x: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """∇ log N(x; α μ, α² Σ + σ² I) for x (n, ...) flattened to (n, d), per-sample α, σ (n,); like x."""
        flat = x.reshape(len(x), -1).double()
        alpha, sigma = alpha.double()[:, None], sigma.double()[:, None]
        rotated = (flat - alpha * self.mean) @ self.eigenvectors  # Uᵀ(x − αμ), row-wise
        return (-(rotated / (alpha**2 * self.eigenvalues + sigma**2)) @ self.eigenvectors.T).reshape(x.shape).to(x)

    def marginal_score_fn(self, sde: SDE):
        """Exact score function (x, t) ↦ ∇ log p_t(x); x of shape (n, ...) with d elements per item."""
        def score_fn(x, t):
            t = batch_time(t, x)
            return self.score(x, sde.alpha(t), sde.sigma(t))
        return score_fn

    def linear_map(self, matrix) -> "Gaussian":
        """The law of A·x: N(A μ, A Σ Aᵀ) (A square and invertible)."""
        matrix = torch.as_tensor(matrix, dtype=torch.float64)
        return Gaussian(matrix @ self.mean, matrix @ self.cov @ matrix.T)

    def conditional(self, known: torch.Tensor, values: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Mean (u,) and covariance (u, u) of the coordinates where `known` (bool, (d,)) is False given x[known] =
        values:  μ_u + Σ_uk Σ_kk⁻¹ (values − μ_k),  Σ_uu − Σ_uk Σ_kk⁻¹ Σ_ku."""
        known = torch.as_tensor(known, dtype=torch.bool)
        values = torch.as_tensor(values, dtype=torch.float64)
        cov_kk, cov_uk = self.cov[known][:, known], self.cov[~known][:, known]
        gain = torch.linalg.solve(cov_kk, cov_uk.T).T  # Σ_uk Σ_kk⁻¹
        mean = self.mean[~known] + gain @ (values - self.mean[known])
        return mean, self.cov[~known][:, ~known] - gain @ cov_uk.T


def ar1_gaussian(dim: int = 6, rho: float = 0.9, seed: int = 0) -> Gaussian:
    """N(μ, Σ) with Σ_ij = ρ^|i−j| (an AR(1) chain: neighbours strongly correlated, unit variances) and μ drawn
    once from N(0, ¼ I) with a fixed seed. The inpainting oracle."""
    i = torch.arange(dim, dtype=torch.float64)
    mean = 0.5 * torch.randn(dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return Gaussian(mean, rho ** (i[:, None] - i[None]).abs())


# Colour correlations of the colorization oracle (R, G, B), and the channels' standard deviations.
PIXEL_COLOUR_CORRELATION = ((1.0, 0.8, 0.5), (0.8, 1.0, 0.7), (0.5, 0.7, 1.0))
PIXEL_COLOUR_STDS = (1.0, 0.8, 1.2)


def colour_pixels_gaussian(pixels: int = 2, pixel_rho: float = 0.7, seed: int = 0) -> Gaussian:
    """A Gaussian over `pixels` RGB pixels, as vectors of length 3·pixels in channel-major order (the layout of a
    (3, pixels) array): Σ = C ⊗ P with C the colour covariance (PIXEL_COLOUR_CORRELATION scaled by
    PIXEL_COLOUR_STDS) and P_ij = pixel_rho^|i−j|; μ drawn once from N(0, ¼ I). The colorization oracle."""
    stds = torch.tensor(PIXEL_COLOUR_STDS, dtype=torch.float64)
    colour = torch.tensor(PIXEL_COLOUR_CORRELATION, dtype=torch.float64) * stds[:, None] * stds[None]
    i = torch.arange(pixels, dtype=torch.float64)
    mean = 0.5 * torch.randn(3 * pixels, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return Gaussian(mean, torch.kron(colour, pixel_rho ** (i[:, None] - i[None]).abs()))


# The inpainting oracle's known coordinates and how far above their means they are set (in their std units).
ORACLE_KNOWN = (0, 3)
ORACLE_SHIFT = 1.5


def inpainting_oracle() -> Tuple[Gaussian, torch.Tensor, torch.Tensor]:
    """(data, mask, x_known): `ar1_gaussian()` (d = 6) with coordinates ORACLE_KNOWN known at ORACLE_SHIFT above
    their means; mask (d,) bool, x_known (d,) with zeros where unknown. The exact answer is
    `data.conditional(mask, x_known[mask])`."""
    data = ar1_gaussian()
    mask = torch.zeros(data.dim, dtype=torch.bool)
    mask[list(ORACLE_KNOWN)] = True
    x_known = torch.where(mask, data.mean + ORACLE_SHIFT, torch.zeros_like(data.mean))
    return data, mask, x_known


def colorization_oracle(pixels: int = 2) -> Tuple[Gaussian, torch.Tensor]:
    """(data, grey): `colour_pixels_gaussian(pixels)` and a grey input (1, 1, pixels), the channel mean of
    μ + ORACLE_SHIFT·(channel stds) (a bright, plausible image)."""
    data = colour_pixels_gaussian(pixels)
    image = data.mean.reshape(3, pixels) + ORACLE_SHIFT * torch.tensor(PIXEL_COLOUR_STDS, dtype=torch.float64)[:, None]
    return data, image.mean(0).reshape(1, 1, pixels)


class LabelledMixture:
    """A Gaussian mixture whose components are grouped into classes y = 0..C−1 (`classes[y]` lists y's components):
    p(x | y) is the mixture of class y's components with renormalized weights, p(y) the sum of their weights.

    Exact at every time of every SDE, as oracles for guidance: the class-conditional scores ∇ log p_t(x | y), the
    unconditional score ∇ log p_t(x), and the class posterior log p_t(y | x) with its gradient (by autograd).
    """

    def __init__(self, mixture: GaussianMixture, classes: Sequence[Sequence[int]]):
        members = [sorted(int(k) for k in group) for group in classes]
        if sorted(k for group in members for k in group) != list(range(len(mixture.weights))):
            raise ValueError(f"classes {classes} must split the components 0..{len(mixture.weights) - 1} into groups")
        self.mixture, self.classes = mixture, members
        self.membership = torch.zeros(len(members), len(mixture.weights), dtype=torch.bool)  # (C, K)
        for y, group in enumerate(members):
            self.membership[y, group] = True
        self.class_weights = (self.membership.double() * mixture.weights[None]).sum(1)  # (C,)
        self._class_mixtures = [GaussianMixture(mixture.weights[k] / mixture.weights[k].sum(), mixture.means[k],
                                                mixture.stds[k]) for k in members]

    def class_mixture(self, y: int) -> GaussianMixture:
        """p(x | y) as a GaussianMixture of class y's components."""
        return self._class_mixtures[y]

    def label_of_component(self) -> torch.Tensor:
        """(K,) the class of each component."""
        return self.membership.double().argmax(0)

    def sample(self, n: int, generator: Optional[torch.Generator] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """(n, d) points of the mixture and their (n,) class labels."""
        x, k = self.mixture.sample(n, generator)
        return x, self.label_of_component()[k]

    def log_class_posterior(self, x: torch.Tensor, alpha=None, sigma=None) -> torch.Tensor:
        """(n, C) log p(y | x) under the mixture perturbed by x = αx_0 + σz (float64, differentiable in x)."""
        log_joint = self.mixture._component_log_probs(x, *self.mixture._coeffs(x, alpha, sigma))  # (n, K)
        per_class = log_joint[:, None, :].masked_fill(~self.membership[None], -math.inf)  # (n, C, K)
        return torch.logsumexp(per_class, dim=2) - torch.logsumexp(log_joint, dim=1, keepdim=True)

    def conditional_score_fn(self, sde: SDE, labels: torch.Tensor):
        """Exact (x, t) ↦ ∇ log p_t(x | y_i) for row i, labels (n,)."""
        def score_fn(x, t):
            t = batch_time(t, x)
            alpha, sigma = sde.alpha(t).double(), sde.sigma(t).double()
            out = torch.empty_like(x)
            for y in range(len(self.classes)):
                rows = labels == y
                out[rows] = self.class_mixture(y).score(x[rows], alpha[rows], sigma[rows])
            return out
        return score_fn

    def class_posterior_grad_fn(self, sde: SDE, labels: torch.Tensor):
        """Exact (x, t) ↦ ∇ₓ log p_t(y_i | x) for row i, labels (n,), by autograd of `log_class_posterior`."""
        def grad_log_p_y(x, t):
            t = batch_time(t, x)
            with torch.enable_grad():
                x_in = x.detach().double().requires_grad_(True)
                log_post = self.log_class_posterior(x_in, sde.alpha(t).double(), sde.sigma(t).double())
                return torch.autograd.grad(log_post.gather(1, labels[:, None]).sum(), x_in)[0].to(x.dtype)
        return grad_log_p_y
