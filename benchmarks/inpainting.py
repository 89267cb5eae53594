"""Inpainting and colorization against the exact Gaussian conditional: replacement versus RePaint resampling.

Data: `toy.inpainting_oracle()` (d = 6, AR(1) correlations ρ = 0.9, coordinates 0 and 3 known at 1.5 std above
their means) and `toy.colorization_oracle()` (two RGB pixels with correlated colours; the grey level, i.e. the
channel mean, is known). The score is the exact score of the diffused Gaussian, so every error below is the
conditioning method's (and the solver's), not a network's. For each task × SDE × sampler × method the samples'
missing part (inpainting: the 4 unknown coordinates; colorization: the 4 colour coordinates of the decoupled colour
space) is compared with the exact Gaussian conditional: mean error ‖m̂ − μ‖/√tr Σ and covariance error
‖Ĉ − Σ‖_F/‖Σ‖_F, next to their noise floors (the RMS errors of as many exact samples). NFE counts score calls,
the final Tweedie step included. Known coordinates (or the grey level) are checked to come out exactly.

    python benchmarks/inpainting.py                # the full table (≈ 4 minutes on one CPU core)
    python benchmarks/inpainting.py --quick        # the cases tests/test_controllable.py asserts (≈ 20 s)
    python benchmarks/inpainting.py --ablations    # the design choices: RePaint's ancestral way back instead of the
                                                   # reflection; DPM-Solver-3's history kept or restarted
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Dict, List, Tuple

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import sde_diffusion.sampling as sampling  # noqa: E402
from sde_diffusion import controllable  # noqa: E402
from sde_diffusion.metrics_toy import gaussian_moment_errors, gaussian_moment_noise_floor  # noqa: E402
from sde_diffusion.sampling import sample  # noqa: E402
from sde_diffusion.sdes import SubVPSDE, VESDE, VPSDE  # noqa: E402
from sde_diffusion.toy import Gaussian, colorization_oracle, inpainting_oracle  # noqa: E402

SEED = 1
SDES = {"VP": VPSDE, "sub-VP": SubVPSDE, "VE": VESDE}
# sampler name → (method, steps, options)
SAMPLERS: Dict[str, Tuple[str, int, dict]] = {
    "pc (Euler–Maruyama) 100": ("pc", 100, {}),
    "ddim 50": ("ddim", 50, {}),
    "dpm_solver 20": ("dpm_solver", 20, dict(order=3)),
    "ode (dopri5)": ("ode", 1, {}),
}
# conditioning name → (method, resample)
METHODS = {"replacement": ("replacement", 1), "repaint r=2": ("repaint", 2), "repaint r=5": ("repaint", 5),
           "repaint r=10": ("repaint", 10)}


def colour_conditional(data: Gaussian, grey: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Exact mean and covariance of the colour coordinates (channels 1, 2 of the decoupled space, channel-major)
    of `data` (3·P channel-major) given the grey level (1, 1, P)."""
    pixels = grey.numel()
    decoupled = data.linear_map(torch.kron(controllable.COLOR_BASIS, torch.eye(pixels, dtype=torch.float64)))
    known = torch.arange(3 * pixels) < pixels
    return decoupled.conditional(known, controllable.GREY_SCALE * grey.flatten().double())


def run_inpainting(sde, sampler, method, n: int) -> Dict:
    data, mask, x_known = inpainting_oracle()
    exact_mean, exact_cov = data.conditional(mask, x_known[mask])
    kind, steps, options = sampler
    name, resample = method
    constraint = controllable.inpainting(sde, x_known[None].float(), mask[None], method=name, resample=resample)
    x, nfe = sample(data.marginal_score_fn(sde), sde, (n, data.dim), kind, steps=steps,
                    generator=torch.Generator().manual_seed(SEED), constraint=constraint, **options)
    if not torch.equal(x[:, mask], x_known[mask].float().expand(n, -1)):
        raise AssertionError("known coordinates changed")
    return dict(nfe=nfe, errors=gaussian_moment_errors(x[:, ~mask], exact_mean, exact_cov),
                floor=gaussian_moment_noise_floor(exact_cov, n))


def run_colorization(sde, sampler, method, n: int) -> Dict:
    data, grey = colorization_oracle()
    exact_mean, exact_cov = colour_conditional(data, grey)
    kind, steps, options = sampler
    name, resample = method
    pixels = grey.numel()
    constraint = controllable.colorization(sde, grey.float(), method=name, resample=resample)
    x, nfe = sample(data.marginal_score_fn(sde), sde, (n, 3, pixels), kind, steps=steps,
                    generator=torch.Generator().manual_seed(SEED), constraint=constraint, **options)
    grey_error = (controllable.to_grey(x) - grey.float()).abs().max().item()
    if grey_error > 1e-5:
        raise AssertionError(f"grey level changed by {grey_error}")
    colour = controllable.decouple(x, controllable.COLOR_BASIS)[:, 1:].reshape(n, 2 * pixels)
    return dict(nfe=nfe, errors=gaussian_moment_errors(colour, exact_mean, exact_cov),
                floor=gaussian_moment_noise_floor(exact_cov, n), grey_error=grey_error)


