"""Blocks of the NCSN++ / DDPM++ U-Net (Song et al. 2021) and of the DDPM U-Net (Ho et al. 2020).

Shapes are (batch, channels, height, width) unless stated. Residual sums are divided by √2 when
`skip_rescale` is on, so that two unit-variance branches give a unit-variance sum.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import torch
from torch import nn
import torch.nn.functional as F

from . import fir, layers

Tensor = torch.Tensor
GROUP_NORM_EPS = 1e-6
MAX_GROUPS = 32  # NCSN++ normalizes in min(C / CHANNELS_PER_GROUP, MAX_GROUPS) groups; DDPM always in 32
CHANNELS_PER_GROUP = 4
NIN_INIT_SCALE = 0.1  # the reference's init scale of 1×1 "network-in-network" layers (attention, DDPM shortcuts)
SQRT2 = math.sqrt(2.0)

GroupsFn = Callable[[int], int]


def ncsnpp_groups(channels: int) -> int:
    """Group count of NCSN++'s GroupNorm layers: min(C // 4, 32), which must divide C."""
    groups = min(channels // CHANNELS_PER_GROUP, MAX_GROUPS)
    if groups == 0 or channels % groups:
        raise ValueError(f"NCSN++ normalizes {channels} channels in min({channels} // {CHANNELS_PER_GROUP}, "
                         f"{MAX_GROUPS}) = {groups} groups, which must divide {channels}: choose model.nf and "
                         f"model.ch_mult so that every width is a multiple of {CHANNELS_PER_GROUP} (and of "
                         f"{MAX_GROUPS} above {CHANNELS_PER_GROUP * MAX_GROUPS})")
    return groups


def ddpm_groups(channels: int) -> int:
    """Group count of the DDPM U-Net's GroupNorm layers: always 32 (channel counts must be multiples of 32)."""
    if channels % MAX_GROUPS:
        raise ValueError(f"the DDPM U-Net normalizes {channels} channels in {MAX_GROUPS} groups: choose model.nf "
                         f"and model.ch_mult so that every level's width is a multiple of {MAX_GROUPS}")
    return MAX_GROUPS


def group_norm(channels: int, groups: GroupsFn) -> nn.GroupNorm:
    return nn.GroupNorm(groups(channels), channels, eps=GROUP_NORM_EPS)


def residual_sum(x: Tensor, h: Tensor, skip_rescale: bool) -> Tensor:
    """x + h, or (x + h) / √2 with skip_rescale."""
    return (x + h) / SQRT2 if skip_rescale else x + h


# --------------------------------------------------------------------------------------------------
# Resampling by a factor of 2
# --------------------------------------------------------------------------------------------------
class FIRFilter(nn.Module):
    """Holds the normalized 2-D FIR filter of `fir_kernel` as a (non-persistent) buffer, or None without FIR."""

    def __init__(self, fir_kernel: Optional[Sequence[int]]):
        super().__init__()
        self.register_buffer("K", fir.fir_filter(fir_kernel) if fir_kernel else None, persistent=False)


class Resample(FIRFilter):
    """Parameter-free ×2 resampling ('up' or 'down'): the FIR filter, or nearest-neighbour / 2×2 mean pooling."""

    def __init__(self, direction: str, fir_kernel: Optional[Sequence[int]] = None):
        super().__init__(fir_kernel)
        if direction not in ("up", "down"):
            raise ValueError(f"resampling direction must be 'up' or 'down', got {direction!r}")
        self.up = direction == "up"

    def forward(self, x: Tensor) -> Tensor:
        if self.up:
            return fir.upsample_2d(x, self.K) if self.K is not None else F.interpolate(x, scale_factor=2.0,
                                                                                       mode="nearest")
        return fir.downsample_2d(x, self.K) if self.K is not None else F.avg_pool2d(x, 2)


class _Resample(FIRFilter):
    """Up/downsampling by 2, optionally with a 3×3 convolution from in_ch to out_ch (default in_ch) channels."""

    def __init__(self, in_ch: int, out_ch: Optional[int] = None, with_conv: bool = False,
                 fir_kernel: Optional[Sequence[int]] = None):
        super().__init__(fir_kernel)
        out_ch = out_ch or in_ch
        self.conv = layers.conv3x3(in_ch, out_ch) if with_conv else None


class Upsample(_Resample):
    """(B, in_ch, H, W) → (B, out_ch, 2H, 2W).

    Without FIR: nearest neighbour, then an optional 3×3 conv. With FIR: the FIR upsampler, or (with_conv)
    the fused StyleGAN2 upsample-conv: a stride-2 transposed convolution followed by the FIR filter.
    """

    def forward(self, x: Tensor) -> Tensor:
        if self.K is None:
            h = F.interpolate(x, scale_factor=2.0, mode="nearest")
            return self.conv(h) if self.conv is not None else h
        if self.conv is None:
            return fir.upsample_2d(x, self.K)
        return fir.upsample_conv_2d(x, self.conv.weight, self.K) + self.conv.bias[:, None, None]


class Downsample(_Resample):
    """(B, in_ch, H, W) → (B, out_ch, H/2, W/2).

    Without FIR: a stride-2 3×3 conv on the input padded at the bottom/right ('SAME' as in TensorFlow), or 2×2
    average pooling. With FIR: the FIR downsampler, or (with_conv) the FIR filter followed by a stride-2 conv.
    """

    def forward(self, x: Tensor) -> Tensor:
        if self.K is None:
            if self.conv is None:
                return F.avg_pool2d(x, 2)
            return F.conv2d(F.pad(x, (0, 1, 0, 1)), self.conv.weight, self.conv.bias, stride=2)
        if self.conv is None:
            return fir.downsample_2d(x, self.K)
        return fir.conv_downsample_2d(x, self.conv.weight, self.K) + self.conv.bias[:, None, None]


# --------------------------------------------------------------------------------------------------
# Residual and attention blocks
# --------------------------------------------------------------------------------------------------
class ResnetBlock(nn.Module):
    """(B, in_ch, H, W), temb (B, temb_dim) → (B, out_ch, H', W'), H' = H, 2H ('up') or H/2 ('down').

        a = act(norm_0(x));  a, x = resample(a), resample(x)
        h = conv_0(a) + temb_proj(act(temb))
        h = conv_1(dropout(act(norm_1(h))))
        out = residual_sum(shortcut(x), h)

    `resample` (BigGAN-style blocks only) is a parameter-free `Resample`. The shortcut is a 1×1 conv when the
    width or the resolution changes, the identity otherwise. conv_1 starts at `init_scale` (0: near zero), so a
    fresh block is close to its shortcut.
    """

    def __init__(self, in_ch: int, out_ch: int, temb_dim: Optional[int], act: nn.Module, dropout: float,
                 groups: GroupsFn, skip_rescale: bool, init_scale: float = 0.0,
                 resample: Optional[Resample] = None, shortcut_init_scale: float = 1.0):
        super().__init__()
        self.norm_0 = group_norm(in_ch, groups)
        self.resample = resample
        self.conv_0 = layers.conv3x3(in_ch, out_ch)
        self.temb_proj = layers.linear(temb_dim, out_ch) if temb_dim else None
        self.norm_1 = group_norm(out_ch, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv_1 = layers.conv3x3(out_ch, out_ch, init_scale=init_scale)
        needs_shortcut = in_ch != out_ch or resample is not None
        self.shortcut = layers.conv1x1(in_ch, out_ch, init_scale=shortcut_init_scale) if needs_shortcut else None
        self.act, self.skip_rescale = act, skip_rescale

    def forward(self, x: Tensor, temb: Optional[Tensor] = None) -> Tensor:
        a = self.act(self.norm_0(x))
        if self.resample is not None:
            a, x = self.resample(a), self.resample(x)
        h = self.conv_0(a)
        if self.temb_proj is not None:
            h = h + self.temb_proj(self.act(temb))[:, :, None, None]
        h = self.conv_1(self.dropout(self.act(self.norm_1(h))))
        if self.shortcut is not None:
            x = self.shortcut(x)
        return residual_sum(x, h, self.skip_rescale)


def attention_heads(channels: int, head_dim: int) -> int:
    """The number of `head_dim`-channel heads that split `channels` (head_dim 0: one head of width `channels`)."""
    if head_dim == 0:
        return 1
    if head_dim < 0 or channels % head_dim:
        raise ValueError(f"model.attention_head_dim={head_dim} does not split the attention width {channels} into "
                         "heads: choose a head width that divides every width with attention (0: one head)")
    return channels // head_dim


class AttnBlock(nn.Module):
    """Multi-head self-attention over the H·W positions, with a residual connection. (B, C, H, W) → same.

        t = norm(x) as tokens (B, HW, C);  q, k, v = qkv(t), each split into C/d heads of d = head_dim channels
        (channel h·d + j is channel j of head h, as in diffusers' Attention);
        out = residual_sum(x, proj_out(concat over heads of softmax(q_h k_hᵀ/√d) v_h))

    head_dim 0 is one head of width C (score_sde's attention).
    """

    def __init__(self, channels: int, groups: GroupsFn, skip_rescale: bool = False, init_scale: float = 0.0,
                 head_dim: int = 0):
        super().__init__()
        self.heads = attention_heads(channels, head_dim)
        self.norm = group_norm(channels, groups)
        self.qkv = nn.Linear(channels, 3 * channels)
        for rows in self.qkv.weight.split(channels):  # q, k and v each get the reference's NIN init
            layers.variance_scaling_(rows, NIN_INIT_SCALE)
        nn.init.zeros_(self.qkv.bias)
        self.proj_out = layers.linear(channels, channels, init_scale=init_scale)
        self.skip_rescale = skip_rescale

    def forward(self, x: Tensor) -> Tensor:
        B, C, H, W = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # (B, HW, C)
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2)  # each (B, heads, HW, C / heads)
                   for t in self.qkv(tokens).chunk(3, dim=-1))
        h = layers.attention(q, k, v).transpose(1, 2).flatten(2)  # (B, HW, C), heads contiguous in channels
        h = self.proj_out(h).transpose(1, 2).unflatten(2, (H, W))
        return residual_sum(x, h, self.skip_rescale)


class Combine(nn.Module):
    """Joins a pyramid image p (B, dim1, H, W) into features h (B, dim2, H, W): conv1x1(p) + h, or
    cat([conv1x1(p), h]) (B, 2·dim2, H, W)."""

    METHODS = ("cat", "sum")

    def __init__(self, dim1: int, dim2: int, method: str = "cat"):
        super().__init__()
        if method not in self.METHODS:
            raise ValueError(f"model.progressive_combine={method!r} is not one of {list(self.METHODS)}")
        self.conv = layers.conv1x1(dim1, dim2)
        self.method = method

    def forward(self, p: Tensor, h: Tensor) -> Tensor:
        p = self.conv(p)
        return torch.cat([p, h], dim=1) if self.method == "cat" else p + h
