"""A small Diffusion Transformer (DiT, Peebles & Xie 2023) as the transformer alternative to the U-Nets.

    x (B, C, H, W) ─ patchify ─► tokens (B, N, D) + fixed 2-D sin-cos positions,  N = (H/p)·(W/p)
                   ─ depth × DiTBlock(tokens, c) ─► FinalLayer ─► (B, N, p·p·C) ─ unpatchify ─► (B, C, H, W)

c = MLP(embedding of the noise condition) conditions every block through adaLN-zero: it regresses the
shift, scale and gate of each LayerNorm'd sub-layer, with the regression initialised at zero so that every
block starts as the identity and the network's output starts at 0. It works with every SDE: the noise
condition is whatever the parameterization gives (999·t, σ(t), ¼·ln σ or discrete labels) and `get_score_fn`
turns the output into a score as for any other network.

config.model: nf (width D), patch_size (p), depth, num_heads, attention_head_dim (> 0: self-attention in
D / attention_head_dim heads instead of num_heads), mlp_ratio, embedding_type, fourier_scale, dropout, conditional,
num_classes (> 0: a label embedding added to c); config.data: image_size, num_channels, centered.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import nn

from . import layers
from .cross_attention import CrossAttentionTokens
from .layers import LAYER_NORM_EPS, xavier_linear, zero_linear
from .registry import register_model
from .text_conditioning import build_text_conditioning, context_dim

Tensor = torch.Tensor
POS_EMBED_MAX_PERIOD = 10000.0
TEMB_INIT_STD = 0.02  # DiT's init of the noise-embedding MLP


def sincos_positions(dim: int, grid: int) -> Tensor:
    """Fixed 2-D sin-cos position embedding (grid·grid, dim): half the channels encode the row, half the column."""
    if dim % 4:
        raise ValueError(f"the DiT width model.nf={dim} must be a multiple of 4 for its 2-D sin-cos positions")
    quarter = dim // 4
    freqs = 1.0 / POS_EMBED_MAX_PERIOD ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    rows, cols = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64),
                                indexing="ij")

    def encode(pos: Tensor) -> Tensor:
        angles = pos.reshape(-1, 1) * freqs[None]
        return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)

    return torch.cat([encode(rows), encode(cols)], dim=1).float()


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """x (B, N, D) · (1 + scale) + shift, with shift and scale (B, D) per sample."""
    return x * (1 + scale[:, None]) + shift[:, None]




class SelfAttention(nn.Module):
    """Multi-head self-attention over tokens (B, N, D) (`layers.attention`)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = xavier_linear(dim, 3 * dim)
        self.proj = xavier_linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        B, N, D = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        h = layers.attention(q, k, v)  # (B, heads, N, D / heads)
        return self.proj(h.transpose(1, 2).reshape(B, N, D))


class DiTBlock(nn.Module):
    """x ← x + gate₁ · attn(modulate(norm(x), shift₁, scale₁));  [x ← x + cross-attn(norm(x), text)];
    x ← x + gate₂ · mlp(modulate(norm(x), shift₂, scale₂)), with (shift₁, scale₁, gate₁, shift₂, scale₂, gate₂) =
    adaLN(c), zero at initialisation; the cross-attention (text-conditioned, context_dim > 0) starts as the
    identity. The self-attention has `self_heads` heads (0: num_heads), the cross-attention num_heads."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, dropout: float, context_dim: int = 0,
                 self_heads: int = 0):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm_1 = nn.LayerNorm(dim, elementwise_affine=False, eps=LAYER_NORM_EPS)
        self.attn = SelfAttention(dim, self_heads or num_heads)
        self.norm_2 = nn.LayerNorm(dim, elementwise_affine=False, eps=LAYER_NORM_EPS)
        self.mlp = nn.Sequential(xavier_linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Dropout(dropout),
                                 xavier_linear(hidden, dim))
        self.adaLN = nn.Sequential(nn.SiLU(), zero_linear(dim, 6 * dim))
        self.cross = CrossAttentionTokens(dim, context_dim, num_heads) if context_dim else None

    def forward(self, x: Tensor, c: Tensor, context: Optional[Tuple[Tensor, Tensor]] = None) -> Tensor:
        shift_1, scale_1, gate_1, shift_2, scale_2, gate_2 = self.adaLN(c).chunk(6, dim=1)
        x = x + gate_1[:, None] * self.attn(modulate(self.norm_1(x), shift_1, scale_1))
        if self.cross is not None:
            x = self.cross(x, *context)
        return x + gate_2[:, None] * self.mlp(modulate(self.norm_2(x), shift_2, scale_2))


class FinalLayer(nn.Module):
    """tokens (B, N, D) → patches (B, N, p·p·C): adaLN-modulated LayerNorm, then a zero-initialised linear map."""

    def __init__(self, dim: int, patch_values: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=LAYER_NORM_EPS)
        self.adaLN = nn.Sequential(nn.SiLU(), zero_linear(dim, 2 * dim))
        self.linear = zero_linear(dim, patch_values)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.adaLN(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm(x), shift, scale))


def check_options(config) -> None:
    """Raise ValueError naming the key when the DiT cannot be built from config."""
    m, d = config.model, config.data
    if m.patch_size < 1 or d.image_size % m.patch_size:
        raise ValueError(f"model.patch_size={m.patch_size} must divide data.image_size={d.image_size}")
    if m.num_heads < 1 or m.nf % m.num_heads:
        raise ValueError(f"model.num_heads={m.num_heads} must divide the DiT width model.nf={m.nf}")
    if m.attention_head_dim < 0 or (m.attention_head_dim and m.nf % m.attention_head_dim):
        raise ValueError(f"model.attention_head_dim={m.attention_head_dim} must divide the DiT width model.nf={m.nf} "
                         "(0: model.num_heads heads)")
    if m.nf % 4:
        raise ValueError(f"the DiT width model.nf={m.nf} must be a multiple of 4 (2-D sin-cos positions)")
    if m.depth < 1 or m.mlp_ratio <= 0:
        raise ValueError(f"model.depth={m.depth} must be ≥ 1 and model.mlp_ratio={m.mlp_ratio} > 0")


def self_attention_heads(config) -> int:
    """The DiT's self-attention heads: model.nf / model.attention_head_dim, or model.num_heads when that is 0."""
    m = config.model
    return m.nf // m.attention_head_dim if m.attention_head_dim > 0 else m.num_heads


