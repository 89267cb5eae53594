"""FID and KID against NFE for every few-step solver on a trained digits model, with PC-1000 as the reference row.

Trains the quickstart model (configs/vp_digits.py) unless its checkpoint exists, tunes grids for some solvers
(`--mode tune_grid`), then runs `--mode compare` over all entries: FID/KID of `--num` samples against the 297-image
test split (the quickstart's eval setting). Every count is an NFE including the final denoising call.

    python benchmarks/digits_samplers.py --workdir runs/digits_samplers        # ≈ 1.5 hours on 2 CPU cores
    python benchmarks/digits_samplers.py --num 128 --tuned unipc --tuned_nfes 5,8 --tune_batch 64   # ≈ 30 min
"""
from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path
from typing import List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import run_lib  # noqa: E402
from sde_diffusion import sampling  # noqa: E402
from sde_diffusion.config import load_config_file  # noqa: E402
from sde_diffusion.sdes import VPSDE  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NFES = (5, 8, 10, 20)
# label → (sampler spec, the paper's grid); one compare entry per NFE where the sampler's step structure fits the
# budget exactly, on the sampler's default grid and, where it differs, on the paper's (named in the entry: compare
# puts unnamed entries on one common grid)
SOLVERS = {
    "ddim": ("ddim", "time"), "dpm_solver 2M": ("dpm_solver:order=2", "logsnr"),
    "dpm_solver 3M": ("dpm_solver", "logsnr"),
    "unipc": ("unipc", "logsnr"), "ipndm": ("ipndm", "edm"), "deis": ("deis", "logsnr"), "heun": ("heun", "edm"),
    "dpm_solver 2M SDE": ("dpm_solver_sde", "logsnr"), "edm_sde": ("edm_sde", "edm"), "restart": ("restart", "edm"),
}
TUNED = {"unipc": "unipc", "dpm_solver 3M": "dpm_solver"}  # label → spec, tuned at --tuned_nfes
REFERENCE = "pc:grid=time@1000"


def entries_for(sde, tuned_files) -> List[str]:
    entries = [REFERENCE]
    for label, (spec, paper) in SOLVERS.items():
        method, options = sampling.parse_spec(spec)
        grids = dict.fromkeys((sampling.SAMPLERS[method].grid, paper))
        for nfe in NFES:
            try:
                steps = sampling.steps_for_nfe(sde, method, nfe, denoise=True, **options)
            except ValueError:
                continue
            _, used = sampling.sample(lambda x, t: 0 * x, sde, (1, 1), method, steps=steps, **options)
            if used == nfe:
                entries += [f"{spec}{',' if ':' in spec else ':'}grid={grid}@{steps}" for grid in grids]
    for (label, nfe), path in tuned_files.items():
        spec = TUNED[label]
        sep = "," if ":" in spec else ":"
        steps = len(sampling.load_grid(path)["times"]) - 1
        entries.append(f"{spec}{sep}grid={path}@{steps}")
    return entries


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=ROOT / "runs" / "digits_samplers")
    parser.add_argument("--num", type=int, default=256, help="samples per entry")
    parser.add_argument("--tuned", default="unipc,dpm_solver 3M", help="labels of TUNED to tune, comma-separated")
    parser.add_argument("--tuned_nfes", default="5,8,10", help="NFEs the tuned grids are made for")
    parser.add_argument("--tune_batch", type=int, default=128, help="prior draws each grid is fitted on")
    args = parser.parse_args(argv)
    config = load_config_file(ROOT / "configs" / "vp_digits.py")
    config.device = "cpu"
    workdir = args.workdir
    if not (workdir / "checkpoints" / "checkpoint_1.pth").exists():
        run_lib.train(config, workdir)
    sde = VPSDE()
    tuned_files = {}
    for label in filter(None, args.tuned.split(",")):
        spec = TUNED[label]
        for nfe in (int(n) for n in args.tuned_nfes.split(",")):
            config.tune.sampler, config.tune.nfe, config.tune.batch = spec, nfe, args.tune_batch
            config.tune.out = str(workdir / "grids" / f"{spec.split(':')[0]}_nfe{nfe}.json")
            if not Path(config.tune.out).exists():
                run_lib.tune_grid(config, workdir)
            tuned_files[(label, nfe)] = config.tune.out
    config.compare.samplers = tuple(entries_for(sde, tuned_files))
    config.compare.num_samples = args.num
    config.eval.batch_size = args.num
    run_lib.compare(config, workdir)
    rows = list(csv.DictReader((workdir / "compare" / "compare.csv").open()))
    reference = next(float(r["fid"]) for r in rows if r["sampler"].startswith("pc") and r["steps"] == "1000")
    print(f"| sampler | grid | NFE | FID | KID | FID / PC-1000 FID |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['sampler'].split(',grid=')[0].split(':grid=')[0]} | "
              f"{'tuned' if r['grid'].endswith('.json') else r['grid']} | {r['nfe']} | {float(r['fid']):.2f} | "
              f"{float(r['kid']):.4f} | {float(r['fid']) / reference:.2f} |")


if __name__ == "__main__":
    main()
