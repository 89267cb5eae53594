"""Latent score-based models: the diffusion runs on z = scale · E(x), the latents of a frozen first-stage
autoencoder, and samples are decoded, x = D(z / scale).

`scale` makes the training latents unit-variance (latent diffusion's rule): 1 / std of the latents of the first
LATENT_SCALE_IMAGES training images, measured once when training starts and stored in every checkpoint (with the
first stage's fingerprint, so a checkpoint is never decoded by another autoencoder). First stages take and return
images in [−1, 1]:

- `TrainedAutoencoder`: our KL autoencoder of `--mode train_autoencoder` (models/autoencoder.py);
- `DiffusersAutoencoder`: a diffusers `AutoencoderKL` folder on disk (the Stable Diffusion VAE format);
- any object with `encode(x) → z`, `decode(z) → x`, `latent_shape(image_shape)` and `fingerprint`.

`LatentDataset` wraps an image dataset so that everything downstream (loss, samplers, guidance, eval) sees
latents as its data, while `from_model` decodes to [0, 1] images for pictures and FID.
"""
from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Dict, Iterator, Optional, Sequence, Tuple

import torch
from torch import nn

from .checkpoints import files_sha256
from .errors import CheckpointError, ConfigError

log = logging.getLogger("sde_diffusion")

LATENT_SCALE_IMAGES = 1024  # training images whose latents set the scale
ENCODE_CHUNK = 256  # images per encoder / decoder call
AUTOENCODER_FOLDER = "autoencoder"  # <workdir>/autoencoder/: --mode train_autoencoder's outputs
AUTOENCODER_FILE = "autoencoder.pth"


# --------------------------------------------------------------------------------------------------
# First stages
# --------------------------------------------------------------------------------------------------
class TrainedAutoencoder:
    """Our KLAutoencoder as a frozen first stage: encode gives the posterior mean."""

    def __init__(self, model: nn.Module, fingerprint: str):
        self.model = model.eval().requires_grad_(False)
        self.fingerprint = fingerprint

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.encode(x).mean

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.model.decode(z)

    def latent_shape(self, image_shape: Sequence[int]) -> Tuple[int, int, int]:
        return self.model.latent_shape(image_shape)

    def to(self, device) -> "TrainedAutoencoder":
        self.model.to(device)
        return self


def diffusers_vae_folder(path) -> Optional[Path]:
    """The AutoencoderKL folder at `path` (itself, or its vae/ sub-folder as in a pipeline folder), or None."""
    path = Path(path)
    for folder in (path, path / "vae"):
        config = folder / "config.json"
        if config.is_file():
            try:
                if json.loads(config.read_text()).get("_class_name") == "AutoencoderKL":
                    return folder
            except json.JSONDecodeError:
                continue
    return None


def folder_fingerprint(folder: Path) -> str:
    """SHA-256 over the names and bytes of a folder's weight and config files (`checkpoints.files_sha256`)."""
    return files_sha256(sorted(f for f in folder.iterdir() if f.suffix in (".safetensors", ".bin", ".json")))


class DiffusersAutoencoder:
    """A diffusers AutoencoderKL loaded from a local folder (no download), frozen: encode gives the posterior mean
    (latent_dist.mean), decode the decoder's sample. Its own `scaling_factor` is not used: the scale is measured."""

    def __init__(self, folder):
        try:
            from diffusers import AutoencoderKL
        except ImportError as err:
            raise ConfigError("model.autoencoder.pretrained names a diffusers AutoencoderKL folder, which needs the "
                              "diffusers package: pip install diffusers") from err
        self.folder = Path(folder)
        self.vae = AutoencoderKL.from_pretrained(self.folder, local_files_only=True).eval().requires_grad_(False)
        self.fingerprint = folder_fingerprint(self.folder)
        cfg = self.vae.config
        self.in_channels, self.latent_channels = cfg.in_channels, cfg.latent_channels
        self.downsample = 2 ** (len(cfg.block_out_channels) - 1)

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.vae.encode(x).latent_dist.mean

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(z).sample

    def latent_shape(self, image_shape: Sequence[int]) -> Tuple[int, int, int]:
        _, h, w = image_shape
        return self.latent_channels, h // self.downsample, w // self.downsample

    def to(self, device) -> "DiffusersAutoencoder":
        self.vae.to(device)
        return self


