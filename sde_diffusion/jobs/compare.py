"""--mode compare: every entry of config.compare.samplers on one checkpoint (EMA weights).

Writes into workdir/<eval_folder>: compare.md, compare.csv and compare.json (NFE, wall time, FID/KID for images
or sliced W₂/NLL for toy data), compare.png (each metric against NFE), samples_<entry>.png and rounds_<entry>/.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Dict, List

from evaluation.compare import SamplerEntry, parse_entry, plot_metrics, write_table

from .. import distributed, sampling
from ..checkpoints import write_json
from ..validation import validate_config
from . import builder
from .generation import generate_and_score, image_metrics, make_conditioning, save_samples_picture

log = logging.getLogger("sde_diffusion")


def run(config, workdir, eval_folder: str = "compare") -> None:
    """Every entry of config.compare.samplers on one checkpoint (EMA weights): a table (Markdown + CSV) with NFE,
    wall time and FID/KID (images) or sliced W₂/NLL (toy data), a plot of each metric against NFE, a grid each."""
    validate_config(config)
    entries = [parse_entry(text) for text in config.compare.samplers]  # checked against the sampler registry
    with builder.distributed_job(config) as (world, device):  # under torchrun the ranks share each sampler's rounds
        compare(config, Path(workdir), eval_folder, entries, world, device)


def metric_names(config, dataset, with_image_metrics: bool) -> List[str]:
    """The table's metric columns: FID and KID for images (when measured), sliced W₂ (and NLL) for toy data."""
    if dataset.is_image:
        return ["fid", "kid"] if with_image_metrics else []
    return ["sliced_w2"] + (["nll"] if dataset.log_prob is not None else [])


def compare(config, workdir: Path, eval_folder: str, entries: List[SamplerEntry], world: distributed.World,
            device) -> None:
    builder.seed_everything(config.seed)
    sde, dataset, model = builder.build(config, device, workdir=workdir)
    k, path = builder.chosen_checkpoint(workdir, config.compare.checkpoint, "compare.checkpoint")
    out = builder.prepare_workdir(workdir / eval_folder)
    metrics = None
    if dataset.is_image and config.eval.enable_fid:
        metrics = image_metrics(config, dataset, device, world)
    builder.load_weights(path, model, dataset, device)
    model.eval()
    conditioning = make_conditioning(config, sde, model, dataset, workdir, device)
    num = config.compare.num_samples or config.eval.num_samples
    names = metric_names(config, dataset, metrics is not None)
    s, rows = config.sampling, []
    for entry in entries:
        settings = {**dict(method=entry.method, steps=entry.steps, eps=s.eps, denoise=s.noise_removal), **entry.options}
        samples, report = generate_and_score(config, sde, conditioning, dataset, device, out / f"rounds_{entry.slug}",
                                             (config.seed, k), settings, num, metrics, {"checkpoint": path.name},
                                             world)
        if world.is_main:
            save_samples_picture(samples[:s.num_grid_samples], dataset, out / f"samples_{entry.slug}.png",
                                 title=f"{entry.label}, NFE {report['nfe']}")
            rows.append(table_row(entry, report, names))
            log.info("%s@%d: %s", entry.label, entry.steps, rows[-1])
    if world.is_main:
        write_comparison(config, rows, names, out, path.name, num)


def table_row(entry: SamplerEntry, report: Dict, names: List[str]) -> Dict:
    grid = report["sampler"].get("grid") or sampling.SAMPLERS[entry.method].grid
    return {"sampler": entry.label, "steps": entry.steps, "grid": grid, "nfe": report["nfe"],
            "seconds": report["sampling_seconds"], **{m: report.get(m) for m in names}}


def write_comparison(config, rows: List[Dict], names: List[str], out: Path, checkpoint: str, num: int) -> None:
    """compare.md / .csv (the table), compare.png (metrics against NFE) and compare.json."""
    write_table(rows, ["sampler", "steps", "grid", "nfe", "seconds", *names], out)
    if names:
        plot_metrics(rows, names, out / "compare.png",
                     title=f"{config.data.dataset}, {checkpoint}, {num} samples per sampler")
    write_json(out / "compare.json", {"checkpoint": checkpoint, "num_samples": num, "rows": rows})
    log.info("wrote %s (.md, .csv, .png)", out / "compare")
