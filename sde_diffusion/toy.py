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
