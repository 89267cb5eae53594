"""Bits/dim by the probability-flow ODE: `sampling.dopri5` on the device against scipy's `solve_ivp` on the host.

    python benchmarks/likelihood.py                                   # fixture DDPM++ (score_sde weights), CPU
    python benchmarks/likelihood.py --config configs/vp_cifar.py --checkpoint none --batch 1   # full-size DDPM++
    python benchmarks/likelihood.py --device cuda --batch 64          # on a GPU

Both backends solve the same problem (`likelihood.bits_per_dim`: same images, dequantization noise and
Rademacher probe, same rtol/atol) and report wall time, NFE (score evaluations, each a forward and a backward
pass) and bits/dim, one JSON line per backend and repeat, then a summary line with the speed-up and the bits/dim
difference. The default network is the DDPM++ of the score_sde_pytorch fixture `ddpmpp_vp_small_perturbed`
(ncsnpp, nf = 24, 16×16×3, 0.99 M parameters, O(1) outputs), so the ODE has realistic, non-trivial dynamics;
`--checkpoint none` builds `--config` with fresh weights instead (whose near-zero outputs make the ODE easy).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sde_diffusion import likelihood, sdes  # noqa: E402
from sde_diffusion.config import load_config_file  # noqa: E402
from sde_diffusion.interop import config_from_score_sde, load_score_sde_pytorch  # noqa: E402
from sde_diffusion.models import create_model, get_score_fn  # noqa: E402

FIXTURE = ROOT.parent / "shared" / "fixtures" / "score_sde_pytorch" / "ddpmpp_vp_small_perturbed.pth"
NUM_LEVELS = 256  # 8-bit images
DTYPES = {"float32": torch.float32, "float64": torch.float64}


def build(args):
    """(config, model) from the fixture checkpoint (its JSON holds the config) or from --config with fresh weights."""
    if args.checkpoint != "none":
        checkpoint = Path(args.checkpoint)
        config, _ = config_from_score_sde(json.loads(checkpoint.with_suffix(".json").read_text())["config"])
        return config, load_score_sde_pytorch(checkpoint, config, use_ema=True)
    config = load_config_file(args.config)
    torch.manual_seed(0)
    return config, create_model(config).eval()


def solve(score_fn, sde, levels, to_model, backend: str, args):
    start = time.perf_counter()
    bpd, _, nfe = likelihood.bits_per_dim(score_fn, sde, levels, num_levels=NUM_LEVELS, to_model=to_model,
                                          divergence=args.divergence, rtol=args.rtol, atol=args.atol,
                                          generator=torch.Generator(device=levels.device).manual_seed(args.seed),
                                          dtype=DTYPES[args.dtype], backend=backend)
    if levels.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, nfe, bpd.double().cpu()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=str(FIXTURE), help="score_sde_pytorch checkpoint (with its .json), "
                        "or 'none' for --config with fresh weights")
    parser.add_argument("--config", default="configs/vp_cifar.py")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--divergence", choices=likelihood.DIVERGENCES, default="rademacher")
    parser.add_argument("--rtol", type=float, default=likelihood.DEFAULT_RTOL)
    parser.add_argument("--atol", type=float, default=likelihood.DEFAULT_ATOL)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backends", nargs="+", default=["torch", "scipy"], choices=sorted(likelihood.ODE_SOLVERS))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    config, model = build(args)
    model = model.to(device=device, dtype=DTYPES[args.dtype])
    sde = sdes.sde_from_config(config)
    score_fn = get_score_fn(sde, model, continuous=config.training.continuous)
    shape = (args.batch, config.data.num_channels, config.data.image_size, config.data.image_size)
    levels = torch.randint(0, NUM_LEVELS, shape, generator=torch.Generator().manual_seed(args.seed)).to(device)
    to_model = (lambda y: 2.0 * y - 1.0) if config.data.centered else (lambda y: y)
    params = sum(p.numel() for p in model.parameters())
    setting = dict(model=config.model.name, params=params, shape=list(shape), device=str(device), dtype=args.dtype,
                   threads=args.threads, divergence=args.divergence, rtol=args.rtol, atol=args.atol,
                   torch=torch.__version__)

    results = {}
    for backend in args.backends:
        runs = [solve(score_fn, sde, levels, to_model, backend, args) for _ in range(args.repeats)]
        for seconds, nfe, bpd in runs:
            print(json.dumps(dict(backend=backend, seconds=round(seconds, 3), nfe=nfe,
                                  ms_per_nfe=round(1000 * seconds / nfe, 2), bpd=[round(v, 6) for v in bpd.tolist()],
                                  **setting)), flush=True)
        results[backend] = (statistics.median(r[0] for r in runs), runs[0][1], runs[0][2])
    if len(results) == 2:
        (t_torch, nfe_torch, bpd_torch), (t_scipy, nfe_scipy, bpd_scipy) = results["torch"], results["scipy"]
        print(json.dumps(dict(summary=True, speedup_torch_over_scipy=round(t_scipy / t_torch, 3),
                              nfe_torch=nfe_torch, nfe_scipy=nfe_scipy,
                              max_bpd_difference=float((bpd_torch - bpd_scipy).abs().max()),
                              mean_bpd_torch=float(bpd_torch.mean()), mean_bpd_scipy=float(bpd_scipy.mean()),
                              **setting)))


if __name__ == "__main__":
    main()
