"""Classifier-free guidance, CFG in a noise-level interval, and autoguidance on class-conditional digits: FID / KID
of --num samples per (method, w) against the 297-image test split, every run with the same seeds and the test
split's labels in order (eval's conditioning), through the jobs' own conditioning (jobs/generation.py).

Needs a class-conditional digits run with label dropout and early checkpoints for the guide:

    nice -n 10 python main.py --config configs/vp_digits_cond.py --mode train --workdir runs/vp_digits_cond \\
        --config.training.snapshot_freq=250
    nice -n 10 python benchmarks/guidance_digits.py --workdir runs/vp_digits_cond      # DPM-Solver++ 3M, 25 steps

Writes WORKDIR/guidance/guidance.md, .csv and .json (every row, FID with its 95 % jackknife interval) and a picture
of each run's first samples (samples_<method>_w<w>.png); prints the table and each method's best scale (the
w = 0 row, the conditional model alone, counts for every method).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Dict, List, Optional, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evaluation.compare import metric_cells, write_table  # noqa: E402
from sde_diffusion import distributed  # noqa: E402
from sde_diffusion.config import load_config_file  # noqa: E402
from sde_diffusion.jobs import builder  # noqa: E402
from sde_diffusion.jobs.generation import (generate_and_score, image_metrics, make_conditioning,  # noqa: E402
                                           save_samples_picture)

ROOT = Path(__file__).resolve().parents[1]
METRICS = ("fid", "kid")


def methods(intervals: List[Tuple[float, float]], guides: List[int]) -> Dict[str, Tuple[str, Dict]]:
    """Method label → (its name in file names, its config.sampling keys beside guidance_scale)."""
    found = {"CFG": ("cfg", {})}
    found.update({f"CFG, σ/α in [{lo:g}, {hi:g}]": (f"cfg_interval{lo:g}-{hi:g}", {"guidance_interval": (lo, hi)})
                  for lo, hi in intervals})
    found.update({f"autoguidance, guide = checkpoint {k}": (f"autoguidance_guide{k}", {"guide_checkpoint": k})
                  for k in guides})
    return found


def run(config, workdir: Path, k: int, num: int, scales: List[float], table: Dict[str, Tuple[str, Dict]],
        resamples: int):
    """Rows of (method, w) with FID/KID and their intervals, for checkpoint k of workdir."""
    device = builder.resolve_device(config.device)
    builder.seed_everything(config.seed)
    sde, dataset, model = builder.build(config, device, workdir=workdir)
    path = builder.numbered_checkpoint(workdir, k)
    step = builder.load_weights(path, model, dataset, config)["step"]
    model.eval()
    out = builder.prepare_workdir(workdir / "guidance")
    metrics = image_metrics(config, dataset, device, distributed.World())
    settings = builder.sampler_settings(config, sde)
    rows = []
    for label, (name, keys) in table.items():
        for w in scales:
            if w == 0 and label != "CFG":
                continue  # w = 0 is the conditional model alone, whatever the method
            for key in ("guidance_interval", "guide_checkpoint"):
                config.sampling[key] = keys.get(key)
            config.sampling.guidance_scale = w
            conditioning = make_conditioning(config, sde, model, dataset, workdir, device)
            slug = f"{name}_w{w:g}"
            samples, report = generate_and_score(config, sde, conditioning, dataset, device, out / f"rounds_{slug}",
                                                 (config.seed, k), settings, num, metrics,
                                                 {"checkpoint": path.name}, resamples=resamples)
            save_samples_picture(samples[:64], dataset, out / f"samples_{slug}.png")
            row = {"method": label, "w": w, "nfe": report["nfe"], "seconds": round(report["sampling_seconds"], 1)}
            for metric in METRICS:
                row.update(metric_cells(report, metric))
            rows.append(row)
            logging.info("%s, w = %g: FID %.2f, KID %.4f", label, w, row["fid"], row["kid"])
    return rows, {"checkpoint": path.name, "step": int(step), "num_samples": num, "sampler": settings}


def best_rows(rows: List[Dict]) -> List[Dict]:
    """Each method's row of lowest FID (the w = 0 row counts for every method)."""
    base = [row for row in rows if row["w"] == 0]
    best = []
    for method in dict.fromkeys(row["method"] for row in rows):
        best.append(min(base + [row for row in rows if row["method"] == method], key=lambda row: row["fid"]))
        best[-1] = {**best[-1], "method": method}
    return best


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=ROOT / "runs" / "vp_digits_cond")
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "vp_digits_cond.py")
    parser.add_argument("--checkpoint", type=int, default=None, help="the main model's; None: the newest")
    parser.add_argument("--num", type=int, default=128, help="samples per run")
    parser.add_argument("--scales", default="0,0.5,1,2,4", help="guidance scales w, comma-separated")
    parser.add_argument("--intervals", default="0.3:5,0.3:2", help="σ/α intervals lo:hi for CFG, comma-separated")
    parser.add_argument("--guides", default="1,2", help="guide checkpoints for autoguidance, comma-separated")
    parser.add_argument("--resamples", type=int, default=16, help="jackknife groups of FID's interval")
    parser.add_argument("--method", default="dpm_solver", help="sampling.method ('': the config's)")
    parser.add_argument("--steps", type=int, default=25, help="sampler steps (0: the config's)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    config = load_config_file(args.config)
    config.device = "cpu"
    if args.method:
        config.sampling.method = args.method
    if args.steps:
        config.sampling.steps = args.steps
    intervals = [tuple(float(v) for v in spec.split(":")) for spec in args.intervals.split(",") if spec]
    guides = [int(k) for k in args.guides.split(",") if k]
    k = args.checkpoint or builder.newest_checkpoint(args.workdir)[0]
    rows, about = run(config, args.workdir, k, args.num, [float(w) for w in args.scales.split(",")],
                      methods(intervals, guides), args.resamples)
    out = args.workdir / "guidance"
    columns = ["method", "w", "nfe", "seconds", *[c for m in METRICS for c in (m, f"{m}_lo", f"{m}_hi")]]
    write_table(rows, columns, out, "guidance")
    write_table(best_rows(rows), columns, out, "guidance_best")
    (out / "guidance.json").write_text(json.dumps({**about, "rows": rows}, indent=2, default=str) + "\n")
    print((out / "guidance.md").read_text() + "\nbest scale per method:\n" + (out / "guidance_best.md").read_text())


if __name__ == "__main__":
    main()
