"""Linear measurement operators A for inverse problems y = A·x + noise.

An operator maps a batch x (n, *in_shape) to measurements (n, *out_shape), linearly and the same way for every
sample. Its adjoint Aᵀ comes from autograd (the vector-Jacobian product of a linear map is its transpose), so a
user's operator is one function; the built-ins are

| operator            | y                                      | config spec                        |
|---------------------|----------------------------------------|------------------------------------|
| `Matrix(A)`         | A @ x.flatten(): any dense (m, d) map  | `matrix:file=A.npy`                |
| `Mask(mask)`        | the kept entries (inpainting)          | `inpaint:box=0.5` / `mask=m.png`   |
| `AveragePool(k)`    | k×k block means (super-resolution)     | `super_resolution:factor=2`        |
| `GaussianBlur(std)` | the image blurred, zero padding         | `blur:std=1.0`                     |
| `Function(fn)`      | fn(x), any linear callable             | (Python only)                      |

`OPERATORS` holds the config specs (`@register_operator("name")` on `factory(shape, *, option=default) ->
LinearOperator`, shape the data's per-sample shape).
"""
from __future__ import annotations

import abc
import math
from typing import Callable, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ..options import Registry


class LinearOperator(abc.ABC):
    """A linear map of per-sample shape `in_shape` → `out_shape`; subclasses define `forward`."""

    def __init__(self, in_shape: Sequence[int]):
        self.in_shape = tuple(int(s) for s in in_shape)

    @property
    def dim(self) -> int:
        """d: the number of entries of one x."""
        return math.prod(self.in_shape)

    @abc.abstractmethod
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """A·x for a batch x (n, *in_shape) → (n, *out_shape)."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[1:]) != self.in_shape:
            raise ValueError(f"{type(self).__name__} acts on samples shaped {self.in_shape}, got a batch shaped "
                             f"{tuple(x.shape)}")
        return self.forward(x)

    def out_shape(self) -> Tuple[int, ...]:
        return tuple(self(torch.zeros(1, *self.in_shape, dtype=torch.float64)).shape[1:])

    def adjoint(self, v: torch.Tensor) -> torch.Tensor:
        """Aᵀv for v (n, *out_shape): the vector-Jacobian product of the linear map."""
        with torch.enable_grad():
            x = torch.zeros(v.shape[0], *self.in_shape, dtype=v.dtype, device=v.device, requires_grad=True)
            return torch.autograd.grad(self(x), x, v)[0]

    def matrix(self) -> torch.Tensor:
        """The dense (m, d) float64 matrix (small d only: one application per basis vector)."""
        eye = torch.eye(self.dim, dtype=torch.float64).reshape(self.dim, *self.in_shape)
        return self(eye).reshape(self.dim, -1).T.contiguous()


class Matrix(LinearOperator):
    """y = A·vec(x) with A (m, d); in_shape defaults to (d,)."""

    def __init__(self, A, in_shape: Optional[Sequence[int]] = None):
        self.A = torch.as_tensor(A)
        if self.A.ndim != 2:
            raise ValueError(f"a measurement matrix must be 2-D (m, d), got shape {tuple(self.A.shape)}")
        super().__init__(in_shape if in_shape is not None else (self.A.shape[1],))
        if self.dim != self.A.shape[1]:
            raise ValueError(f"the matrix has {self.A.shape[1]} columns but each sample has {self.dim} entries "
                             f"(shape {self.in_shape})")

    def forward(self, x):
        return x.flatten(1) @ self.A.to(x).T

    def matrix(self):
        return self.A.double()


class Mask(LinearOperator):
    """Inpainting: y = the entries where `mask` is True, (n, m); mask shaped like one sample, or (H, W) / (1, H, W)
    for every channel of a (C, H, W) sample (then pass in_shape)."""

    def __init__(self, mask, in_shape: Optional[Sequence[int]] = None):
        mask = torch.as_tensor(mask).bool()
        in_shape = tuple(mask.shape) if in_shape is None else tuple(in_shape)
        try:
            mask = mask.expand(in_shape)
        except RuntimeError:
            raise ValueError(f"a mask shaped {tuple(mask.shape)} does not fit samples shaped {in_shape}") from None
        super().__init__(in_shape)
        self.index = mask.flatten().nonzero().squeeze(1)
        if len(self.index) == 0:
            raise ValueError("the inpainting mask keeps no entry: nothing is measured")

    def forward(self, x):
        return x.flatten(1)[:, self.index.to(x.device)]

    def adjoint(self, v):
        out = v.new_zeros(v.shape[0], self.dim)
        out[:, self.index.to(v.device)] = v
        return out.reshape(v.shape[0], *self.in_shape)


class AveragePool(LinearOperator):
    """Super-resolution: y = the means of factor×factor pixel blocks of (C, H, W) images, (n, C, H/f, W/f)."""

    def __init__(self, factor: int, in_shape: Sequence[int]):
        super().__init__(in_shape)
        self.factor = int(factor)
        if len(self.in_shape) != 3 or self.factor < 1 or self.in_shape[1] % self.factor or self.in_shape[2] % self.factor:
            raise ValueError(f"super-resolution by factor {factor} needs (C, H, W) images with H and W divisible by it, "
                             f"got shape {self.in_shape}")

    def forward(self, x):
        return F.avg_pool2d(x, self.factor)

    def adjoint(self, v):
        f = self.factor
        return v.repeat_interleave(f, dim=2).repeat_interleave(f, dim=3) / f**2


def gaussian_kernel(std: float, radius: Optional[int] = None) -> torch.Tensor:
    """(2r+1,) normalized samples of exp(−u²/2std²), r = ⌈3·std⌉ by default."""
    radius = math.ceil(3 * std) if radius is None else int(radius)
    u = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-u**2 / (2 * std**2))
    return kernel / kernel.sum()


class GaussianBlur(LinearOperator):
    """Deblurring: y = x convolved with a separable Gaussian of `std` pixels per channel, zero padding, (n, C, H, W).
    The kernel is symmetric, so the operator is its own adjoint."""

    def __init__(self, std: float, in_shape: Sequence[int], radius: Optional[int] = None):
        super().__init__(in_shape)
        if len(self.in_shape) != 3 or std <= 0:
            raise ValueError(f"blur needs (C, H, W) images and std > 0, got shape {self.in_shape}, std={std}")
        self.kernel = gaussian_kernel(std, radius)

    def forward(self, x):
        C, r = x.shape[1], len(self.kernel) // 2
        k = self.kernel.to(x)
        x = F.conv2d(x, k.reshape(1, 1, -1, 1).expand(C, 1, -1, 1), padding=(r, 0), groups=C)
        return F.conv2d(x, k.reshape(1, 1, 1, -1).expand(C, 1, 1, -1), padding=(0, r), groups=C)

    def adjoint(self, v):
        return self.forward(v)


class Function(LinearOperator):
    """Any linear callable fn(x (n, *in_shape)) -> (n, ...); its adjoint by autograd. Linearity is the caller's
    promise (`check_linear` tests it)."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], in_shape: Sequence[int]):
        super().__init__(in_shape)
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


