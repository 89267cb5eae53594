"""Sampler accuracy versus cost, against exact answers, side by side with diffusers' schedulers.

Every sampler is driven by the exact score of a Gaussian mixture (2-D: `toy.default_mixture`, 16-D:
`toy.high_dim_mixture`), so the target distribution is known. The error is the sliced W₂ distance of the samples
to fresh exact samples, in units of its noise floor (≈ 1.0 means as good as exact samples of that size; see
`sde_diffusion.metrics_toy.sliced_w2_ratio`). All samplers start from the same prior draw (common random
numbers), so their differences are not hidden by the floor's own scatter.

diffusers' `DPMSolverMultistepScheduler` (dpmsolver++, orders 2 and 3) and `DDIMScheduler` run on the DDPM chain
(β linear from 1e-4 to 0.02 over 1000 steps, the discretization of our VP SDE with β_min = 0.1, β_max = 20), fed the
exact ε = −√(1 − ᾱ_k)·∇log p_k(x) of that chain; default configurations except DDIM's clip_sample=False (its
default clips x̂_0 to [−1, 1], meant for images). diffusers is a benchmark-only dependency
(benchmarks/requirements.txt); without it those rows are skipped.

    python benchmarks/samplers.py                 # the full table (≈ 10 minutes on one busy CPU core)
    python benchmarks/samplers.py --quick         # fewer points and samplers, for a smoke test
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sde_diffusion.metrics_toy import sliced_w2_noise_floor, sliced_w2_ratio  # noqa: E402
from sde_diffusion.sampling import sample  # noqa: E402
from sde_diffusion.sdes import SubVPSDE, VESDE, VPSDE  # noqa: E402
from sde_diffusion.toy import GaussianMixture, default_mixture, high_dim_mixture  # noqa: E402

NFE_BUDGETS = (10, 20, 50)
SEED = 0

# Our samplers: name → (method, options, steps for a budget of `nfe` score calls including the final Tweedie step).
OURS: Dict[str, Tuple[str, dict, Callable[[int], int]]] = {
    "dpm_solver++ 3M (λ grid)": ("dpm_solver", dict(order=3), lambda nfe: nfe - 1),
    "dpm_solver++ 2M (λ grid)": ("dpm_solver", dict(order=2), lambda nfe: nfe - 1),
    "dpm_solver++ 3M (t grid)": ("dpm_solver", dict(order=3, grid="time"), lambda nfe: nfe - 1),
    "ddim η=0": ("ddim", {}, lambda nfe: nfe - 1),
    "ddim η=1": ("ddim", dict(eta=1.0), lambda nfe: nfe - 1),
    "heun (EDM ρ=7)": ("heun", {}, lambda nfe: nfe // 2),
    "ancestral": ("ancestral", {}, lambda nfe: nfe - 1),
    "pc euler_maruyama": ("pc", {}, lambda nfe: nfe - 1),
    "pc reverse_diffusion": ("pc", dict(predictor="reverse_diffusion"), lambda nfe: nfe - 1),
    "pc ancestral_sampling": ("pc", dict(predictor="ancestral_sampling"), lambda nfe: nfe - 1),
    "pc reverse_diffusion + langevin": ("pc", dict(predictor="reverse_diffusion", corrector="langevin"),
                                        lambda nfe: (nfe - 1) // 2),
    "pc euler_maruyama + ald": ("pc", dict(corrector="ald"), lambda nfe: (nfe - 1) // 2),
    "sde (torchsde euler)": ("sde", dict(sde_method="euler"), lambda nfe: nfe - 1),
    "sde (torchsde milstein)": ("sde", dict(sde_method="milstein"), lambda nfe: nfe - 1),
    "sde (torchsde srk)": ("sde", dict(sde_method="srk"), lambda nfe: (nfe - 1) // 4),
}
# Deterministic ones: compared with diffusers' (deterministic) schedulers from the same prior draw.
DETERMINISTIC = ("dpm_solver++ 3M (λ grid)", "dpm_solver++ 2M (λ grid)", "dpm_solver++ 3M (t grid)", "ddim η=0",
                 "heun (EDM ρ=7)")
QUICK = ("dpm_solver++ 3M (λ grid)", "dpm_solver++ 2M (λ grid)", "ddim η=0", "heun (EDM ρ=7)", "ancestral")
# The adaptive ODE solver picks its own NFE: one row per tolerance.
ODE_TOLERANCES = (1e-2, 1e-3, 1e-5)

SDES = {"VP (linear)": VPSDE, "sub-VP": SubVPSDE, "VE": VESDE}
TIMED_SDE = "VP (linear)"
DIFFUSERS = ("diffusers DPM++ 3M", "diffusers DPM++ 2M", "diffusers DDIM")


def diffusers_sample(name: str, mixture: GaussianMixture, x: torch.Tensor, nfe: int) -> torch.Tensor:
    """Run a diffusers scheduler on the 1000-step DDPM chain with the exact ε of that chain; nfe model calls."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    chain = dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear")
    if name == "diffusers DDIM":
        scheduler = DDIMScheduler(clip_sample=False, **chain)
    else:
        scheduler = DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=3 if "3M" in name else 2,
                                                **chain)
    scheduler.set_timesteps(nfe)
    alphas_cumprod = scheduler.alphas_cumprod.double()
    x = x * scheduler.init_noise_sigma
    for k in scheduler.timesteps:
        abar = alphas_cumprod[int(k)]
        alpha, sigma = abar.sqrt(), (1 - abar).sqrt()
        eps = -sigma * mixture.score(x, alpha, sigma).double()
        x = scheduler.step(eps.to(x.dtype), k, x).prev_sample
    return x


