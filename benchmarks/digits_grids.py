"""Default grids against the papers' grids on a trained network: each deterministic solver's distance to a tight
adaptive probability-flow solution from the same prior draws, at 10 and 20 score calls.

The default grid is what `sample` runs when no grid is named (up to sampling.FEW_STEPS steps the few-step grid).
The papers' grids: uniform t for DDIM, λ-uniform for DPM-Solver++, UniPC and DEIS, EDM's ρ = 7 for Heun and iPNDM.
The error is the RMS distance per pixel (model space, [−1, 1]) at eps, without the final denoising step, over
--num prior draws; the reference is the `ode` sampler (dopri5) at rtol = atol = --rtol from the same draws.

    python main.py --config configs/vp_digits.py --mode train                 # the model (≈ 5 minutes on 2 cores)
    python benchmarks/digits_grids.py --config configs/vp_digits.py --workdir runs/vp_digits --json vp.json
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from sde_diffusion import sampling  # noqa: E402
from sde_diffusion.config import load_config_file  # noqa: E402
from sde_diffusion.jobs import builder  # noqa: E402

# label → (method, options, the paper's grid)
SOLVERS = {
    "ddim": ("ddim", {}, "time"),
    "dpm_solver 2M": ("dpm_solver", {"order": 2}, "logsnr"),
    "dpm_solver 3M": ("dpm_solver", {}, "logsnr"),
    "unipc": ("unipc", {}, "logsnr"),
    "deis": ("deis", {}, "logsnr"),
    "ipndm": ("ipndm", {}, "edm"),
    "heun": ("heun", {}, "edm"),
}
NFES = (10, 20)
LIMIT = 1.25  # the default grid's error may be at most this multiple of the paper's


def run(config_path: Path, workdir: Path, num: int, rtol: float, seed: int) -> Dict:
    config = load_config_file(str(config_path))
    sde, dataset, model = builder.build(config, "cpu", workdir=workdir)
    k, path = builder.newest_checkpoint(workdir)
    builder.load_weights(path, model, dataset)
    model.eval()
    score_fn = builder.labelled_score_fn(config, sde, model)(None)
    shape = (num, *dataset.shape)
    z = sde.prior_sampling(shape, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        reference, ref_nfe = sampling.sample(score_fn, sde, shape, "ode", x_T=z, denoise=False, rtol=rtol, atol=rtol)
    rows = []
    for label, (method, options, paper) in SOLVERS.items():
        for nfe in NFES:
            steps = sampling.steps_for_nfe(sde, method, nfe, **options)
            errors = {}
            default = sampling.SAMPLERS[method].grid_for(steps, sde)  # what `sample` runs when no grid is named
            for name, grid in (("default", None), ("paper", paper)):
                with torch.no_grad():
                    x, used = sampling.sample(score_fn, sde, shape, method, steps=steps, grid=grid, x_T=z,
                                              denoise=False, **options)
                errors[name] = (x - reference).pow(2).mean().sqrt().item()
            ratio = errors["default"] / errors["paper"]
            rows.append(dict(solver=label, nfe=used, steps=steps, default_grid=default,
                             paper_grid=paper, rms_default=errors["default"], rms_paper=errors["paper"], ratio=ratio,
                             ok=ratio <= LIMIT))
            print(f"{label:14s} NFE {used:3d}: default ({rows[-1]['default_grid']}) {errors['default']:.4f}, paper "
                  f"({paper}) {errors['paper']:.4f}, ratio {ratio:.2f}", flush=True)
    return dict(config=str(config_path), checkpoint=str(path), samples=num, reference_nfe=ref_nfe,
                reference_rtol=rtol, rows=rows, worst_ratio=max(r["ratio"] for r in rows))


def markdown(result: Dict) -> str:
    lines = [f"{result['config']} ({result['samples']} draws, reference NFE {result['reference_nfe']})", "",
             "| solver | NFE | default grid | RMS | paper's grid | RMS | ratio |", "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['solver']} | {r['nfe']} | {r['default_grid']} | {r['rms_default']:.4f} | "
                     f"{r['paper_grid']} | {r['rms_paper']:.4f} | {r['ratio']:.2f} |")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=Path("configs/vp_digits.py"))
    parser.add_argument("--workdir", type=Path, default=Path("runs/vp_digits"))
    parser.add_argument("--num", type=int, default=64, help="prior draws")
    parser.add_argument("--rtol", type=float, default=1e-5, help="the reference's rtol = atol")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if not any((args.workdir / "checkpoints").glob("checkpoint_*.pth")):
        sys.exit(f"no checkpoint in {args.workdir}/checkpoints: train first, e.g. python main.py --config "
                 f"{args.config} --mode train --workdir {args.workdir}")
    result = run(args.config, args.workdir, args.num, args.rtol, args.seed)
    print(markdown(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    if not math.isfinite(result["worst_ratio"]):
        sys.exit("a solver returned non-finite samples")


if __name__ == "__main__":
    main()
