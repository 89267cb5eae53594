"""The first stage of a latent score-based model: a KL-regularised convolutional autoencoder.

    encoder: x (B, C, H, W) → q(z | x) = N(μ(x), diag σ²(x)),  z of shape (B, c, H/f, W/f)
    decoder: z → x̂ (B, C, H, W)
    loss:    mean over pixels of |x − x̂| (l1) or (x − x̂)² (l2)  +  kl_weight · KL(q(z|x) ‖ N(0, I)) / pixels

Both the reconstruction and the KL are per pixel, so kl_weight has latent diffusion's meaning (a summed
reconstruction plus kl_weight × a summed KL). f = 2^(levels − 1): every level but the last halves the resolution.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

LOGVAR_RANGE = (-30.0, 20.0)  # log σ² of the posterior is clamped here (exp stays finite in fp32)
DOWNSAMPLE_FACTORS = (1, 2, 4, 8)
DEFAULT_CH_MULT = (1, 2, 4, 4)  # widths of the levels (times nf) when model.autoencoder.ch_mult is not given
RECONSTRUCTION_LOSSES = ("l1", "l2")


def norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with up to 32 groups of at least 4 channels."""
    groups = max(1, min(32, channels // 4))
    while channels % groups:
        groups -= 1
    return nn.GroupNorm(groups, channels, eps=1e-6)


class ResBlock(nn.Module):
    """GroupNorm → SiLU → conv3×3, twice, plus the input (1×1 conv when the width changes)."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.norm1, self.conv1 = norm(in_ch), nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2, self.conv2 = norm(out_ch), nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class Downsample(nn.Module):
    """Stride-2 3×3 convolution: (B, C, H, W) → (B, C, H/2, W/2)."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour ×2, then a 3×3 convolution."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


@dataclass
class DiagonalGaussian:
    """q(z | x) = N(mean, diag exp(logvar)); tensors (B, c, h, w)."""

    mean: torch.Tensor
    logvar: torch.Tensor

    @property
    def std(self) -> torch.Tensor:
        return torch.exp(0.5 * self.logvar)

    def sample(self, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        noise = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * noise

    def kl(self) -> torch.Tensor:
        """KL(q ‖ N(0, I)) per example, summed over latent dimensions: (B,) nats."""
        return 0.5 * (self.mean ** 2 + self.logvar.exp() - 1.0 - self.logvar).flatten(1).sum(1)


@dataclass(frozen=True)
class AutoencoderOptions:
    channels: int  # image channels C
    nf: int = 64
    ch_mult: Tuple[int, ...] = (1, 2)  # f = 2^(len − 1)
    num_res_blocks: int = 1
    latent_channels: int = 4

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


def options_from_config(config) -> AutoencoderOptions:
    """config.model.autoencoder (nf, downsample, ch_mult, num_res_blocks, latent_channels) and data.num_channels."""
    a = config.model.autoencoder
    levels = int(round(math.log2(a.downsample))) + 1
    ch_mult = tuple(a.ch_mult) if a.ch_mult is not None else DEFAULT_CH_MULT[:levels]
    return AutoencoderOptions(channels=config.data.num_channels, nf=a.nf, ch_mult=ch_mult,
                              num_res_blocks=a.num_res_blocks, latent_channels=a.latent_channels)


def check_config(config) -> None:
    """model.autoencoder's own keys; raises ValueError naming the key."""
    a = config.model.autoencoder
    if a.downsample not in DOWNSAMPLE_FACTORS:
        raise ValueError(f"model.autoencoder.downsample must be one of {DOWNSAMPLE_FACTORS}, got {a.downsample}")
    levels = int(round(math.log2(a.downsample))) + 1
    if a.ch_mult is not None and len(a.ch_mult) != levels:
        raise ValueError(f"model.autoencoder.ch_mult={tuple(a.ch_mult)} has {len(a.ch_mult)} levels, but "
                         f"downsample={a.downsample} needs {levels} (one per halving, plus one): give {levels} "
                         "widths or leave ch_mult=None")
    for key in ("nf", "latent_channels", "num_res_blocks", "batch_size", "n_iters"):
        if a[key] < 1:
            raise ValueError(f"model.autoencoder.{key} must be ≥ 1, got {a[key]}")
    if a.kl_weight < 0:
        raise ValueError(f"model.autoencoder.kl_weight must be ≥ 0, got {a.kl_weight}")
    if a.loss not in RECONSTRUCTION_LOSSES:
        raise ValueError(f"model.autoencoder.loss must be one of {RECONSTRUCTION_LOSSES}, got {a.loss!r}")
    if config.data.image_size % a.downsample:
        raise ValueError(f"data.image_size={config.data.image_size} is not divisible by model.autoencoder."
                         f"downsample={a.downsample}")


def levels(widths: Sequence[int], num_res_blocks: int, resample) -> Tuple[nn.Sequential, int]:
    """num_res_blocks ResBlocks per width, `resample` (Downsample or Upsample) between levels; the blocks and the
    last width."""
    blocks, ch = [], widths[0]
    for level, width in enumerate(widths):
        for _ in range(num_res_blocks):
            blocks.append(ResBlock(ch, width))
            ch = width
        if level < len(widths) - 1:
            blocks.append(resample(ch))
    return nn.Sequential(*blocks), ch


class Encoder(nn.Module):
    def __init__(self, o: AutoencoderOptions):
        super().__init__()
        widths = [o.nf * m for m in o.ch_mult]
        self.conv_in = nn.Conv2d(o.channels, widths[0], 3, padding=1)
        self.blocks, ch = levels(widths, o.num_res_blocks, Downsample)
        self.mid = ResBlock(ch, ch)
        self.norm_out, self.conv_out = norm(ch), nn.Conv2d(ch, 2 * o.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> DiagonalGaussian:
        h = self.mid(self.blocks(self.conv_in(x)))
        mean, logvar = self.conv_out(F.silu(self.norm_out(h))).chunk(2, dim=1)
        return DiagonalGaussian(mean, logvar.clamp(*LOGVAR_RANGE))


class Decoder(nn.Module):
    def __init__(self, o: AutoencoderOptions):
        super().__init__()
        widths = [o.nf * m for m in o.ch_mult][::-1]
        ch = widths[0]
        self.conv_in = nn.Conv2d(o.latent_channels, ch, 3, padding=1)
        self.mid = ResBlock(ch, ch)
        self.blocks, ch = levels(widths, o.num_res_blocks, Upsample)
        self.norm_out, self.conv_out = norm(ch), nn.Conv2d(ch, o.channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.blocks(self.mid(self.conv_in(z)))
        return self.conv_out(F.silu(self.norm_out(h)))


class KLAutoencoder(nn.Module):
    """x (B, C, H, W) in the data's model scale ↔ latents (B, latent_channels, H/f, W/f)."""

    def __init__(self, options: AutoencoderOptions):
        super().__init__()
        self.options = options
        self.encoder, self.decoder = Encoder(options), Decoder(options)

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        return self.encoder(x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)

    def latent_shape(self, image_shape: Sequence[int]) -> Tuple[int, int, int]:
        _, h, w = image_shape
        f = self.options.downsample
        return self.options.latent_channels, h // f, w // f


def autoencoder_loss(model: KLAutoencoder, x: torch.Tensor, kl_weight: float, loss: str = "l1",
                     generator: Optional[torch.Generator] = None) -> Tuple[torch.Tensor, dict]:
    """The first stage's training loss on a batch x (B, C, H, W) (see the module docstring) and its parts
    (per-pixel reconstruction, KL per pixel) as tensors."""
    posterior = model.encode(x)
    x_hat = model.decode(posterior.sample(generator))
    error = (x - x_hat).abs() if loss == "l1" else (x - x_hat) ** 2
    reconstruction = error.mean()
    kl = posterior.kl().mean() / x[0].numel()
    return reconstruction + kl_weight * kl, {"reconstruction": reconstruction.detach(), "kl": kl.detach()}
