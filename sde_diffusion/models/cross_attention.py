"""Cross-attention from image features or tokens to a text context, for text-conditioned score networks.

    queries  = norm(x) as tokens (B, N, D)        keys, values = context (B, L, Dc)
    out      = x + proj(softmax(q kᵀ/√d, masked keys → −∞) v),     proj zero at initialisation

so every block starts as the identity. `mask` (B, L) is True at real context tokens (`text.TextFeatures.mask`);
keys where it is False get zero weight. The attention is `F.scaled_dot_product_attention` with a boolean
`attn_mask`: off CUDA under its MATH backend, which autograd differentiates to any order (as `layers.attention`,
the fused CUDA kernels have no double backward: take higher-order gradients there under
`torch.nn.attention.sdpa_kernel(SDPBackend.MATH)`).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from . import layers
from .layers import LAYER_NORM_EPS, xavier_linear, zero_linear
from .layerspp import NIN_INIT_SCALE, GroupsFn, group_norm, ncsnpp_groups

Tensor = torch.Tensor


def split_heads(t: Tensor, num_heads: int) -> Tensor:
    """(B, N, heads·d) → (B, heads, N, d)."""
    return t.unflatten(-1, (num_heads, -1)).transpose(1, 2)


def merge_heads(t: Tensor) -> Tensor:
    """(B, heads, N, d) → (B, N, heads·d)."""
    return t.transpose(1, 2).flatten(2)


def masked_attention(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor] = None) -> Tensor:
    """softmax(q kᵀ/√d) v with the keys where mask is False left out: q (B, heads, N, d), k and v (B, heads, L, d),
    mask (B, L) bool or None (all keys) → (B, heads, N, d).

    A row of the mask with no True key attends to all its keys (rather than giving NaN); no host synchronisation.
    """
    attn_mask = None
    if mask is not None:
        keep = mask | ~mask.any(dim=-1, keepdim=True)
        attn_mask = keep[:, None, None, :]  # broadcast over heads and queries
    if q.is_cuda:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
    with sdpa_kernel(SDPBackend.MATH):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)


def check_context(context: Tensor, mask: Optional[Tensor], batch: int, context_dim: int) -> None:
    """Raise ValueError naming the shapes unless context is (batch, L, context_dim) and mask (batch, L) bool."""
    if context.ndim != 3 or context.shape[0] != batch or context.shape[2] != context_dim:
        raise ValueError(f"cross-attention context must be (batch={batch}, L, context_dim={context_dim}), got "
                         f"{tuple(context.shape)}: pass TextFeatures.context of a text encoder of that width")
    if mask is not None and (mask.dtype != torch.bool or mask.shape != context.shape[:2]):
        raise ValueError(f"cross-attention mask must be bool of shape {tuple(context.shape[:2])} (True = real "
                         f"token), got {mask.dtype} {tuple(mask.shape)}: pass TextFeatures.mask")


class CrossAttention(nn.Module):
    """Multi-head attention of query tokens (B, N, dim) to context tokens (B, L, context_dim) → (B, N, dim), the
    output projection zero at initialisation (no normalization, no residual: the blocks below add them)."""

    def __init__(self, dim: int, context_dim: int, num_heads: int = 1, qkv_init: str = "xavier"):
        super().__init__()
        if num_heads < 1 or dim % num_heads:
            raise ValueError(f"cross-attention: num_heads={num_heads} must divide the width {dim}")
        self.dim, self.context_dim, self.num_heads = dim, context_dim, num_heads
        if qkv_init == "xavier":  # as the DiT's self-attention
            self.to_q, self.to_kv = xavier_linear(dim, dim), xavier_linear(context_dim, 2 * dim)
        elif qkv_init == "nin":  # as the U-Nets' AttnBlock
            self.to_q, self.to_kv = layers.linear(dim, dim, NIN_INIT_SCALE), nn.Linear(context_dim, 2 * dim)
            for rows in self.to_kv.weight.split(dim):
                layers.variance_scaling_(rows, NIN_INIT_SCALE)
            nn.init.zeros_(self.to_kv.bias)
        else:
            raise ValueError(f"cross-attention qkv_init={qkv_init!r} is not one of ['nin', 'xavier']")
        self.proj_out = zero_linear(dim, dim)

    def forward(self, tokens: Tensor, context: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        check_context(context, mask, tokens.shape[0], self.context_dim)
        q = split_heads(self.to_q(tokens), self.num_heads)
        k, v = (split_heads(t, self.num_heads) for t in self.to_kv(context.to(tokens.dtype)).chunk(2, dim=-1))
        return self.proj_out(merge_heads(masked_attention(q, k, v, mask)))


class CrossAttention2d(nn.Module):
    """U-Net feature maps (B, C, H, W) attend to a text context (B, L, context_dim) → (B, C, H, W):

        t = GroupNorm(x) as tokens (B, HW, C);   out = x + attend(t, context, mask) as (B, C, H, W)

    `groups` is the network's GroupNorm rule (`layerspp.ncsnpp_groups` for NCSN++/DDPM++, `layerspp.ddpm_groups`
    for the DDPM U-Net); q, k and v get AttnBlock's init, the output projection zero (identity at initialisation).
    """

    def __init__(self, channels: int, context_dim: int, num_heads: int = 1, groups: GroupsFn = ncsnpp_groups):
        super().__init__()
        self.norm = group_norm(channels, groups)
        self.attn = CrossAttention(channels, context_dim, num_heads, qkv_init="nin")

    def forward(self, x: Tensor, context: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # (B, HW, C)
        h = self.attn(tokens, context, mask).transpose(1, 2).unflatten(2, x.shape[2:])
        return x + h


class CrossAttentionTokens(nn.Module):
    """Tokens (B, N, dim) (a DiT's) attend to a text context (B, L, context_dim) → (B, N, dim):

        out = x + attend(LayerNorm(x), context, mask),   the output projection zero at initialisation.
    """

    def __init__(self, dim: int, context_dim: int, num_heads: int = 1):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.attn = CrossAttention(dim, context_dim, num_heads, qkv_init="xavier")

    def forward(self, x: Tensor, context: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        return x + self.attn(self.norm(x), context, mask)
