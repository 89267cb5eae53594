"""`LinearObservation`: a measurement y = A·x + noise_std·z of the data, and its log-likelihood."""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from .operators import LinearOperator, as_operator


class LinearObservation:
    """y = A·x + noise_std·z, z ~ N(0, I).

    A: a LinearOperator, a (m, d) matrix on flattened samples, or a linear callable (then `shape`, the shape of one
    sample, is needed). y: one measurement (*out_shape), shared by every sample, or one per sample (n, *out_shape).
    noise_std: σ_y ≥ 0 (0: noiseless).
    """

    def __init__(self, A, y: torch.Tensor, noise_std: float, *, shape: Optional[Sequence[int]] = None):
        self.A: LinearOperator = as_operator(A, shape)
        self.y = torch.as_tensor(y)
        self.noise_std = float(noise_std)
        if not self.noise_std >= 0:
            raise ValueError(f"noise_std must be ≥ 0, got {noise_std}")
        out = self.A.out_shape()
        if tuple(self.y.shape) != out and tuple(self.y.shape[1:]) != out:
            raise ValueError(f"the measurement y is shaped {tuple(self.y.shape)} but the operator gives {out} per "
                             f"sample (from samples shaped {self.A.in_shape}): pass y shaped {out} or (n, *{out})")

    @property
    def shared(self) -> bool:
        """True when one y serves every sample."""
        return tuple(self.y.shape) == self.A.out_shape()

    def y_like(self, x: torch.Tensor) -> torch.Tensor:
        """y for the batch x: (n, *out_shape), on x's device and dtype."""
        y = self.y.to(device=x.device, dtype=x.dtype)
        if self.shared:
            return y.expand(x.shape[0], *y.shape)
        if y.shape[0] != x.shape[0]:
            raise ValueError(f"the observation holds {y.shape[0]} measurements but the batch has {x.shape[0]} samples")
        return y

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        """y − A·x, (n, *out_shape)."""
        return self.y_like(x) - self.A(x)

    def residual_norm(self, x: torch.Tensor) -> torch.Tensor:
        """‖A·x − y‖ per sample, (n,)."""
        return self.residual(x).flatten(1).norm(dim=1)

    @staticmethod
    def simulate(A, x: torch.Tensor, noise_std: float, generator: Optional[torch.Generator] = None,
                 shape: Optional[Sequence[int]] = None) -> "LinearObservation":
        """The observation of x (n, *shape) (or one sample): y = A·x + noise_std·z."""
        operator = as_operator(A, shape if shape is not None else tuple(x.shape[1:]))
        batch = x if tuple(x.shape) != operator.in_shape else x[None]
        y = operator(batch)
        y = y + noise_std * torch.randn(y.shape, generator=generator, dtype=y.dtype).to(y.device)
        return LinearObservation(operator, y if batch is x else y[0], noise_std)
