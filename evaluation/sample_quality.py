"""Sample-quality numbers for a report: FID / KID / IS for images, sliced W₂ and NLL under the true density
for 2-D toy data. Inputs are samples already generated (and, for images, their Inception features)."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional, Tuple

import numpy as np
import torch

from sde_diffusion.metrics_toy import sliced_w2

from .inception import InceptionNetwork, locate_inception
from .metrics import feature_statistics, frechet_distance, inception_score, kernel_inception_distance
from .reference import reference_statistics


def reference_identity(config, dataset) -> Tuple[str, Path]:
    """The dataset's name in reference-statistics file names, and their default folder. Your own images
    (data.dataset='folder') are named by a hash of the images and the split, so two folders never share
    statistics, and keep them beside their preprocessed cache; named datasets use <data.root>/fid_stats."""
    name = getattr(dataset, "reference_name", None) or config.data.dataset.lower()
    default_dir = getattr(dataset, "stats_dir", None) or Path(config.data.root) / "fid_stats"
    return name, Path(default_dir)


class ImageMetrics:
    """Inception network plus the reference statistics of one dataset split, ready to score sample features."""

    def __init__(self, config, dataset, device):
        e = config.eval
        self.weights = locate_inception(e.inception_path, allow_download=e.inception_download)
        self.network = InceptionNetwork(self.weights, device=device, batch_size=e.inception_batch_size)
        name, default_dir = reference_identity(config, dataset)
        cache = Path(e.stats_dir) if e.stats_dir else default_dir
        self.split, self.seed = e.fid_split, config.seed
        self.reference = reference_statistics(dataset, name, e.fid_split, self.network, cache,
                                              limit=e.fid_num_reference)

    def describe(self) -> Dict:
        return {"inception_weights": self.weights.describe(), "fid_reference": {
            "split": self.split, "num_images": int(len(self.reference["features"]))}}

    def scores(self, features: np.ndarray, probabilities: Optional[np.ndarray]) -> Dict:
        """fid, kid and inception_score (None without class probabilities) of sample features (n, 2048)."""
        mu, sigma = feature_statistics(features)
        report = {"fid": frechet_distance(mu, sigma, self.reference["mu"], self.reference["sigma"]),
                  "kid": kernel_inception_distance(features, self.reference["features"], seed=self.seed),
                  "inception_score": None, "inception_score_std": None}
        if probabilities is not None:
            report["inception_score"], report["inception_score_std"] = inception_score(probabilities)
        return report


def toy_scores(samples: torch.Tensor, dataset) -> Dict:
    """sliced_w2 between the samples and as many test points; nll (nats) of the samples under the data's true
    density when it has one (the cross-entropy, minimal at the data's entropy)."""
    n = min(len(samples), len(dataset.test))
    report = {"sliced_w2": sliced_w2(samples[:n].double(), dataset.test[:n].double())}
    if dataset.log_prob is not None:
        report["nll"] = float(-dataset.log_prob(samples.double()).mean())
    return report

