"""Every built-in objective's effective weighting w(λ): the weight per unit log-SNR on E‖ε̂ − ε‖² that training
optimizes (Kingma & Gao 2023), noise-level distribution included (`losses.effective_weighting`).

    python benchmarks/objectives.py --png benchmarks/effective_weighting.png --json effective_weighting.json

Prints, per objective, w(λ) at λ = −6 … 8 normalized to ∫w dλ = 1 over that range (so objectives compare by
shape), and where its mass lies (the λ quartiles); the PNG plots them on one axis.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sde_diffusion import losses  # noqa: E402
from sde_diffusion.sdes import EDMSDE, RectifiedFlowSDE, VPSDE  # noqa: E402

LAMBDAS = torch.arange(-6.0, 8.0 + 1e-9, 0.25, dtype=torch.float64)
# label → (SDE, time sampling, weighting, continuous)
OBJECTIVES = {
    "DDPM L_simple (VP chain)": (lambda: VPSDE(schedule="linear_chain"), "discrete", "eps", False),
    "score_sde DSM (VP)": (VPSDE, "uniform", "eps", True),
    "ELBO / likelihood weighting (VP)": (VPSDE, "uniform", "elbo", True),
    "ELBO, importance-sampled (VP)": (VPSDE, "importance", "elbo", True),
    "EDM (log-normal, λ(σ))": (EDMSDE, "log_normal", "edm", True),
    "min-SNR-5 (VP)": (VPSDE, "uniform", "min_snr:gamma=5", True),
    "soft-min-SNR-5 (VP)": (VPSDE, "uniform", "soft_min_snr:gamma=5", True),
    "v-prediction, SNR+1 (VP cosine)": (lambda: VPSDE(schedule="cosine"), "uniform", "v", True),
    "rectified flow, logit-normal (SD3)": (RectifiedFlowSDE, "logit_normal", "velocity", True),
    "sigmoid b=2, λ-uniform (VDM++)": (VPSDE, "uniform_log_snr", "sigmoid:bias=2", True),
}


def effective(label: str):
    make, sampling, weighting, continuous = OBJECTIVES[label]
    objective = losses.Objective(make(), time_sampling=sampling, weighting=weighting, continuous=continuous)
    lam, w = losses.effective_weighting(objective, LAMBDAS, draws=2_000_000)
    return lam, w / (w.sum() * (LAMBDAS[1] - LAMBDAS[0]))


def quartiles(lam: torch.Tensor, w: torch.Tensor):
    cdf = torch.cumsum(w, 0) / w.sum()
    return [lam[int(torch.searchsorted(cdf, torch.tensor(q, dtype=torch.float64)))].item() for q in (0.25, 0.5, 0.75)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--png", type=Path)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    results = {}
    print(f"{'objective':38s} {'λ quartiles (25/50/75 %)':>26s}   w at λ = −4, 0, 4")
    for label in OBJECTIVES:
        lam, w = effective(label)
        q = quartiles(lam, w)
        at = [w[torch.argmin((lam - v).abs())].item() for v in (-4.0, 0.0, 4.0)]
        results[label] = dict(log_snr=lam.tolist(), weight=w.tolist(), quartiles=q)
        print(f"{label:38s} {q[0]:+7.2f} {q[1]:+7.2f} {q[2]:+7.2f}        {at[0]:.3f} {at[1]:.3f} {at[2]:.3f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    if args.png:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(8, 4.5))
        for label, r in results.items():
            ax.plot(r["log_snr"], r["weight"], label=label)
        ax.set_xlabel("log-SNR λ = log(α/σ)")
        ax.set_ylabel("w(λ), normalized over λ ∈ [−6, 8]")
        ax.set_yscale("log")
        ax.set_ylim(1e-4, 2)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(args.png, dpi=120)


if __name__ == "__main__":
    main()
