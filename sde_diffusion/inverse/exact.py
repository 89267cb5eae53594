"""The exact posterior of a Gaussian-mixture prior under a linear-Gaussian measurement, and the scores of samples
against it.

Prior p(x) = Σ_k w_k N(x; μ_k, Σ_k), measurement y = A·x + σ_y·z. Each component's posterior is Gaussian (the
Kalman update) and the weights are each component's evidence:

    S_k = A Σ_k Aᵀ + σ_y² I,   K_k = Σ_k Aᵀ S_k⁻¹
    μ'_k = μ_k + K_k (y − A μ_k),   Σ'_k = Σ_k − K_k A Σ_k,   w'_k ∝ w_k N(y; A μ_k, S_k)

so p(x | y) is again a mixture, with full covariances, and so is p_t(x_t | y) at every time of every SDE
(means α μ'_k, covariances α² Σ'_k + σ² I). With σ_y = 0 the posterior lives on the plane A·x = y: it is
described in coordinates z = Nᵀx along an orthonormal basis N of A's null space (x = A⁺y + N z).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import torch

from ..metrics_toy import sliced_w2
from ..sdes import SDE, batch_time
from ..toy import Gaussian, GaussianMixture
from .observation import LinearObservation

# Draws behind a posterior's Monte-Carlo entropy (standard error ≈ std(log p)/√n, about 1e-3 nats per dimension).
ENTROPY_SAMPLES = 100_000


class FullGaussianMixture:
    """p(x) = Σ_k w_k N(x; μ_k, Σ_k) with full covariances: weights (K,), means (K, d), covs (K, d, d), float64."""

    def __init__(self, weights, means, covs):
        self.weights = torch.as_tensor(weights, dtype=torch.float64)
        self.means = torch.as_tensor(means, dtype=torch.float64)
        covs = torch.as_tensor(covs, dtype=torch.float64)
        self.covs = 0.5 * (covs + covs.transpose(1, 2))
        self.dim = self.means.shape[1]
        self._chol = torch.linalg.cholesky(self.covs)

    @staticmethod
    def from_prior(prior: Union[GaussianMixture, Gaussian]) -> "FullGaussianMixture":
        """The toy module's mixtures (and single Gaussians) with their covariances written out."""
        if isinstance(prior, Gaussian):
            return FullGaussianMixture(torch.ones(1), prior.mean[None], prior.cov[None])
        R = torch.eye(prior.dim, dtype=torch.float64) if prior.rotation is None else prior.rotation
        covs = R[None] @ torch.diag_embed(prior.axis_stds**2) @ R.T[None]
        return FullGaussianMixture(prior.weights, prior.means, covs)

    def sample(self, n: int, generator: Optional[torch.Generator] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """(n, d) float64 draws and their (n,) components."""
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        return self.means[k] + (self._chol[k] @ z[..., None]).squeeze(-1), k

    def _perturbed(self, alpha: float, sigma: float) -> Tuple[torch.Tensor, torch.Tensor]:
        """Means and Cholesky factors of the components of α·x + σ·z."""
        if alpha == 1.0 and sigma == 0.0:
            return self.means, self._chol
        eye = torch.eye(self.dim, dtype=torch.float64)
        return alpha * self.means, torch.linalg.cholesky(alpha**2 * self.covs + sigma**2 * eye)

    def _log_terms(self, x: torch.Tensor, alpha: float, sigma: float) -> Tuple[torch.Tensor, torch.Tensor]:
        """(n, K) log w_k + log N(x; α μ_k, α² Σ_k + σ² I), and the whitened residuals' solves (n, K, d): C_k⁻¹(x − m_k)."""
        means, chol = self._perturbed(alpha, sigma)
        diff = x.double()[:, None, :] - means[None]  # (n, K, d)
        white = torch.linalg.solve_triangular(chol[None], diff[..., None], upper=False).squeeze(-1)
        log_det = 2 * torch.log(torch.diagonal(chol, dim1=1, dim2=2)).sum(1)
        log_n = -0.5 * (white.pow(2).sum(-1) + log_det[None] + self.dim * math.log(2 * math.pi))
        solved = torch.linalg.solve_triangular(chol.transpose(1, 2)[None], white[..., None], upper=True).squeeze(-1)
        return torch.log(self.weights)[None] + log_n, solved

    def log_prob(self, x: torch.Tensor, alpha: float = 1.0, sigma: float = 0.0) -> torch.Tensor:
        """(n,) log density (nats) at x (n, d), of the mixture or of α·x + σ·z."""
        return torch.logsumexp(self._log_terms(x, alpha, sigma)[0], dim=1)

    def score(self, x: torch.Tensor, alpha: float = 1.0, sigma: float = 0.0) -> torch.Tensor:
        """(n, d) ∇ log density at x, of the mixture or of α·x + σ·z (float64)."""
        log_terms, solved = self._log_terms(x, alpha, sigma)
        return -(torch.softmax(log_terms, dim=1)[..., None] * solved).sum(1)

    def marginal_score_fn(self, sde: SDE):
        """(x, t) ↦ ∇ log p_t(x) for x (n, d) and per-sample or shared t; like x."""
        def score_fn(x: torch.Tensor, t) -> torch.Tensor:
            t = batch_time(t, x)
            alpha, sigma = sde.alpha(t).double(), sde.sigma(t).double()
            out = torch.empty(x.shape, dtype=torch.float64, device=x.device)
            for a, s in torch.unique(torch.stack([alpha, sigma], 1), dim=0):
                rows = (alpha == a) & (sigma == s)
                out[rows] = self.score(x[rows], float(a), float(s))
            return out.to(x.dtype)
        return score_fn


class ExactPosterior:
    """p(x | y) of a Gaussian-mixture prior: `mixture` over coordinates z = coords(x) (x itself when σ_y > 0; the
    null-space coordinates of A when σ_y = 0, the rest being fixed by y)."""

    def __init__(self, mixture: FullGaussianMixture, basis: Optional[torch.Tensor], offset: torch.Tensor):
        self.mixture, self.basis, self.offset = mixture, basis, offset

    @property
    def dim(self) -> int:
        """The posterior's dimension: d, or d − rank(A) when noiseless."""
        return self.mixture.dim

    def coords(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(len(x), -1).double()
        return x if self.basis is None else x @ self.basis

    def sample(self, n: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """(n, d) exact posterior draws in data space, float64."""
        z = self.mixture.sample(n, generator)[0]
        return z if self.basis is None else self.offset + z @ self.basis.T

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """(n,) log density in the posterior's coordinates."""
        return self.mixture.log_prob(self.coords(x))

    def entropy(self, n: int = ENTROPY_SAMPLES, seed: int = 2024) -> float:
        """H(p(x | y)) in nats per posterior dimension (Monte Carlo over n exact draws)."""
        z = self.mixture.sample(n, torch.Generator().manual_seed(seed))[0]
        return -torch.cat([self.mixture.log_prob(part) for part in z.split(20_000)]).mean().item() / self.dim

    def gap(self, x: torch.Tensor, entropy: Optional[float] = None) -> float:
        """Cross-entropy minus entropy, nats per posterior dimension: ≈ 0 for exact samples, > 0 for samples in low
        posterior density (too spread, or not fitting y), < 0 for samples crowding its modes."""
        entropy = self.entropy() if entropy is None else entropy
        return -self.log_prob(x).mean().item() / self.dim - entropy

    def sliced_w2(self, x: torch.Tensor, seed: int = 0) -> float:
        """Sliced W₂ between samples x (n, d) and as many exact posterior draws."""
        x = x.reshape(len(x), -1).double()
        return sliced_w2(x, self.sample(len(x), torch.Generator().manual_seed(seed)))

    def score_fn(self, sde: SDE):
        """The exact posterior score ∇log p_t(x_t | y) (σ_y > 0 only: otherwise it is singular at t → 0)."""
        if self.basis is not None:
            raise ValueError("the noiseless posterior has no density in data space; give noise_std > 0")
        return self.mixture.marginal_score_fn(sde)


def exact_posterior(prior: Union[GaussianMixture, Gaussian, FullGaussianMixture], obs: LinearObservation
                    ) -> ExactPosterior:
    """The exact p(x | y) for one shared measurement y (module docstring). A noiseless observation needs A of full
    row rank."""
    if not obs.shared:
        raise ValueError("exact_posterior takes one measurement y shared by every sample")
    prior = prior if isinstance(prior, FullGaussianMixture) else FullGaussianMixture.from_prior(prior)
    A, y = obs.A.matrix(), obs.y.double().reshape(-1)
    m = A.shape[0]
    cov_A = prior.covs @ A.T[None]  # (K, d, m): Σ_k Aᵀ
    S = A[None] @ cov_A + obs.noise_std**2 * torch.eye(m, dtype=torch.float64)
    gain = torch.linalg.solve(S, cov_A.transpose(1, 2)).transpose(1, 2)  # Σ_k Aᵀ S_k⁻¹ (S symmetric)
    innovation = y[None] - prior.means @ A.T  # (K, m)
    means = prior.means + (gain @ innovation[..., None]).squeeze(-1)
    covs = prior.covs - gain @ cov_A.transpose(1, 2)
    chol = torch.linalg.cholesky(S)
    white = torch.linalg.solve_triangular(chol, innovation[..., None], upper=False).squeeze(-1)
    log_evidence = -0.5 * (white.pow(2).sum(1) + 2 * torch.log(torch.diagonal(chol, dim1=1, dim2=2)).sum(1))
    weights = torch.softmax(torch.log(prior.weights) + log_evidence, dim=0)
    if obs.noise_std > 0:
        return ExactPosterior(FullGaussianMixture(weights, means, covs), None, torch.zeros(prior.dim))
    _, singular, vh = torch.linalg.svd(A)
    rank = int((singular > singular.max() * 1e-10).sum())
    basis = vh[rank:].T  # (d, d − rank): A's null space
    offset = torch.linalg.pinv(A) @ y
    mixture = FullGaussianMixture(weights, means @ basis, basis.T[None] @ covs @ basis[None])
    return ExactPosterior(mixture, basis, offset)
