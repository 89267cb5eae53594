"""--mode train_autoencoder: the first stage of a latent model (model.autoencoder), a KL-regularised convolutional
autoencoder trained on the image dataset of config.data, in one process, resumable.

Writes into workdir/autoencoder/: checkpoints-meta/checkpoint_<step>.pth (preemption, the newest two kept),
autoencoder.pth (the trained weights with their options and fingerprint, what model.latent=True loads),
report.json (test-split PSNR, reconstruction error, rFID/KID of the reconstructions against the test split) and
reconstructions.png (rows alternate test images and their reconstructions).
"""
from __future__ import annotations

import copy
import hashlib
import logging
import time
from pathlib import Path
from typing import Dict

import torch

from ..checkpoints import (newest_good_checkpoint, prune_step_checkpoints,
                           remove_stale_temporaries, save_checkpoint, step_checkpoint, write_json)
from ..data.datasets import get_dataset, is_image_data
from ..errors import ConfigError
from ..latent import AUTOENCODER_FILE, AUTOENCODER_FOLDER
from ..models.autoencoder import KLAutoencoder, autoencoder_loss, options_from_config
from ..progress import Progress
from ..validation import validate_config
from ..visualize import save_image_grid
from . import builder

log = logging.getLogger("sde_diffusion")

KEEP_CHECKPOINTS = 2  # preemption checkpoints kept
GRID_IMAGES = 32  # test images (and as many reconstructions) in reconstructions.png
GRID_COLUMNS = 8


def run(config, workdir) -> Dict:
    """Train (or resume) the autoencoder of model.autoencoder for its n_iters steps; write autoencoder.pth, the
    report and the reconstruction grid. Returns the report."""
    validate_config(config)
    if not is_image_data(config):
        raise ConfigError(f"--mode train_autoencoder needs image data, not data.dataset={config.data.dataset!r}")
    builder.require_one_process("train_autoencoder")
    with builder.training_lock(workdir, "train_autoencoder"):
        return fit_autoencoder(config, Path(workdir))