def autoencoder_path(config, workdir) -> Path:
    """Where the first stage comes from: model.autoencoder.pretrained, else <workdir>/autoencoder/autoencoder.pth."""
    pretrained = config.model.autoencoder.pretrained
    if pretrained:
        return Path(pretrained).expanduser()
    if workdir is None:
        raise ConfigError("model.latent=True needs a first stage: set model.autoencoder.pretrained, or pass the "
                          "--workdir whose autoencoder/ --mode train_autoencoder wrote")
    return Path(workdir) / AUTOENCODER_FOLDER / AUTOENCODER_FILE


def latent_geometry(config) -> Tuple[int, int]:
    """(channels, downsampling factor f) of the first stage config describes: of the diffusers folder
    model.autoencoder.pretrained names, else of model.autoencoder's own keys."""
    a = config.model.autoencoder
    folder = diffusers_vae_folder(a.pretrained) if a.pretrained else None
    if folder is not None:
        cfg = json.loads((folder / "config.json").read_text())
        return cfg.get("latent_channels", 4), 2 ** (len(cfg.get("block_out_channels", (0,))) - 1)
    return a.latent_channels, a.downsample


def network_config(config):
    """A copy of config whose data section describes the latents (image_size, num_channels, centered=True): the
    score network and a classifier are built from it."""
    if not config.model.latent:
        return config
    channels, f = latent_geometry(config)
    latent = copy.deepcopy(config)
    size = config.data.image_size // f
    with latent.unlocked():
        latent.data.image_size, latent.data.num_channels, latent.data.centered = size, channels, True
    return latent


def check_config(config) -> None:
    """model.latent and model.autoencoder: image data, the autoencoder's keys, an existing pretrained path, and the
    measures a latent model cannot report (bits/dim of pixels, pixel-space inpainting). Raises ConfigError."""
    from .data.datasets import is_image_data
    from .models.autoencoder import check_config as check_autoencoder
    m, e, s = config.model, config.eval, config.sampling
    try:
        check_autoencoder(config)
    except ValueError as err:
        raise ConfigError(str(err)) from err
    if e.enable_latent_nll and not m.latent:
        raise ConfigError("eval.enable_latent_nll=True is the NLL of a latent model's latents: set model.latent=True, "
                          "or use eval.enable_bpd for a pixel model")
    if not m.latent:
        return
    if not is_image_data(config):
        raise ConfigError(f"model.latent=True encodes images, but data.dataset={config.data.dataset!r} is vector data")
    pretrained = m.autoencoder.pretrained
    if pretrained and not Path(pretrained).expanduser().exists():
        raise ConfigError(f"model.autoencoder.pretrained={pretrained!r} does not exist: give a local diffusers "
                          "AutoencoderKL folder or an autoencoder.pth of --mode train_autoencoder")
    if e.enable_bpd:
        raise ConfigError("eval.enable_bpd=True: bits/dim needs a likelihood of the pixels, and a latent model has "
                          "none (its decoder is a deterministic map, not a likelihood model). Set "
                          "eval.enable_bpd=False; eval.enable_latent_nll=True reports the NLL of the test images' "
                          "latents instead")
    if s.inpaint_mask is not None or s.colorize:
        raise ConfigError("inpainting and colourization constrain pixels, which a latent model does not sample: "
                          "use a pixel-space model for them (a constraint on latents works through "
                          "sampling.sample(constraint=...))")
    _, f = latent_geometry(config)
    if config.data.image_size % f:
        raise ConfigError(f"data.image_size={config.data.image_size} is not divisible by the first stage's "
                          f"downsampling factor {f}")


