"""Low-dimensional distributions with exact answers: Gaussian mixtures (closed-form score and density at every
time of every SDE), mixtures with classes (exact conditional scores and class posteriors, for guidance), two moons
and swiss roll. Used as toy datasets and as test oracles."""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch

from .sdes import SDE, batch_time, per_sample


class GaussianMixture:
    """p(x) = Σ_k w_k N(x; μ_k, R diag(s_k²) Rᵀ).  weights (K,), means (K, d), stds (K,) (isotropic components) or
    (K, d) (each component's std along the axes of the frame R), rotation (d, d) orthogonal (None: the identity)
    — float64 internally. `stds` keeps each component's RMS std (K,), `axis_stds` the (K, d) ones.

    Under any SDE with kernel x_t = α(t)x_0 + σ(t)z the marginal p_t is again such a mixture, with means α μ_k and
    covariances R diag(α² s_k² + σ²) Rᵀ, so `marginal_score_fn(sde)` is the exact score of p_t.
    """

    def __init__(self, weights, means, stds, rotation=None):
        self.weights = torch.as_tensor(weights, dtype=torch.float64)
        self.means = torch.as_tensor(means, dtype=torch.float64)
        if not torch.allclose(self.weights.sum(), torch.tensor(1.0, dtype=torch.float64)):
            raise ValueError(f"mixture weights must sum to 1, got {self.weights.sum().item()}")
        K, self.dim = self.means.shape
        stds = torch.as_tensor(stds, dtype=torch.float64)
        self.axis_stds = (stds.expand(K)[:, None] if stds.ndim <= 1 else stds).expand(K, self.dim).clone()
        self.stds = self.axis_stds.pow(2).mean(1).sqrt()
        self.rotation = None if rotation is None else torch.as_tensor(rotation, dtype=torch.float64)
        if self.rotation is not None and not torch.allclose(self.rotation.T @ self.rotation,
                                                            torch.eye(self.dim, dtype=torch.float64), atol=1e-9):
            raise ValueError("rotation must be an orthogonal (d, d) matrix")
        self._frame_means = self._to_frame(self.means)  # (K, d) means in the frame of the axes

    def _to_frame(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.rotation is None else x @ self.rotation

    def _from_frame(self, y: torch.Tensor) -> torch.Tensor:
        return y if self.rotation is None else y @ self.rotation.T

    def sample(self, n: int, generator: Optional[torch.Generator] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """(n, d) float32 points and their (n,) component labels."""
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        return (self.means[k] + self._from_frame(self.axis_stds[k] * z)).float(), k

    def _component_terms(self, x: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor):
        """(n, K) log w_k + log N(x; α μ_k, R diag(α² s_k² + σ²) Rᵀ), the inverse variances and x in the frame.
        With one α and σ for the whole batch (a sampler's step) the quadratic forms are matrix products; per-sample
        α, σ of shape (n,) broadcast over (n, K, d)."""
        y = self._to_frame(x.double())
        S2, M = self.axis_stds**2, self._frame_means
        if len(alpha) and bool((alpha == alpha[0]).all() and (sigma == sigma[0]).all()):
            a, s = alpha[0], sigma[0]
            inv = 1.0 / (a**2 * S2 + s**2)  # (K, d)
            quad = y.pow(2) @ inv.T - 2 * a * y @ (M * inv).T + a**2 * (M.pow(2) * inv).sum(1)
            log_det = -torch.log(inv).sum(1)[None]
        else:
            inv = 1.0 / (alpha[:, None, None] ** 2 * S2[None] + sigma[:, None, None] ** 2)  # (n, K, d)
            quad = ((y[:, None, :] - alpha[:, None, None] * M[None]).pow(2) * inv).sum(-1)
            log_det = -torch.log(inv).sum(-1)
        log_probs = torch.log(self.weights)[None] - 0.5 * (self.dim * math.log(2 * math.pi) + log_det + quad)
        return log_probs, inv, y

    def _component_log_probs(self, x: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """(n, K): log w_k + log N(x; α μ_k, R diag(α² s_k² + σ²) Rᵀ) with per-sample α, σ of shape (n,)."""
        return self._component_terms(x, alpha, sigma)[0]

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
        log_probs, inv, y = self._component_terms(x, alpha, sigma)
        post = torch.softmax(log_probs, dim=1)  # (n, K)
        if inv.ndim == 2:  # Σ_k p_k (α m_k − y)/v_k as matrix products
            score = alpha[0] * post @ (self._frame_means * inv) - y * (post @ inv)
        else:
            score = (post[..., None] * (alpha[:, None, None] * self._frame_means[None] - y[:, None, :]) * inv).sum(1)
        return self._from_frame(score).to(x.dtype)

    def posterior(self, x: torch.Tensor) -> torch.Tensor:
        """(n, K) responsibilities p(k | x) under the clean mixture."""
        return torch.softmax(self._component_log_probs(x, *self._coeffs(x)), dim=1)

    def subset(self, components: Sequence[int]) -> "GaussianMixture":
        """The mixture of the given components, weights renormalized."""
        k = torch.as_tensor(list(components))
        return GaussianMixture(self.weights[k] / self.weights[k].sum(), self.means[k], self.axis_stds[k],
                               self.rotation)

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


# The family of random mixtures that default time grids are chosen on (one set of seeds) and verified on (another):
# benchmarks/default_grids.py, tests/test_default_grids.py.
FAMILY_DIMS = (2, 4, 8, 16, 32, 64)
FAMILY_COMPONENTS = (2, 10)  # fewest, most
FAMILY_SCALES = (0.1, 2.0)  # spread of the component means per coordinate (log-uniform)
FAMILY_SEPARATION = (0.5, 2.0)  # extra factor on the means' spread: close to far modes (log-uniform)
FAMILY_RELATIVE_STD = (0.05, 1.0)  # a component's RMS std over the scale: narrow to wide modes (log-uniform)
FAMILY_ANISOTROPY = 3.0  # anisotropic members stretch each axis of a random frame by a factor in [1/3, 3]
# Smallest std of any component along any axis: the samplers stop at σ(eps) ≈ 0.01 (VP, VE; 0.014 for cosine VP),
# and a mode narrower than about 10 σ(eps) cannot be resolved by any sampler with the final denoising step (an
# exact sampler is then off by about −σ(eps)²/(2 s²) nats/dim, −0.01 at s = 0.1 on cosine VP).
FAMILY_MIN_STD = 0.1
FAMILY_MIN_WEIGHT = 0.02
# Seeds of the members that defaults are selected on, and the disjoint ones they are verified on.
FAMILY_SELECTION_SEEDS = tuple(range(0, 24))
FAMILY_VERIFICATION_SEEDS = tuple(range(1000, 1024))


def random_mixture(seed: int) -> GaussianMixture:
    """Member `seed` of the mixture family: d ∈ FAMILY_DIMS, 2–10 components with Dirichlet weights (≥ 2 %), means
    with spread scale·separation per coordinate, isotropic or (half the members) anisotropic components in a random
    frame, narrow to wide and close to far modes, every axis std ≥ FAMILY_MIN_STD. The same seed gives the same
    mixture everywhere (its own generator)."""
    g = torch.Generator().manual_seed(int(seed))

    def uniform(low: float, high: float) -> float:
        return low + (high - low) * torch.rand((), generator=g, dtype=torch.float64).item()

    def log_uniform(low: float, high: float) -> float:
        return math.exp(uniform(math.log(low), math.log(high)))

    dim = FAMILY_DIMS[int(torch.randint(len(FAMILY_DIMS), (), generator=g))]
    k = int(torch.randint(FAMILY_COMPONENTS[0], FAMILY_COMPONENTS[1] + 1, (), generator=g))
    scale = log_uniform(*FAMILY_SCALES)
    means = scale * log_uniform(*FAMILY_SEPARATION) * torch.randn(k, dim, generator=g, dtype=torch.float64)
    stds = torch.tensor([scale * log_uniform(*FAMILY_RELATIVE_STD) for _ in range(k)], dtype=torch.float64)
    weights = -torch.log(torch.rand(k, 2, generator=g, dtype=torch.float64)).sum(1)  # Gamma(2): Dirichlet(2, …, 2)
    weights = (weights / weights.sum()).clamp_min(FAMILY_MIN_WEIGHT)
    rotation = None
    axis_stds = stds[:, None].expand(k, dim)
    if torch.rand((), generator=g).item() < 0.5:
        exponent = 2 * torch.rand(k, dim, generator=g, dtype=torch.float64) - 1  # uniform in [−1, 1]
        axis_stds = axis_stds * FAMILY_ANISOTROPY**exponent
        rotation = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))[0]
    return GaussianMixture(weights / weights.sum(), means, axis_stds.clamp_min(FAMILY_MIN_STD), rotation)


def describe_mixture(mixture: GaussianMixture) -> str:
    """One line: d, components, RMS spread of the means, std range, isotropic or not."""
    spread = (mixture.means - mixture.weights @ mixture.means).pow(2).mean().sqrt().item()
    kind = "isotropic" if mixture.rotation is None else "anisotropic"
    return (f"d={mixture.dim}, K={len(mixture.weights)}, spread {spread:.2f}, stds "
            f"{mixture.axis_stds.min().item():.2f}–{mixture.axis_stds.max().item():.2f}, {kind}")


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
        self._class_mixtures = [mixture.subset(k) for k in members]

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
