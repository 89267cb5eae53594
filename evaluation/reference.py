"""Reference Inception statistics of a dataset split, computed once from its uint8 images and cached.

The cache file name holds everything the numbers depend on — dataset, split, resolution, number of images and
the SHA-256 of the Inception weights — so statistics from other weights or another split are never reused. Its
.sha256 sidecar is checked at every load: a truncated or altered file is reported and computed again.
FIDs in the literature (and score_sde's) use the full training set; pass `limit` only for quick checks.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Dict, Optional

import numpy as np
import torch

from sde_diffusion.checkpoints import load_verified_npz, save_verified_npz

from .inception import InceptionNetwork, to_uint8_rgb
from .metrics import feature_statistics

log = logging.getLogger("sde_diffusion")

WEIGHTS_HASH_CHARS = 16  # of the SHA-256 in cache file names


def split_images(dataset, split: str) -> torch.Tensor:
    """The split's images as floats in [0, 1], (n, C, H, W), exactly k/(K−1) for level k."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    return dataset.to_float(dataset.train if split == "train" else dataset.test)


def reference_cache_path(cache_dir: Path, dataset_name: str, split: str, resolution: int, count: int,
                         weights_sha256: str) -> Path:
    return Path(cache_dir) / (f"{dataset_name}_{split}_{resolution}px_n{count}_"
                              f"inception-{weights_sha256[:WEIGHTS_HASH_CHARS]}.npz")


def reference_statistics(dataset, dataset_name: str, split: str, network: InceptionNetwork, cache_dir: Path,
                         limit: Optional[int] = None) -> Dict[str, np.ndarray]:
    """{'mu', 'sigma', 'features'} of the split's images (the first `limit` of them if given), cached on disk."""
    images = split_images(dataset, split)
    if limit is not None:
        images = images[:limit]
    path = reference_cache_path(cache_dir, dataset_name, split, images.shape[-1], len(images), network.weights.sha256)
    cached = load_verified_npz(path, "reference statistics")
    if cached is not None and {"mu", "sigma", "features"} <= set(cached):
        return {key: cached[key] for key in ("mu", "sigma", "features")}
    log.info("computing reference Inception statistics of %d %s %s images → %s", len(images), dataset_name, split,
             path)
    features = network.features(to_uint8_rgb(images), progress=True)
    mu, sigma = feature_statistics(features)
    stats = {"mu": mu, "sigma": sigma, "features": features.astype(np.float32)}
    save_verified_npz(path, **stats)
    return stats
