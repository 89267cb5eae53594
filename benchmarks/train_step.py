"""Time one training step (forward + backward + Adam) and one eval-mode forward of a score network.

    python benchmarks/train_step.py --config configs/vp_cifar.py --batch 8 --threads 2 --repeats 5     # CPU
    python benchmarks/train_step.py --device cuda --batch 128 --precisions fp32,bf16,bf16+compile \\
        --formats channels_last --optimizers fused --peak-tflops 989                                  # GPU

Prints one JSON line per (memory format, optimizer, precision) with the median over `repeats` timed steps (after
`warmup` untimed ones), images/s, the model FLOPs utilisation when --peak-tflops is given, and the ratio of its
median to the first row's. The variants are timed in interleaved rounds (one step of each per round), so that load
from other jobs on a shared machine falls on all of them alike.
A step is the config's loss through `get_score_fn`, backward, the warm-up learning rate, gradient clipping and
Adam, as in run_lib.train; 'training' is the optimizer run_lib builds (training.optim.make_optimizer), 'fused' the
same Adam with fused=True.
The eval forward is one network call in eval mode under torch.inference_mode. Model FLOPs are counted by
torch.utils.flop_counter (a training step counts as 3× the forward: forward, and backward to inputs and to
weights).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sde_diffusion import losses, parameterization  # noqa: E402
from sde_diffusion.training import optim  # noqa: E402
from sde_diffusion.config import load_config_file  # noqa: E402
from sde_diffusion.models import create_model, get_score_fn  # noqa: E402
from sde_diffusion.sdes import sde_from_config  # noqa: E402

TRAIN_FLOPS_PER_FORWARD = 3  # forward + backward (input and weight gradients)


def interleaved(fns: dict, warmup: int, repeats: int, device: torch.device) -> dict:
    """Seconds per call of each function, timed round by round (one call of each per round)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = {name: [] for name in fns}
    for round_ in range(warmup + repeats):
        for name, fn in fns.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            if round_ >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


def make_adam(model, config, kind: str) -> torch.optim.Optimizer:
    if kind == "training":
        return optim.make_optimizer(model.parameters(), config.optim)
    o = config.optim
    return torch.optim.Adam(model.parameters(), lr=o.lr, betas=(o.beta1, 0.999), eps=o.eps,
                            weight_decay=o.weight_decay, fused=True)


def forward_flops(model, x, cond) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x, cond)
    return counter.get_total_flops()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/vp_cifar.py")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (torch.set_num_threads)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--formats", default="contiguous,channels_last")
    parser.add_argument("--optimizers", default="training,fused")
    parser.add_argument("--precisions", default="fp32", help="any of fp32, bf16, bf16+compile (comma-separated)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="device peak for the MFU column")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    config = load_config_file(args.config)
    sde = sde_from_config(config)
    d, continuous = config.data, config.training.continuous
    loss_fn = losses.get_loss_fn(sde, continuous=continuous, reduce_mean=config.training.reduce_mean)
    variants = {}  # (format, optimizer, precision) → (train step, eval forward, forward FLOPs)
    for fmt in args.formats.split(","):
        memory_format = torch.channels_last if fmt == "channels_last" else torch.contiguous_format
        x0 = torch.rand(args.batch, d.num_channels, d.image_size, d.image_size, device=device)
        x0 = x0.contiguous(memory_format=memory_format)
        cond = parameterization.from_config(config, sde).condition(torch.full((args.batch,), 0.5, device=device))
        torch.manual_seed(0)
        base = create_model(config).to(device=device, memory_format=memory_format)
        flops = forward_flops(base, x0, cond)
        n_params = sum(p.numel() for p in base.parameters())
        for precision in args.precisions.split(","):
            for kind in args.optimizers.split(","):
                variants[fmt, kind, precision] = make_variant(
                    base, config, sde, loss_fn, x0, cond, kind, precision) + (flops,)

    fns = {}
    for (fmt, kind, precision), (train_step, eval_forward, _) in variants.items():
        fns[fmt, kind, precision, "train"] = train_step
        fns[fmt, precision, "forward"] = eval_forward  # once per model and precision, whatever the optimizer
    times = interleaved(fns, args.warmup, args.repeats, device)
    first = None
    for key, (_, _, flops) in variants.items():
        fmt, kind, precision = key
        train, forward = times[key + ("train",)], times[fmt, precision, "forward"]
        step_s, forward_s = statistics.median(train), statistics.median(forward)
        first = first or (step_s, forward_s)
        row = {"config": args.config, "device": str(device), "batch": args.batch, "format": fmt,
               "optimizer": kind, "precision": precision, "params": n_params,
               "forward_gflops": round(flops / 1e9, 1),
               "train_step_s_median": round(step_s, 4), "eval_forward_s_median": round(forward_s, 4),
               "train_step_s_min": round(min(train), 4),
               "train_ratio_to_first": round(step_s / first[0], 3),
               "forward_ratio_to_first": round(forward_s / first[1], 3),
               "train_images_per_s": round(args.batch / step_s, 1),
               "train_step_s": [round(v, 4) for v in train], "eval_forward_s": [round(v, 4) for v in forward],
               "torch": torch.__version__}
        if device.type == "cpu":
            row["threads"] = args.threads
        if args.peak_tflops:
            row["train_mfu"] = round(TRAIN_FLOPS_PER_FORWARD * flops / step_s / (args.peak_tflops * 1e12), 4)
        print(json.dumps(row), flush=True)


def make_variant(base, config, sde, loss_fn, x0, cond, kind: str, precision: str):
    """(train step, eval forward) closures for one optimizer and precision; each model gets its own optimizer."""
    continuous = config.training.continuous
    model = torch.compile(base) if precision.endswith("+compile") else base
    autocast = (torch.autocast(x0.device.type, dtype=torch.bfloat16) if precision.startswith("bf16")
                else contextlib.nullcontext())
    optimizer = make_adam(base, config, kind)
    step = [0]

    def train_step():
        base.train()
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            loss = loss_fn(get_score_fn(sde, model, continuous=continuous), x0)
        loss.backward()
        step[0] += 1
        for group in optimizer.param_groups:
            group["lr"] = optim.learning_rate(step[0], config.optim)
        if config.optim.grad_clip >= 0:
            torch.nn.utils.clip_grad_norm_(base.parameters(), max_norm=config.optim.grad_clip)
        optimizer.step()

    def eval_forward():
        base.eval()
        with torch.inference_mode(), autocast:
            model(x0, cond)

    return train_step, eval_forward


if __name__ == "__main__":
    main()
