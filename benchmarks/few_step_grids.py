"""The few-step default grid (grids.FEW_STEP_GRID up to grids.FEW_STEPS steps): chosen on random mixtures against
diffusers' schedulers by the worst case, verified on other members.

A case is a member of `toy.random_mixture` on the VP SDE (whose discretisation is the DDPM chain diffusers'
schedulers run), 20 000 prior draws shared by every sampler, scored by sliced W₂ to fresh exact samples in units of
its noise floor (≈ 1 for exact samples). diffusers' best is the smallest over DPM-Solver++ 2M/3M (and 3M on
λ-uniform steps), UniPC bh2, DEIS and DDIM, each at the timestep spacings linspace, leading and trailing
(fast_samplers.py drives them with the exact ε of the chain). Ours is the best of our fixed-step solvers with the
final step landing at eps (no denoising call: with a handful of steps the last solver step is the denoising step).

    # candidate (centre σ/α, noisy width, clean width) of the fixed "sech" spacing, worst over the members:
    python benchmarks/few_step_grids.py select --members 0,3,4,6,7,8,11,14,21,23 --nfes 5,6
    # the defaults as they are, every fixed-step solver, beside the many-step defaults (λ-uniform, ρ = 7):
    python benchmarks/few_step_grids.py verify --members 1002,1003,1009,1017,1018,1019,1020 --nfes 5,6,8,9,10
    # the "auto" spacing (the default: a sech centre measured on the model), its factor and widths:
    python benchmarks/few_step_grids.py autos --members 0,3,4,6,7,8,11,14,21,23 --nfes 5,6 \
        --autos 1.2/4/1,1.0/4/1,1.4/4/1,0.84/4/1,1.56/4/1,1.2/2.8/1,1.2/5.2/1,1.2/4/0.7,1.2/4/1.3
    # probe: a centre picked by RMS to the probability-flow solution among PROBE_CENTRES (not what "auto" does):
    python benchmarks/few_step_grids.py centres --members 1002,1003,1009,1017,1018,1019,1020 --nfes 5,6

diffusers' results (and select's) are cached per case in --cache, so reruns only run what is new; --merge reads
the caches of parallel runs (e.g. members split over two processes).
"""
from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import sys
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from fast_samplers import diffusers_sample, diffusers_settings  # noqa: E402
from sde_diffusion.metrics_toy import sliced_w2_noise_floor, sliced_w2_ratio  # noqa: E402
from sde_diffusion.sampling import SAMPLERS, grids, sample, steps_for_nfe  # noqa: E402
from sde_diffusion.sdes import VPSDE  # noqa: E402
from sde_diffusion.toy import describe_mixture, random_mixture  # noqa: E402

POINTS, CHUNKS = 20_000, 4
SEED = 0
# The solvers a candidate spacing is scored with in `select` (the few-step winners on every member tried).
SELECT_SOLVERS = {"unipc p2": ("unipc", dict(order=2)), "unipc p3": ("unipc", dict(order=3)),
                  "dpm_solver++ 3M": ("dpm_solver", dict(order=3)), "ipndm": ("ipndm", {})}
# Every fixed-step solver in `verify` (heun and edm_sde take 2 calls a step).
VERIFY_SOLVERS = {**SELECT_SOLVERS, "dpm_solver++ 2M": ("dpm_solver", dict(order=2)),
                  "unipc bh1 p3": ("unipc", dict(order=3, variant="bh1")),
                  "deis": ("deis", {}), "ddim": ("ddim", {}), "heun": ("heun", {}),
                  "dpm_solver_sde": ("dpm_solver_sde", {}), "edm_sde": ("edm_sde", {})}
