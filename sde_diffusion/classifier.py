"""Noise-conditional classifiers p_t(y | x_t) for classifier guidance (Dhariwal & Nichol 2021; Song et al. 2021 §5).

A classifier sees x_t = α(t)x_0 + σ(t)z at a random t and the noise condition of the SDE (as a score network does),
and is trained with cross-entropy against the label of x_0 (`classifier_loss`). Its input is divided by
√(α(t)² + σ(t)²), the scale of x_t for unit-variance data, so that VE states (σ up to σ_max) reach it at the same
scale as VP ones. `grad_log_p_y_fn` turns it into ∇ₓ log p_t(y | x) by autograd, the term that
`guidance.classifier` adds to a score.

Networks (`create_classifier`, from config.classifier and config.model's embedding options):
  images  the encoder half of the DDPM U-Net (conv, down levels, middle block), GroupNorm, act, global mean pool,
          linear → logits;
  vectors the residual MLP of models/mlp.py with a linear head → logits.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn
import torch.nn.functional as F

from .data.datasets import declared_classes, is_image_data
from .errors import ConfigError, positive
from .models import layers
from .models.layerspp import group_norm, ncsnpp_groups
from .models.mlp import ResidualMLPBlock
from .models.ncsnpp import Blocks, DownLevel, MiddleBlock, UNetOptions, check_resolutions
from .models.score_fn import Labels, batch_labels
from .parameterization import noise_condition
from .sdes import SDE, batch_time, per_sample

CLASSIFIER_DIR = "classifier"  # workdir/classifier/{checkpoint.pth, report.json}
CLASSIFIER_CHECKPOINT = "checkpoint.pth"


def checkpoint_path(workdir) -> Path:
    return Path(workdir) / CLASSIFIER_DIR / CLASSIFIER_CHECKPOINT


def encoder_options(config) -> UNetOptions:
    """The U-Net encoder's structure from config.classifier (nf, ch_mult, num_res_blocks, attn_resolutions, dropout),
    config.model (nonlinearity, embedding_type, fourier_scale) and config.data."""
    c, m, d = config.classifier, config.model, config.data
    return UNetOptions(image_size=d.image_size, channels=d.num_channels, centered=d.centered, nf=c.nf,
                       ch_mult=tuple(c.ch_mult), num_res_blocks=c.num_res_blocks,
                       attn_resolutions=tuple(c.attn_resolutions), dropout=c.dropout, resamp_with_conv=True,
                       conditional=True, nonlinearity=m.nonlinearity, embedding_type=m.embedding_type.lower(),
                       fourier_scale=m.fourier_scale, resblock_type="ddpm", skip_rescale=False,
                       groups=ncsnpp_groups)


def check_encoder(config) -> None:
    """Raise ValueError naming the classifier.* key when the U-Net encoder cannot be built from config."""
    o = encoder_options(config)
    check_resolutions(o, "classifier")
    with torch.device("meta"):
        EncoderClassifier(o, num_classes=2)  # every width and GroupNorm group count


class EncoderClassifier(nn.Module):
    """x (B, C, H, W) and noise condition (B,) → logits (B, num_classes): the U-Net's down path and middle block."""

    def __init__(self, o: UNetOptions, num_classes: int):
        super().__init__()
        make = Blocks(o)
        self.act, nf = make.act, o.nf
        embed_dim = 2 * nf if o.embedding_type == "fourier" else nf
        self.embed = layers.NoiseEmbedding(o.embedding_type, embed_dim, o.fourier_scale)
        self.temb = nn.Sequential(layers.linear(embed_dim, make.temb_dim), make.act,
                                  layers.linear(make.temb_dim, make.temb_dim))
        self.conv_in = layers.conv3x3(o.channels, nf)
        self.down, ch = nn.ModuleList(), nf
        for i, mult in enumerate(o.ch_mult):
            last = i == len(o.ch_mult) - 1
            self.down.append(DownLevel(make, ch, nf * mult, o.resolutions[i] in o.attn_resolutions, last, None))
            ch = nf * mult
        self.mid = MiddleBlock(make, ch)
        self.norm_out = group_norm(ch, o.groups)
        self.head = layers.linear(ch, num_classes)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        temb = self.temb(self.embed(cond))
        h, skips = self.conv_in(x), []
        for level in self.down:
            h, _ = level(h, temb, skips, None)
        h = self.act(self.norm_out(self.mid(h, temb)))
        return self.head(h.mean(dim=(2, 3)))