@register_model("dit")
class DiT(nn.Module):
    """x (B, C, H, W), noise condition (B,) and optional class labels (B,) or caption token ids (B, L) → output
    (B, C, H, W); text-conditioned, every block cross-attends to the caption. See the module docstring."""

    check_config = staticmethod(check_options)
    convolutional = False  # patches and attention: channels_last does not apply

    def __init__(self, config):
        super().__init__()
        check_options(config)
        m, d = config.model, config.data
        dim, p = m.nf, m.patch_size
        self.patch, self.channels, self.centered, self.dim = p, d.num_channels, d.centered, dim
        self.patchify = nn.Conv2d(d.num_channels, dim, kernel_size=p, stride=p)
        nn.init.xavier_uniform_(self.patchify.weight.view(dim, -1))
        nn.init.zeros_(self.patchify.bias)
        self.register_buffer("positions", sincos_positions(dim, d.image_size // p)[None], persistent=False)
        if m.conditional:
            self.embed = layers.NoiseEmbedding(m.embedding_type, dim, m.fourier_scale)
            self.temb = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))
            for layer in (self.temb[0], self.temb[2]):
                nn.init.normal_(layer.weight, std=TEMB_INIT_STD)
                nn.init.zeros_(layer.bias)
        else:
            self.embed = self.temb = None
        self.num_classes = m.num_classes
        if m.num_classes and not m.conditional:
            raise ValueError("model.num_classes > 0 adds the label embedding to the noise embedding: set "
                             "model.conditional=True")
        self.label_embed = (layers.LabelEmbedding(m.num_classes, dim, init_std=TEMB_INIT_STD) if m.num_classes
                            else None)
        self.text = build_text_conditioning(config, dim)
        width = context_dim(config) if self.text is not None else 0
        self.blocks = nn.ModuleList(DiTBlock(dim, m.num_heads, m.mlp_ratio, m.dropout, width,
                                             self_attention_heads(config)) for _ in range(m.depth))
        self.final = FinalLayer(dim, p * p * d.num_channels)

    def unpatchify(self, patches: Tensor, height: int, width: int) -> Tensor:
        """(B, N, p·p·C) → (B, C, H, W), patches in row-major order."""
        B, p, C = patches.shape[0], self.patch, self.channels
        x = patches.reshape(B, height // p, width // p, p, p, C)
        return torch.einsum("bhwpqc->bchpwq", x).reshape(B, C, height, width)

    def forward(self, x: Tensor, cond: Tensor, y: Optional[Tensor] = None) -> Tensor:
        B, _, H, W = x.shape
        if not self.centered:
            x = 2 * x - 1.0  # data in [0, 1] → [−1, 1]
        c = self.temb(self.embed(cond)) if self.temb is not None else x.new_zeros(B, self.dim)
        context = None
        if self.text is not None:
            features, pooled = self.text(y, B, x.device)
            c, context = c + pooled, (features.context, features.mask)
        else:
            c = layers.add_label_embedding(c, self.label_embed, y)
        tokens = self.patchify(x).flatten(2).transpose(1, 2) + self.positions.to(x.dtype)  # (B, N, D)
        for block in self.blocks:
            tokens = block(tokens, c, context)
        return self.unpatchify(self.final(tokens, c), H, W)
