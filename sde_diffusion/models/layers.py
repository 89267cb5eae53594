"""Building blocks shared by the score networks: noise-level and class-label embeddings, initializers, activations."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn
import torch.nn.functional as F

# Sinusoidal embeddings use frequencies 1 / MAX_PERIOD^(k/half) as in the Transformer and DDPM.
MAX_PERIOD = 10000.0

ACTIVATIONS = {"swish": nn.SiLU, "silu": nn.SiLU, "relu": nn.ReLU, "elu": nn.ELU, "lrelu": lambda: nn.LeakyReLU(0.2)}


def get_act(name: str) -> nn.Module:
    if name.lower() not in ACTIVATIONS:
        raise ValueError(f"model.nonlinearity={name!r} is not one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name.lower()]()


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q kᵀ/√d) v over (..., N, d) tokens.

    On CUDA this is `F.scaled_dot_product_attention` (flash / memory-efficient kernels); elsewhere it is written out
    with matmul and softmax, which autograd differentiates to any order (the fused kernels have no double backward:
    on a GPU, take higher-order gradients under `torch.nn.attention.sdpa_kernel(SDPBackend.MATH)`).
    """
    if q.is_cuda:
        return F.scaled_dot_product_attention(q, k, v)
    weights = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1)
    return weights @ v


def timestep_embedding(timesteps: torch.Tensor, dim: int) -> torch.Tensor:
    """DDPM sinusoidal embedding of a (batch,) tensor of noise levels → (batch, dim): [sin | cos], computed in float32
    (float64 for float64 levels)."""
    half = dim // 2
    # exp(k · (−log MAX_PERIOD / (half − 1))), in the reference's order of operations (bit-identical frequencies)
    k = torch.arange(half, device=timesteps.device, dtype=torch.float32)
    freqs = torch.exp(k * -(math.log(MAX_PERIOD) / (half - 1)))
    args = timesteps.float()[:, None] * freqs[None]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1).to(torch.promote_types(timesteps.dtype, torch.float32))
    return F.pad(emb, (0, 1)) if dim % 2 else emb


class GaussianFourierProjection(nn.Module):
    """Random Fourier features of a scalar (Tancik et al.): [sin 2πWv | cos 2πWv], W ~ N(0, scale²), fixed."""

    def __init__(self, embedding_size: int = 256, scale: float = 1.0):
        super().__init__()
        self.W = nn.Parameter(torch.randn(embedding_size) * scale, requires_grad=False)

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        proj = v[:, None] * self.W[None, :] * 2 * math.pi
        return torch.cat([torch.sin(proj), torch.cos(proj)], dim=-1)


def variance_scaling_(weight: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """In-place 'fan_avg, uniform' variance scaling (the DDPM/score_sde default init); scale 0 → 1e-10."""
    scale = 1e-10 if scale == 0 else scale
    receptive = weight[0][0].numel() if weight.ndim > 2 else 1
    fan_in, fan_out = weight.shape[1] * receptive, weight.shape[0] * receptive
    bound = math.sqrt(3.0 * scale / ((fan_in + fan_out) / 2.0))
    with torch.no_grad():
        return weight.uniform_(-bound, bound)


def conv3x3(in_ch: int, out_ch: int, init_scale: float = 1.0) -> nn.Conv2d:
    """``nn.Conv2d(in_ch, out_ch, 3, padding=1)`` (shape-preserving), variance-scaled weight, zero bias."""
    conv = nn.Conv2d(in_ch, out_ch, 3, padding=1)
    variance_scaling_(conv.weight, init_scale)
    nn.init.zeros_(conv.bias)
    return conv


def conv1x1(in_ch: int, out_ch: int, init_scale: float = 1.0) -> nn.Conv2d:
    conv = nn.Conv2d(in_ch, out_ch, 1)
    variance_scaling_(conv.weight, init_scale)
    nn.init.zeros_(conv.bias)
    return conv


def linear(in_dim: int, out_dim: int, init_scale: float = 1.0) -> nn.Linear:
    layer = nn.Linear(in_dim, out_dim)
    variance_scaling_(layer.weight, init_scale)
    nn.init.zeros_(layer.bias)
    return layer


class NoiseEmbedding(nn.Module):
    """Embeds the (batch,) noise condition → (batch, dim): DDPM's sinusoidal embedding of the value itself
    ('positional', for VP's 0..999 time scale) or random Fourier features of its log ('fourier', for VE's σ,
    which spans decades; W holds dim/2 fixed frequencies ~ N(0, fourier_scale²))."""

    KINDS = ("fourier", "positional")

    def __init__(self, kind: str, dim: int, fourier_scale: float = 16.0):
        super().__init__()
        if kind not in self.KINDS:
            raise ValueError(f"model.embedding_type={kind!r} is not one of {sorted(self.KINDS)}")
        self.kind, self.dim = kind, dim
        if kind == "fourier":
            self.fourier = GaussianFourierProjection(dim // 2, fourier_scale)

    def forward(self, cond: torch.Tensor) -> torch.Tensor:
        if self.kind == "fourier":
            return self.fourier(torch.log(cond))
        return timestep_embedding(cond, self.dim)


LAYER_NORM_EPS = 1e-6  # the transformers' (DiT, cross-attention) LayerNorm epsilon


def zero_linear(in_dim: int, out_dim: int) -> nn.Linear:
    """A linear map initialised to zero (weights and bias)."""
    layer = nn.Linear(in_dim, out_dim)
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


def xavier_linear(in_dim: int, out_dim: int) -> nn.Linear:
    """A linear map with Xavier-uniform weights and zero bias."""
    layer = nn.Linear(in_dim, out_dim)
    nn.init.xavier_uniform_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


class LabelEmbedding(nn.Module):
    """Class labels (batch,) → (batch, dim), added to a network's noise embedding (class-conditional models).

    Rows 0..num_classes−1 embed the classes; row num_classes is the "no label" entry (`null_label`), used for
    labels dropped in training (classifier-free guidance) and for unconditional evaluation; y=None selects it.
    """

    def __init__(self, num_classes: int, dim: int, init_std: float = 1.0):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"model.num_classes={num_classes}: a label embedding needs at least one class")
        self.num_classes = num_classes
        self.table = nn.Embedding(num_classes + 1, dim)
        nn.init.normal_(self.table.weight, std=init_std)

    @property
    def null_label(self) -> int:
        return self.num_classes

    def forward(self, y: Optional[torch.Tensor], batch: int, device) -> torch.Tensor:
        if y is None:
            y = torch.full((batch,), self.null_label, dtype=torch.long, device=device)
        return self.table(y)


def add_label_embedding(emb: torch.Tensor, label_embed: Optional[LabelEmbedding], y: Optional[torch.Tensor]):
    """emb (batch, dim) plus the embedding of labels y (None: the null label); an unconditional network
    (label_embed None) must get y=None."""
    if label_embed is None:
        if y is not None:
            raise ValueError("class labels given to a network without a label embedding: build it with "
                             "model.num_classes > 0")
        return emb
    return emb + label_embed(y, emb.shape[0], emb.device).to(emb.dtype)