class MLPClassifier(nn.Module):
    """x (B, d) and noise condition (B,) → logits (B, num_classes): residual MLP blocks with the noise embedding."""

    def __init__(self, config, num_classes: int):
        super().__init__()
        c, m = config.classifier, config.model
        width = c.nf
        self.embed = layers.NoiseEmbedding(m.embedding_type.lower(), width, m.fourier_scale)
        self.emb_mlp = nn.Sequential(layers.linear(width, 2 * width), layers.get_act(m.nonlinearity),
                                     layers.linear(2 * width, 2 * width))
        self.input = layers.linear(config.data.dim, width)
        self.blocks = nn.ModuleList(ResidualMLPBlock(width, 2 * width, layers.get_act(m.nonlinearity))
                                    for _ in range(c.num_res_blocks))
        self.out_norm = nn.LayerNorm(width)
        self.act = layers.get_act(m.nonlinearity)
        self.head = layers.linear(width, num_classes)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        emb = self.emb_mlp(self.embed(cond))
        h = self.input(x)
        for block in self.blocks:
            h = block(h, emb)
        return self.head(self.act(self.out_norm(h)))


def create_classifier(config, num_classes: int) -> nn.Module:
    """The classifier for config.data: the U-Net encoder for images (for the latents of a latent model), the
    residual MLP for vectors."""
    if is_image_data(config):
        from .latent import network_config
        return EncoderClassifier(encoder_options(network_config(config)), num_classes)
    return MLPClassifier(config, num_classes)


def classifier_logits(model: nn.Module, sde: SDE, x: torch.Tensor, t) -> torch.Tensor:
    """Logits (B, num_classes) of p_t(y | x) for x_t (B, ...) at time t (float or (B,)): the input is divided by
    √(α² + σ²) and the network sees the SDE's continuous noise conditioning (parameterization.noise_condition)."""
    t = batch_time(t, x)
    scale = torch.sqrt(sde.alpha(t) ** 2 + sde.sigma(t) ** 2).to(x.dtype)
    return model(x / per_sample(scale, x), noise_condition(sde, t))


def noisy_inputs(sde: SDE, x0: torch.Tensor, eps: float, generator: Optional[torch.Generator] = None):
    """x_t = α(t)x_0 + σ(t)z with t ~ U(eps, T): returns (x_t, t)."""
    t = torch.rand(x0.shape[0], generator=generator, device=x0.device, dtype=x0.dtype) * (sde.T - eps) + eps
    z = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    mean, std = sde.marginal_prob(x0, t)
    return mean + per_sample(std, x0) * z, t


def classifier_loss(model: nn.Module, sde: SDE, x0: torch.Tensor, labels: torch.Tensor, *, eps: float = 1e-5,
                    generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Mean cross-entropy −log p_t(y | x_t) over the batch at x_t ~ p_t(x_t | x_0), t ~ U(eps, T) (a scalar)."""
    x_t, t = noisy_inputs(sde, x0, eps, generator)
    return F.cross_entropy(classifier_logits(model, sde, x_t, t), labels)


@torch.no_grad()
def accuracy(model: nn.Module, sde: SDE, x0: torch.Tensor, labels: torch.Tensor, t: float,
             generator: Optional[torch.Generator] = None) -> float:
    """Fraction of x_t ~ p_t(x_t | x_0) at the fixed time t classified as their labels."""
    z = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    mean, std = sde.marginal_prob(x0, torch.full((x0.shape[0],), t, dtype=x0.dtype, device=x0.device))
    logits = classifier_logits(model, sde, mean + per_sample(std, x0) * z, t)
    return (logits.argmax(1) == labels).double().mean().item()


def grad_log_p_y_fn(sde: SDE, model: nn.Module, labels: Labels) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """grad_log_p_y(x, t) = ∇ₓ log_softmax(logits(x_t, t))[y] for the wanted labels ((B,) or one int), like x.

    Works inside samplers' torch.no_grad(); the classifier's own parameters get no gradient.
    """

    def grad_log_p_y(x: torch.Tensor, t) -> torch.Tensor:
        with torch.enable_grad():
            x_in = x.detach().requires_grad_(True)
            log_p = torch.log_softmax(classifier_logits(model, sde, x_in, t), dim=1)
            chosen = log_p.gather(1, batch_labels(labels, x)[:, None]).sum()
            return torch.autograd.grad(chosen, x_in)[0].detach()

    return grad_log_p_y


def check_config(config) -> None:
    """The classifier.* keys, and for labelled image data that the encoder builds. Raises ConfigError."""
    c = config.classifier
    for key in ("nf", "num_res_blocks", "n_iters", "lr", "log_freq"):
        positive(f"classifier.{key}", c[key])
    if not 0.0 <= c.dropout < 1.0:
        raise ConfigError(f"classifier.dropout must lie in [0, 1), got {c.dropout}")
    if declared_classes(config) != 0 and is_image_data(config):
        try:
            check_encoder(config)
        except ValueError as err:
            raise ConfigError(f"config.classifier cannot be built: {err}") from err
