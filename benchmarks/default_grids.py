"""Default time grids and step counts chosen on one family of random Gaussian mixtures and verified on another.

Every case is one member of the family (`toy.random_mixture(seed)`), one built-in SDE, one sampler on one grid at
one step count, driven by the exact score: its error is the cross-entropy gap of the samples under the exact
density minus the entropy (nats/dim; + over-dispersed, − under-dispersed), the median of three draws of 4000
points with the final denoising step (`sample`'s default). A case passes within ±0.03 nats/dim (±0.04 for d < 8,
where one draw scatters more).

    python benchmarks/default_grids.py select   --json select.json    # per sampler and spacing: the fewest steps
                                                                      # that pass on every selection member and SDE
    python benchmarks/default_grids.py verify   --json verify.json    # the defaults (grid and count) on the
                                                                      # verification seeds: worst case per sampler
    python benchmarks/default_grids.py verify --steps-scale 0.7       # the same at 70 % of each documented count

Selection seeds are SELECTION_SEEDS, verification seeds VERIFICATION_SEEDS (disjoint); tests/test_default_grids.py
runs a fixed subset of the verification seeds. Results are cached per case in --cache (JSON), so a rerun only
computes what is new. Two worker processes, one thread each.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from sde_diffusion import sampling  # noqa: E402
from sde_diffusion.metrics_toy import cross_entropy_gap, mixture_entropy  # noqa: E402
from sde_diffusion.sdes import EDMSDE, RectifiedFlowSDE, SubVPSDE, VESDE, VPSDE  # noqa: E402
from sde_diffusion.toy import (FAMILY_SELECTION_SEEDS, FAMILY_VERIFICATION_SEEDS, describe_mixture,  # noqa: E402
                               random_mixture)

SELECTION_SEEDS, VERIFICATION_SEEDS = FAMILY_SELECTION_SEEDS, FAMILY_VERIFICATION_SEEDS
SDES = {
    "vp": VPSDE,
    "vp_cosine": lambda: VPSDE(schedule="cosine"),
    "vp_quadratic": lambda: VPSDE(schedule="quadratic"),
    "subvp": SubVPSDE,
    "ve": VESDE,
    "edm": EDMSDE,
}
# Processes checked beside the selection's (--sdes): their defaults were not selected on them
EXTRA_SDES = {"rectified_flow": RectifiedFlowSDE}
ALL_SDES = {**SDES, **EXTRA_SDES}
# variant → (method, options): the fixed-step samplers at their default options (dpm_solver also at order 2)
VARIANTS = {
    "ddim": ("ddim", {}),
    "dpm_solver": ("dpm_solver", {}),
    "dpm_solver_2": ("dpm_solver", {"order": 2}),
    "unipc": ("unipc", {}),
    "ipndm": ("ipndm", {}),
    "deis": ("deis", {}),
    "heun": ("heun", {}),
    "dpm_solver_sde": ("dpm_solver_sde", {}),
    "edm_sde": ("edm_sde", {}),
    "restart": ("restart", {}),
    "pc": ("pc", {}),
    "ancestral": ("ancestral", {}),
    "sde": ("sde", {}),
}
SPACINGS = ("logsnr", "edm", "time", "quadratic", "sech")
LADDER = (15, 18, 20, 25, 30, 35, 40, 50, 60, 70, 80, 100, 120, 150, 200, 300, 500, 1000)
POINTS, DRAWS = 4000, 3
# What `select --members 10` found (BENCHMARKS.md): variant → (its default grid, documented steps, the selection
# case that fails at the ladder's rung below). tests/test_default_grids.py checks that the case passes the margin
# criterion at the documented count and fails it at 70 % of it, so a count cut by 30 % is caught.
SELECTED = {
    "dpm_solver": ("logsnr", 50, (6, "subvp")),
    "unipc": ("logsnr", 40, (6, "subvp")),
    "deis": ("logsnr", 40, (6, "subvp")),
    "ipndm": ("edm", 50, (6, "vp_cosine")),
    "heun": ("edm", 60, (0, "vp_cosine")),
    "ddim": ("logsnr", 200, (0, "subvp")),
    "dpm_solver_sde": ("logsnr", 40, (0, "subvp")),
    "edm_sde": ("edm", 120, (0, "vp_cosine")),  # the rung below failed by the draws' scatter on (0, "edm"); 80 here
    "restart": ("edm", 70, (6, "vp_cosine")),
}


def tolerance(dim: int) -> float:
    """The gap a case may have: ±0.03 nats/dim, ±0.04 below d = 8."""
    return 0.04 if dim < 8 else 0.03


# Deterministic samplers: their gap is also estimated against a tight probability-flow solution from the same prior
# draws (the control variate below), which removes most of the draws' scatter.
DETERMINISTIC = ("ddim", "dpm_solver", "dpm_solver_2", "unipc", "ipndm", "deis", "heun")
REFERENCE_TOLERANCE = 1e-6  # rtol = atol of the reference's adaptive solve
# Selection asks for a margin against the scatter of the median of three draws (about 0.67 of one draw's std):
# |estimate| + MARGIN_SIGMAS · (one draw's std on that member) ≤ tolerance.
MARGIN_SIGMAS = 1.35

_ENTROPIES: Dict[int, float] = {}


def entropy(seed: int) -> float:
    if seed not in _ENTROPIES:
        _ENTROPIES[seed] = mixture_entropy(random_mixture(seed))
    return _ENTROPIES[seed]


def draw_std(seed: int) -> float:
    """Std of one draw's gap for exact samples: std(log p)/(d·√POINTS)."""
    mixture = random_mixture(seed)
    x = mixture.sample(20_000, torch.Generator().manual_seed(7))[0]
    return mixture.log_prob(x).std().item() / mixture.dim / math.sqrt(POINTS)


