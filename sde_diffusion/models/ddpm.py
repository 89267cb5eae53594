"""The DDPM U-Net of Ho et al. (2020), as score_sde's `ddpm` model.

It is the U-Net of ncsnpp.py with DDPM's choices fixed: 'ddpm' residual blocks (no resampling inside), no
skip rescaling, GroupNorm in 32 groups everywhere, the sinusoidal ('positional') embedding of the noise
condition, nearest/strided-conv resampling without FIR, and no input or output pyramid:

conv_in → down levels (num_res_blocks ResnetBlocks, attention at `attn_resolutions`, downsample)
→ middle (ResnetBlock, attention, ResnetBlock) → up levels (num_res_blocks + 1 ResnetBlocks fed with the
matching skip activations, attention, upsample) → GroupNorm, act, conv_out. score_sde's DDPM attends once per
up level; Ho et al.'s original (and diffusers' `AttnUpBlock2D`) after every up block: model.up_attn_per_block.
"""
from __future__ import annotations

from .layerspp import ddpm_groups
from .ncsnpp import TEMB_WIDTH, UNet, UNetOptions, build_on_meta, text_options
from .text_conditioning import build_text_conditioning
from .registry import register_model


def ddpm_options(config) -> UNetOptions:
    """config.model: nf, ch_mult, num_res_blocks, attn_resolutions, up_attn_per_block, attention_head_dim, dropout,
    resamp_with_conv, conditional, nonlinearity, num_classes; config.data: image_size, num_channels, centered."""
    m, d = config.model, config.data
    return UNetOptions(image_size=d.image_size, channels=d.num_channels, centered=d.centered, nf=m.nf,
                       ch_mult=tuple(m.ch_mult), num_res_blocks=m.num_res_blocks,
                       attn_resolutions=tuple(m.attn_resolutions), dropout=m.dropout,
                       resamp_with_conv=m.resamp_with_conv, conditional=m.conditional,
                       nonlinearity=m.nonlinearity, embedding_type="positional",
                       resblock_type="ddpm", fir=False, skip_rescale=False, init_scale=0.0, progressive="none",
                       progressive_input="none", groups=ddpm_groups, num_classes=m.num_classes,
                       up_attn_per_block=m.up_attn_per_block, attention_head_dim=m.attention_head_dim,
                       **text_options(config))


@register_model("ddpm")
class DDPM(UNet):
    """x (batch, C, H, W) and noise condition (batch,) → output (batch, C, H, W); uncentered inputs in [0, 1]
    are mapped to [−1, 1] inside the network. `model.embedding_type` is ignored (always 'positional')."""

    @staticmethod
    def check_config(config) -> None:
        """Raise ValueError if the network cannot be built from config (used by models.check_config)."""
        build_on_meta(ddpm_options(config))

    def __init__(self, config):
        super().__init__(ddpm_options(config), build_text_conditioning(config, TEMB_WIDTH * config.model.nf))
