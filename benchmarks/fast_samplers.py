"""Few-step sampling (NFE 4–20) against exact answers, side by side with diffusers' schedulers.

Every solver is driven by the exact score of a Gaussian mixture (d = 2: `toy.default_mixture`, d = 16:
`toy.high_dim_mixture`) and starts from the same prior draws. Three errors per run:

* rms: RMS distance per coordinate to the exact probability-flow solution from the same draw (a float64 dopri5
  integration at rtol = atol = 1e-10), for deterministic solvers (ours only: diffusers' chain is another ODE);
* gap: cross-entropy of the samples under the exact density minus its entropy, nats per dimension
  (`metrics_toy.cross_entropy_gap`; + over-dispersed, − under-dispersed; exact samples scatter by ≈ 0.01);
* sw2: sliced W₂ to fresh exact samples in units of its noise floor (≈ 1 for exact samples).

Our rows (default grids unless the name says: "sech", "λ grid") count NFE exactly
(`sampling.steps_for_nfe`), each without and with ("+denoise") the final denoising call. "tuned" rows use `sampling.tune_grid` (1024 other draws). diffusers' schedulers
run the 1000-step DDPM chain (β 1e-4 … 0.02, the discretization of our VP SDE) with the exact ε of that chain at
their own time steps, each at several documented settings; IPNDMScheduler is left out (it defines its own cosine
chain, not the DDPM one). diffusers rows exist for VP only; for VE the comparison is against our DPM-Solver++ 2M.

    python benchmarks/fast_samplers.py              # the full tables (≈ 20 minutes on one CPU core)
    python benchmarks/fast_samplers.py --quick      # d = 16, VP only, fewer NFEs
    python benchmarks/fast_samplers.py --family 1002,1003,1019,1020 --points 20000 --nfes 5,6,8,10   # family members
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sde_diffusion.metrics_toy import cross_entropy_gap, mixture_entropy, sliced_w2_noise_floor  # noqa: E402
from sde_diffusion.metrics_toy import sliced_w2_ratio  # noqa: E402
from sde_diffusion.sampling import ode_decode, sample, steps_for_nfe, tune_grid  # noqa: E402
from sde_diffusion.sdes import VESDE, VPSDE  # noqa: E402
from sde_diffusion.toy import (GaussianMixture, default_mixture, describe_mixture, high_dim_mixture,  # noqa: E402
                               random_mixture)

NFES = (4, 5, 6, 8, 10, 15, 20)
POINTS, CHUNK = 4000, 1000  # prior draws per run (--points), sliced-W₂ chunk (a quarter of them)
SEED = 0
# name → (method, options); deterministic ones also get the rms column and a tuned-grid row where listed in TUNED
OURS: Dict[str, Tuple[str, dict]] = {  # rows without a grid label: the sampler's default grid
    "dpm_solver++ 2M": ("dpm_solver", dict(order=2)),
    "dpm_solver++ 3M": ("dpm_solver", dict(order=3)),
    "dpm_solver++ 3M (sech)": ("dpm_solver", dict(order=3, grid="sech")),
    "unipc bh1 p3": ("unipc", dict(order=3, variant="bh1")),
    "unipc bh2 p2": ("unipc", dict(order=2)),
    "unipc bh2 p3": ("unipc", dict(order=3)),
    "unipc bh2 p3 (sech)": ("unipc", dict(order=3, grid="sech")),
    "unipc bh2 p3 no corrector": ("unipc", dict(order=3, corrector=False)),
    "ipndm p4": ("ipndm", dict(order=4)),
    "ipndm p4 (λ grid)": ("ipndm", dict(order=4, grid="logsnr")),
    "deis tAB3": ("deis", dict(order=3)),
    "ddim": ("ddim", dict()),
    "heun": ("heun", dict()),
    "dpm_solver++ 2M SDE": ("dpm_solver_sde", dict(order=2)),
    "dpm_solver++ 3M SDE": ("dpm_solver_sde", dict(order=3)),
    "edm_sde": ("edm_sde", dict()),
    "restart": ("restart", dict()),
}
# suffix of the rows whose last score call is the final denoising step (the others end with a solver step at eps)
DENOISED = " +denoise"
# rows that are not at the sampler's default grid: left out of "ours best at default grids"
OFF_DEFAULT = ("(sech)", "(λ grid)")
STOCHASTIC = ("dpm_solver++ 2M SDE", "dpm_solver++ 3M SDE", "edm_sde", "restart")
TUNED = ("unipc bh2 p3", "dpm_solver++ 3M", "ipndm p4")
TUNE_BATCH = 1024

CHAIN = dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear")


def diffusers_settings() -> Dict[str, Tuple[str, dict, int]]:
    """name → (scheduler class, options, score calls per step beyond the first)."""
    settings = {}
    for spacing in ("linspace", "leading", "trailing"):  # "leading" ends at t = 0; the others one step above
        for order in (2, 3):
            settings[f"DPMSolverMultistep {order}M ({spacing})"] = (
                "DPMSolverMultistepScheduler", dict(algorithm_type="dpmsolver++", solver_order=order,
                                                    timestep_spacing=spacing), 0)
        settings[f"DPMSolverMultistep 3M (λ-uniform, {spacing})"] = (
            "DPMSolverMultistepScheduler", dict(algorithm_type="dpmsolver++", solver_order=3, use_lu_lambdas=True,
                                                timestep_spacing=spacing), 0)
        for variant in ("bh1", "bh2"):
            settings[f"UniPCMultistep {variant} ({spacing})"] = (
                "UniPCMultistepScheduler", dict(solver_type=variant, timestep_spacing=spacing), 0)
        settings[f"DEISMultistep 3 ({spacing})"] = ("DEISMultistepScheduler", dict(timestep_spacing=spacing), 0)
        settings[f"DDIM ({spacing})"] = ("DDIMScheduler", dict(clip_sample=False, set_alpha_to_one=False,
                                                               timestep_spacing=spacing), 0)
    settings["HeunDiscrete (Karras σ)"] = ("HeunDiscreteScheduler", dict(use_karras_sigmas=True), 1)
    settings["HeunDiscrete"] = ("HeunDiscreteScheduler", {}, 1)
    return settings


def diffusers_sample(cls_name: str, options: dict, mixture: GaussianMixture, z: torch.Tensor, steps: int
                     ) -> Tuple[torch.Tensor, int]:
    """One scheduler on the DDPM chain with the exact ε; returns (x, model calls)."""
    import diffusers

    scheduler = getattr(diffusers, cls_name)(**CHAIN, **options)
    scheduler.set_timesteps(steps)
    abar = scheduler.alphas_cumprod.double()
    sig_table = ((1 - abar) / abar).sqrt().numpy()
    x = z.double() * float(scheduler.init_noise_sigma)
    calls = 0
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(x, t)
        sig = float(np.interp(float(t), np.arange(len(sig_table)), sig_table))  # the chain's σ/α at t
        alpha = torch.tensor(1 / math.sqrt(1 + sig**2), dtype=torch.float64)
        sigma = alpha * sig
        eps = -sigma * mixture.score(model_input, alpha, sigma).double()
        calls += 1
        x = scheduler.step(eps, t, x).prev_sample
    return x, calls


def errors(x: torch.Tensor, mixture, entropy, floor, reference=None) -> Dict[str, float]:
    out = {"gap": cross_entropy_gap(x, mixture, entropy), "sw2": sliced_w2_ratio(x.float(), mixture, CHUNK, floor)}
    if reference is not None:
        out["rms"] = (x.double() - reference).pow(2).mean().sqrt().item()
    return out


def run_setting(sde_name: str, sde, mixture, nfes, with_diffusers: bool, log) -> Dict[str, Dict[int, dict]]:
    score_fn = mixture.marginal_score_fn(sde)
    entropy, floor = mixture_entropy(mixture), sliced_w2_noise_floor(mixture, CHUNK)
    z = sde.prior_sampling((POINTS, mixture.dim), generator=torch.Generator().manual_seed(SEED), dtype=torch.float64)
    reference, _ = ode_decode(score_fn, sde, z, rtol=1e-10, atol=1e-10)
    table: Dict[str, Dict[int, dict]] = {}
    for name, (method, options) in OURS.items():
        for nfe in nfes:
            for denoise in (False, True):
                try:
                    steps = steps_for_nfe(sde, method, nfe, denoise=denoise, **options)
                except ValueError:
                    continue
                x, used = sample(score_fn, sde, z.shape, method, steps=steps, x_T=z, denoise=denoise,
                                 dtype=torch.float64, generator=torch.Generator().manual_seed(SEED + 1), **options)
                result = dict(errors(x, mixture, entropy, floor, None if name in STOCHASTIC or denoise else reference),
                              nfe=used, denoise=denoise)
                table.setdefault(name + (DENOISED if denoise else ""), {})[nfe] = result
        if name in TUNED:
            for nfe in nfes:
                grid = tune_grid(score_fn, sde, (TUNE_BATCH, mixture.dim), method, nfe, seed=SEED + 7,
                                 dtype=torch.float64, start=options.get("grid"),
                                 **{k: v for k, v in options.items() if k != "grid"})
                x, used = sample(score_fn, sde, z.shape, method, grid=grid, x_T=z, denoise=False,
                                 dtype=torch.float64, **{k: v for k, v in options.items() if k != "grid"})
                table.setdefault(name + " (tuned)", {})[nfe] = dict(errors(x, mixture, entropy, floor, reference),
                                                                     nfe=used, denoise=False)
        log(f"{sde_name}: {name}")
    if with_diffusers:
        for name, (cls_name, options, extra) in diffusers_settings().items():
            for nfe in nfes:
                steps = (nfe + 1) // 2 if extra else nfe
                try:
                    x, used = diffusers_sample(cls_name, options, mixture, z, steps)
                except Exception as err:  # a setting a scheduler version refuses: report, go on
                    log(f"  {name} @ {steps}: {type(err).__name__}: {err}")
                    continue
                table.setdefault("diffusers " + name, {})[nfe] = dict(errors(x, mixture, entropy, floor), nfe=used)
        log(f"{sde_name}: diffusers")
    return table


def best_of(table, names, nfe, key) -> Tuple[float, str]:
    cells = [(abs(table[n][nfe][key]), n) for n in names if n in table and nfe in table[n] and key in table[n][nfe]
             and table[n][nfe]["nfe"] <= nfe and math.isfinite(table[n][nfe][key])]
    return min(cells) if cells else (math.nan, "—")


def report(results: Dict[str, Dict], nfes) -> str:
    lines = []
    for setting, table in results.items():
        lines += [f"**{setting}**: rms / gap / sw2 per NFE (gap in nats/dim; rms only for deterministic rows)", "",
                  "| solver | " + " | ".join(f"NFE {n}" for n in nfes) + " |", "|---|" + "---|" * len(nfes)]
        for name, row in table.items():
            cells = []
            for nfe in nfes:
                r = row.get(nfe)
                if r is None:
                    cells.append("")
                    continue
                rms = f"{r['rms']:.3f} / " if "rms" in r else ""
                cells.append(f"{rms}{r['gap']:+.3f} / {r['sw2']:.2f}" + ("" if r["nfe"] == nfe else f" ({r['nfe']})"))
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
        ours = [n for n in table if not n.startswith("diffusers") and "(tuned)" not in n
                and not any(mark in n for mark in OFF_DEFAULT)]
        tuned = [n for n in table if "(tuned)" in n]
        theirs = [n for n in table if n.startswith("diffusers")]
        baseline = theirs or ["dpm_solver++ 2M"]
        label = "diffusers' best" if theirs else "our DPM-Solver++ 2M"
        lines += [f"Ratios to {label} (|gap| and sw2; < 1 means ours is better)", "",
                  "| NFE | ours best \\|gap\\| | theirs \\|gap\\| | ratio | ours tuned ratio | ours best sw2 | theirs sw2 | "
                  "ratio | ours tuned ratio |", "|---|---|---|---|---|---|---|---|---|"]
        for nfe in nfes:
            cells = [str(nfe)]
            for key in ("gap", "sw2"):
                mine, theirs_best, mine_tuned = (best_of(table, ours, nfe, key), best_of(table, baseline, nfe, key),
                                                 best_of(table, tuned, nfe, key))
                cells += [f"{mine[0]:.3f} ({mine[1]})", f"{theirs_best[0]:.3f} ({theirs_best[1]})",
                          f"{mine[0] / theirs_best[0]:.2f}", f"{mine_tuned[0] / theirs_best[0]:.2f}"]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> None:
    global POINTS, CHUNK
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="d = 16, VP only, NFE 5, 8, 10")
    parser.add_argument("--json", type=Path, default=None, help="also write all numbers to this file")
    parser.add_argument("--family", default=None,
                        help="comma-separated seeds of toy.random_mixture members (VP only), instead of the fixed "
                             "mixtures")
    parser.add_argument("--points", type=int, default=4000, help="prior draws per run")
    parser.add_argument("--nfes", default=None, help="comma-separated NFEs (default: all, or 5,8,10 with --quick)")
    args = parser.parse_args(argv)
    POINTS, CHUNK = args.points, args.points // 4
    torch.set_num_threads(1)
    try:
        import diffusers  # noqa: F401
        have_diffusers = True
    except ImportError:
        have_diffusers = False
        print("diffusers is not installed: its rows are skipped (pip install -r benchmarks/requirements.txt)")
    nfes = tuple(int(n) for n in args.nfes.split(",")) if args.nfes else (5, 8, 10) if args.quick else NFES
    mixtures = {"d=16": high_dim_mixture(16)} if args.quick else {"d=2": default_mixture(), "d=16": high_dim_mixture(16)}
    sdes = {"VP": VPSDE} if args.quick else {"VP": VPSDE, "VE": VESDE}
    if args.family:
        mixtures = {f"member {seed} ({describe_mixture(random_mixture(int(seed)))})": random_mixture(int(seed))
                    for seed in args.family.split(",")}
        sdes = {"VP": VPSDE}
    results = {}
    for dim_name, mixture in mixtures.items():
        for sde_name, make in sdes.items():
            key = f"{sde_name}, {dim_name}"
            results[key] = run_setting(key, make(), mixture, nfes, have_diffusers and sde_name == "VP",
                                       lambda text: print(text, file=sys.stderr, flush=True))
    print(report(results, nfes))
    if args.json:
        args.json.write_text(json.dumps({k: {n: {str(c): v for c, v in row.items()} for n, row in t.items()}
                                         for k, t in results.items()}, indent=1))


if __name__ == "__main__":
    main()