CENTRES = (0.35, 0.5, 0.7, 1.0)
PROBE_CENTRES = (0.1, 0.2, 0.35, 0.7, 1.4)  # `centres`: a centre fitted to the model, probed
NOISY_WIDTHS = (2.5, 3.0, 4.0, 5.0)
CLEAN_WIDTHS = (1.0, 1.5, 2.0, 3.0)
# What `autos` and `verify` found for the default ("auto": AUTO_CENTRE_FACTOR 1.2, widths (4, 1), up to 8 steps) on
# the cases where a 30 % change shows: (member, NFE) → (diffusers' best sliced W₂ and its setting, the default's
# ratio to it). Mutants, ratio on the case that catches them: noisy width 2.8 → 0.95 on (1003, 5); 5.2 → 1.02 on
# (1009, 6); clean width 0.7 → 1.09 on (1019, 6); 1.3 → 0.86 on (1003, 6); factor 0.84 → 0.91 on (1003, 5);
# 1.56 → 0.93 on (1019, 6); λ-uniform from 7 steps (FEW_STEPS 6, 25 % fewer) → 1.32 on (6, 7). Selection member 6,
# verification members 1003, 1009 and 1019. tests/test_default_grids.py checks these ratios with a small margin.
DECIDING = {
    (1003, 5): (2.2272, "UniPCMultistep bh2 (leading)", 0.81),
    (1003, 6): (1.8702, "DPMSolverMultistep 3M (leading)", 0.73),
    (1009, 6): (1.5968, "DPMSolverMultistep 3M (λ-uniform, leading)", 0.90),
    (1019, 6): (1.4252, "UniPCMultistep bh2 (trailing)", 0.82),
    (6, 7): (1.3720, "UniPCMultistep bh2 (leading)", 0.96),
}
# diffusers settings left out: UniPC bh1 diverges on the chain's final step to σ = 0 and Heun is far behind at these
# budgets (fast_samplers.py reports them).
SKIPPED = ("bh1", "Heun")
# `sample` keywords that shape the grid, not the step structure (steps_for_nfe takes the sampler's options only)
GRID_KEYS = ("grid", "width")


@contextlib.contextmanager
def patched(module, name: str, value) -> Iterator[None]:
    """Temporarily set a module constant (a benchmark knob: grids.SECH_CENTER_SIGMA, auto_grid.AUTO_CENTRE_FACTOR)."""
    saved = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, saved)


class Case:
    """One member: its exact score, shared prior draws and the sliced-W₂ scorer."""

    def __init__(self, seed: int):
        self.seed, self.mixture, self.sde = seed, random_mixture(seed), VPSDE()
        self.score_fn = self.mixture.marginal_score_fn(self.sde)
        self.chunk = POINTS // CHUNKS
        self.floor = sliced_w2_noise_floor(self.mixture, self.chunk)
        self.z = self.sde.prior_sampling((POINTS, self.mixture.dim), generator=torch.Generator().manual_seed(SEED),
                                         dtype=torch.float64)

    def sw2(self, x: torch.Tensor) -> float:
        value = sliced_w2_ratio(x.float(), self.mixture, self.chunk, self.floor)
        return value if math.isfinite(value) else math.inf

    def ours(self, method: str, nfe: int, **options) -> float:
        """sliced W₂ of `method` with the most steps that fit nfe score calls, no denoising call."""
        steps = steps_for_nfe(self.sde, method, nfe, **{k: v for k, v in options.items() if k not in GRID_KEYS})
        x, _ = sample(self.score_fn, self.sde, self.z.shape, method, steps=steps, x_T=self.z, denoise=False,
                      dtype=torch.float64, generator=torch.Generator().manual_seed(SEED + 1), **options)
        return self.sw2(x)

    def best(self, nfe: int, **grid) -> float:
        """The smallest sliced W₂ of SELECT_SOLVERS at nfe (grid: `sample`'s grid keywords; none: the defaults)."""
        return min(self.ours(method, nfe, **grid, **options) for method, options in SELECT_SOLVERS.values())

    def diffusers_best(self, nfe: int) -> Tuple[float, str]:
        best = (math.inf, "—")
        for name, (cls_name, options, extra) in diffusers_settings().items():
            if extra or any(mark in name for mark in SKIPPED):
                continue
            x, _ = diffusers_sample(cls_name, options, self.mixture, self.z, nfe)
            best = min(best, (self.sw2(x), name))
        return best


class Cases:
    """Members built on first use (select runs from its cache without building any)."""

    def __init__(self):
        self.built: Dict[int, Case] = {}

    def __call__(self, seed: int) -> Case:
        if seed not in self.built:
            self.built = {seed: Case(seed)}  # one member at a time: they hold 20 000 draws each
        return self.built[seed]


def theirs(seed: int, nfe: int, cache: Dict, cases: Cases) -> Tuple[float, str]:
    """diffusers' best sliced W₂ and its setting, from the cache when there."""
    key = f"{seed}@{nfe}@{POINTS}"
    if key not in cache:
        cache[key] = cases(seed).diffusers_best(nfe)
    return tuple(cache[key])


