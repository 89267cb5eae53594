"""EDM2's magnitude-preserving U-Net (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of
Diffusion Models", its final configuration), `model.name = "edm2"`.

Every layer keeps activations, weights and updates at unit magnitude (RMS 1) in expectation: no biases, no
normalization layers, weights normalized to unit RMS per output channel at every use (and overwritten with it in
training mode, "forced weight normalization"), and every sum, concatenation and nonlinearity rescaled so that
unit-variance inputs give unit-variance outputs (`mp_sum`, `mp_cat`, `mp_silu`).

    x (B, C, H, W) ─ cat ones ─► conv 3×3 ─► encoder blocks ─► decoder blocks ─► conv 3×3 · out_gain ─► (B, C, H, W)
                                    │ └── every output is a skip ──┘ ▲ mp_cat(x, skip)
    noise condition ─ MPFourier ─ MPConv ─┐
    class one-hot·√K ─ MPConv ────────────┴ mp_sum ─ mp_silu ─► emb (every block scales its residual branch by it)

Per level (resolution r = image_size >> level): the encoder halves the resolution with a 'down' block (level 0:
the input conv), then runs num_res_blocks 'enc' blocks to width nf·ch_mult[level]; the decoder runs two blocks at
the lowest resolution (the first with attention), or an 'up' block, then num_res_blocks + 1 'dec' blocks, each on
mp_cat(x, skip). Self-attention (cosine attention, heads of model.attention_head_dim channels) where r is in
model.attn_resolutions. `log_variance(noise condition)` is the learned uncertainty u(σ) of EDM2's loss
(sde_diffusion.training.objectives: w·L/exp(u) + u).

Text conditioning (not in the paper) follows the other networks, magnitude-preserving: the normalized pooled
caption joins the embedding as the class term does, and blocks at model.cross_attn_resolutions (None: the
attention resolutions) cross-attend to the caption (cosine attention, added by mp_sum).

config.model: nf, ch_mult, num_res_blocks, attn_resolutions, attention_head_dim, dropout, num_classes, text,
cross_attn_resolutions, cross_attn_heads; config.data: image_size, num_channels, centered.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from . import layers
from .cross_attention import check_context, masked_attention
from ..parameterization import resolved_names
from ..sdes import sde_from_config
from .layerspp import attention_heads
from .registry import register_model
from .text_conditioning import build_text_conditioning, context_dim, text_conditioned

Tensor = torch.Tensor
Context = Optional[Tuple[Tensor, Optional[Tensor]]]  # (text context (B, L, D), mask (B, L)) for cross-attention

NORMALIZE_EPS = 1e-4  # ε of normalize: x / (ε + RMS(x))
SILU_GAIN = 0.596  # √E[silu(z)²] for z ~ N(0, 1): mp_silu divides by it
RESIDUAL_BALANCE = 0.3  # mp_sum weight t of a block's residual branch
ATTENTION_BALANCE = 0.3  # mp_sum weight t of the attention branch
EMBEDDING_BALANCE = 0.5  # mp_sum weight t of the class (or caption) embedding against the noise embedding
CONCAT_BALANCE = 0.5  # mp_cat weight t of the skip against the decoder's features
CLIP_ACTIVATION = 256.0  # every block clips its output to ±CLIP_ACTIVATION
LOGVAR_CHANNELS = 128  # Fourier features of the log-variance head u(σ)
RESAMPLE_MODES = ("keep", "down", "up")


# --------------------------------------------------------------------------------------------------
# Magnitude-preserving primitives
# --------------------------------------------------------------------------------------------------
def at_least_fp32(dtype: torch.dtype) -> torch.dtype:
    """float32 for half-precision dtypes, else dtype itself (float64 stays)."""
    return torch.promote_types(dtype, torch.float32)


def normalize(x: Tensor, dim: Optional[Sequence[int]] = None, eps: float = NORMALIZE_EPS) -> Tensor:
    """x / (ε + RMS of x over `dim`), the RMS taken in at least float32; dim None: every dimension but the first (per
    output channel of a weight); dim=1 on activations (B, C, H, W) is the pixel norm."""
    dim = tuple(range(1, x.ndim)) if dim is None else dim
    norm = torch.linalg.vector_norm(x, dim=dim, keepdim=True, dtype=at_least_fp32(x.dtype))
    rms = norm / math.sqrt(x.numel() // norm.numel())  # ‖x‖ / √(elements reduced)
    return x / (eps + rms).to(x.dtype)


def mp_silu(x: Tensor) -> Tensor:
    """silu(x) / 0.596: unit magnitude for x ~ N(0, 1)."""
    return F.silu(x) / SILU_GAIN


def mp_sum(a: Tensor, b: Tensor, t: float) -> Tensor:
    """(1 − t)·a + t·b divided by √((1 − t)² + t²): unit magnitude for independent unit-magnitude a and b."""
    return a.lerp(b, t) / math.sqrt((1 - t) ** 2 + t**2)


def mp_cat(a: Tensor, b: Tensor, t: float, dim: int = 1) -> Tensor:
    """[a·C(1 − t)/√Na, b·C·t/√Nb] along `dim`, C = √((Na + Nb)/((1 − t)² + t²)): unit magnitude out of unit-magnitude
    a (Na channels) and b (Nb channels), b contributing the share t."""
    na, nb = a.shape[dim], b.shape[dim]
    c = math.sqrt((na + nb) / ((1 - t) ** 2 + t**2))
    return torch.cat([a * (c * (1 - t) / math.sqrt(na)), b * (c * t / math.sqrt(nb))], dim=dim)


class MPFourier(nn.Module):
    """(B,) → (B, channels): √2·cos(x·f + φ) with fixed f ~ 2π·N(0, 1) and φ ~ 2π·U(0, 1) (unit magnitude)."""

    def __init__(self, channels: int):
        super().__init__()
        self.register_buffer("freqs", 2 * math.pi * torch.randn(channels))
        self.register_buffer("phases", 2 * math.pi * torch.rand(channels))

    def forward(self, x: Tensor) -> Tensor:
        return math.sqrt(2) * torch.cos(torch.outer(x.to(self.freqs.dtype), self.freqs) + self.phases)


class MPConv(nn.Module):
    """A convolution (kernel (k, k), padding k//2) or, kernel (), a linear map, without bias: weight (cout, cin,
    *kernel) ~ N(0, 1) used as normalize(weight)·gain/√fan_in, so unit-magnitude inputs give gain-magnitude
    outputs. In training mode each call first overwrites the stored weight with normalize(weight) ("forced weight
    normalization"; the graph uses a copy, so the network may be called twice before one backward). Weights are
    normalized in at least float32, then cast to x's dtype."""

    def __init__(self, in_channels: int, out_channels: int, kernel: Tuple[int, ...] = ()):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, *kernel))

    @torch.no_grad()
    def force_normalize_(self) -> None:
        """Overwrite the stored weight with normalize(weight): unit RMS per output channel."""
        self.weight.copy_(normalize(self.weight.to(at_least_fp32(self.weight.dtype))))

    def forward(self, x: Tensor, gain=1.0) -> Tensor:
        if self.training:
            self.force_normalize_()
        w = self.weight.to(at_least_fp32(self.weight.dtype), copy=True)
        fan_in = w[0].numel()
        w = (normalize(w) * (gain / math.sqrt(fan_in))).to(x.dtype)
        if w.ndim == 2:
            return x @ w.t()
        return F.conv2d(x, w, padding=w.shape[-1] // 2)


# --------------------------------------------------------------------------------------------------
# Blocks
# --------------------------------------------------------------------------------------------------
def resample(x: Tensor, mode: str) -> Tensor:
    """'down': 2×2 average; 'up': nearest neighbour ×2; 'keep': x."""
    if mode == "down":
        return F.avg_pool2d(x, 2)
    if mode == "up":
        return F.interpolate(x, scale_factor=2, mode="nearest")
    return x


class SelfAttention(nn.Module):
    """x (B, C, H, W) → (B, C, H, W): q, k, v = 1×1 MPConv(x), each normalized per head and pixel (cosine
    attention), softmax(q·k/√d)·v per head, a 1×1 MPConv projection."""

    def __init__(self, channels: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = MPConv(channels, 3 * channels, (1, 1))
        self.proj = MPConv(channels, channels, (1, 1))

    def forward(self, x: Tensor) -> Tensor:
        B, C, H, W = x.shape
        qkv = normalize(self.qkv(x).reshape(B, 3, self.heads, C // self.heads, H * W), dim=3)
        q, k, v = qkv.transpose(-1, -2).unbind(1)  # (B, heads, HW, d) each
        y = layers.attention(q, k, v).transpose(-1, -2)  # (B, heads, d, HW)
        return self.proj(y.reshape(B, C, H, W))


class CrossAttention(nn.Module):
    """x (B, C, H, W) attends to a text context (B, L, context_dim) → (B, C, H, W): q = 1×1 MPConv(x), k, v =
    MPConv-linear(context), each normalized per head (cosine attention), masked softmax(q·k/√d)·v, a 1×1 MPConv
    projection."""

    def __init__(self, channels: int, context_channels: int, heads: int):
        super().__init__()
        self.heads, self.context_channels = heads, context_channels
        self.q = MPConv(channels, channels, (1, 1))
        self.kv = MPConv(context_channels, 2 * channels)
        self.proj = MPConv(channels, channels, (1, 1))

    def forward(self, x: Tensor, context: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        B, C, H, W = x.shape
        check_context(context, mask, B, self.context_channels)
        q = normalize(self.q(x).reshape(B, self.heads, C // self.heads, H * W), dim=2).transpose(-1, -2)
        kv = self.kv(context.to(x.dtype)).reshape(B, context.shape[1], 2, self.heads, C // self.heads)
        k, v = normalize(kv, dim=4).permute(2, 0, 3, 1, 4)  # (B, heads, L, d) each
        y = masked_attention(q, k, v, mask).transpose(-1, -2)  # (B, heads, d, HW)
        return self.proj(y.reshape(B, C, H, W))


class Block(nn.Module):
    """x (B, cin, H, W), emb (B, c_emb) → (B, cout, H', W'):

        x ← resample(x);  enc: x ← pixel_norm(skip(x))
        y = conv₁(mp_silu(conv₀(mp_silu(x)) · (1 + emb_gain·MPConv(emb))))   (dropout before conv₁)
        dec: x ← skip(x);  x ← mp_sum(x, y, 0.3);  [x ← mp_sum(x, attention(x), 0.3)];  [cross-attention alike]
        x ← clip(x, ±256)

    skip: a 1×1 MPConv when cin ≠ cout; emb_gain starts at 0. `takes_skip`: the decoder feeds it mp_cat(x, skip).
    """

    def __init__(self, cin: int, cout: int, emb_channels: int, flavor: str, resample_mode: str = "keep", *,
                 heads: int = 0, dropout: float = 0.0, context_channels: int = 0, cross_heads: int = 1,
                 takes_skip: bool = False):
        super().__init__()
        if flavor not in ("enc", "dec") or resample_mode not in RESAMPLE_MODES:
            raise ValueError(f"Block: flavor={flavor!r} must be 'enc' or 'dec', resample_mode={resample_mode!r} "
                             f"one of {list(RESAMPLE_MODES)}")
        self.flavor, self.resample_mode, self.dropout, self.takes_skip = flavor, resample_mode, dropout, takes_skip
        self.conv_skip = MPConv(cin, cout, (1, 1)) if cin != cout else None
        self.conv_res0 = MPConv(cout if flavor == "enc" else cin, cout, (3, 3))
        self.emb_linear = MPConv(emb_channels, cout)
        self.emb_gain = nn.Parameter(torch.zeros(()))
        self.conv_res1 = MPConv(cout, cout, (3, 3))
        self.attention = SelfAttention(cout, heads) if heads else None
        self.cross = CrossAttention(cout, context_channels, cross_heads) if context_channels else None

    def forward(self, x: Tensor, emb: Tensor, context: Context = None) -> Tensor:
        x = resample(x, self.resample_mode)
        if self.flavor == "enc":
            if self.conv_skip is not None:
                x = self.conv_skip(x)
            x = normalize(x, dim=1)
        y = self.conv_res0(mp_silu(x))
        c = self.emb_linear(emb, gain=self.emb_gain) + 1
        y = mp_silu(y * c[:, :, None, None].to(y.dtype))
        if self.training and self.dropout:
            y = F.dropout(y, self.dropout)
        y = self.conv_res1(y)
        if self.flavor == "dec" and self.conv_skip is not None:
            x = self.conv_skip(x)
        x = mp_sum(x, y, RESIDUAL_BALANCE)
        if self.attention is not None:
            x = mp_sum(x, self.attention(x), ATTENTION_BALANCE)
        if self.cross is not None:
            x = mp_sum(x, self.cross(x, *context), ATTENTION_BALANCE)
        return x.clamp(-CLIP_ACTIVATION, CLIP_ACTIVATION)


# --------------------------------------------------------------------------------------------------
# The network
# --------------------------------------------------------------------------------------------------
def cross_resolutions(config) -> Tuple[int, ...]:
    """Resolutions with cross-attention to the caption: none without a text encoder; else
    model.cross_attn_resolutions (None: model.attn_resolutions)."""
    m = config.model
    if not text_conditioned(config):
        return ()
    return tuple(m.attn_resolutions if m.cross_attn_resolutions is None else m.cross_attn_resolutions)


def check_options(config) -> None:
    """Raise ValueError naming the key when the EDM2 U-Net cannot be built from config."""
    m, d = config.model, config.data
    levels = len(m.ch_mult)
    if m.nf < 1:
        raise ValueError(f"model.nf={m.nf} must be ≥ 1")
    if levels < 1 or min(m.ch_mult) < 1:
        raise ValueError(f"model.ch_mult={tuple(m.ch_mult)} needs one width multiplier ≥ 1 per level")
    if m.num_res_blocks < 0:
        raise ValueError(f"model.num_res_blocks={m.num_res_blocks} must be ≥ 0")
    if not 0.0 <= m.dropout < 1.0:
        raise ValueError(f"model.dropout={m.dropout} must lie in [0, 1)")
    if not m.conditional:
        raise ValueError("model.conditional=False: the EDM2 U-Net always embeds the noise level (set it to True)")
    if m.num_classes < 0:
        raise ValueError(f"model.num_classes={m.num_classes} must be ≥ 0")
    if d.image_size % 2 ** (levels - 1):
        raise ValueError(f"data.image_size={d.image_size} cannot be halved {levels - 1} times for "
                         f"model.ch_mult={tuple(m.ch_mult)}")
    resolutions = [d.image_size >> level for level in range(levels)]
    widths = dict(zip(resolutions, (m.nf * k for k in m.ch_mult)))
    for key, wanted in (("attn_resolutions", tuple(m.attn_resolutions)), ("cross_attn_resolutions",
                                                                          cross_resolutions(config))):
        unreachable = [r for r in wanted if r not in resolutions]
        if unreachable:
            raise ValueError(f"model.{key} has {unreachable}, which the network never reaches (its resolutions are "
                             f"{resolutions})")
    attended = {resolutions[-1]} | set(m.attn_resolutions)  # the lowest resolution always has attention
    for r in sorted(attended, reverse=True):
        attention_heads(widths[r], m.attention_head_dim)  # ValueError naming the key unless it splits the width
    for r in cross_resolutions(config):
        if m.cross_attn_heads < 1 or widths[r] % m.cross_attn_heads:
            raise ValueError(f"model.cross_attn_heads={m.cross_attn_heads} does not divide the width {widths[r]} of "
                             f"the cross-attention at resolution {r}")


# The largest std of x_t (the SDE's prior_std, of unit-variance data) the network may see without EDM's c_in:
# variance-preserving processes (VP, sub-VP, rectified flow) stay near 1, variance-exploding ones grow to σ_max
MAX_UNSCALED_STD = 2.0


def check_config(config) -> None:
    """check_options, and the network's inputs: the noise condition must be EDM's c_noise = ¼·ln σ (its Fourier
    features expect an O(1) input), and x_t must reach it at unit scale (EDM's c_in, or a variance-preserving
    process)."""
    check_options(config)
    name, conditioning = resolved_names(config)
    if conditioning != "log_sigma":
        raise ValueError(f"model.name='edm2' takes EDM's noise input ¼·ln σ, and model.noise_conditioning resolves "
                         f"to {conditioning!r}: set model.noise_conditioning='log_sigma' (with "
                         "model.parameterization='edm', as configs/edm2_digits.py)")
    prior_std = sde_from_config(config).prior_std
    if name != "edm" and prior_std > MAX_UNSCALED_STD:
        raise ValueError(f"model.name='edm2' expects unit-variance inputs, and training.sde={config.training.sde!r} "
                         f"(x_T with std {prior_std:.3g}) with model.parameterization={name!r} gives it x_t unscaled: "
                         "set model.parameterization='edm' (its c_in scales x_t)")


@register_model("edm2")
class EDM2UNet(nn.Module):
    """x (B, C, H, W), noise condition (B,) and optional class labels (B,) (null label: num_classes) or caption
    token ids (B, L) → output (B, C, H, W); `log_variance(noise condition) → (B,)`. See the module docstring."""

    check_config = staticmethod(check_config)

    def __init__(self, config):
        super().__init__()
        check_options(config)
        m, d = config.model, config.data
        widths = [m.nf * k for k in m.ch_mult]
        c_emb = max(widths)
        self.centered, self.num_classes = d.centered, m.num_classes
        self.noise_fourier = MPFourier(m.nf)
        self.noise_linear = MPConv(m.nf, c_emb)
        self.class_linear = MPConv(m.num_classes, c_emb) if m.num_classes else None
        self.text = build_text_conditioning(config, c_emb)
        crossed, text_width = cross_resolutions(config), context_dim(config) if self.text is not None else 0

        def block(cin: int, cout: int, flavor: str, resolution: int, resample_mode: str = "keep",
                  attention: bool = False, takes_skip: bool = False) -> Block:
            return Block(cin, cout, c_emb, flavor, resample_mode, heads=attention_heads(cout, m.attention_head_dim) if
                         attention else 0, dropout=m.dropout, takes_skip=takes_skip, cross_heads=m.cross_attn_heads,
                         context_channels=text_width if resolution in crossed else 0)

        self.conv_in = MPConv(d.num_channels + 1, widths[0], (3, 3))
        self.encoder = nn.ModuleList()
        skips: List[int] = [widths[0]]
        cout = widths[0]
        for level, width in enumerate(widths):
            r = d.image_size >> level
            if level > 0:
                self.encoder.append(block(cout, cout, "enc", r, "down"))
                skips.append(cout)
            for _ in range(m.num_res_blocks):
                cin, cout = cout, width
                self.encoder.append(block(cin, cout, "enc", r, attention=r in m.attn_resolutions))
                skips.append(cout)

        self.decoder = nn.ModuleList()
        for level, width in reversed(list(enumerate(widths))):
            r = d.image_size >> level
            if level == len(widths) - 1:
                self.decoder.append(block(cout, cout, "dec", r, attention=True))
                self.decoder.append(block(cout, cout, "dec", r))
            else:
                self.decoder.append(block(cout, cout, "dec", r, "up"))
            for _ in range(m.num_res_blocks + 1):
                cin, cout = cout + skips.pop(), width
                self.decoder.append(block(cin, cout, "dec", r, attention=r in m.attn_resolutions, takes_skip=True))
        assert not skips, "every skip connection is consumed"
        self.conv_out = MPConv(cout, d.num_channels, (3, 3))
        self.out_gain = nn.Parameter(torch.zeros(()))

        self.logvar_fourier = MPFourier(LOGVAR_CHANNELS)
        self.logvar_linear = MPConv(LOGVAR_CHANNELS, 1)

    def embedding(self, cond: Tensor, y: Optional[Tensor], batch: int, device) -> Tuple[Tensor, Context]:
        """emb = mp_silu(mp_sum(noise embedding, class or pooled caption embedding, 0.5)) (B, c_emb), and the text
        context of the cross-attention (None without a text encoder)."""
        emb = self.noise_linear(self.noise_fourier(cond))
        if self.text is not None:
            features, pooled = self.text(y, batch, device)
            return mp_silu(mp_sum(emb, normalize(pooled).to(emb.dtype), EMBEDDING_BALANCE)), (features.context,
                                                                                             features.mask)
        if self.class_linear is None:
            if y is not None:
                raise ValueError("class labels given to a network without a label embedding: build it with "
                                 "model.num_classes > 0")
            return mp_silu(emb), None
        if y is None:
            y = torch.full((batch,), self.num_classes, dtype=torch.long, device=device)
        one_hot = F.one_hot(y, self.num_classes + 1)[:, :self.num_classes]  # the null label → the zero vector
        labels = self.class_linear(one_hot.to(emb.dtype) * math.sqrt(self.num_classes))
        return mp_silu(mp_sum(emb, labels, EMBEDDING_BALANCE)), None

    def forward(self, x: Tensor, cond: Tensor, y: Optional[Tensor] = None) -> Tensor:
        """y: (B,) class labels of a class-conditional network, or (B, L) caption token ids of a text-conditioned
        one (None: the null label or the empty caption)."""
        emb, context = self.embedding(cond, y, x.shape[0], x.device)
        if not self.centered:
            x = 2 * x - 1.0  # data in [0, 1] → [−1, 1]
        x = self.conv_in(torch.cat([x, torch.ones_like(x[:, :1])], dim=1))
        skips = [x]
        for block in self.encoder:
            x = block(x, emb, context)
            skips.append(x)
        for block in self.decoder:
            if block.takes_skip:
                x = mp_cat(x, skips.pop(), CONCAT_BALANCE)
            x = block(x, emb, context)
        return self.conv_out(x, gain=self.out_gain)

    def log_variance(self, cond: Tensor) -> Tensor:
        """The learned uncertainty u (B,) at noise condition cond (B,): MPConv-linear of its 128 Fourier features."""
        return self.logvar_linear(self.logvar_fourier(cond)).reshape(-1)