def load_first_stage(config, workdir, device):
    """The frozen first stage on `device` (see autoencoder_path); errors name the file and what to run."""
    from .checkpoints import load_checkpoint
    from .models.autoencoder import KLAutoencoder, options_from_config
    path = autoencoder_path(config, workdir)
    if path.is_dir():
        folder = diffusers_vae_folder(path)
        if folder is None:
            raise ConfigError(f"model.autoencoder.pretrained={str(path)!r} holds no diffusers AutoencoderKL (a "
                              "config.json with _class_name AutoencoderKL, itself or in vae/): give such a folder or "
                              "an autoencoder.pth written by --mode train_autoencoder")
        stage = DiffusersAutoencoder(folder)
        if stage.in_channels != config.data.num_channels:
            raise ConfigError(f"the autoencoder in {folder} takes {stage.in_channels}-channel images, but "
                              f"data.num_channels={config.data.num_channels}: use data.convert_channels or another "
                              "autoencoder")
        return stage.to(device)
    if not path.is_file():
        raise CheckpointError(f"model.latent=True needs the first-stage autoencoder {path}, which does not exist: run "
                              "--mode train_autoencoder first (same --workdir and config), or set "
                              "model.autoencoder.pretrained")
    checkpoint = load_checkpoint(path, device)
    options = options_from_config(config)
    if checkpoint.get("options") != options.__dict__:
        raise ConfigError(f"{path} was trained with model.autoencoder options {checkpoint.get('options')}, but this "
                          f"config builds {options.__dict__}: set model.autoencoder.* to the trained ones")
    model = KLAutoencoder(options)
    model.load_state_dict(checkpoint["model"], strict=True)
    return TrainedAutoencoder(model, checkpoint["fingerprint"]).to(device)