def as_operator(A, in_shape: Optional[Sequence[int]] = None) -> LinearOperator:
    """A LinearOperator from an operator, a (m, d) matrix (tensor or array) or a linear callable (needs in_shape)."""
    if isinstance(A, LinearOperator):
        if in_shape is not None and tuple(in_shape) != A.in_shape:
            raise ValueError(f"the operator acts on samples shaped {A.in_shape}, not {tuple(in_shape)}")
        return A
    if callable(A) and not torch.is_tensor(A):
        if in_shape is None:
            raise ValueError("a callable measurement operator needs the shape of one sample: "
                             "LinearObservation(fn, y, noise_std, shape=(C, H, W))")
        return Function(A, in_shape)
    return Matrix(A, in_shape)


def check_linear(A: LinearOperator, generator: Optional[torch.Generator] = None, rtol: float = 1e-6) -> None:
    """ValueError unless A(a·x + b·z) = a·A(x) + b·A(z) on random inputs (float64)."""
    x, z = torch.randn(2, 2, *A.in_shape, dtype=torch.float64, generator=generator)
    left, right = A(0.7 * x - 1.3 * z), 0.7 * A(x) - 1.3 * A(z)
    if not torch.allclose(left, right, rtol=rtol, atol=rtol * float(right.abs().max())):
        raise ValueError(f"the measurement operator {A!r} is not linear: A(0.7x − 1.3z) ≠ 0.7A(x) − 1.3A(z)")


# ------------------------------------------------------------------------------------------------
# Config specs: `sampling.inverse = "name[:option=value,...]"`
# ------------------------------------------------------------------------------------------------
OPERATORS = Registry("inverse operator", leading=("shape",), passed=(), how="@inverse.register_operator")
register_operator = OPERATORS.register


@register_operator("super_resolution")
def _super_resolution(shape, *, factor: int = 2) -> LinearOperator:
    return AveragePool(factor, shape)


@register_operator("blur")
def _blur(shape, *, std: float = 1.0) -> LinearOperator:
    return GaussianBlur(std, shape)


@register_operator("inpaint")
def _inpaint(shape, *, box: float = 0.5, mask: str = "") -> LinearOperator:
    """mask: a .png (white = known) or .npy (1 = known) file; else a centred square hole of side box·H."""
    if mask:
        from ..controllable import load_mask
        return Mask(load_mask(mask, shape).bool(), shape)
    if not 0 < box < 1 or len(shape) != 3:
        raise ValueError(f"inpaint:box={box} must lie in (0, 1) and the data must be (C, H, W) images (shape {shape}); "
                         "or give inpaint:mask=FILE")
    keep = torch.ones(shape, dtype=torch.bool)
    H, W = shape[1:]
    h, w = max(1, round(box * H)), max(1, round(box * W))
    keep[:, (H - h) // 2:(H - h) // 2 + h, (W - w) // 2:(W - w) // 2 + w] = False
    return Mask(keep, shape)


@register_operator("matrix")
def _matrix(shape, *, file: str = "") -> LinearOperator:
    """file: a .npy (m, d) matrix, d the number of entries of one sample."""
    if not file:
        raise ValueError("inverse 'matrix' needs file=A.npy, a (m, d) array with d the entries of one sample")
    import numpy as np
    return Matrix(torch.from_numpy(np.load(file)).double(), shape)