def run_ours(name, sde, mixture, n, nfe, **overrides) -> Tuple[torch.Tensor, int, float]:
    method, options, steps_for = OURS[name] if name in OURS else ("ode", {}, lambda _: 1)
    options = {**options, **overrides}
    start = time.perf_counter()
    x, used = sample(mixture.marginal_score_fn(sde), sde, (n, mixture.dim), method, steps=max(1, steps_for(nfe)),
                     generator=torch.Generator().manual_seed(SEED), **options)
    return x, used, time.perf_counter() - start


def score_cost(mixture: GaussianMixture, sde, n: int, repeats: int = 10) -> float:
    """Seconds per exact score evaluation on n points (to separate the sampler's own overhead)."""
    score_fn = mixture.marginal_score_fn(sde)
    x, t = torch.randn(n, mixture.dim), torch.full((n,), 0.5)
    score_fn(x, t)
    start = time.perf_counter()
    for _ in range(repeats):
        score_fn(x, t)
    return (time.perf_counter() - start) / repeats


class StandardNormal(GaussianMixture):
    """N(0, I) data, whose score −x/(α² + σ²) costs next to nothing: timing it shows a sampler's own overhead."""

    def __init__(self, dim: int):
        super().__init__(weights=[1.0], means=torch.zeros(1, dim), stds=1.0)

    def score(self, x, alpha=None, sigma=None):
        return -x / (alpha**2 + sigma**2).to(x)

    def marginal_score_fn(self, sde):
        return lambda x, t: self.score(x, sde.alpha(t)[:, None], sde.sigma(t)[:, None])


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer points and samplers")
    parser.add_argument("--json", type=Path, default=None, help="also write all numbers to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # small tensors: intra-op threads cost more than they save here

    chunks = 2 if args.quick else 5
    setups = {"d=2": (default_mixture(), 1000 if args.quick else 4000),
              "d=16": (high_dim_mixture(16), 500 if args.quick else 2000)}
    ours = QUICK if args.quick else tuple(OURS)
    try:
        import diffusers  # noqa: F401
        have_diffusers = True
    except ImportError:
        have_diffusers = False
        print("diffusers is not installed: its rows are skipped (pip install -r benchmarks/requirements.txt)")

    results: Dict[str, dict] = {}
    timing: Dict[str, Dict[str, float]] = {}
    for dim_name, (mixture, chunk) in setups.items():
        n = chunks * chunk
        floor = sliced_w2_noise_floor(mixture, chunk)
        for sde_name, make in SDES.items():
            sde = make()
            table = results.setdefault(f"{sde_name}, {dim_name}", {})
            for name in ours:
                for nfe in NFE_BUDGETS:
                    x, used, seconds = run_ours(name, sde, mixture, n, nfe)
                    table.setdefault(name, {})[nfe] = (sliced_w2_ratio(x, mixture, chunk, floor), used)
                    if nfe == NFE_BUDGETS[-1] and sde_name == TIMED_SDE:
                        timing.setdefault(name, {})[f"exact score, {dim_name}, n={n}"] = seconds / used
            for tol in ODE_TOLERANCES:
                for backend in ("torch", "scipy"):
                    x, used, seconds = run_ours("ode", sde, mixture, n, 0, rtol=tol, atol=tol, backend=backend)
                    if backend == "torch":
                        table.setdefault(f"ode RK45 rtol=atol={tol:g}", {})["adaptive"] = (
                            sliced_w2_ratio(x, mixture, chunk, floor), used)
                    if sde_name == TIMED_SDE:
                        timing.setdefault(f"ode RK45 rtol=atol={tol:g} ({backend})", {})[
                            f"exact score, {dim_name}, n={n}"] = seconds / used
            if have_diffusers and sde_name == "VP (linear)":
                for name in DIFFUSERS:
                    for nfe in NFE_BUDGETS:
                        x0 = sde.prior_sampling((n, mixture.dim), generator=torch.Generator().manual_seed(SEED))
                        start = time.perf_counter()
                        x = diffusers_sample(name, mixture, x0, nfe)
                        seconds = time.perf_counter() - start
                        table.setdefault(name, {})[nfe] = (sliced_w2_ratio(x, mixture, chunk, floor), nfe)
                        if nfe == NFE_BUDGETS[-1]:
                            timing.setdefault(name, {})[f"exact score, {dim_name}, n={n}"] = seconds / nfe
            if sde_name == TIMED_SDE:
                timing.setdefault("the exact score alone", {})[f"exact score, {dim_name}, n={n}"] = score_cost(
                    mixture, sde, n)
            print(f"done: {sde_name}, {dim_name} (n = {n})", file=sys.stderr, flush=True)
    overhead(timing, ours, have_diffusers, n=setups["d=16"][1] * chunks)

    print(report(results, timing, setups, chunks))
    if args.json:
        args.json.write_text(json.dumps({"error": {k: {r: {str(c): v for c, v in row.items()} for r, row in t.items()}
                                                   for k, t in results.items()}, "seconds_per_nfe": timing}, indent=1))


def overhead(timing, ours, have_diffusers, n: int, dim: int = 16) -> None:
    """Seconds per NFE with a nearly free score (N(0, I) data), VP (linear), NFE 50: the sampler's own cost."""
    data, sde, column = StandardNormal(dim), VPSDE(), f"overhead (free score), d={dim}, n={n}"
    for name in ours:
        _, used, seconds = run_ours(name, sde, data, n, NFE_BUDGETS[-1])
        timing[name][column] = seconds / used
    for tol in ODE_TOLERANCES:
        for backend in ("torch", "scipy"):
            _, used, seconds = run_ours("ode", sde, data, n, 0, rtol=tol, atol=tol, backend=backend)
            timing[f"ode RK45 rtol=atol={tol:g} ({backend})"][column] = seconds / used
    if have_diffusers:
        for name in DIFFUSERS:
            x0 = torch.randn(n, dim, generator=torch.Generator().manual_seed(SEED))
            start = time.perf_counter()
            diffusers_sample(name, data, x0, NFE_BUDGETS[-1])
            timing[name][column] = (time.perf_counter() - start) / NFE_BUDGETS[-1]


def report(results, timing, setups, chunks) -> str:
    lines = [f"Error = sliced W₂ / noise floor (mean over {chunks} chunks; ≈1.0 is as good as exact samples), "
             "cells 'error (NFE)' where the NFE differs from the column's budget.", ""]
    for key, table in results.items():
        lines += [f"**{key}**", "", "| sampler | NFE 10 | NFE 20 | NFE 50 |", "|---|---|---|---|"]
        for name, row in table.items():
            if "adaptive" in row:
                ratio, used = row["adaptive"]
                lines.append(f"| {name} | {ratio:.2f} ({used}) | | |")
                continue
            cells = [f"{row[b][0]:.2f}" + ("" if row[b][1] == b else f" ({row[b][1]})") for b in NFE_BUDGETS]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    vp = [k for k in results if k.startswith("VP (linear)")]
    if any(name in results[k] for k in vp for name in DIFFUSERS):
        lines += ["**Best of ours vs best of diffusers (VP linear; deterministic solvers, same prior draw)**", "",
                  "| setting | NFE | ours (best) | diffusers (best) | ratio ours/diffusers |", "|---|---|---|---|---|"]
        for key in vp:
            table = results[key]
            for nfe in (10, 20):
                mine = min((row[nfe][0], name) for name, row in table.items()
                           if name in DETERMINISTIC and nfe in row and row[nfe][1] <= nfe)
                theirs = min((table[name][nfe][0], name) for name in DIFFUSERS if name in table)
                lines.append(f"| {key} | {nfe} | {mine[0]:.2f} ({mine[1]}) | {theirs[0]:.2f} ({theirs[1]}) | "
                             f"{mine[0] / theirs[0]:.2f} |")
        lines.append("")
    columns = list(next(iter(timing.values())).keys())
    lines += [f"**Wall time per NFE (ms, one CPU thread, {TIMED_SDE}, NFE 50)**: with the exact mixture score (its cost "
              "alone in the last row), and with a nearly free score (the sampler's own overhead)",
              "", "| sampler | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for name, row in timing.items():
        lines.append(f"| {name} | " + " | ".join(f"{1000 * row[c]:.2f}" if c in row else "" for c in columns) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
