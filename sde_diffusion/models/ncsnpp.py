"""The U-Net family of score_sde: NCSN++ and DDPM++ (`ncsnpp`), and the DDPM U-Net (`ddpm`, in ddpm.py).

    x ─► conv_in ─► down levels ─► middle ─► up levels ─► norm_out, act, conv_out ─► output (B, C, H, W)
                      │  └── skips ────────────────────────┘ ▲
                      └─ input pyramid (progressive_input)    └─ output pyramid (progressive)

A down level runs `num_res_blocks` residual blocks (each followed by attention at `attn_resolutions`),
pushing every activation onto the skip stack, then halves the resolution (a BigGAN block with resampling
inside, or a plain Downsample for resblock_type='ddpm'). An up level runs num_res_blocks + 1 blocks, each fed
with the concatenation of the current features and one popped skip, then attention, the output pyramid step,
and a doubling of the resolution. All options follow score_sde_pytorch's `config.model` section; see
`UNetOptions.from_config`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn

from . import layers
from .layerspp import (AttnBlock, Combine, Downsample, GroupsFn, NIN_INIT_SCALE, Resample, ResnetBlock, Upsample,
                       attention_heads, group_norm, ncsnpp_groups, residual_sum)
from .cross_attention import CrossAttention2d
from .text_conditioning import build_text_conditioning
from .registry import register_model

Tensor = torch.Tensor
Context = Optional[Tuple[Tensor, Tensor]]  # (text context (B, L, D), mask (B, L)) for cross-attention

RESBLOCK_TYPES = ("ddpm", "biggan")
PROGRESSIVE = ("none", "output_skip", "residual")
PROGRESSIVE_INPUT = ("none", "input_skip", "residual")
PROGRESSIVE_COMBINE = ("sum", "cat")
EMBEDDING_TYPES = ("fourier", "positional")
TEMB_WIDTH = 4  # the noise embedding MLP is TEMB_WIDTH·nf wide


def check_options(config) -> None:
    """Raise ValueError naming the key if `config.model` holds an option the NCSN++ family does not have."""
    m = config.model
    for key, allowed in (("resblock_type", RESBLOCK_TYPES), ("progressive", PROGRESSIVE),
                         ("progressive_input", PROGRESSIVE_INPUT), ("progressive_combine", PROGRESSIVE_COMBINE),
                         ("embedding_type", EMBEDDING_TYPES)):
        if str(m[key]).lower() not in allowed:
            raise ValueError(f"model.{key}={m[key]!r} is not one of {list(allowed)}")
    for key, only in (("conv_size", 3), ("attention_type", "ddpm"), ("normalization", "GroupNorm")):
        if m[key] != only:
            raise ValueError(f"model.{key}={m[key]!r} is not supported: score_sde's NCSN++ only has {only!r}")
    if m.embedding_type.lower() == "fourier" and not config.training.continuous:
        raise ValueError("model.embedding_type='fourier' embeds a continuous noise level: use it with "
                         "training.continuous=True, or use 'positional' for discrete training")


def text_options(config) -> dict:
    """UNetOptions' cross-attention fields from config.model (empty without a text encoder): cross-attention at
    model.cross_attn_resolutions (None: model.attn_resolutions) with model.cross_attn_heads heads."""
    from .text_conditioning import context_dim, text_conditioned
    if not text_conditioned(config):
        return {}
    m = config.model
    resolutions = m.attn_resolutions if m.cross_attn_resolutions is None else m.cross_attn_resolutions
    return {"context_dim": context_dim(config), "cross_attn_resolutions": tuple(resolutions),
            "cross_attn_heads": m.cross_attn_heads}


@dataclass(frozen=True)
class UNetOptions:
    """Everything the U-Net's structure depends on (names as in score_sde_pytorch's config.model)."""

    image_size: int
    channels: int
    centered: bool
    nf: int
    ch_mult: Tuple[int, ...]
    num_res_blocks: int
    attn_resolutions: Tuple[int, ...]
    dropout: float
    resamp_with_conv: bool
    conditional: bool
    nonlinearity: str
    embedding_type: str = "positional"
    fourier_scale: float = 16.0
    resblock_type: str = "biggan"
    fir: bool = False
    fir_kernel: Tuple[int, ...] = (1, 3, 3, 1)
    skip_rescale: bool = True
    init_scale: float = 0.0
    progressive: str = "none"
    progressive_input: str = "none"
    progressive_combine: str = "sum"
    groups: GroupsFn = ncsnpp_groups  # GroupNorm group count for a channel count
    num_classes: int = 0  # > 0: a class-label embedding added to the noise embedding
    up_attn_per_block: bool = False  # up levels: attention after every block (Ho et al.), or once (score_sde)
    attention_head_dim: int = 0  # self-attention heads of this many channels; 0: one head as wide as the layer
    # text conditioning: cross-attention to a context of this width after the (self-)attention of these resolutions
    # and in the middle block; 0: none
    context_dim: int = 0
    cross_attn_resolutions: Tuple[int, ...] = ()
    cross_attn_heads: int = 1

    @classmethod
    def from_config(cls, config) -> "UNetOptions":
        check_options(config)
        m, d = config.model, config.data
        return cls(**text_options(config), image_size=d.image_size, channels=d.num_channels, centered=d.centered, nf=m.nf,
                   ch_mult=tuple(m.ch_mult), num_res_blocks=m.num_res_blocks,
                   attn_resolutions=tuple(m.attn_resolutions), dropout=m.dropout,
                   resamp_with_conv=m.resamp_with_conv, conditional=m.conditional, nonlinearity=m.nonlinearity,
                   embedding_type=m.embedding_type.lower(), fourier_scale=m.fourier_scale,
                   resblock_type=m.resblock_type.lower(), fir=m.fir,
                   fir_kernel=tuple(m.fir_kernel), skip_rescale=m.skip_rescale, init_scale=m.init_scale,
                   progressive=m.progressive.lower(), progressive_input=m.progressive_input.lower(),
                   progressive_combine=m.progressive_combine.lower(), num_classes=m.num_classes,
                   up_attn_per_block=m.up_attn_per_block, attention_head_dim=m.attention_head_dim)

    @property
    def resolutions(self) -> List[int]:
        return [self.image_size // 2**i for i in range(len(self.ch_mult))]

    @property
    def fir_or_none(self) -> Optional[Tuple[int, ...]]:
        return self.fir_kernel if self.fir else None


class Blocks:
    """Factory for the blocks of one network, so that level code reads `make.resblock(in_ch, out_ch)`."""

    def __init__(self, o: UNetOptions):
        self.o = o
        self.temb_dim = TEMB_WIDTH * o.nf if o.conditional else None
        self.act = layers.get_act(o.nonlinearity)
        # 'ddpm' blocks have the reference's NIN shortcut (init scale 0.1), 'biggan' ones a 1×1 conv (scale 1)
        self.shortcut_init_scale = NIN_INIT_SCALE if o.resblock_type == "ddpm" else 1.0

    def resblock(self, in_ch: int, out_ch: Optional[int] = None, resample: Optional[str] = None) -> ResnetBlock:
        o = self.o
        return ResnetBlock(in_ch, out_ch or in_ch, self.temb_dim, self.act, o.dropout, o.groups, o.skip_rescale,
                           o.init_scale, Resample(resample, o.fir_or_none) if resample else None,
                           self.shortcut_init_scale)

    def attn(self, channels: int) -> AttnBlock:
        return AttnBlock(channels, self.o.groups, self.o.skip_rescale, self.o.init_scale, self.o.attention_head_dim)

    def cross(self, channels: int) -> CrossAttention2d:
        return CrossAttention2d(channels, self.o.context_dim, self.o.cross_attn_heads, self.o.groups)

    def crosses(self, channels: int, count: int, resolution: int) -> Optional[nn.ModuleList]:
        """`count` cross-attention blocks when the network is text-conditioned at this resolution, else None."""
        if not self.o.context_dim or resolution not in self.o.cross_attn_resolutions:
            return None
        return nn.ModuleList(self.cross(channels) for _ in range(count))

    def downsample(self, channels: int) -> nn.Module:
        """Halve the resolution: a BigGAN block with resampling inside, or a plain Downsample ('ddpm' blocks)."""
        if self.o.resblock_type == "biggan":
            return self.resblock(channels, resample="down")
        return Downsample(channels, with_conv=self.o.resamp_with_conv, fir_kernel=self.o.fir_or_none)

    def upsample(self, channels: int) -> nn.Module:
        if self.o.resblock_type == "biggan":
            return self.resblock(channels, resample="up")
        return Upsample(channels, with_conv=self.o.resamp_with_conv, fir_kernel=self.o.fir_or_none)


class InputPyramid(nn.Module):
    """progressive_input: the input image, downsampled alongside the features and merged into them.

    'input_skip': p ← FIR/avg-downsample(p);  h ← combine(p, h)          (p keeps the image's channels)
    'residual':   p ← downsample-conv(p);     h ← p ← residual_sum(p, h)  (p takes the features' width)
    """

    def __init__(self, mode: str, pyramid_ch: int, h_ch: int, o: UNetOptions):
        super().__init__()
        self.mode, self.skip_rescale = mode, o.skip_rescale
        if mode == "input_skip":
            self.downsample = Downsample(pyramid_ch, with_conv=False, fir_kernel=o.fir_or_none)
            self.combine = Combine(pyramid_ch, h_ch, o.progressive_combine)
        else:
            self.downsample = Downsample(pyramid_ch, h_ch, with_conv=True, fir_kernel=o.fir_or_none)
            self.combine = None

    def forward(self, p: Tensor, h: Tensor) -> Tuple[Tensor, Tensor]:
        p = self.downsample(p)
        if self.combine is not None:
            return p, self.combine(p, h)
        p = residual_sum(p, h, self.skip_rescale)
        return p, p


class OutputPyramid(nn.Module):
    """progressive: an output image built up across the up levels.

    'output_skip': p ← upsample(p) + conv(act(norm(h)))  (p has the image's channels; it is the network output)
    'residual':    p ← upsample-conv(p);  h ← p ← residual_sum(p, h)
    At the lowest resolution (first up level) there is no p yet: p ← conv(act(norm(h))).
    """

    def __init__(self, mode: str, first: bool, h_ch: int, pyramid_ch: int, o: UNetOptions, act: nn.Module):
        super().__init__()
        self.mode, self.first, self.act, self.skip_rescale = mode, first, act, o.skip_rescale
        self.upsample = self.norm = self.conv = None
        if not first:
            self.upsample = Upsample(pyramid_ch, h_ch if mode == "residual" else None,
                                     with_conv=mode == "residual", fir_kernel=o.fir_or_none)
        if first or mode == "output_skip":
            self.norm = group_norm(h_ch, o.groups)
            out_ch, scale = (o.channels, o.init_scale) if mode == "output_skip" else (h_ch, 1.0)
            self.conv = layers.conv3x3(h_ch, out_ch, init_scale=scale)

    def forward(self, h: Tensor, p: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
        if self.first:
            return h, self.conv(self.act(self.norm(h)))
        p = self.upsample(p)
        if self.mode == "output_skip":
            return h, p + self.conv(self.act(self.norm(h)))
        p = residual_sum(p, h, self.skip_rescale)
        return p, p


class DownLevel(nn.Module):
    """One resolution of the encoder: blocks (+ attention), then optionally halve the resolution."""

    def __init__(self, make: Blocks, in_ch: int, out_ch: int, attention: bool, last: bool,
                 pyramid: Optional[InputPyramid], resolution: int = 0):
        super().__init__()
        n = make.o.num_res_blocks
        self.blocks = nn.ModuleList(make.resblock(in_ch if i == 0 else out_ch, out_ch) for i in range(n))
        self.attns = nn.ModuleList(make.attn(out_ch) for _ in range(n)) if attention else None
        self.crosses = make.crosses(out_ch, n, resolution)
        self.downsample = None if last else make.downsample(out_ch)
        self.pyramid = pyramid

    def forward(self, h: Tensor, temb: Optional[Tensor], skips: List[Tensor], p: Optional[Tensor],
                context: Context = None):
        for i, block in enumerate(self.blocks):
            h = block(h, temb)
            if self.attns is not None:
                h = self.attns[i](h)
            if self.crosses is not None:
                h = self.crosses[i](h, *context)
            skips.append(h)
        if self.downsample is not None:
            h = self.downsample(h, temb) if isinstance(self.downsample, ResnetBlock) else self.downsample(h)
            if self.pyramid is not None:
                p, h = self.pyramid(p, h)
            skips.append(h)
        return h, p


class MiddleBlock(nn.Module):
    """ResnetBlock → attention (→ cross-attention, text-conditioned) → ResnetBlock at the lowest resolution."""

    def __init__(self, make: Blocks, channels: int):
        super().__init__()
        self.block_0 = make.resblock(channels)
        self.attn = make.attn(channels)
        self.cross = make.cross(channels) if make.o.context_dim else None
        self.block_1 = make.resblock(channels)

    def forward(self, h: Tensor, temb: Optional[Tensor], context: Context = None) -> Tensor:
        h = self.attn(self.block_0(h, temb))
        if self.cross is not None:
            h = self.cross(h, *context)
        return self.block_1(h, temb)


class UpLevel(nn.Module):
    """One resolution of the decoder: blocks fed with popped skips, attention (once after the blocks, `attn`, or
    after every block, `attns`), output pyramid, upsampling."""

    def __init__(self, make: Blocks, in_ch: int, skip_chs: Sequence[int], out_ch: int, attention: bool,
                 last: bool, pyramid: Optional[OutputPyramid], resolution: int = 0):
        super().__init__()
        widths = [in_ch] + [out_ch] * (len(skip_chs) - 1)
        self.blocks = nn.ModuleList(make.resblock(c + s, out_ch) for c, s in zip(widths, skip_chs))
        per_block = attention and make.o.up_attn_per_block
        self.attn = make.attn(out_ch) if attention and not per_block else None
        self.attns = nn.ModuleList(make.attn(out_ch) for _ in skip_chs) if per_block else None
        self.crosses = make.crosses(out_ch, len(skip_chs), resolution)  # after every block
        self.pyramid = pyramid
        self.upsample = None if last else make.upsample(out_ch)

    def forward(self, h: Tensor, temb: Optional[Tensor], skips: List[Tensor], p: Optional[Tensor],
                context: Context = None):
        for i, block in enumerate(self.blocks):
            h = block(torch.cat([h, skips.pop()], dim=1), temb)
            if self.attns is not None:
                h = self.attns[i](h)
            if self.crosses is not None:
                h = self.crosses[i](h, *context)
        if self.attn is not None:
            h = self.attn(h)
        if self.pyramid is not None:
            h, p = self.pyramid(h, p)
        if self.upsample is not None:
            h = self.upsample(h, temb) if isinstance(self.upsample, ResnetBlock) else self.upsample(h)
        return h, p


class UNet(nn.Module):
    """x (B, C, H, W), noise condition (B,) and optional class labels (B,) or caption token ids (B, L) → output
    (B, C, H, W). See the module docstring.

    The noise condition is whatever the parameterization gives (sde_diffusion.parameterization: 999·t, σ(t),
    ¼·ln σ or discrete labels); the output is turned into a score there, so the network knows no SDE.
    `text`: the TextConditioning of a text-conditioned network (options.context_dim > 0): its pooled features join
    the noise embedding, its context the cross-attention blocks.
    """

    def __init__(self, o: UNetOptions, text: Optional[nn.Module] = None):
        super().__init__()
        self.options = o
        make = Blocks(o)
        self.act = make.act
        nf, levels = o.nf, len(o.ch_mult)
        if o.conditional:
            embed_dim = 2 * nf if o.embedding_type == "fourier" else nf
            self.embed = layers.NoiseEmbedding(o.embedding_type, embed_dim, o.fourier_scale)
            self.temb = nn.Sequential(layers.linear(embed_dim, make.temb_dim), make.act,
                                      layers.linear(make.temb_dim, make.temb_dim))
        else:
            self.embed = self.temb = None
        self.num_classes = o.num_classes
        if o.num_classes and not o.conditional:
            raise ValueError("model.num_classes > 0 adds the label embedding to the noise embedding: set "
                             "model.conditional=True")
        self.label_embed = layers.LabelEmbedding(o.num_classes, make.temb_dim) if o.num_classes else None
        if text is not None and not o.context_dim:
            raise ValueError("a U-Net given a TextConditioning needs options.context_dim (its width) > 0")
        self.text = text

        self.conv_in = layers.conv3x3(o.channels, nf)
        self.down = nn.ModuleList()
        skip_chs, ch, pyramid_ch = [nf], nf, o.channels
        for i, mult in enumerate(o.ch_mult):
            last = i == levels - 1
            pyramid = None
            if o.progressive_input != "none" and not last:
                pyramid = InputPyramid(o.progressive_input, pyramid_ch, nf * mult, o)
                pyramid_ch = nf * mult if o.progressive_input == "residual" else pyramid_ch
            self.down.append(DownLevel(make, ch, nf * mult, o.resolutions[i] in o.attn_resolutions, last, pyramid,
                                       o.resolutions[i]))
            ch = nf * mult
            skip_chs += [ch] * o.num_res_blocks
            if not last:
                if o.progressive_input == "input_skip" and o.progressive_combine == "cat":
                    ch *= 2
                skip_chs.append(ch)

        self.mid = MiddleBlock(make, ch)

        self.up = nn.ModuleList()
        pyramid_ch = 0
        for i in reversed(range(levels)):
            first, out_ch = i == levels - 1, nf * o.ch_mult[i]
            level_skips = [skip_chs.pop() for _ in range(o.num_res_blocks + 1)]
            pyramid = None
            if o.progressive != "none":
                pyramid = OutputPyramid(o.progressive, first, out_ch, pyramid_ch, o, make.act)
                pyramid_ch = o.channels if o.progressive == "output_skip" else out_ch
            self.up.append(UpLevel(make, ch, level_skips, out_ch, o.resolutions[i] in o.attn_resolutions,
                                   i == 0, pyramid, o.resolutions[i]))
            ch = out_ch
        assert not skip_chs, "every skip connection is consumed"

        if o.progressive == "output_skip":
            self.norm_out = self.conv_out = None  # the output pyramid is the output
        else:
            self.norm_out = group_norm(ch, o.groups)
            self.conv_out = layers.conv3x3(ch, o.channels, init_scale=o.init_scale)

    def forward(self, x: Tensor, cond: Tensor, y: Optional[Tensor] = None) -> Tensor:
        """y: (B,) class labels of a class-conditional network, or (B, L) caption token ids of a text-conditioned
        one (None: the null label or the empty caption, i.e. unconditional)."""
        o = self.options
        temb = self.temb(self.embed(cond)) if self.temb is not None else None
        context = None
        if self.text is not None:
            features, pooled = self.text(y, x.shape[0], x.device)
            temb, context = temb + pooled, (features.context, features.mask)
        elif temb is not None or y is not None:
            temb = layers.add_label_embedding(temb, self.label_embed, y)
        if not o.centered:
            x = 2 * x - 1.0  # data in [0, 1] → [−1, 1]
        p = x if o.progressive_input != "none" else None
        h = self.conv_in(x)
        skips = [h]
        for level in self.down:
            h, p = level(h, temb, skips, p, context)
        h = self.mid(h, temb, context)
        p = None
        for level in self.up:
            h, p = level(h, temb, skips, p, context)
        return p if self.conv_out is None else self.conv_out(self.act(self.norm_out(h)))


def check_resolutions(o: UNetOptions, section: str = "model") -> None:
    """Raise ValueError when data.image_size cannot be halved once per level of `section`.ch_mult, or when
    `section`.attn_resolutions names a resolution the network never reaches."""
    levels = len(o.ch_mult) - 1
    if o.image_size % 2**levels:
        raise ValueError(f"data.image_size={o.image_size} cannot be halved {levels} times for "
                         f"{section}.ch_mult={o.ch_mult}")
    for key, wanted in (("attn_resolutions", o.attn_resolutions), ("cross_attn_resolutions", o.cross_attn_resolutions)):
        unreachable = [r for r in wanted if r not in o.resolutions]
        if unreachable:
            raise ValueError(f"{section}.{key} has {unreachable}, which the network never reaches "
                             f"(its resolutions are {o.resolutions})")


def check_attention_heads(o: UNetOptions) -> None:
    """Raise ValueError naming model.attention_head_dim when it does not divide a width with self-attention: nf·ch_mult
    at the attention resolutions, and the middle block's."""
    widths = {o.nf * mult for mult, r in zip(o.ch_mult, o.resolutions) if r in o.attn_resolutions}
    for width in sorted(widths | {o.nf * o.ch_mult[-1]}):
        attention_heads(width, o.attention_head_dim)


def build_on_meta(options: UNetOptions) -> None:
    """Check the resolutions and attention heads, then construct the network without allocating memory, so that
    every width and group count is checked."""
    check_resolutions(options)
    check_attention_heads(options)
    with torch.device("meta"):
        UNet(options)


@register_model("ncsnpp")
class NCSNpp(UNet):
    """NCSN++ / DDPM++ (Song et al. 2021): the U-Net above with every option of score_sde's config.model.

    Configure it like score_sde_pytorch: DDPM++ = resblock_type 'biggan', fir False, positional embedding;
    NCSN++ = fir True, progressive_input 'residual', fourier embedding (VE: the 'score' parameterization).
    """

    @staticmethod
    def check_config(config) -> None:
        """Raise ValueError if the network cannot be built from config (used by models.check_config)."""
        build_on_meta(UNetOptions.from_config(config))

    def __init__(self, config):
        super().__init__(UNetOptions.from_config(config), build_text_conditioning(config, TEMB_WIDTH * config.model.nf))
