"""--mode train_classifier: the noise-conditional classifier p_t(y | x_t) for classifier guidance
(config.classifier), on training batches diffused to t ~ U(training.eps, T), in one process.

Writes workdir/classifier/checkpoint.pth and workdir/classifier/report.json (its test accuracy at
CLASSIFIER_REPORT_TIMES).
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Dict

import torch
from ..progress import Progress

from .. import classifier as noisy_classifier
from .. import latent
from ..checkpoints import save_checkpoint, write_json
from ..data.datasets import NUM_CLASSES, dataset_classes, get_dataset
from ..sdes import sde_from_config
from ..errors import ConfigError
from ..validation import validate_config
from . import builder

log = logging.getLogger("sde_diffusion")

CLASSIFIER_REPORT_TIMES = (0.01, 0.1, 0.25, 0.5, 0.75, 1.0)  # times of the classifier's test accuracy


def run(config, workdir) -> None:
    """Train the noise-conditional classifier p_t(y | x_t) for classifier guidance (config.classifier) on
    training batches diffused to t ~ U(training.eps, T); writes workdir/classifier/checkpoint.pth and report.json
    (test accuracy at CLASSIFIER_REPORT_TIMES)."""
    validate_config(config)
    builder.require_one_process("train_classifier")
    with builder.training_lock(workdir, "train_classifier"):
        fit_classifier(config, builder.prepare_workdir(workdir))


def fit_classifier(config, workdir: Path) -> None:
    """run's work, under the workdir's lock."""
    builder.seed_everything(config.seed)
    device = builder.resolve_device(config.device)
    sde, dataset = sde_from_config(config), get_dataset(config)
    num_classes = dataset_classes(config, dataset)
    if config.model.latent:  # the classifier sees the score network's data: scaled latents (the same scale)
        dataset = latent.LatentDataset(dataset, latent.load_first_stage(config, workdir, device), device)
        dataset.measure_scale()
    if not num_classes:
        raise ConfigError(f"data.dataset={config.data.dataset!r} has no class labels to train a classifier on; "
                         f"labelled datasets: {sorted(NUM_CLASSES)}, or folder data with data.labels")
    model = noisy_classifier.create_classifier(config, num_classes).to(device)
    log.info("training a classifier (%d parameters) on %s, %s, %d steps", sum(p.numel() for p in model.parameters()),
             config.data.dataset, type(sde).__name__, config.classifier.n_iters)
    start = time.time()
    fit(config, sde, model, dataset, device, start)
    path = noisy_classifier.checkpoint_path(workdir)
    save_checkpoint(path, {"model": model.state_dict(), "step": config.classifier.n_iters})
    report = {"checkpoint": str(path), "steps": config.classifier.n_iters, "seconds": time.time() - start,
              "test_accuracy": classifier_accuracy(config, sde, model, dataset, device)}
    write_json(path.parent / "report.json", report)
    log.info("wrote %s; test accuracy by t: %s", path, report["test_accuracy"])


def fit(config, sde, model, dataset, device, start: float) -> None:
    """classifier.n_iters Adam steps (constant classifier.lr) on the cross-entropy of diffused training batches;
    leaves the model in eval mode."""
    c = config.classifier
    optimizer = torch.optim.Adam(model.parameters(), lr=c.lr)
    model.train()
    for step in Progress(range(1, c.n_iters + 1), desc="train_classifier"):
        x, labels = (v.to(device) for v in dataset.train_batch(with_labels=True))
        loss = noisy_classifier.classifier_loss(model, sde, x, labels, eps=config.training.eps)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % c.log_freq == 0:
            log.info("step %d  cross-entropy %.4f  (%.1f s)", step, loss.item(), time.time() - start)
    model.eval()


def classifier_accuracy(config, sde, model, dataset, device) -> Dict[str, float]:
    """Test-split accuracy of the classifier at each of CLASSIFIER_REPORT_TIMES (seeded noise)."""
    generator = torch.Generator(device=device).manual_seed(config.seed)
    result = {}
    for t in CLASSIFIER_REPORT_TIMES:
        correct = total = 0
        for x, labels in builder.labelled_batches(dataset, config.eval.batch_size, True, device):
            correct += noisy_classifier.accuracy(model, sde, x, labels, t, generator) * len(x)
            total += len(x)
        result[f"{t:g}"] = correct / total
    return result
