"""3×3 convolution weight gradient on CPU: oneDNN (torch's stock kernel) against the GEMM form of models/convs.py.

    python benchmarks/conv_weight_grad.py --threads 2 --repeats 21

Part 1, per shape (B, C_in, C_out, H=W), channels_last: the minimum over `repeats` interleaved calls of each
kernel (the minimum, because on a shared machine other jobs only ever add time), their ratio, and whether
Conv3x3's dispatch rule (convs.gemm_shape) picks the GEMM there.

Part 2, the 3×3 convolutions of one training step of --config at --batch, found by running the network once
with hooks: per-step totals of the forward, the input gradient and the weight gradient, in NCHW (as
score_sde_pytorch runs) and channels_last (as run_lib trains), with the weight gradient by oneDNN, by GEMM, and
as Conv3x3 dispatches it. Medians over `rounds` interleaved rounds.
"""
from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sde_diffusion import parameterization  # noqa: E402
from sde_diffusion.config import load_config_file  # noqa: E402
from sde_diffusion.models import create_model  # noqa: E402
from sde_diffusion.models.convs import (GEMM_MAX_POSITIONS, GEMM_MIN_CHANNELS, GEMM_MIN_CHANNELS_SMALL_BATCH,  # noqa
                                       SMALL_BATCH, Conv3x3, gemm_shape, weight_grad_3x3)
from sde_diffusion.sdes import sde_from_config  # noqa: E402

SHAPES = [(8, 128, 128, 32), (8, 256, 128, 32), (8, 128, 256, 16), (8, 128, 128, 8), (8, 256, 256, 16),
          (8, 512, 256, 16), (8, 256, 256, 8), (8, 256, 256, 4), (16, 256, 256, 16), (32, 256, 256, 16),
          (128, 256, 256, 4), (16, 128, 128, 16), (32, 128, 128, 16), (32, 256, 128, 8), (64, 128, 128, 8),
          (128, 128, 128, 8), (16, 64, 64, 64), (128, 32, 32, 8), (128, 64, 64, 4)]


def onednn_weight_grad(grad_out, x, weight):
    return torch.ops.aten.convolution_backward(grad_out, x, weight, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1,
                                               [False, True, False])[1]


def input_grad(grad_out, x, weight):
    return torch.ops.aten.convolution_backward(grad_out, x, weight, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1,
                                               [True, False, False])[0]


def tensors(b, c_in, c_out, h, w, memory_format):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(b, c_in, h, w, generator=g).contiguous(memory_format=memory_format)
    weight = torch.randn(c_out, c_in, 3, 3, generator=g).contiguous(memory_format=memory_format)
    grad_out = torch.randn(b, c_out, h, w, generator=g).contiguous(memory_format=memory_format)
    return x, weight, grad_out


def per_shape(repeats: int) -> None:
    for b, c_in, c_out, size in SHAPES:
        x, weight, grad_out = tensors(b, c_in, c_out, size, size, torch.channels_last)
        kernels = {"onednn": lambda: onednn_weight_grad(grad_out, x, weight),
                   "gemm": lambda: weight_grad_3x3(grad_out, x)}
        times = {name: [] for name in kernels}
        for round_ in range(repeats + 1):
            for name, fn in kernels.items():
                start = time.perf_counter()
                fn()
                if round_:
                    times[name].append(time.perf_counter() - start)
        best = {name: min(ts) for name, ts in times.items()}
        print(json.dumps({"shape_B_Cin_Cout_HW": [b, c_in, c_out, size], "onednn_ms": round(best["onednn"] * 1e3, 2),
                          "gemm_ms": round(best["gemm"] * 1e3, 2),
                          "gemm_over_onednn": round(best["gemm"] / best["onednn"], 3),
                          "dispatch": "gemm" if gemm_shape(b, c_in, c_out, size, size) else "onednn"}), flush=True)


def step_inventory(config, batch: int) -> collections.Counter:
    """(B, C_in, C_out, H, W) → how many 3×3 convolutions of that shape one forward pass runs."""
    model = create_model(config)
    seen = collections.Counter()
    def count(m, args):
        batch, _, height, width = args[0].shape
        seen.update([(batch, m.in_channels, m.out_channels, height, width)])

    hooks = [m.register_forward_pre_hook(count) for m in model.modules() if isinstance(m, Conv3x3)]
    d, sde = config.data, sde_from_config(config)
    with torch.no_grad():
        model(torch.zeros(batch, d.num_channels, d.image_size, d.image_size),
              parameterization.from_config(config, sde).condition(torch.full((batch,), 0.5)))
    for hook in hooks:
        hook.remove()
    return seen


def per_step(config, batch: int, rounds: int) -> None:
    inventory = step_inventory(config, batch)
    print(json.dumps({"config_3x3_convs": sum(inventory.values()), "shapes": len(inventory)}), flush=True)
    data = {fmt: [(tensors(*shape, mf), n) for shape, n in inventory.items()]
            for fmt, mf in (("nchw", torch.contiguous_format), ("channels_last", torch.channels_last))}
    dispatched = lambda g, x, w: (weight_grad_3x3(g, x) if gemm_shape(x.shape[0], x.shape[1], g.shape[1], *x.shape[2:])
                                  else onednn_weight_grad(g, x, w))
    parts = {"forward": lambda g, x, w: F.conv2d(x, w, padding=1), "input_grad": lambda g, x, w: input_grad(g, x, w),
             "weight_grad_onednn": lambda g, x, w: onednn_weight_grad(g, x, w),
             "weight_grad_gemm": lambda g, x, w: weight_grad_3x3(g, x), "weight_grad_dispatched": dispatched}
    times = collections.defaultdict(list)
    for round_ in range(rounds + 1):
        for fmt, entries in data.items():
            for part, fn in parts.items():
                if fmt == "nchw" and part in ("weight_grad_gemm", "weight_grad_dispatched"):
                    continue  # Conv3x3 only takes the GEMM path for channels_last inputs
                start = time.perf_counter()
                for (x, weight, grad_out), n in entries:
                    for _ in range(n):
                        fn(grad_out, x, weight)
                if round_:
                    times[fmt, part].append(time.perf_counter() - start)
    for (fmt, part), ts in times.items():
        print(json.dumps({"format": fmt, "part": part, "seconds_per_step_median": round(statistics.median(ts), 3),
                          "all": [round(t, 3) for t in ts]}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=21, help="calls per kernel and shape (part 1)")
    parser.add_argument("--config", default="configs/vp_cifar.py")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=4, help="interleaved rounds of the step's convolutions (part 2)")
    parser.add_argument("--skip-shapes", action="store_true", help="only part 2")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(json.dumps({"threads": args.threads, "torch": torch.__version__, "GEMM_MIN_CHANNELS": GEMM_MIN_CHANNELS,
                      "GEMM_MIN_CHANNELS_SMALL_BATCH": GEMM_MIN_CHANNELS_SMALL_BATCH, "SMALL_BATCH": SMALL_BATCH,
                      "GEMM_MAX_POSITIONS": GEMM_MAX_POSITIONS}), flush=True)
    if not args.skip_shapes:
        per_shape(args.repeats)
    per_step(load_config_file(args.config), args.batch, args.rounds)


if __name__ == "__main__":
    main()
