"""Super-resolution of test digits with the EDM digits model (`configs/edm_digits.py`, trained in runs/edm_digits):
every inverse method through `--mode sample`'s job, PSNR against the test digits and the measurement residual
(BENCHMARKS.md, "Inverse problems").

    python benchmarks/inverse_digits.py --workdir runs/edm_digits --num 64     # about 15 min on 2 cores
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import run_lib  # noqa: E402
from configs import edm_digits  # noqa: E402

METHODS = ("mmps", "mmps:cg_steps=1", "pigdm", "dps", "dps:zeta=0.1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("runs/edm_digits"))
    parser.add_argument("--num", type=int, default=64)
    parser.add_argument("--operator", default="super_resolution:factor=2")
    parser.add_argument("--noise_std", type=float, default=0.05)
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    rows = []
    for method in METHODS:
        config = edm_digits.get_config()
        config.device = "cpu"
        s = config.sampling
        s.inverse, s.inverse_method, s.noise_std = args.operator, method, args.noise_std
        s.method, s.steps, s.noise_removal = "dpm_solver", args.steps, True
        config.eval.num_samples = config.eval.batch_size = args.num
        folder = "inverse_" + method.replace(":", "_").replace("=", "")
        run_lib.sample(config, args.workdir, eval_folder=folder)
        (report,) = (args.workdir / folder).glob("*.json")
        report = json.loads(report.read_text())
        saved = np.load(report_path_npz(args.workdir / folder))
        preview, truth = torch.from_numpy(saved["preview"]), torch.from_numpy(saved["ground_truth"])
        upsampled = (-10 * torch.log10((preview - truth).pow(2).flatten(1).mean(1))).mean().item()
        rows.append((method, report["psnr_mean"], report["residual_mean"], report["residual_expected"], upsampled,
                     report["nfe"]))
        print(rows[-1], flush=True)
    print("| method | PSNR (dB) | residual ‖A·x − y‖ | σ_y·√m | upsampled observation PSNR | NFE |")
    print("|---|---|---|---|---|---|")
    for method, psnr, residual, expected, upsampled, nfe in rows:
        print(f"| `{method}` | {psnr:.2f} | {residual:.3f} | {expected:.3f} | {upsampled:.2f} | {nfe} |")


def report_path_npz(folder: Path) -> Path:
    (path,) = folder.glob("*.npz")
    return path


if __name__ == "__main__":
    main()
