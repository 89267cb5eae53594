"""What post-hoc EMA tracking costs: the per-step profile update and the snapshot write, against the training step.

For each config: the network's trainable parameters, the snapshot size per file, the time of one profile update
(every step, all profiles), of one snapshot write (atomic, with .sha256), of one training step (TrainStep, on random
data of the config's shape), and the overhead in seconds per 1000 steps at training.post_hoc_ema_freq.

    python benchmarks/post_hoc_ema.py --configs configs/edm_digits.py,configs/edm2_digits.py --profiles 0.05,0.1
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sde_diffusion import phema  # noqa: E402
from sde_diffusion.jobs import builder  # noqa: E402
from sde_diffusion.models import create_model  # noqa: E402
from sde_diffusion.sdes import sde_from_config  # noqa: E402
from sde_diffusion.training.optim import make_optimizer  # noqa: E402
from sde_diffusion.training.step import TrainStep  # noqa: E402


def load(path: str):
    spec = importlib.util.spec_from_file_location(Path(path).stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def measure(path: str, profiles, freq: int, precision: str, repeats: int, batch: int) -> dict:
    config = load(path)
    config.device = "cpu"
    device = torch.device("cpu")
    builder.seed_everything(config.seed)
    sde, model = sde_from_config(config), create_model(config)
    optimizer = make_optimizer(model.parameters(), config.optim)
    ema = builder.make_ema(config, model)
    step = TrainStep(model, optimizer, ema, builder.make_loss_fn(config, sde), config.optim, precision="fp32",
                     device=device, noise=torch.Generator().manual_seed(0))
    score_fn = builder.labelled_score_fn(config, sde, model)(None)
    d = config.data
    x = torch.randn(batch or config.training.batch_size, d.num_channels, d.image_size, d.image_size)
    counter = iter(range(1, 10**9))
    train_s = median_seconds(lambda: step(x, next(counter), score_fn), repeats)
    tracker = phema.PowerEMA(model, profiles)
    update_s = median_seconds(lambda: tracker.update(model.parameters(), 1000), repeats)
    with tempfile.TemporaryDirectory() as tmp:
        save_s = median_seconds(lambda: phema.save_snapshot(tmp, tracker, 1000, precision), max(3, repeats // 5))
        size = phema.snapshot_path(tmp, 1000).stat().st_size
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    per_1000 = 1000 * update_s + (1000 / freq) * save_s
    return {"config": f"{Path(path).name} (batch {len(x)})", "params": params, "snapshot_mb": size / 2**20, "train_step_ms": 1e3 * train_s,
            "update_ms": 1e3 * update_s, "snapshot_s": save_s, "overhead_s_per_1000": per_1000,
            "overhead_pct": 100 * per_1000 / (1000 * train_s)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="configs/edm_digits.py")
    parser.add_argument("--profiles", default="0.05,0.1")
    parser.add_argument("--freq", type=int, default=50, help="training.post_hoc_ema_freq")
    parser.add_argument("--precision", default="fp32", choices=sorted(phema.PRECISIONS))
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--batch", type=int, default=0, help="training batch of the step timed (0: the config's)")
    args = parser.parse_args()
    profiles = [float(s) for s in args.profiles.split(",")]
    print(f"profiles σ_rel {profiles}, a snapshot every {args.freq} steps ({args.precision}), "
          f"{torch.get_num_threads()} threads, {torch.__version__}")
    print("| config | parameters | snapshot (MB) | train step (ms) | profile update (ms) | snapshot write (s) | "
          "overhead (s / 1000 steps) | overhead (% of training) |")
    print("|---|---|---|---|---|---|---|---|")
    for path in args.configs.split(","):
        r = measure(path, profiles, args.freq, args.precision, args.repeats, args.batch)
        print(f"| {r['config']} | {r['params']:,} | {r['snapshot_mb']:.2f} | {r['train_step_ms']:.1f} | "
              f"{r['update_ms']:.3f} | {r['snapshot_s']:.4f} | {r['overhead_s_per_1000']:.2f} | "
              f"{r['overhead_pct']:.1f} |")


if __name__ == "__main__":
    main()