def truncation_bias(seed: int, sde_name: str, n: int = 100_000) -> float:
    """The gap of an exact sampler: exact draws of p_eps followed by the final denoising step (negative: the
    denoiser shrinks modes narrower than about 10 σ(eps))."""
    mixture, sde = random_mixture(seed), ALL_SDES[sde_name]()
    eps = torch.tensor(sde.default_eps, dtype=torch.float64)
    g = torch.Generator().manual_seed(11)
    x0 = mixture.sample(n, g)[0].double()
    x = (sde.alpha(eps) * x0 + sde.sigma(eps) * torch.randn(x0.shape, generator=g, dtype=torch.float64)).float()
    x = sampling.tweedie_denoise(mixture.marginal_score_fn(sde), sde, x, eps.float())
    return cross_entropy_gap(x, mixture, entropy(seed))


def _gaps(seed: int, sde_name: str, method: str, options: dict, spacing, steps) -> List[float]:
    mixture, sde = random_mixture(seed), ALL_SDES[sde_name]()
    score_fn = mixture.marginal_score_fn(sde)
    gaps = []
    for draw in range(DRAWS):
        x, _ = sampling.sample(score_fn, sde, (POINTS, mixture.dim), method, steps=steps, grid=spacing,
                               generator=torch.Generator().manual_seed(draw), **options)
        gaps.append(cross_entropy_gap(x, mixture, entropy(seed)) if torch.isfinite(x).all() else math.inf)
    return gaps


def case_gap(case: Tuple[int, str, str, Optional[str], int]) -> Dict[str, float]:
    """For (seed, sde, variant, spacing, steps): 'gaps' over DRAWS draws of POINTS points (draw k seeded k) and
    'raw', their median. Variant 'reference' gives the gaps of a tight probability-flow solution from the same
    prior draws, the exact sampler's denoising bias and the member's one-draw std, from which `Cache.run` makes a
    deterministic variant's control-variate estimate 'cv'."""
    torch.set_num_threads(1)
    seed, sde_name, variant, spacing, steps = case
    if variant == "reference":
        return {"gaps": _gaps(seed, sde_name, "ode", dict(rtol=REFERENCE_TOLERANCE, atol=REFERENCE_TOLERANCE),
                              None, 1), "draw_std": draw_std(seed), "bias": truncation_bias(seed, sde_name)}
    method, options = VARIANTS[variant]
    gaps = _gaps(seed, sde_name, method, options, spacing, steps)
    return {"raw": float(statistics.median(gaps)), "gaps": gaps}


def key(case) -> str:
    return "|".join(map(str, case))


class Cache:
    """Case results on disk (JSON), written after every batch."""

    def __init__(self, path: Path):
        self.path = path
        self.values: Dict[str, Dict] = json.loads(path.read_text()) if path.exists() else {}

    def _compute(self, cases: Sequence[tuple], pool: ProcessPoolExecutor) -> None:
        todo = [c for c in dict.fromkeys(cases) if key(c) not in self.values]
        for case, result in zip(todo, pool.map(case_gap, todo)):
            self.values[key(case)] = result
        if todo:
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.values))
            tmp.replace(self.path)

    def run(self, cases: Sequence[tuple], pool: ProcessPoolExecutor) -> List[Dict[str, float]]:
        """Each case's 'raw' median gap, 'cv' (deterministic variants) and the member's one-draw std 'draw_std'."""
        references = [(c[0], c[1], "reference", None, 0) for c in cases]
        self._compute(references + list(cases), pool)
        out = []
        for case, ref in zip(cases, references):
            result, reference = dict(self.values[key(case)]), self.values[key(ref)]
            if case[2] in DETERMINISTIC:
                result["cv"] = reference["bias"] + sum(g - r for g, r in zip(result["gaps"], reference["gaps"])) / DRAWS
            result["draw_std"] = reference["draw_std"]
            out.append(result)
        return out


def badness(case: tuple, result: Dict[str, float], margin: bool) -> float:
    """|gap| / tolerance (> 1 fails): the control-variate estimate plus the margin for deterministic variants when
    `margin`, else the raw median of three draws."""
    tol = tolerance(random_mixture(case[0]).dim)
    if margin and "cv" in result:
        value = abs(result["cv"]) + MARGIN_SIGMAS * result["draw_std"]
    else:
        value = abs(result["raw"])
    return value / tol if math.isfinite(value) else math.inf


