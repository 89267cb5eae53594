"""--mode eval: each numbered checkpoint eval.begin_ckpt..eval.end_ckpt, with EMA weights.

Writes into workdir/<eval_folder>: report_<k>.json (eval loss, bits/dim, sampler, NFE, FID/KID/IS for images or
sliced W₂/NLL for toy data), samples_<k>.png and .npz, rounds_<k>/ (resumable sampling rounds),
forward_noising.png and trajectory_<k>.png (images).
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Dict, Optional

import torch

from .. import distributed, likelihood, sampling
from ..checkpoints import load_model_weights, save_npz, write_json
from ..validation import validate_config
from ..visualize import TrajectoryRecorder, forward_noising_strip, save_strip, unit_scale
from . import builder
from .generation import generate_and_score, image_metrics, make_conditioning, save_samples_picture

log = logging.getLogger("sde_diffusion")

PICTURE_IMAGES = 8  # rows of the forward-noising and trajectory strips
TRAJECTORY_SEED_KEY = 2**31 - 1  # seeds the trajectory picture apart from every sampling round
NOISING_TIMES = (0.0, 0.02, 0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1.0)  # columns of the forward-noising strip
REPORT_LOG_OMITS = ("config", "sampler", "inception_weights")  # report keys left out of the log line


def run(config, workdir, eval_folder: str = "eval") -> None:
    """For each checkpoint eval.begin_ckpt..eval.end_ckpt, with EMA weights: eval loss, samples in resumable
    rounds, FID/KID/IS (images) or sliced W₂/NLL (toy data), a sample grid and report_<k>.json. Under torchrun the
    ranks share the sampling rounds; rank 0 alone computes the rest and writes the files (the same report as one
    process: every round is seeded by its index)."""
    validate_config(config)
    with builder.distributed_job(config) as (world, device):
        evaluate(config, Path(workdir), eval_folder, world, device)


def evaluate(config, workdir: Path, eval_folder: str, world: distributed.World, device: torch.device) -> None:
    builder.seed_everything(config.seed)
    sde, dataset, model = builder.build(config, device)
    out = builder.prepare_workdir(workdir / eval_folder)
    checkpoints = builder.checkpoint_range(config, workdir)
    e = config.eval
    metrics = None
    if e.enable_sampling and e.enable_fid and dataset.is_image:  # fail on missing weights before any sampling
        metrics = image_metrics(config, dataset, device, world)
    loss_fn = builder.make_loss_fn(config, sde)
    conditioning = make_conditioning(config, sde, model, dataset, workdir, device)  # loads a classifier first
    if dataset.is_image and world.is_main:
        save_forward_noising_picture(config, sde, dataset, out / "forward_noising.png")
    for k, path in checkpoints:
        start = time.time()
        ckpt = load_model_weights(path, model, use_ema=True, map_location=device)
        model.eval()
        if not world.is_main:  # the other ranks only help with the sampling rounds
            if e.enable_sampling:
                evaluate_samples(config, sde, conditioning, dataset, device, out, k, path, metrics, world)
            continue
        report = {"checkpoint": path.name, "step": int(ckpt["step"]), "config": config.to_dict()}
        if conditioning.describe():
            report["conditioning"] = conditioning.describe()
        report.update(held_out_measures(config, sde, model, dataset, loss_fn, device, k))
        if e.enable_sampling:
            report.update(evaluate_samples(config, sde, conditioning, dataset, device, out, k, path, metrics, world))
        if world.distributed:
            report["world_size"] = world.world_size
        if e.enable_sampling and dataset.is_image:
            save_trajectory_picture(config, sde, conditioning, dataset, device, out / f"trajectory_{k}.png", k)
        report["eval_seconds"] = time.time() - start
        write_json(out / f"report_{k}.json", report)
        log.info("wrote %s: %s", out / f"report_{k}.json",
                 {key: v for key, v in report.items() if key not in REPORT_LOG_OMITS})


def held_out_measures(config, sde, model, dataset, loss_fn, device, k: int) -> Dict:
    """eval_loss (class-conditional models: with the test split's labels) and bits/dim (class-conditional models:
    of the null label's unconditional score, so of p(x)), as eval.enable_loss / enable_bpd ask."""
    e, report = config.eval, {}
    score_fn_for = builder.labelled_score_fn(config, sde, model)
    if e.enable_loss:
        batches = builder.labelled_batches(dataset, e.batch_size, config.model.num_classes > 0, device)
        report["eval_loss"] = builder.evaluation_loss(loss_fn, score_fn_for, model, batches, seed=config.seed)
    if e.enable_bpd:
        generator = torch.Generator(device=device).manual_seed(builder.round_seed(config.seed, k))
        report.update(likelihood.evaluate_bpd(score_fn_for(None), sde, dataset, config, device, generator))
    return report


def evaluate_samples(config, sde, conditioning, dataset, device, out: Path, k: int, path: Path,
                     metrics, world: distributed.World) -> Optional[Dict]:
    """Generate eval.num_samples in rounds (each saved, so a killed eval resumes), score them, save a grid.
    Under torchrun every rank makes its share of the rounds; rank 0 gets the report, the others None."""
    settings = builder.sampler_settings(config, sde)
    samples, report = generate_and_score(config, sde, conditioning, dataset, device, out / f"rounds_{k}",
                                         (config.seed, k), settings, config.eval.num_samples, metrics,
                                         {"checkpoint": path.name}, world)
    if not world.is_main:
        return None
    save_npz(out / f"samples_{k}.npz", samples=samples.numpy())
    save_samples_picture(samples[:config.sampling.num_grid_samples], dataset, out / f"samples_{k}.png",
                         title=f"{path.name}, NFE {report['nfe']}")
    return report


def save_forward_noising_picture(config, sde, dataset, path: Path) -> None:
    """Test images diffused to x_t for several t (one row per image), rescaled to unit variance."""
    x0 = next(dataset.eval_batches(PICTURE_IMAGES))
    times = [max(t, sde.default_eps) for t in NOISING_TIMES]
    columns = forward_noising_strip(sde, x0, times, generator=torch.Generator().manual_seed(config.seed))
    save_strip([dataset.from_model(c) for c in columns], path)


def save_trajectory_picture(config, sde, conditioning, dataset, device, path: Path, k: int) -> None:
    """The sampler's states from the prior to the data for a few samples (rescaled to unit variance)."""
    recorder = TrajectoryRecorder()
    generator = torch.Generator(device=device).manual_seed(builder.round_seed(config.seed, k, TRAJECTORY_SEED_KEY))
    x, _ = sampling.sample(conditioning.score_fn(0, PICTURE_IMAGES, device), sde, (PICTURE_IMAGES, *dataset.shape),
                           generator=generator, device=device, callback=recorder,
                           **builder.sampler_settings(config, sde))
    columns = [dataset.from_model(unit_scale(sde, state, t)) for t, state in recorder.pick(8)]
    save_strip(columns + [dataset.from_model(x).cpu()], path)
