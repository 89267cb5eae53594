"""The DDPM U-Net of Ho et al. (2020), as in score_sde's `ddpm` model, built from named blocks.

Layout: conv_in → down levels (num_res_blocks ResnetBlocks, attention at `attn_resolutions`, downsample)
→ middle (ResnetBlock, attention, ResnetBlock) → up levels (num_res_blocks + 1 ResnetBlocks fed with the
matching skip activations, attention, upsample) → GroupNorm, act, conv_out.
"""
from __future__ import annotations

from typing import List, Optional

import torch
from torch import nn
import torch.nn.functional as F

from . import layers
from .registry import register_model

GROUP_NORM_GROUPS = 32  # as in the reference DDPM; channel counts must be multiples of this
GROUP_NORM_EPS = 1e-6


def group_norm(channels: int) -> nn.GroupNorm:
    if channels % GROUP_NORM_GROUPS:
        raise ValueError(f"the DDPM U-Net normalizes {channels} channels in {GROUP_NORM_GROUPS} groups: "
                         f"choose model.nf and model.ch_mult so that every level's width is a multiple of "
                         f"{GROUP_NORM_GROUPS}")
    return nn.GroupNorm(GROUP_NORM_GROUPS, channels, eps=GROUP_NORM_EPS)


class ResnetBlock(nn.Module):
    """h = conv(act(norm(x))) + dense(act(temb)); h = conv(dropout(act(norm(h)))); return shortcut(x) + h."""

    def __init__(self, in_ch: int, out_ch: int, temb_dim: Optional[int], act: nn.Module, dropout: float):
        super().__init__()
        self.norm_0 = group_norm(in_ch)
        self.conv_0 = layers.conv3x3(in_ch, out_ch)
        self.temb_proj = layers.linear(temb_dim, out_ch) if temb_dim else None
        self.norm_1 = group_norm(out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv_1 = layers.conv3x3(out_ch, out_ch, init_scale=0.0)
        self.shortcut = layers.conv1x1(in_ch, out_ch) if in_ch != out_ch else nn.Identity()
        self.act = act

    def forward(self, x: torch.Tensor, temb: Optional[torch.Tensor]) -> torch.Tensor:
        h = self.conv_0(self.act(self.norm_0(x)))
        if self.temb_proj is not None:
            h = h + self.temb_proj(self.act(temb))[:, :, None, None]
        h = self.conv_1(self.dropout(self.act(self.norm_1(h))))
        return self.shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all spatial positions, with a residual connection."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = group_norm(channels)
        self.q, self.k, self.v = (layers.conv1x1(channels, channels) for _ in range(3))
        self.proj_out = layers.conv1x1(channels, channels, init_scale=0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.norm(x)
        q, k, v = (f(h).reshape(B, 1, C, H * W).transpose(-1, -2) for f in (self.q, self.k, self.v))
        h = F.scaled_dot_product_attention(q, k, v)  # (B, 1, HW, C), softmax(q kᵀ/√C) v
        return x + self.proj_out(h.transpose(-1, -2).reshape(B, C, H, W))


class Downsample(nn.Module):
    """Halve H and W: a stride-2 3×3 conv on the input padded at the bottom/right, or 2×2 average pooling."""

    def __init__(self, channels: int, with_conv: bool):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2) if with_conv else None
        if self.conv is not None:
            layers.variance_scaling_(self.conv.weight)
            nn.init.zeros_(self.conv.bias)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1))) if self.conv is not None else F.avg_pool2d(x, 2)


class Upsample(nn.Module):
    """Double H and W by nearest-neighbour interpolation, then an optional 3×3 conv."""

    def __init__(self, channels: int, with_conv: bool):
        super().__init__()
        self.conv = layers.conv3x3(channels, channels) if with_conv else None

    def forward(self, x):
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.conv(x) if self.conv is not None else x


class DownLevel(nn.Module):
    def __init__(self, in_ch, out_ch, num_blocks, attn, temb_dim, act, dropout, downsample, resamp_with_conv):
        super().__init__()
        self.blocks = nn.ModuleList(ResnetBlock(in_ch if i == 0 else out_ch, out_ch, temb_dim, act, dropout)
                                    for i in range(num_blocks))
        self.attns = nn.ModuleList(AttnBlock(out_ch) for _ in range(num_blocks)) if attn else None
        self.downsample = Downsample(out_ch, resamp_with_conv) if downsample else None

    def forward(self, h, temb, skips: List[torch.Tensor]):
        for i, block in enumerate(self.blocks):
            h = block(h, temb)
            if self.attns is not None:
                h = self.attns[i](h)
            skips.append(h)
        if self.downsample is not None:
            h = self.downsample(h)
            skips.append(h)
        return h


