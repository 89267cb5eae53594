"""--mode ema_sweep: the post-hoc EMA of every σ_rel in eval.ema_sweep (sde_diffusion/phema.py), reconstructed at one
checkpoint's step (compare.checkpoint, else the newest) and scored with the configured sampler, next to the regular
EMA (σ_rel 0).

Writes into workdir/<eval_folder>: ema_sweep.md / .csv (σ_rel, the reconstruction's density error, NFE, then FID/KID
for images or sliced W₂/NLL for toy data, each with its 95 % interval), ema_sweep.json (the rows and each
reconstruction's snapshots), ema_sweep.png (each metric against σ_rel, the regular EMA as a dashed line),
samples_sigma_rel<σ>.png and rounds_<σ>/ (resumable sample rounds).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Dict, List, Sequence

from evaluation.compare import metric_cells, metric_columns, metric_panels, write_table

from .. import distributed, phema
from ..checkpoints import write_json
from ..validation import validate_config
from . import builder
from .compare import metric_names
from .generation import generate_and_score, image_metrics, make_conditioning, save_samples_picture

log = logging.getLogger("sde_diffusion")


def run(config, workdir, eval_folder: str = "ema_sweep") -> None:
    """Score the regular EMA and the post-hoc EMA of each σ_rel in eval.ema_sweep on one checkpoint."""
    validate_config(config)
    phema.require_snapshots(workdir, "--mode ema_sweep")
    with builder.distributed_job(config) as (world, device):
        sweep(config, Path(workdir), eval_folder, world, device)


def sweep(config, workdir: Path, eval_folder: str, world: distributed.World, device) -> None:
    builder.seed_everything(config.seed)
    sde, dataset, model = builder.build(config, device, workdir=workdir)
    k, path = builder.chosen_checkpoint(workdir, config.compare.checkpoint, "compare.checkpoint")
    out = builder.prepare_workdir(workdir / eval_folder)
    regular = builder.load_weights(path, model, dataset)  # the regular EMA, and the run's step
    builder.check_recorded_parts(regular, path, builder.recorded_parts(config))
    step = int(regular["step"])
    sigma_rels = [0.0, *config.eval.ema_sweep]
    plan = phema.plan(workdir, sigma_rels[1:], step)  # every σ_rel checked before any sampling
    metrics = image_metrics(config, dataset, device, world) if dataset.is_image and config.eval.enable_fid else None
    names = metric_names(config, dataset, metrics is not None)
    settings = builder.sampler_settings(config, sde)
    model.eval()
    conditioning = make_conditioning(config, sde, model, dataset, workdir, device)  # it holds the model, not weights
    rows = []
    for sigma_rel in sigma_rels:  # the regular EMA first: it is loaded already
        if sigma_rel:
            builder.load_post_hoc_ema(path, model, sigma_rel, step, plan)
        samples, report = generate_and_score(config, sde, conditioning, dataset, device,
                                             out / f"rounds_{sigma_rel:g}", (config.seed, k), settings,
                                             config.eval.num_samples, metrics, {"checkpoint": path.name}, world,
                                             resamples=config.compare.resamples)
        if not world.is_main:
            continue
        save_samples_picture(samples[:config.sampling.num_grid_samples], dataset,
                             out / f"samples_sigma_rel{sigma_rel:g}.png",
                             title=f"{path.name}, " + (f"σ_rel {sigma_rel:g}" if sigma_rel else "regular EMA"))
        error = plan.solutions[sigma_rel][1] if sigma_rel else None
        row = {"sigma_rel": sigma_rel, "density_error": error, "nfe": report["nfe"]}
        for metric in names:
            row.update(metric_cells(report, metric))
        rows.append(row)
        log.info("σ_rel %g: %s", sigma_rel, row)
    if world.is_main:
        write_table(rows, ["sigma_rel", "density_error", "nfe", *metric_columns(names)], out, stem="ema_sweep")
        write_json(out / "ema_sweep.json", {"checkpoint": path.name, "step": step, "sampler": settings,
                                            "num_samples": config.eval.num_samples, "rows": rows,
                                            "snapshots": sorted({s.path.name for s in plan.snapshots}),
                                            "skipped_corrupt": plan.corrupt})
        if names:
            plot_sweep(rows, names, out / "ema_sweep.png", f"{config.data.dataset}, {path.name} (step {step})")
        log.info("wrote %s (.md, .csv, .json, .png)", out / "ema_sweep")


def plot_sweep(rows: List[Dict], metrics: Sequence[str], path: Path, title: str) -> None:
    """One panel per metric against σ_rel, with 95 % error bars; the regular EMA (σ_rel 0) as a dashed line."""
    swept = [r for r in rows if r["sigma_rel"]]

    def draw(ax, metric: str) -> None:
        values = [r[metric] for r in swept]
        bars = None
        if all(r[f"{metric}_lo"] is not None for r in swept):
            bars = [[v - r[f"{metric}_lo"] for v, r in zip(values, swept)],
                    [r[f"{metric}_hi"] - v for v, r in zip(values, swept)]]
        ax.errorbar([r["sigma_rel"] for r in swept], values, yerr=bars, marker="o", capsize=3, label="post-hoc EMA")
        for r in rows:
            if not r["sigma_rel"]:
                ax.axhline(r[metric], color="grey", linestyle="--", label="regular EMA")
        ax.set_xlabel("σ_rel (EMA length relative to training time)")

    metric_panels(metrics, path, title, draw)