# --------------------------------------------------------------------------------------------------
# Latents as data
# --------------------------------------------------------------------------------------------------
class LatentDataset:
    """An image dataset seen through a first stage: batches are scaled latents (B, c, h, w) on the first stage's
    device; `from_model` decodes latents to [0, 1] images. Everything else (test images for FID, labels,
    levels) is the image dataset's."""

    is_image = True

    def __init__(self, images, first_stage, device):
        self.images, self.first_stage, self.device = images, first_stage, torch.device(device)
        self.shape = tuple(first_stage.latent_shape(images.shape))
        self.scale: Optional[float] = None

    def __getattr__(self, name):  # test, test_labels, num_levels, … of the image dataset
        if name in ("images", "first_stage"):
            raise AttributeError(name)
        return getattr(self.images, name)

    # scale ---------------------------------------------------------------------------------------
    def measure_scale(self, num_images: int = LATENT_SCALE_IMAGES) -> float:
        """scale = 1 / std of the (unscaled) latents of the first num_images training images, in order."""
        latents, count = [], 0
        for x in self.images.eval_batches(ENCODE_CHUNK, "train"):
            x = x[:num_images - count]
            latents.append(self._encode(x).double().flatten())
            count += len(x)
            if count >= num_images:
                break
        std = float(torch.cat(latents).std())
        if not std > 0:
            raise ConfigError(f"the first stage's latents of the training images have std {std}: the autoencoder "
                              "maps every image to the same latent (retrain it)")
        self.scale = 1.0 / std
        log.info("latent scale %.5g (1 / std of the latents of %d training images)", self.scale, count)
        return self.scale

    def _require_scale(self) -> float:
        if self.scale is None:
            raise RuntimeError("the latent scale is unknown: measure_scale() before training, or restore() it "
                               "from a checkpoint")
        return self.scale

    def restore(self, checkpoint: Dict) -> None:
        """Take the scale a training checkpoint recorded, after checking it was trained on this first stage."""
        state = checkpoint.get("data", {})
        if "latent_scale" not in state:
            raise CheckpointError("this checkpoint was not trained as a latent model (no latent scale recorded): set "
                                  "model.latent=False for it")
        if state["first_stage"] != self.first_stage.fingerprint:
            raise CheckpointError("this checkpoint was trained on the latents of another first stage (fingerprint "
                                  f"{state['first_stage'][:12]}…, this one {self.first_stage.fingerprint[:12]}…): "
                                  "point model.autoencoder.pretrained at the autoencoder it was trained with")
        self.scale = float(state["latent_scale"])

    # pixels ↔ latents -------------------------------------------------------------------------------
    def _encode(self, x_model: torch.Tensor) -> torch.Tensor:
        """Image-model-space batch → unscaled latents."""
        pixels = 2.0 * self.images.from_model(x_model.to(self.device)) - 1.0
        return torch.cat([self.first_stage.encode(chunk) for chunk in pixels.split(ENCODE_CHUNK)])

    def encode(self, x_model: torch.Tensor) -> torch.Tensor:
        """Image batch in the image dataset's model space → scaled latents."""
        return self._encode(x_model) * self._require_scale()

    def to_model(self, x: torch.Tensor) -> torch.Tensor:
        """[0, 1] images → scaled latents."""
        return self.encode(self.images.to_model(x))

    def from_model(self, z: torch.Tensor) -> torch.Tensor:
        """Scaled latents → decoded images in [0, 1] (unclipped)."""
        z = z.to(self.device) / self._require_scale()
        pixels = torch.cat([self.first_stage.decode(chunk) for chunk in z.split(ENCODE_CHUNK)])
        return (pixels + 1.0) / 2.0

    # batches ---------------------------------------------------------------------------------------
    def train_batch(self, with_labels: bool = False, with_indices: bool = False):
        batch = self.images.train_batch(with_labels=with_labels, with_indices=with_indices)
        if with_labels or with_indices:
            x, labels = batch
            return self.encode(x), labels
        return self.encode(batch)

    def eval_batches(self, batch_size: int, split: str = "test", with_labels: bool = False) -> Iterator:
        for batch in self.images.eval_batches(batch_size, split, with_labels=with_labels):
            if with_labels:
                yield self.encode(batch[0]), batch[1]
            else:
                yield self.encode(batch)

    def state_dict(self) -> Dict:
        return {**self.images.state_dict(), "latent_scale": self._require_scale(),
                "first_stage": self.first_stage.fingerprint}

    def load_state_dict(self, state: Dict) -> None:
        self.images.load_state_dict(state)
        self.restore({"data": state})


def evaluate_latent_nll(score_fn, sde, dataset: LatentDataset, config, device,
                        generator: Optional[torch.Generator] = None) -> Dict[str, float]:
    """−log p(z) of the scaled latents of eval.bpd_dataset's images by the probability-flow ODE (the eval.bpd_*
    tolerances, divergence and batch limit): latent_nll in nats and latent_nll_bits per latent dimension, its
    standard error, the number of images and the mean NFE per batch. A density of the latents, not of the
    pixels: it is comparable between latent models on the same first stage only."""
    import math
    from .likelihood import log_likelihood
    e = config.eval
    values, nfes = [], []
    for b, z in enumerate(dataset.eval_batches(e.batch_size, e.bpd_dataset)):
        if e.bpd_num_batches is not None and b >= e.bpd_num_batches:
            break
        logp, _, nfe = log_likelihood(score_fn, sde, z.to(device), divergence=e.bpd_divergence, rtol=e.bpd_rtol,
                                      atol=e.bpd_atol, eps=e.bpd_eps, generator=generator)
        values.append((-logp / z[0].numel()).double().cpu())
        nfes.append(nfe)
    values = torch.cat(values)
    std_error = float(values.std()) / math.sqrt(len(values)) if len(values) > 1 else float("nan")
    return {"latent_nll": float(values.mean()), "latent_nll_bits": float(values.mean()) / math.log(2),
            "latent_nll_std": std_error, "latent_nll_count": len(values), "latent_nll_nfe": sum(nfes) / len(nfes)}