class UpLevel(nn.Module):
    def __init__(self, in_ch, skip_chs, out_ch, attn, temb_dim, act, dropout, upsample, resamp_with_conv):
        super().__init__()
        chans = [in_ch] + [out_ch] * (len(skip_chs) - 1)
        self.blocks = nn.ModuleList(ResnetBlock(c + s, out_ch, temb_dim, act, dropout) for c, s in zip(chans, skip_chs))
        self.attn = AttnBlock(out_ch) if attn else None
        self.upsample = Upsample(out_ch, resamp_with_conv) if upsample else None

    def forward(self, h, temb, skips: List[torch.Tensor]):
        for block in self.blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), temb)
        if self.attn is not None:
            h = self.attn(h)
        return self.upsample(h) if self.upsample is not None else h


@register_model("ddpm")
class DDPM(nn.Module):
    """x (batch, C, H, W) and noise condition (batch,) → output (batch, C, H, W).

    config.model: nf, ch_mult, num_res_blocks, attn_resolutions, dropout, resamp_with_conv, conditional,
    nonlinearity; config.data: image_size, num_channels, centered (uncentered inputs in [0, 1] are mapped
    to [−1, 1] inside the network).
    """

    def __init__(self, config):
        super().__init__()
        m, d = config.model, config.data
        if m.scale_by_sigma:
            raise ValueError("the ddpm model does not support model.scale_by_sigma=True (its score comes from "
                             "get_score_fn); set it to False")
        nf, act = m.nf, layers.get_act(m.nonlinearity)
        self.nf, self.centered = nf, d.centered
        temb_dim = 4 * nf if m.conditional else None
        self.temb = nn.Sequential(layers.linear(nf, temb_dim), act, layers.linear(temb_dim, temb_dim)) \
            if m.conditional else None
        num_levels = len(m.ch_mult)
        resolutions = [d.image_size // 2**i for i in range(num_levels)]
        self.conv_in = layers.conv3x3(d.num_channels, nf)

        self.down = nn.ModuleList()
        skip_chs, ch = [nf], nf
        for i, mult in enumerate(m.ch_mult):
            last = i == num_levels - 1
            self.down.append(DownLevel(ch, nf * mult, m.num_res_blocks, resolutions[i] in m.attn_resolutions,
                                       temb_dim, act, m.dropout, not last, m.resamp_with_conv))
            ch = nf * mult
            skip_chs += [ch] * (m.num_res_blocks + (0 if last else 1))

        self.mid_block_0 = ResnetBlock(ch, ch, temb_dim, act, m.dropout)
        self.mid_attn = AttnBlock(ch)
        self.mid_block_1 = ResnetBlock(ch, ch, temb_dim, act, m.dropout)

        self.up = nn.ModuleList()
        for i in reversed(range(num_levels)):
            level_skips = [skip_chs.pop() for _ in range(m.num_res_blocks + 1)]
            self.up.append(UpLevel(ch, level_skips, nf * m.ch_mult[i], resolutions[i] in m.attn_resolutions,
                                   temb_dim, act, m.dropout, i != 0, m.resamp_with_conv))
            ch = nf * m.ch_mult[i]
        assert not skip_chs, "every skip connection is consumed"

        self.norm_out = group_norm(ch)
        self.act = act
        self.conv_out = layers.conv3x3(ch, d.num_channels, init_scale=0.0)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        temb = self.temb(layers.timestep_embedding(cond, self.nf)) if self.temb is not None else None
        h = x if self.centered else 2 * x - 1.0
        h = self.conv_in(h)
        skips = [h]
        for level in self.down:
            h = level(h, temb, skips)
        h = self.mid_block_1(self.mid_attn(self.mid_block_0(h, temb)), temb)
        for level in self.up:
            h = level(h, temb, skips)
        return self.conv_out(self.act(self.norm_out(h)))
