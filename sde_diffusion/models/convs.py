"""``Conv3x3``: the networks' 3×3 convolution, with a faster weight gradient on CPU where oneDNN's is slow.

The layer is exactly ``nn.Conv2d(in_ch, out_ch, 3, padding=1)`` (same parameters, state-dict keys, function and
forward kernel). Only the weight gradient on CPU may be computed differently. oneDNN's backward-weights kernel
splits the positions (batch × height × width) among threads and then sums per-thread copies of the whole weight
gradient; with few positions per weight — small batches at low resolution, as in a CIFAR-10 U-Net's inner levels
at batch 8 — that bookkeeping is a large part of the time. The same sum written as GEMMs runs at BLAS speed:
with the input laid out as (H+2, B, W, 3·C_in) — zero-padded image rows outermost, the three horizontal taps side
by side — the weight gradient of kernel row kh is one matrix product over all B·H·W positions,

    ∂L/∂W[:, :, kh, :] = Gᵀ · X3[rows kh … kh+H−1],      G: (H·B·W, C_out),  X3 rows: (H·B·W, 3·C_in),

which reads the input three times instead of materialising the nine-fold im2col matrix.

It is used where it measured faster (BENCHMARKS.md, issue 3 section; AMD EPYC, AVX2, 1–2 threads): channels_last
inputs with at most GEMM_MAX_POSITIONS positions and at least GEMM_MIN_CHANNELS input and output channels, where
it took 0.6–0.9× oneDNN's time at every batch size tried, or at least GEMM_MIN_CHANNELS_SMALL_BATCH at batch
≤ SMALL_BATCH (0.8–0.97×; at batch 16–128 such layers measured 0.94–1.14×, so they keep oneDNN). Elsewhere (GPU,
autocast, torch.compile, eval mode, no weight gradient) the layer is the stock ``nn.Conv2d``. The choice depends
on shapes only, so training stays bit-reproducible.
"""
from __future__ import annotations

import math
import threading

import torch
import torch.nn.functional as F
from torch import Tensor, nn

GEMM_MIN_CHANNELS = 256              # both C_in and C_out, at any batch size
GEMM_MIN_CHANNELS_SMALL_BATCH = 128  # ... and at batch ≤ SMALL_BATCH (at 16–128 oneDNN is as fast with 128)
SMALL_BATCH = 8
GEMM_MAX_POSITIONS = 8192            # B·H·W: beyond this oneDNN's per-thread reduction is amortised


def gemm_shape(batch: int, c_in: int, c_out: int, height: int, width: int) -> bool:
    """Whether a channels_last 3×3 layer of this shape takes the GEMM weight gradient (module docstring)."""
    min_channels = GEMM_MIN_CHANNELS_SMALL_BATCH if batch <= SMALL_BATCH else GEMM_MIN_CHANNELS
    return min(c_in, c_out) >= min_channels and batch * height * width <= GEMM_MAX_POSITIONS


_buffers = threading.local()  # per thread: autograd may run backward passes in several threads


def _workspace(shape: tuple[int, ...], like: Tensor) -> Tensor:
    """An uninitialised scratch tensor of `shape` for the tap layout, reused from call to call (one per thread,
    grown to the largest size asked for: 27 MB for vp_cifar at batch 8). A fresh allocation of this size comes
    from the kernel as untouched pages, whose first-touch faults made each copy into it take 17 ms instead of
    1.1 ms on the 32×32 layers. Fresh when autograd records (double backward), which may save it."""
    n = math.prod(shape)
    if torch.is_grad_enabled():
        return like.new_empty(shape)
    buffer = getattr(_buffers, "taps", None)
    if buffer is None or buffer.numel() < n or buffer.dtype != like.dtype or buffer.device != like.device:
        buffer = _buffers.taps = like.new_empty(n)
    return buffer[:n].view(shape)


def weight_grad_3x3(grad_out: Tensor, x: Tensor) -> Tensor:
    """∂L/∂W of a 3×3 stride-1 padding-1 convolution: grad_out (B, C_out, H, W), x (B, C_in, H, W)
    → (C_out, C_in, 3, 3), in channels_last strides (the layout of a channels_last weight)."""
    B, c_out, H, W = grad_out.shape
    c_in = x.shape[1]
    rows = x.permute(2, 0, 3, 1)                                   # (H, B, W, C_in): image rows outermost
    taps = _workspace((H + 2, B, W, 3, c_in), x)                   # padded rows; the 3 horizontal taps
    taps[0] = taps[H + 1] = 0                                      # zero padding above and below
    taps[:, :, 0, 0] = taps[:, :, W - 1, 2] = 0                    # ... and left and right
    taps[1:H + 1, :, 1:, 0] = rows[:, :, :W - 1]                   # left neighbour
    taps[1:H + 1, :, :, 1] = rows                                  # centre
    taps[1:H + 1, :, :W - 1, 2] = rows[:, :, 1:]                   # right neighbour
    taps = taps.view((H + 2) * B * W, 3 * c_in)
    g = grad_out.permute(2, 0, 3, 1).reshape(H * B * W, c_out)     # (H·B·W, C_out), same row order
    grad_w = x.new_empty(c_out, 3, 3 * c_in)
    for kh in range(3):                                            # kernel row kh sees image rows kh … kh+H−1
        torch.mm(g.t(), taps[kh * B * W:(kh + H) * B * W], out=grad_w[:, kh])
    return grad_w.view(c_out, 3, 3, c_in).permute(0, 3, 1, 2)


class _Conv3x3GemmWeightGrad(torch.autograd.Function):
    """conv2d(x, weight, bias, padding=1) with the weight gradient from :func:`weight_grad_3x3`."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return F.conv2d(x, weight, bias, padding=1)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad
        grad_x = grad_w = grad_b = None
        if need_x:
            grad_x = torch.ops.aten.convolution_backward(
                grad_out, x, weight, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1, [True, False, False])[0]
        if need_w:
            grad_w = weight_grad_3x3(grad_out, x)
        if ctx.has_bias and need_b:
            grad_b = grad_out.sum((0, 2, 3))
        return grad_x, grad_w, grad_b


class Conv3x3(nn.Conv2d):
    """``nn.Conv2d(in_ch, out_ch, 3, padding=1)``: (B, in_ch, H, W) → (B, out_ch, H, W). On CPU in training mode,
    for the shapes named in the module docstring, the backward pass computes the weight gradient with GEMMs
    (:func:`weight_grad_3x3`). (Eval mode keeps the stock kernel: there, as in the likelihood's input gradients,
    the weight gradient is unneeded, which a custom backward cannot know.)"""

    gemm_weight_grad: bool = True  # False: always the stock kernels (benchmarks compare the two)

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__(in_ch, out_ch, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        if self._gemm_applies(x):
            return _Conv3x3GemmWeightGrad.apply(x, self.weight, self.bias)
        return super().forward(x)

    def _gemm_applies(self, x: Tensor) -> bool:
        """CPU, float32/64, training with a weight gradient, outside autocast and torch.compile, and a shape
        where the GEMMs measured faster (see the module docstring)."""
        B, _, H, W = x.shape
        return (self.gemm_weight_grad and self.training and torch.is_grad_enabled() and self.weight.requires_grad
                and x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64)
                and not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling()
                and x.is_contiguous(memory_format=torch.channels_last)
                and gemm_shape(B, self.in_channels, self.out_channels, H, W))
