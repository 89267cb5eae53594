"""A residual MLP score network for low-dimensional (toy) data."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from . import layers
from .registry import register_model
from .text_conditioning import build_text_conditioning


class ResidualMLPBlock(nn.Module):
    def __init__(self, width: int, emb_dim: int, act: nn.Module):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc_in = layers.linear(width, width)
        self.emb_proj = layers.linear(emb_dim, width)
        self.fc_out = layers.linear(width, width, init_scale=0.0)
        self.act = act

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        r = self.fc_in(self.act(self.norm(h))) + self.emb_proj(emb)
        return h + self.fc_out(self.act(r))


@register_model("mlp")
class MLP(nn.Module):
    """x (batch, d), noise condition (batch,) and optional class labels (batch,) or caption token ids (batch, L)
    → output (batch, d).

    config.model: nf (hidden width), num_res_blocks (residual blocks), nonlinearity, embedding_type,
    fourier_scale, num_classes (> 0: a label embedding added to the noise embedding), text (a text encoder whose
    pooled features are added to it); config.data.dim (d).
    """

    vector_data = True
    convolutional = False

    def __init__(self, config):
        super().__init__()
        m = config.model
        width, dim = m.nf, config.data.dim
        self.embed = layers.NoiseEmbedding(m.embedding_type, width, m.fourier_scale)
        self.emb_mlp = nn.Sequential(layers.linear(width, 2 * width), layers.get_act(m.nonlinearity),
                                     layers.linear(2 * width, 2 * width))
        self.num_classes = m.num_classes
        self.label_embed = layers.LabelEmbedding(m.num_classes, 2 * width) if m.num_classes else None
        self.text = build_text_conditioning(config, 2 * width)  # captions: their pooled features join emb
        self.input = layers.linear(dim, width)
        self.blocks = nn.ModuleList(ResidualMLPBlock(width, 2 * width, layers.get_act(m.nonlinearity))
                                    for _ in range(m.num_res_blocks))
        self.out_norm = nn.LayerNorm(width)
        self.act = layers.get_act(m.nonlinearity)
        self.output = layers.linear(width, dim)

    def forward(self, x: torch.Tensor, cond: torch.Tensor, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        emb = self.emb_mlp(self.embed(cond))
        if self.text is not None:
            emb = emb + self.text(y, x.shape[0], x.device)[1]
        else:
            emb = layers.add_label_embedding(emb, self.label_embed, y)
        h = self.input(x)
        for block in self.blocks:
            h = block(h, emb)
        return self.output(self.act(self.out_norm(h)))
