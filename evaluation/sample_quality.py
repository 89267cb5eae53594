"""Sample-quality numbers for a report: FID / KID / IS for images, sliced W₂ and NLL under the true density
for 2-D toy data, and, when asked (resamples > 0), their standard errors over the generated samples (`<metric>_se`:
see each function). Inputs are samples already generated (and, for images, their Inception features)."""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Dict, Optional, Tuple

import numpy as np
import torch

from sde_diffusion.metrics_toy import sliced_w2

from .inception import InceptionNetwork, locate_inception
from .metrics import (bootstrap_indices, feature_statistics, frechet_distance, inception_score, jackknife_fids,
                      jackknife_groups, jackknife_standard_error, kid_and_standard_error, symmetric_sqrt)
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

    @functools.cached_property
    def reference_root(self) -> np.ndarray:
        """Σ^½ (d, d) of the reference features, for the FID jackknife (computed once)."""
        return symmetric_sqrt(self.reference["sigma"])

    def scores(self, features: np.ndarray, probabilities: Optional[np.ndarray], resamples: int = 0) -> Dict:
        """fid, kid and inception_score (None without class probabilities) of sample features (n, 2048).
        resamples > 0 adds fid_se (delete-a-group jackknife with that many groups, seeded) and kid_se (closed
        form), standard errors over the samples with the reference fixed (evaluation/metrics.py)."""
        mu, sigma = feature_statistics(features)
        kid, kid_se = kid_and_standard_error(features, self.reference["features"], seed=self.seed)
        report = {"fid": frechet_distance(mu, sigma, self.reference["mu"], self.reference["sigma"]), "kid": kid,
                  "inception_score": None, "inception_score_std": None}
        if resamples:
            groups = jackknife_groups(len(features), resamples, self.seed)
            fids = jackknife_fids(features, self.reference["mu"], self.reference["sigma"], groups,
                                  self.reference_root)
            report.update(fid_se=jackknife_standard_error(fids), kid_se=kid_se)
        if probabilities is not None:
            report["inception_score"], report["inception_score_std"] = inception_score(probabilities)
        return report


def toy_scores(samples: torch.Tensor, dataset, resamples: int = 0, seed: int = 0) -> Dict:
    """sliced_w2 between the samples (n, d) and as many test points; nll (nats) of the samples under the data's
    true density when it has one (the cross-entropy, minimal at the data's entropy). resamples > 0 adds their
    standard errors over the samples, the test points fixed: sliced_w2_se, the std of sliced W₂ over that many
    bootstrap resamples of the samples (seeded by `seed`), and nll_se, the standard error of a mean, std/√n."""
    n = min(len(samples), len(dataset.test))
    x, y = samples[:n].double(), dataset.test[:n].double()
    report = {"sliced_w2": sliced_w2(x, y)}
    if resamples:
        values = [sliced_w2(x[torch.from_numpy(idx)], y) for idx in bootstrap_indices(n, resamples, seed)]
        report["sliced_w2_se"] = float(np.std(values, ddof=1))
    if dataset.log_prob is not None:
        nll = -dataset.log_prob(samples.double())
        report["nll"] = float(nll.mean())
        if resamples:
            report["nll_se"] = float(nll.std() / len(nll) ** 0.5)
    return report

