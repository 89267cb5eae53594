"""FIR up/down-sampling of images (StyleGAN2's `upfirdn2d`) in plain PyTorch: no compiled ops, any device.

A 1-D kernel k (e.g. (1, 3, 3, 1)) becomes the separable 2-D filter K = k kᵀ / Σ(k kᵀ) (`fir_filter`). Every
function here is a per-channel linear filter of zero-padded images, shapes (batch, C, H, W):

    upfirdn2d(x, K, up, down, pad)  = downsample_down( pad( zero_insert_up(x) ) ⊛ K )     (⊛: true convolution)
    upsample_2d(x, k)               = upfirdn2d(x, up² K, up=2)               (B, C, 2H, 2W)
    downsample_2d(x, k)             = upfirdn2d(x, K, down=2)                 (B, C, H/2, W/2)
    upsample_conv_2d(x, w, k)       = FIR( conv_transpose(x, w) )            the fused "upsample, then conv"
    conv_downsample_2d(x, w, k)     = conv_stride2( FIR(x), w )              the fused "conv, then downsample"

Zero insertion followed by a convolution is computed as one transposed convolution (no wasted multiplications).
"""
from __future__ import annotations

from typing import Sequence, Tuple

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def fir_filter(kernel: Sequence[float]) -> Tensor:
    """The normalized 2-D filter K = k kᵀ / Σ k kᵀ of a 1-D kernel k (float32, shape (n, n), ΣK = 1)."""
    values = [float(v) for v in kernel]
    if not values or sum(values) == 0:
        raise ValueError(f"model.fir_kernel must be a non-empty 1-D sequence with a non-zero sum, got {kernel!r}")
    k = torch.tensor(values, dtype=torch.float64) / sum(values)
    return torch.outer(k, k).float()


def _depthwise(kernel: Tensor, x: Tensor) -> Tensor:
    """(n, n) filter → (C, 1, n, n) weight of a grouped convolution over x's C channels, in x's dtype."""
    return kernel.to(device=x.device, dtype=x.dtype).expand(x.shape[1], 1, *kernel.shape)


def _window(x: Tensor, start: int, rows: int, cols: int) -> Tensor:
    """x[..., start:start+rows, start:start+cols], zeros where that runs outside x (F.pad with negative pads crops)."""
    top, bottom = -start, start + rows - x.shape[-2]
    left, right = -start, start + cols - x.shape[-1]
    return F.pad(x, [left, right, top, bottom]) if (top, bottom, left, right) != (0, 0, 0, 0) else x


def upfirdn2d(x: Tensor, kernel: Tensor, up: int = 1, down: int = 1, pad: Tuple[int, int] = (0, 0)) -> Tensor:
    """Zero-insert `up`×, zero-pad by pad=(before, after), convolve with `kernel` (n, n), keep every `down`-th.

    x: (B, C, H, W); the same padding applies to both axes. Output: (B, C, H', W') with
    H' = (H·up + before + after − n + 1) / down, as StyleGAN2's reference `upfirdn2d_native`.
    """
    n = kernel.shape[-1]
    before, after = pad
    if up == 1:
        x = F.pad(x, [before, after, before, after])
        return F.conv2d(x, _depthwise(kernel.flip(0, 1), x), stride=down, groups=x.shape[1])
    # Zero insertion + true convolution = a transposed convolution. Its "full" output has (H−1)·up + n rows;
    # the padded valid convolution keeps H·up + before + after − n + 1 of them, from row n − 1 − before on.
    H, W = x.shape[-2:]
    start, extra = n - 1 - before, before + after - n + 1
    rows, full_rows = H * up + extra, (H - 1) * up + n
    trim = start if start >= 0 and full_rows - rows - start == start else 0  # symmetric crop: conv padding
    y = F.conv_transpose2d(x, _depthwise(kernel, x), stride=up, padding=trim, groups=x.shape[1])
    y = _window(y, start - trim, rows, W * up + extra)
    return y[..., ::down, ::down] if down > 1 else y


def upsample_2d(x: Tensor, K: Tensor, factor: int = 2) -> Tensor:
    """(B, C, H, W) → (B, C, H·factor, W·factor): zero insertion, then the filter K (from `fir_filter`) with
    gain factor², so that a constant image stays constant."""
    p = K.shape[0] - factor
    return upfirdn2d(x, K * factor**2, up=factor, pad=((p + 1) // 2 + factor - 1, p // 2))


def downsample_2d(x: Tensor, K: Tensor, factor: int = 2) -> Tensor:
    """(B, C, H, W) → (B, C, H/factor, W/factor): the filter K (from `fir_filter`), then every factor-th pixel."""
    p = K.shape[0] - factor
    return upfirdn2d(x, K, down=factor, pad=((p + 1) // 2, p // 2))


def upsample_conv_2d(x: Tensor, weight: Tensor, K: Tensor, factor: int = 2) -> Tensor:
    """Fused `upsample_2d` followed by a 'same' convolution with weight (out, in, k, k) (StyleGAN2 semantics).

    Transposed convolution with stride `factor` (padding applied once, at the end), then the FIR filter:
    (B, in, H, W) → (B, out, H·factor, W·factor). As in StyleGAN2 / the JAX score_sde, the conv weight acts
    as a correlation on the upsampled grid, so the transposed convolution uses it flipped, in ↔ out swapped.
    """
    k = weight.shape[-1]
    p = (K.shape[0] - factor) - (k - 1)
    x = F.conv_transpose2d(x, weight.transpose(0, 1).flip(2, 3), stride=factor)
    return upfirdn2d(x, K * factor**2, pad=((p + 1) // 2 + factor - 1, p // 2 + 1))


def conv_downsample_2d(x: Tensor, weight: Tensor, K: Tensor, factor: int = 2) -> Tensor:
    """Fused convolution with weight (out, in, k, k) followed by `downsample_2d`: FIR, then a strided conv.

    (B, in, H, W) → (B, out, H/factor, W/factor).
    """
    k = weight.shape[-1]
    p = (K.shape[0] - factor) + (k - 1)
    x = upfirdn2d(x, K, pad=((p + 1) // 2, p // 2))
    return F.conv2d(x, weight, stride=factor)