def score_candidates(args, cache: Dict, candidates: List[tuple], label: str, run) -> Dict[tuple, Dict[str, float]]:
    """ratios[candidate]["seed@nfe"]: run(case, nfe, candidate) (a sliced W₂) over diffusers' best, on every member
    and NFE of args; each result cached under `label` and the candidate."""
    ratios: Dict[tuple, Dict[str, float]] = {c: {} for c in candidates}
    cases = Cases()
    for seed in args.members:
        for nfe in args.nfes:
            baseline, _ = theirs(seed, nfe, cache, cases)
            for candidate in candidates:
                key = f"ours {seed}@{nfe}@{POINTS} {label} {'/'.join(map(str, candidate))}"
                if key not in cache:
                    cache[key] = run(cases(seed), nfe, candidate)
                ratios[candidate][f"{seed}@{nfe}"] = cache[key] / baseline
        print(f"member {seed} done", file=sys.stderr, flush=True)
        save_cache(args.cache, cache)
    return ratios


def ranked(ratios: Dict[tuple, Dict[str, float]], columns: List[str], top: Optional[int] = None) -> List[str]:
    """A Markdown table of the candidates (tuples, one column each), worst ratio first, then second worst."""
    def worst_two(c):  # (worst, second worst); one case: it twice
        values = sorted(ratios[c].values())
        return values[-1], values[-min(2, len(values))]

    order = sorted(ratios, key=worst_two)[:top]
    cells = list(ratios[order[0]])
    lines = ["| " + " | ".join(columns) + " | worst | second worst | " + " | ".join(cells) + " |",
             "|" + "---|" * (len(columns) + 2 + len(cells))]
    for c in order:
        worst, second = worst_two(c)
        lines.append("| " + " | ".join(map(str, c)) + f" | {worst:.2f} | {second:.2f} | "
                     + " | ".join(f"{ratios[c][k]:.2f}" for k in cells) + " |")
    return lines


def select(args, cache: Dict) -> List[str]:
    """Every (centre, noisy, clean) candidate of the fixed "sech" spacing: the best of SELECT_SOLVERS per case over
    diffusers' best; worst first."""
    def run(case, nfe, candidate):
        centre, noisy, clean = candidate
        with patched(grids, "SECH_CENTER_SIGMA", centre):
            return case.best(nfe, grid="sech", width=(noisy, clean))

    candidates = args.candidates or list(itertools.product(CENTRES, NOISY_WIDTHS, CLEAN_WIDTHS))
    return ranked(score_candidates(args, cache, candidates, "sech", run), ["centre σ/α", "noisy", "clean"], args.top)


def verify(args, cache: Dict) -> List[str]:
    """Per member and NFE: our best at the default grids, at the many-step ones (the papers': λ-uniform, EDM's ρ = 7),
    and diffusers' best."""
    lines = ["| member | NFE | ours, default grids | ours, many-step grids | diffusers' best | ratio default | "
             "ratio many-step |", "|---|---|---|---|---|---|---|"]
    worst, cases = {}, Cases()
    for seed in args.members:
        case = cases(seed)
        for nfe in args.nfes:
            baseline, who = theirs(seed, nfe, cache, cases)
            default = min((case.ours(m, nfe, **o), name) for name, (m, o) in VERIFY_SOLVERS.items())
            paper = min((case.ours(m, nfe, grid=SAMPLERS[m].grid, **o), name)
                        for name, (m, o) in VERIFY_SOLVERS.items())
            ratio = default[0] / baseline
            worst[nfe] = max(worst.get(nfe, (0, None)), (ratio, seed))
            lines.append(f"| {seed} ({describe_mixture(case.mixture)}) | {nfe} | {default[0]:.2f} ({default[1]}) | "
                         f"{paper[0]:.2f} ({paper[1]}) | {baseline:.2f} ({who}) | {ratio:.2f} | "
                         f"{paper[0] / baseline:.2f} |")
        print(f"member {seed} done", file=sys.stderr, flush=True)
        save_cache(args.cache, cache)
    lines += ["", "worst ratio at the default grids: " + ", ".join(f"NFE {n}: {r:.2f} (member {s})"
                                                                    for n, (r, s) in sorted(worst.items()))]
    return lines