# --------------------------------------------------------------------------------------------------
# Ablations: what the two design choices of controllable.py / the dpm_solver sampler buy
# --------------------------------------------------------------------------------------------------
def ancestral_way_back(self, score_fn, x, x_jumped, t, t_prev):
    """RePaint's way back: one ancestral step from t_prev to t, E[x_t | x'] plus the DDPM posterior's isotropic
    noise σ_{t_prev|t}·σ(t)/σ(t_prev)·z (DDIM with η = 1), instead of the reflection 2·E[x_t | x'] − x."""
    a, s = self.sde.transition(t_prev, t)
    like = sampling.terms.like
    mean = (x_jumped + like(s**2, x) * score_fn(x_jumped, t_prev.to(x.dtype))) / like(a, x)
    return mean + like(s * self.sde.sigma(t) / self.sde.sigma(t_prev), x) * sampling.terms.noise(x, None)


@sampling.register_sampler("dpm_solver_history", grid="logsnr", replace=True)
def dpm_solver_history(score_fn, sde, x, timesteps, *, restart: bool = False, order: int = 3):
    """DPM-Solver++ (order 3, λ grid) that always restarts its x̂_0 history after a step, or never does
    (the dpm_solver sampler restarts it only under RePaint, whose rounds move the free coordinates)."""
    lam, n, history = sde.log_snr(timesteps), len(timesteps) - 1, []
    for i in range(n):
        t, s = timesteps[i], timesteps[i + 1]
        history = ([] if restart else history)[-(order - 1):]
        history.append(sampling.terms.denoised_and_noise(score_fn, sde, x, t)[0])
        step_order = min(order, len(history), n - i)
        x = sampling.dpm_solver_pp_update(x, history, list(lam[i + 1 - len(history):i + 1]), lam[i + 1],
                                          sde.sigma(s) / sde.sigma(t), sde.alpha(s), step_order)
    return x


KEEP = ("dpm_solver_history", 20, dict(restart=False))
RESTART = ("dpm_solver_history", 20, dict(restart=True))


def ablations(n: int) -> None:
    print("| task | SDE | sampler | variant | NFE | mean error | cov error |")
    print("|---|---|---|---|---|---|---|")
    reflect = controllable.Inpainting.reflect_back
    variants = [  # (sampler name, sampler, conditioning, variant label, way back)
        ("pc (Euler–Maruyama) 100", SAMPLERS["pc (Euler–Maruyama) 100"], ("repaint", 5), "reflection (ours)", reflect),
        ("pc (Euler–Maruyama) 100", SAMPLERS["pc (Euler–Maruyama) 100"], ("repaint", 5), "ancestral way back",
         ancestral_way_back),
        ("dpm_solver 20", SAMPLERS["dpm_solver 20"], ("repaint", 5), "reflection (ours)", reflect),
        ("dpm_solver 20", SAMPLERS["dpm_solver 20"], ("repaint", 5), "ancestral way back", ancestral_way_back),
        ("dpm_solver 20", KEEP, ("replacement", 1), "replacement, history kept (ours)", reflect),
        ("dpm_solver 20", RESTART, ("replacement", 1), "replacement, history restarted", reflect),
        ("dpm_solver 20", RESTART, ("repaint", 5), "repaint r=5, history restarted (ours)", reflect),
        ("dpm_solver 20", KEEP, ("repaint", 5), "repaint r=5, history kept", reflect),
    ]
    for task, run in (("inpainting", run_inpainting), ("colorization", run_colorization)):
        for sde_name in ("VP", "VE"):
            for sampler_name, sampler, method, label, way_back in variants:
                controllable.Inpainting.reflect_back = way_back
                torch.manual_seed(SEED)  # the ancestral way back draws from the global generator
                row = run(SDES[sde_name](), sampler, method, n)
                controllable.Inpainting.reflect_back = reflect
                (mean_error, cov_error) = row["errors"]
                print(f"| {task} | {sde_name} | {sampler_name} | {label} | {row['nfe']} | {mean_error:.3f} | "
                      f"{cov_error:.3f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=10000)
    parser.add_argument("--quick", action="store_true",
                        help="the cases of tests/test_controllable.py: 2000 samples, VP and VE, pc and dpm_solver")
    parser.add_argument("--ablations", action="store_true", help="the design-choice comparison instead of the table")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    n = 2000 if args.quick else args.samples
    if args.ablations:
        ablations(n)
        return
    sdes = {k: v for k, v in SDES.items() if not args.quick or k in ("VP", "VE")}
    samplers = {k: v for k, v in SAMPLERS.items() if not args.quick or k.startswith(("pc", "dpm"))}
    rows: List[Dict] = []
    print(f"{n} samples per cell; cells: mean error / covariance error (NFE)\n")
    print("| task | SDE | sampler | " + " | ".join(METHODS) + " |")
    print("|---|---|---|" + "---|" * len(METHODS))
    for task, run in (("inpainting", run_inpainting), ("colorization", run_colorization)):
        for sde_name, make_sde in sdes.items():
            for sampler_name, sampler in samplers.items():
                cells = []
                for method_name, method in METHODS.items():
                    start = time.perf_counter()
                    row = run(make_sde(), sampler, method, n)
                    row.update(task=task, sde=sde_name, sampler=sampler_name, method=method_name,
                               seconds=time.perf_counter() - start)
                    rows.append(row)
                    cells.append("{:.3f} / {:.3f} ({})".format(*row["errors"], row["nfe"]))
                print(f"| {task} | {sde_name} | {sampler_name} | " + " | ".join(cells) + " |", flush=True)
        floor = rows[-1]["floor"]
        print(f"| {task}: noise floor | | | {floor[0]:.3f} / {floor[1]:.3f} |" + " |" * (len(METHODS) - 1))
    if args.json:
        args.json.write_text(json.dumps(dict(samples=n, seed=SEED, rows=rows), indent=1))


if __name__ == "__main__":
    main()
