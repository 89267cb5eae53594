"""--mode compare: every entry of config.compare.samplers on one checkpoint (EMA weights), on a common time grid.

Entries are "method[:option=value,...]@steps", or "@steps,steps,..." for one row per step count (evaluation/
compare.py). Every row runs on the same time grid unless its entry names one: the entry's `grid=` option, else
config.sampling.grid (a spacing or a .json grid file, whose step count the entry must then have), else
sampling.grids.default_spacing(steps) (DEFAULT_GRID; FEW_STEP_GRID up to FEW_STEPS steps); never the sampler's own
registered default, so that rows differ only by the sampler.
(Adaptive samplers use only the grid's ends.) ρ and the sech width follow config.sampling as in --mode sample.

Writes into workdir/<eval_folder>: compare.md, compare.csv and compare.json (sampler, steps, the grid used, NFE,
wall time, then FID/KID for images or sliced W₂/NLL for toy data, each with the bounds `_lo`, `_hi` of its 95 %
interval over the generated samples: compare.resamples jackknife groups (FID) or bootstrap resamples (sliced W₂),
KID and NLL in closed form; 0 turns them off), compare.png (each metric against NFE, curves for multi-count
entries, with error bars), samples_<row>.png and rounds_<row>/.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from evaluation.compare import (Z95, SamplerEntry, metric_cells, metric_columns, parse_entries, plot_metrics,
                                student_entries,
                                write_table)

from .. import distributed, sampling
from ..checkpoints import write_json
from ..errors import ConfigError
from ..sampling.grids import SECH_SPACINGS, default_spacing
from ..sampling.settings import controls_from_config
from ..validation import validate_config
from . import builder
from .distill import TeacherSource, find_teacher
from .generation import generate_and_score, image_metrics, make_conditioning, save_samples_picture

log = logging.getLogger("sde_diffusion")

Run = Tuple[SamplerEntry, Dict]  # a row and the keyword arguments of `sample` it runs with


def run(config, workdir, eval_folder: str = "compare") -> None:
    """Every entry of config.compare.samplers on one checkpoint (EMA weights): a table (Markdown + CSV) with NFE,
    wall time and FID/KID (images) or sliced W₂/NLL (toy data) with 95 % intervals, a plot of each metric against
    NFE, a grid each."""
    validate_config(config)  # compare.samplers and compare.resamples included
    builder.check_post_hoc_ema(config, workdir)
    runs = [(entry, entry_settings(config, entry)) for entry in student_entries(config)]
    teacher = None
    if config.compare.teacher_samplers:
        source = find_teacher(config)
        teacher = (source, [(entry, entry_settings(source.config, entry))
                            for entry in parse_entries(config.compare.teacher_samplers)])
    with builder.distributed_job(config) as (world, device):  # under torchrun the ranks share each sampler's rounds
        compare(config, Path(workdir), eval_folder, runs, world, device, teacher)


def entry_settings(config, entry: SamplerEntry) -> Dict:
    """Keyword arguments of `sample` for one row: the entry's method, steps and options, eps, denoise, clip_x0
    and threshold from config.sampling (the entry's own clip_x0=/threshold= win), and the grid: the entry's grid=
    option, else sampling.grid, else default_spacing (with sampling.rho for "edm", sampling.width for "sech" and
    "auto", eps from a grid file). ConfigError when a grid file's step count is not the entry's."""
    s = config.sampling
    grid = entry.options.get("grid") or s.grid or default_spacing(entry.steps)
    settings = dict(method=entry.method, steps=entry.steps, eps=s.eps, denoise=s.noise_removal, grid=grid,
                    **controls_from_config(config))
    if grid not in sampling.GRIDS:
        check_grid_file(entry, grid, "its grid= option" if "grid" in entry.options else "sampling.grid")
        settings["eps"] = None  # the file's last time
    if grid == "edm":
        settings["rho"] = s.rho
    if grid in SECH_SPACINGS and s.width is not None:
        settings["width"] = s.width
    return {**settings, **entry.options}


def check_grid_file(entry: SamplerEntry, path: str, source: str) -> None:
    """ConfigError unless the grid file at `path` (named by `source`) is readable and has the entry's steps."""
    try:
        steps = len(sampling.load_grid(path)["times"]) - 1
    except ValueError as err:
        raise ConfigError(f"compare.samplers entry {entry.entry!r}: {source}: {err}") from None
    if steps != entry.steps:
        raise ConfigError(f"compare.samplers entry {entry.entry!r}: the grid file {path} ({source}) has {steps} "
                          f"steps, not {entry.steps}: give the entry @{steps}, or a spacing with grid=")


def metric_names(config, dataset, with_image_metrics: bool) -> List[str]:
    """The table's metric columns: FID and KID for images (when measured), sliced W₂ (and NLL) for toy data."""
    if dataset.is_image:
        return ["fid", "kid"] if with_image_metrics else []
    return ["sliced_w2"] + (["nll"] if dataset.log_prob is not None else [])


def compare(config, workdir: Path, eval_folder: str, runs: List[Run], world: distributed.World, device,
            teacher: Optional[Tuple[TeacherSource, List[Run]]] = None) -> None:
    builder.seed_everything(config.seed)
    sde, dataset, model = builder.build(config, device, workdir=workdir)
    k, path = builder.chosen_checkpoint(workdir, config.compare.checkpoint, "compare.checkpoint")
    out = builder.prepare_workdir(workdir / eval_folder)
    metrics = None
    if dataset.is_image and config.eval.enable_fid:
        metrics = image_metrics(config, dataset, device, world)
    weights = builder.load_weights(path, model, dataset, config).get("ema_reconstruction")
    model.eval()
    conditioning = make_conditioning(config, sde, model, dataset, workdir, device)
    num = config.compare.num_samples or config.eval.num_samples
    names = metric_names(config, dataset, metrics is not None)
    rows = []
    for entry, settings in runs:
        rounds = out / f"rounds_{entry.slug}{builder.weights_suffix(config)}"
        samples, report = generate_and_score(config, sde, conditioning, dataset, device, rounds, (config.seed, k),
                                             settings, num, metrics, {"checkpoint": path.name}, world,
                                             resamples=config.compare.resamples)
        if world.is_main:
            save_samples_picture(samples[:config.sampling.num_grid_samples], dataset,
                                 out / f"samples_{entry.slug}.png", title=f"{entry.label}, NFE {report['nfe']}")
            rows.append(table_row(entry, report, names))
            log.info("%s@%d: %s", entry.label, entry.steps, rows[-1])
    if teacher is not None:
        rows += teacher_rows(config, *teacher, sde, dataset, device, out, (config.seed, k), metrics, names, world)
    if world.is_main:
        write_comparison(config, rows, names, out, path.name, num, weights)


def teacher_rows(config, source: TeacherSource, runs: List[Run], sde, dataset, device, out: Path, seeds,
                 metrics, names: List[str], world: distributed.World) -> List[Dict]:
    """The rows of compare.teacher_samplers: each entry on the teacher's EMA weights (its own parameterization and
    conditioning), with the student's samples' seeds and metrics; labelled "teacher <sampler>"."""
    model = builder.build_network(source.config, device)
    builder.load_weights(source.checkpoint, model, dataset, source.config)
    model.eval()
    conditioning = make_conditioning(source.config, sde, model, dataset, source.workdir, device)
    num = config.compare.num_samples or config.eval.num_samples
    rows = []
    for entry, settings in runs:
        samples, report = generate_and_score(config, sde, conditioning, dataset, device,
                                             out / f"rounds_teacher_{entry.slug}", seeds, settings, num, metrics,
                                             {"checkpoint": str(source.checkpoint)}, world,
                                             resamples=config.compare.resamples)
        if world.is_main:
            save_samples_picture(samples[:config.sampling.num_grid_samples], dataset,
                                 out / f"samples_teacher_{entry.slug}.png",
                                 title=f"teacher {entry.label}, NFE {report['nfe']}")
            row = table_row(entry, report, names)
            rows.append({**row, "sampler": f"teacher {row['sampler']}", "entry": f"teacher {row['entry']}"})
            log.info("teacher %s@%d: %s", entry.label, entry.steps, rows[-1])
    return rows


def table_row(entry: SamplerEntry, report: Dict, names: List[str]) -> Dict:
    """The row of one sampler run: its entry, the grid it ran on, NFE, seconds and each metric with its interval."""
    row = {"sampler": entry.label, "entry": entry.entry, "steps": entry.steps, "grid": str(report["sampler"]["grid"]),
           "nfe": report["nfe"], "seconds": report["sampling_seconds"]}
    for metric in names:
        row.update(metric_cells(report, metric))
    return row


def write_comparison(config, rows: List[Dict], names: List[str], out: Path, checkpoint: str, num: int,
                     post_hoc_ema: Optional[Dict] = None) -> None:
    """compare.md / .csv (the table), compare.png (metrics against NFE) and compare.json (with the post-hoc EMA's
    provenance when eval.ema_sigma_rel chose one)."""
    write_table(rows, ["sampler", "steps", "grid", "nfe", "seconds", *metric_columns(names)], out)
    if names:
        plot_metrics(rows, names, out / "compare.png",
                     title=f"{config.data.dataset}, {checkpoint}, {num} samples per sampler")
    resamples = config.compare.resamples
    intervals = (f"95 % normal intervals, value ± {Z95:.2f} standard errors over the samples (reference fixed): "
                 f"FID by a delete-a-group jackknife ({resamples} groups), sliced W₂ by {resamples} bootstrap "
                 "resamples, KID and NLL in closed form" if resamples else "none (compare.resamples = 0)")
    report = {"checkpoint": checkpoint, "num_samples": num, "intervals": intervals, "rows": rows}
    if post_hoc_ema:
        report["post_hoc_ema"] = post_hoc_ema
    write_json(out / "compare.json", report)
    log.info("wrote %s (.md, .csv, .json, .png)", out / "compare")