def worst(cases: Sequence[tuple], results: Sequence[Dict], margin: bool = True) -> Tuple[float, tuple]:
    """The case with the largest badness, as (badness, case)."""
    return max(((badness(c, r, margin), c) for c, r in zip(cases, results)), key=lambda r: r[0])


def fewest_steps(variant: str, spacing: str, seeds, sdes, cache: Cache, pool) -> Tuple[int, tuple]:
    """The fewest LADDER steps at which every (seed, sde) passes, found by checking the hardest case first."""
    hardest: List[tuple] = []
    for steps in LADDER:
        cases = [(s, e, variant, spacing, steps) for s in seeds for e in sdes]
        order = sorted(cases, key=lambda c: (c[0], c[1]) not in hardest)  # earlier failures first
        ratio, case = 0.0, None
        for chunk_start in range(0, len(order), 8):
            chunk = order[chunk_start:chunk_start + 8]
            r, c = worst(chunk, cache.run(chunk, pool))
            if r > ratio:
                ratio, case = r, c
            if ratio > 1:
                hardest.insert(0, (case[0], case[1]))
                break
        if ratio <= 1:
            return steps, case
    return -1, case


def select(args, cache, pool) -> Dict:
    results = {}
    for variant in args.variants:
        for spacing in args.spacings:
            steps, case = fewest_steps(variant, spacing, SELECTION_SEEDS[:args.members], args.sdes, cache, pool)
            results[f"{variant}|{spacing}"] = dict(steps=steps, worst_case=list(case) if case else None)
            print(f"{variant:15s} {spacing:9s} fewest steps {steps:5d}   worst {case}", flush=True)
    return results


def verify(args, cache, pool) -> Dict:
    """Each variant at its documented count and default grid (times --steps-scale) on the verification members:
    passes and the worst case by the raw median of three draws, and the worst control-variate estimate."""
    results = {}
    for variant in args.variants:
        method, _ = VARIANTS[variant]
        documented = sampling.SAMPLERS[method].steps  # None: the SDE's N (pc, ancestral), not scaled
        steps = None if documented is None else max(1, round(documented * args.steps_scale))
        sampler = sampling.SAMPLERS[method]
        sdes = {e: ALL_SDES[e]() for e in args.sdes}
        grids = {e: args.grid or sampler.grid_for(sde.N if steps is None else steps, sde) for e, sde in sdes.items()}
        grid = "/".join(dict.fromkeys(grids.values()))
        seeds = SELECTION_SEEDS if args.family == "selection" else VERIFICATION_SEEDS
        cases = [(s, e, variant, grids[e], steps) for s in seeds[:args.members] for e in args.sdes]
        found = cache.run(cases, pool)
        fails = sum(badness(c, r, margin=False) > 1 for c, r in zip(cases, found))
        _, case = worst(cases, found, margin=False)
        raw = found[cases.index(case)]["raw"]
        cv_case = max(zip(cases, found), key=lambda cr: abs(cr[1].get("cv", 0.0)))
        results[variant] = dict(steps=steps, grid=grid, passed=len(cases) - fails, cases=len(cases), worst_raw=raw,
                                worst_raw_case=list(case), worst_cv=cv_case[1].get("cv"),
                                worst_cv_case=list(cv_case[0]))
        cv_text = f"; worst solver error (control variate) {cv_case[1]['cv']:+.3f} on seed {cv_case[0][0]}, " \
                  f"{cv_case[0][1]}" if "cv" in cv_case[1] else ""
        print(f"{variant:15s} @ {'N' if steps is None else steps:>4} ({grid}): {len(cases) - fails}/{len(cases)} pass; worst median of "
              f"{DRAWS} draws {raw:+.3f} nats/dim on seed {case[0]} ({describe_mixture(random_mixture(case[0]))}), "
              f"{case[1]}{cv_text}", flush=True)
    return results


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=("select", "verify"))
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--spacings", default=",".join(SPACINGS))
    parser.add_argument("--sdes", default=",".join(SDES), help=f"of {list(ALL_SDES)}")
    parser.add_argument("--family", choices=("verification", "selection"), default="verification",
                        help="verify: the members to run (selection: to choose a default by the worst case)")
    parser.add_argument("--grid", help="verify: this spacing instead of each sampler's default")
    parser.add_argument("--members", type=int, default=24, help="family members (seeds) to use")
    parser.add_argument("--steps-scale", type=float, default=1.0, help="verify at this fraction of each count")
    parser.add_argument("--cache", type=Path, default=Path("default_grids_cache.json"))
    parser.add_argument("--json", type=Path)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    args.variants, args.spacings, args.sdes = args.variants.split(","), args.spacings.split(","), args.sdes.split(",")
    cache = Cache(args.cache)
    with ProcessPoolExecutor(args.workers) as pool:
        results = (select if args.mode == "select" else verify)(args, cache, pool)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