def centres(args, cache: Dict) -> List[str]:
    """Per member and NFE: the sech spacing (default widths) at each of PROBE_CENTRES, the centre an RMS fit would
    pick (best of SELECT_SOLVERS against a tight probability-flow solution on 256 other draws), and each centre's
    ratio to diffusers' best: does a centre fitted to the model beat the fixed one?"""
    from sde_diffusion.sampling.flow import integrate_pf_ode
    lines = ["| member | NFE | " + " | ".join(f"centre {c}: RMS / ratio" for c in PROBE_CENTRES) + " | picked |",
             "|---|---|" + "---|" * (len(PROBE_CENTRES) + 1)]
    cases = Cases()
    for seed in args.members:
        case = cases(seed)
        z = case.sde.prior_sampling((256, case.mixture.dim), generator=torch.Generator().manual_seed(SEED + 7),
                                    dtype=torch.float64)
        reference = integrate_pf_ode(case.score_fn, case.sde, z, case.sde.T, case.sde.default_eps, rtol=1e-7,
                                     atol=1e-7, backend="torch")
        for nfe in args.nfes:
            baseline, _ = theirs(seed, nfe, cache, cases)
            rows = []
            for centre in PROBE_CENTRES:
                with patched(grids, "SECH_CENTER_SIGMA", centre):
                    rms = min((sample(case.score_fn, case.sde, z.shape, m, steps=nfe, x_T=z, denoise=False,
                                      dtype=torch.float64, grid="sech", **o)[0] - reference).pow(2).mean().sqrt()
                              .item() for m, o in SELECT_SOLVERS.values())
                    ratio = case.best(nfe, grid="sech") / baseline
                rows.append((centre, rms, ratio))
            picked = min(rows, key=lambda r: r[1])
            lines.append(f"| {seed} | {nfe} | " + " | ".join(f"{r:.3f} / {q:.2f}" for _, r, q in rows)
                         + f" | {picked[0]}: {picked[2]:.2f} |")
        print(f"member {seed} done", file=sys.stderr, flush=True)
        save_cache(args.cache, cache)
    return lines


def autos(args, cache: Dict) -> List[str]:
    """Per candidate (AUTO_CENTRE_FACTOR, noisy width, clean width) of the "auto" spacing: the best of
    SELECT_SOLVERS over diffusers' best, per case; worst first."""
    from sde_diffusion.sampling import auto_grid

    def run(case, nfe, candidate):
        factor, noisy, clean = candidate
        with patched(auto_grid, "AUTO_CENTRE_FACTOR", factor):
            return case.best(nfe, grid="auto", width=(noisy, clean))

    label = f"auto3 q{auto_grid.AUTO_QUANTILE}"
    return ranked(score_candidates(args, cache, args.autos, label, run), ["factor", "noisy", "clean"])


def save_cache(path: Path, cache: Dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(cache, indent=1))
    tmp.replace(path)


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=("select", "verify", "centres", "autos"))
    parser.add_argument("--members", type=lambda s: [int(v) for v in s.split(",")], required=True)
    parser.add_argument("--nfes", type=lambda s: [int(v) for v in s.split(",")], default=[5, 6])
    parser.add_argument("--top", type=int, default=12, help="candidates listed by select")
    parser.add_argument("--candidates", type=lambda s: [tuple(float(v) for v in c.split("/")) for c in s.split(",")],
                        default=None, help="select: these centre/noisy/clean triples instead of the product of "
                                           "CENTRES, NOISY_WIDTHS and CLEAN_WIDTHS, e.g. 0.5/5/1,0.5/3.5/1")
    parser.add_argument("--autos", type=lambda s: [tuple(float(v) for v in c.split("/")) for c in s.split(",")],
                        default=[(f, 4.0, 1.0) for f in (0.84, 1.0, 1.2, 1.4, 1.56)],
                        help="autos: factor/noisy/clean triples of the auto spacing, e.g. 1.2/4/1,0.84/4/1")
    parser.add_argument("--cache", type=Path, default=Path("few_step_grids_cache.json"))
    parser.add_argument("--merge", type=Path, nargs="*", default=[], help="other caches to read (parallel runs)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    cache = {}
    for path in [args.cache, *args.merge]:
        cache.update(json.loads(path.read_text()) if path.exists() else {})
    modes = {"select": select, "verify": verify, "centres": centres, "autos": autos}
    print("\n".join(modes[args.mode](args, cache)))


if __name__ == "__main__":
    main()
