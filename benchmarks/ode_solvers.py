"""The adaptive ODE backends of sde_diffusion/ode.py at the same rtol/atol: ours (`torch`: dopri5 on the device),
torchdiffeq's dopri5 and scipy's RK45, on problems with exact answers.

Data: Gaussian mixtures with closed-form scores of every p_t (`toy.default_mixture()` in 2-D,
`toy.high_dim_mixture(16)`), so the probability-flow ODE is the exact one and its solutions can be checked.

* sampling: `ode_decode` of the same prior draws; NFE, wall time, the error of the samples against a reference
  solution (ours at rtol = atol = 1e-10): median and max over points of ‖x − x_ref‖, and the sliced W₂ of the
  samples to the exact mixture in units of its noise floor;
* likelihood: `likelihood.log_likelihood` with the exact divergence on exact mixture samples; NFE, wall time, and
  the bits/dim error against the exact log p_eps (closed form for the diffused mixture).

    python benchmarks/ode_solvers.py                 # the table in BENCHMARKS.md (about a minute on one core)
    python benchmarks/ode_solvers.py --rtol 1e-3 --atol 1e-3
    python benchmarks/likelihood.py --backends torch torchdiffeq scipy   # a trained DDPM++ (the fixture network)
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sde_diffusion import likelihood, ode  # noqa: E402
from sde_diffusion.metrics_toy import sliced_w2_noise_floor, sliced_w2_ratio  # noqa: E402
from sde_diffusion.sampling import ode_decode  # noqa: E402
from sde_diffusion.sdes import VESDE, VPSDE  # noqa: E402
from sde_diffusion.toy import default_mixture, high_dim_mixture  # noqa: E402

SDES = {"VP": VPSDE, "VE": VESDE}
MIXTURES = {"2-D": default_mixture, "16-D": lambda: high_dim_mixture(16)}
REFERENCE_TOL = 1e-10


def sampling_rows(args):
    for mixture_name, make in MIXTURES.items():
        mixture = make()
        floor = sliced_w2_noise_floor(mixture, args.points)
        for sde_name, make_sde in SDES.items():
            sde = make_sde()
            score_fn = mixture.marginal_score_fn(sde)
            z = sde.prior_sampling((args.points, mixture.dim), generator=torch.Generator().manual_seed(0),
                                   dtype=torch.float64)
            reference, _ = ode_decode(score_fn, sde, z, rtol=REFERENCE_TOL, atol=REFERENCE_TOL)
            for backend in args.backends:
                start = time.perf_counter()
                x, nfe = ode_decode(score_fn, sde, z.float(), rtol=args.rtol, atol=args.atol, backend=backend)
                seconds = time.perf_counter() - start
                error = (x.double() - reference).norm(dim=1)
                yield dict(task="sampling", data=mixture_name, sde=sde_name, backend=backend, nfe=nfe,
                           seconds=seconds, median_error=error.median().item(), max_error=error.max().item(),
                           sw2=sliced_w2_ratio(x, mixture, args.points, floor))


def likelihood_rows(args):
    mixture = default_mixture()
    x = mixture.sample(args.points, torch.Generator().manual_seed(1))[0].float()
    for sde_name, make_sde in SDES.items():
        sde = make_sde()
        eps = likelihood.DEFAULT_EPS
        t = torch.tensor(eps, dtype=torch.float64)
        exact = mixture.log_prob(x.double(), sde.alpha(t), sde.sigma(t))  # log p_eps, nats
        for backend in args.backends:
            start = time.perf_counter()
            logp, _, nfe = likelihood.log_likelihood(mixture.marginal_score_fn(sde), sde, x, divergence="exact",
                                                     rtol=args.rtol, atol=args.atol, eps=eps, backend=backend)
            seconds = time.perf_counter() - start
            bpd = lambda v: -v.mean().item() / (mixture.dim * math.log(2))  # noqa: E731
            yield dict(task="likelihood", data="2-D", sde=sde_name, backend=backend, nfe=nfe, seconds=seconds,
                       bpd=bpd(logp.double()), bpd_error=bpd(logp.double()) - bpd(exact),
                       max_error=(logp.double() - exact).abs().max().item())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rtol", type=float, default=ode.ODE_RTOL)
    parser.add_argument("--atol", type=float, default=ode.ODE_ATOL)
    parser.add_argument("--points", type=int, default=2000)
    parser.add_argument("--backends", nargs="+", default=list(ode.BACKENDS), choices=ode.BACKENDS)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"rtol = {args.rtol:g}, atol = {args.atol:g}, {args.points} points, float32 states\n")
    print("| task | data | SDE | backend | NFE | seconds | median ‖x − x_ref‖ | max ‖x − x_ref‖ | sliced W₂ / floor |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in sampling_rows(args):
        print(f"| {r['task']} | {r['data']} | {r['sde']} | {r['backend']} | {r['nfe']} | {r['seconds']:.2f} | "
              f"{r['median_error']:.2e} | {r['max_error']:.2e} | {r['sw2']:.2f} |", flush=True)
    print("\n| task | data | SDE | backend | NFE | seconds | bits/dim | bits/dim − exact | max |log p − exact| |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in likelihood_rows(args):
        print(f"| {r['task']} | {r['data']} | {r['sde']} | {r['backend']} | {r['nfe']} | {r['seconds']:.2f} | "
              f"{r['bpd']:.5f} | {r['bpd_error']:+.2e} | {r['max_error']:.2e} |", flush=True)


if __name__ == "__main__":
    main()
