"""Every inverse-problem method against the exact posterior of Gaussian-mixture priors (BENCHMARKS.md, "Inverse
problems").

A case is one member of the random-mixture family (`toy.random_mixture(seed)`, d = 2…64), one measurement — a
random Gaussian matrix with m = d/4 or d/2 rows (scaled by 1/√d), or noiseless inpainting of half the coordinates —
at noise σ_y ∈ {0.1, 0.01} (0 for inpainting), of one prior draw. Each method samples the posterior with the exact
prior score (VP SDE, DPM-Solver++ on 25 steps, 1000 points); the score is the cross-entropy of the samples under the
exact posterior minus its entropy (nats per posterior dimension: 0 for exact samples) and the sliced W₂ to as many
exact posterior draws, beside the same for exact draws (the floor). Inpainting adds the replacement and RePaint
constraints (sde_diffusion/controllable.py), which need no noise.

    python benchmarks/inverse_problems.py --json inverse.json     # the table (about 20 min on 2 cores)
    python benchmarks/inverse_problems.py --seeds 0 1 --quick     # a smaller run
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from sde_diffusion import controllable, inverse, sampling  # noqa: E402
from sde_diffusion.sdes import VPSDE  # noqa: E402
from sde_diffusion.toy import describe_mixture, random_mixture  # noqa: E402

METHODS = {  # label → (method, options)
    "dps ζ=1": ("dps", {}),
    "dps ζ=0.1": ("dps", {"zeta": 0.1}),
    "dps ζ=0.01": ("dps", {"zeta": 0.01}),
    "pigdm": ("pigdm", {}),
    "mmps 1 CG": ("mmps", {}),
    "mmps 3 CG": ("mmps", {"cg_steps": 3}),
}
CONSTRAINTS = ("replacement", "repaint")
MEASUREMENTS = {  # label → (rows as a fraction of d (None: inpainting half), σ_y)
    "A m=d/4 σ=0.1": (0.25, 0.1), "A m=d/2 σ=0.1": (0.5, 0.1), "A m=d/2 σ=0.01": (0.5, 0.01),
    "inpaint ½ σ=0": (None, 0.0),
}
SAMPLER, STEPS, POINTS = "dpm_solver", 25, 1000


def observation(prior, rows, noise_std, seed):
    g = torch.Generator().manual_seed(seed)
    x = inverse.FullGaussianMixture.from_prior(prior).sample(1, g)[0]
    if rows is None:
        keep = torch.arange(prior.dim) % 2 == 0
        A = inverse.Mask(keep)
    else:
        m = max(1, round(rows * prior.dim))
        A = inverse.Matrix(torch.randn(m, prior.dim, generator=g, dtype=torch.float64) / prior.dim**0.5)
    y = A(x)[0]
    return inverse.LinearObservation(A, y + noise_std * torch.randn(y.shape, generator=g, dtype=torch.float64),
                                     noise_std), x[0]


def run_case(seed: int, label: str, points: int) -> Dict:
    prior, sde = random_mixture(seed), VPSDE()
    rows, noise_std = MEASUREMENTS[label]
    obs, _ = observation(prior, rows, noise_std, seed + 100)
    post = inverse.exact_posterior(prior, obs)
    entropy = post.entropy()
    exact = post.sample(points, torch.Generator().manual_seed(1))
    result = {"seed": seed, "d": prior.dim, "posterior_dim": post.dim, "measurement": label,
              "mixture": describe_mixture(prior),
              "exact": {"gap": post.gap(exact, entropy), "sw2": post.sliced_w2(exact, seed=2)}}
    prior_score = prior.marginal_score_fn(sde)
    shape = (points, prior.dim)
    runs = {name: dict(score=inverse.posterior_score(prior_score, sde, obs, method, **options))
            for name, (method, options) in METHODS.items()}
    if rows is None:
        mask = obs.A.matrix().sum(0).bool()
        known = torch.zeros(prior.dim, dtype=torch.float64).masked_scatter(mask, obs.y.double())
        for name in CONSTRAINTS:
            runs[name] = dict(score=prior_score, constraint=controllable.inpainting(sde, known.expand(*shape), mask,
                                                                                      method=name))
    for name, run in runs.items():
        start = time.time()
        x, nfe = sampling.sample(run["score"], sde, shape, SAMPLER, steps=STEPS, dtype=torch.float64,
                                 generator=torch.Generator().manual_seed(3), constraint=run.get("constraint"))
        result[name] = {"gap": post.gap(x, entropy), "sw2": post.sliced_w2(x), "nfe": nfe,
                        "residual": obs.residual_norm(x).mean().item(), "seconds": time.time() - start}
    return result


def table(results: List[Dict]) -> str:
    names = list(METHODS) + list(CONSTRAINTS)
    lines = ["| measurement | score | exact draws | " + " | ".join(names) + " |",
             "|---|---|---|" + "---|" * len(names)]
    for label in MEASUREMENTS:
        cases = [r for r in results if r["measurement"] == label]
        if not cases:
            continue
        for key, what in (("gap", "gap, median (worst)"), ("sw2", "sliced W₂, median (worst)")):
            cells = []
            for name in ["exact"] + names:
                values = [r[name][key] for r in cases if name in r]
                worst = max(values, key=abs) if values else None
                cells.append("" if not values else f"{statistics.median(values):.3g} ({worst:.3g})")
            lines.append(f"| {label} | {what} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=list(range(8)))
    parser.add_argument("--quick", action="store_true", help="300 points per case")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = []
    for seed in args.seeds:
        for label in MEASUREMENTS:
            result = run_case(seed, label, 300 if args.quick else POINTS)
            results.append(result)
            print(f"seed {seed} ({result['mixture']}) {label}: " + ", ".join(
                f"{name} {r['gap']:.3f}/{r['sw2']:.3f}" for name, r in result.items() if isinstance(r, dict)),
                flush=True)
            if args.json:
                args.json.write_text(json.dumps(results, indent=1))
    print(table(results))


if __name__ == "__main__":
    main()