def fit_autoencoder(config, workdir: Path) -> Dict:
    """run's work, under the workdir's lock."""
    a = config.model.autoencoder
    folder = builder.prepare_workdir(workdir / AUTOENCODER_FOLDER)
    device = builder.resolve_device(config.device)
    builder.seed_everything(config.seed)
    image_config = copy.deepcopy(config)
    with image_config.unlocked():
        image_config.training.batch_size = a.batch_size
    dataset = get_dataset(image_config)
    model = KLAutoencoder(options_from_config(config)).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=a.lr)
    generator = torch.Generator(device=device).manual_seed(config.seed)  # posterior samples
    step = resume(folder, model, optimizer, dataset, generator, device)
    log.info("training the autoencoder (%d parameters, f=%d, latents %s) on %s, step %d → %d",
             sum(p.numel() for p in model.parameters()), model.options.downsample,
             model.latent_shape(dataset.shape), config.data.dataset, step, a.n_iters)
    start = time.time()
    model.train()
    for step in Progress(range(step + 1, a.n_iters + 1), desc="train_autoencoder", initial=step, total=a.n_iters):
        for group in optimizer.param_groups:
            group["lr"] = a.lr * min(1.0, step / max(1, a.warmup))
        x = to_pixels(dataset, dataset.train_batch().to(device))
        loss, parts = autoencoder_loss(model, x, a.kl_weight, a.loss, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % a.log_freq == 0:
            log.info("step %d  loss %.5f  reconstruction %.5f  kl/pixel %.3f  (%.1f s)", step, loss.item(),
                     parts["reconstruction"].item(), parts["kl"].item(), time.time() - start)
        if step % a.snapshot_freq_for_preemption == 0 or step == a.n_iters:
            save_checkpoint(step_checkpoint(folder / builder.PREEMPTION, step),
                            {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                             "data": dataset.state_dict(), "generator": generator.get_state(), "step": step})
            prune_step_checkpoints(folder / builder.PREEMPTION, KEEP_CHECKPOINTS)
    model.eval()
    path = folder / AUTOENCODER_FILE
    save_checkpoint(path, {"model": model.state_dict(), "options": model.options.__dict__,
                           "fingerprint": weights_fingerprint(model), "step": a.n_iters,
                           "image_shape": list(dataset.shape)})
    report = {"autoencoder": str(path), "steps": a.n_iters, "seconds": time.time() - start,
              "downsample": model.options.downsample, "latent_shape": list(model.latent_shape(dataset.shape)),
              "parameters": sum(p.numel() for p in model.parameters())}
    report.update(reconstruction_report(config, model, dataset, device, folder / "reconstructions.png"))
    write_json(folder / "report.json", report)
    log.info("wrote %s and %s: %s", path, folder / "report.json",
             {k: v for k, v in report.items() if k in ("psnr", "rfid", "reconstruction_l1")})
    return report


def to_pixels(dataset, x_model: torch.Tensor) -> torch.Tensor:
    """The dataset's model-space images → [−1, 1], what first stages take."""
    return 2.0 * dataset.from_model(x_model) - 1.0


def weights_fingerprint(model: torch.nn.Module) -> str:
    """SHA-256 over the state dict's names and values: identifies the first stage a latent model was trained on."""
    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def resume(folder: Path, model, optimizer, dataset, generator, device) -> int:
    """Load the newest preemption checkpoint that verifies; the step it was written at (0: none)."""
    for stale in remove_stale_temporaries(folder / builder.PREEMPTION):
        log.warning("removed %s, left by a run killed while writing it", stale)
    found = newest_good_checkpoint(folder / builder.PREEMPTION, map_location=device)
    if found is None:
        return 0
    path, state = found
    model.load_state_dict(state["model"], strict=True)
    optimizer.load_state_dict(state["optimizer"])
    dataset.load_state_dict(state["data"])
    generator.set_state(state["generator"].cpu())
    log.info("resuming the autoencoder from %s at step %d", path, state["step"])
    return int(state["step"])


@torch.no_grad()
def reconstructions(model, dataset, device, batch_size: int):
    """(originals, reconstructions) of the test split, [0, 1] images on the host (posterior means decoded)."""
    originals, recons = [], []
    for x in dataset.eval_batches(batch_size, "test"):
        x = x.to(device)
        recon = model.decode(model.encode(to_pixels(dataset, x)).mean)
        originals.append(dataset.from_model(x).cpu())
        recons.append(((recon + 1.0) / 2.0).cpu())
    return torch.cat(originals), torch.cat(recons)


def reconstruction_report(config, model, dataset, device, grid_path: Path) -> Dict:
    """PSNR (dB, mean over test images of 10·log10(1 / MSE) on [0, 1] pixels, reconstructions clipped), mean L1
    and L2 errors, rFID/KID against the test split (model.autoencoder.eval_fid), and the grid picture."""
    originals, recons = reconstructions(model, dataset, device, config.eval.batch_size)
    clipped = recons.clamp(0.0, 1.0)
    mse = ((clipped - originals) ** 2).flatten(1).mean(1).clamp_min(1e-12)
    report = {"psnr": float((10 * torch.log10(1.0 / mse)).mean()),
              "reconstruction_l1": float((recons - originals).abs().mean()),
              "reconstruction_l2": float(((recons - originals) ** 2).mean()),
              "test_images": len(originals)}
    n = min(GRID_IMAGES, len(originals))
    rows = [t for i in range(0, n, GRID_COLUMNS) for t in (originals[i:i + GRID_COLUMNS], clipped[i:i + GRID_COLUMNS])]
    save_image_grid(torch.cat(rows), grid_path, nrow=GRID_COLUMNS)
    if config.model.autoencoder.eval_fid:
        report.update(reconstruction_fid(config, dataset, clipped, device))
    return report


def reconstruction_fid(config, dataset, recons: torch.Tensor, device) -> Dict:
    """rFID and rKID: the test split's reconstructions against the test split's own Inception statistics (the
    first eval.fid_num_reference test images and their reconstructions; None: all)."""
    from evaluation.sample_quality import ImageMetrics
    from .generation import round_features
    test_config = copy.deepcopy(config)
    with test_config.unlocked():
        test_config.eval.fid_split = "test"
    metrics = ImageMetrics(test_config, dataset, device)
    features = round_features(metrics, recons[:len(metrics.reference["features"])])
    scores = metrics.scores(features["features"], None)
    return {"rfid": scores["fid"], "rkid": scores["kid"],
            "rfid_reference": {"split": "test", "num_images": int(len(metrics.reference["features"]))}}
