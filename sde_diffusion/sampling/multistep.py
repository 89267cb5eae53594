"""Training-free multistep solvers of the probability-flow ODE for few score evaluations: `unipc` (Zhao et al. 2023),
`ipndm` (Zhang & Chen 2023's improved PNDM) and `deis` (Zhang & Chen 2023, tAB). One score call per step each.

Notation as in terms.py: λ = log(α/σ), m = x̂_0 the data prediction, ε̂ the noise prediction; x̃ = x/α and
σ̃ = σ/α = e^{−λ}, in which the probability-flow ODE is dx̃/dσ̃ = ε̂.
"""
from __future__ import annotations

import math
from typing import List, Literal

import numpy as np
import torch

from ..sdes import SDE, ScoreFn
from .registry import register_sampler
from .terms import denoised_and_noise, like


# --------------------------------------------------------------------------------------------------
# UniPC
# --------------------------------------------------------------------------------------------------
def _phi_times_h(hh: torch.Tensor, k: int) -> torch.Tensor:
    """hh·φ_k(hh) with φ_0(z) = e^z, φ_{j+1}(z) = (φ_j(z) − 1/j!)/z, evaluated by that recursion (float64)."""
    value = torch.expm1(hh)  # hh·φ_1(hh)
    for j in range(1, k):
        value = value / hh - 1.0 / math.factorial(j)
    return value


def unipc_coefficients(hh: torch.Tensor, ratios: torch.Tensor, variant: str) -> torch.Tensor:
    """ρ solving UniPC's order conditions Σ_m ρ_m r_m^{k−1} = k!·hh·φ_{k+1}(hh)/B(h), k = 1..len(ratios).

    hh = −h (data prediction), ratios r_m = (λ_m − λ_0)/h of the differences used; B(h) = hh ("bh1") or e^{hh} − 1
    ("bh2"). B(h) cancels from B·ρ wherever the system is solved; with a single difference (the 2nd-order predictor,
    the 1st-order corrector) UniPC instead fixes ρ = ½, and B(h) then chooses the method (bh2 with the predictor
    is DPM-Solver++ 2M). float64.
    """
    p = len(ratios)
    if p == 1:
        return torch.full((1,), 0.5, dtype=torch.float64, device=ratios.device)
    big_b = hh if variant == "bh1" else torch.expm1(hh)
    rows = torch.stack([ratios ** k for k in range(p)])  # row k: r^k
    rhs = torch.stack([math.factorial(k) * _phi_times_h(hh, k + 1) / big_b for k in range(1, p + 1)])
    return torch.linalg.solve(rows, rhs)


def unipc_update(x: torch.Tensor, m: List[torch.Tensor], lam: List[torch.Tensor], lam_next: torch.Tensor,
                 sigma_ratio: torch.Tensor, alpha_next: torch.Tensor, order: int, variant: str,
                 m_next: torch.Tensor = None) -> torch.Tensor:
    """UniP-p (m_next None) or UniC-p (m_next = x̂_0 evaluated at the predicted state) from λ_0 = lam[-1].

    x' = (σ'/σ)·x − α'·(e^{−h} − 1)·m_0 − α'·B(h)·Σ_k ρ_k·D_k,   D_k = (m_k − m_0)/r_k,
    with the p − 1 earlier points m[-2], m[-3], … for the predictor, and those plus (λ', m_next) for the corrector.
    """
    h = lam_next - lam[-1]
    hh = -h
    m0 = m[-1]
    out = like(sigma_ratio, x) * x - like(alpha_next * torch.expm1(hh), x) * m0
    points = [(lam[-1 - k], m[-1 - k]) for k in range(1, order)]
    if m_next is not None:
        points.append((lam_next, m_next))
    if not points:
        return out
    ratios = torch.stack([(lam_k - lam[-1]) / h for lam_k, _ in points])
    rho = unipc_coefficients(hh, ratios, variant)
    big_b = hh if variant == "bh1" else torch.expm1(hh)
    correction = sum(like(rho[k] / ratios[k], x) * (m_k - m0) for k, (_, m_k) in enumerate(points))
    return out - like(alpha_next * big_b, x) * correction


@register_sampler("unipc", steps=40)
def unipc_sampler(score_fn: ScoreFn, sde: SDE, x: torch.Tensor, timesteps: torch.Tensor, *,
                  order: Literal[1, 2, 3] = 3, variant: Literal["bh1", "bh2"] = "bh2", corrector: bool = True,
                  lower_order_final: bool = True) -> torch.Tensor:
    """UniPC (Zhao et al. 2023), data prediction: the UniP-p predictor, and the UniC corrector, which reuses the
    evaluation at the predicted state to raise the step to order p + 1 at no extra score call (none after the last
    step). Orders warm up as history accumulates; with lower_order_final the last steps drop to the steps left.
    variant: B(h) = h ("bh1") or e^h − 1 ("bh2"). One score call per step.
    """
    lam = sde.log_snr(timesteps)
    n = len(timesteps) - 1
    m: List[torch.Tensor] = []
    x_before = prev_order = None
    for i in range(n):
        t, s = timesteps[i], timesteps[i + 1]
        m_i = denoised_and_noise(score_fn, sde, x, t)[0]
        if corrector and x_before is not None:  # UniC on the step just taken, with m_i seen at its prediction
            x = unipc_update(x_before, m, list(lam[i - len(m):i]), lam[i], sde.sigma(t) / sde.sigma(timesteps[i - 1]),
                             sde.alpha(t), prev_order, variant, m_next=m_i)
        m = (m + [m_i])[-order:]
        step_order = min(order, len(m), n - i) if lower_order_final else min(order, len(m))
        x_before, prev_order = x, step_order
        x = unipc_update(x, m, list(lam[i + 1 - len(m):i + 1]), lam[i + 1], sde.sigma(s) / sde.sigma(t),
                         sde.alpha(s), step_order, variant)
    return x


# --------------------------------------------------------------------------------------------------
# iPNDM
# --------------------------------------------------------------------------------------------------
# Adams–Bashforth weights of ε̂_i, ε̂_{i−1}, … for equal steps, orders 1–4.
ADAMS_BASHFORTH = {1: (1.0,), 2: (3 / 2, -1 / 2), 3: (23 / 12, -16 / 12, 5 / 12),
                   4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}


@register_sampler("ipndm", grid="edm", steps=50)
def ipndm_sampler(score_fn: ScoreFn, sde: SDE, x: torch.Tensor, timesteps: torch.Tensor, *,
                  order: Literal[1, 2, 3, 4] = 4) -> torch.Tensor:
    """Improved PNDM (Zhang & Chen 2023): x̃_{i+1} = x̃_i + (σ̃_{i+1} − σ̃_i)·Σ_j c_j·ε̂_{i−j}, the fixed
    Adams–Bashforth weights of order min(order, i + 1) (the lower-order warm start), on a grid spaced in σ̃^{1/ρ} by
    default. One score call per step.
    """
    sig = torch.exp(-sde.log_snr(timesteps))
    eps_history: List[torch.Tensor] = []
    for i in range(len(timesteps) - 1):
        t, s = timesteps[i], timesteps[i + 1]
        eps_history = (eps_history + [denoised_and_noise(score_fn, sde, x, t)[1]])[-order:]
        weights = ADAMS_BASHFORTH[len(eps_history)]
        slope = sum(w * e for w, e in zip(weights, reversed(eps_history)))
        x = like(sde.alpha(s), x) * (x / like(sde.alpha(t), x) + like(sig[i + 1] - sig[i], x) * slope)
    return x


# --------------------------------------------------------------------------------------------------
# DEIS (tAB)
# --------------------------------------------------------------------------------------------------
# Gauss–Legendre nodes for the DEIS coefficients' integrals (exact for polynomials of degree < 2·nodes; σ̃ is smooth).
DEIS_QUADRATURE_NODES = 32


def _lagrange(nodes: torch.Tensor, j: int, tau: torch.Tensor) -> torch.Tensor:
    """ℓ_j(τ) = Π_{m≠j} (τ − t_m)/(t_j − t_m) at the points tau (1-D)."""
    others = torch.cat([nodes[:j], nodes[j + 1:]])
    return torch.prod((tau[:, None] - others) / (nodes[j] - others), dim=1)


def _lagrange_derivative(nodes: torch.Tensor, j: int, tau: torch.Tensor) -> torch.Tensor:
    """ℓ_j'(τ) = Σ_{m≠j} 1/(t_j − t_m) · Π_{l≠j,m} (τ − t_l)/(t_j − t_l) (product rule; 0 for a single node)."""
    others = torch.cat([nodes[:j], nodes[j + 1:]])
    total = torch.zeros_like(tau)
    for m in range(len(others)):
        rest = torch.cat([others[:m], others[m + 1:]])
        total = total + torch.prod((tau[:, None] - rest) / (nodes[j] - rest), dim=1) / (nodes[j] - others[m])
    return total


def deis_coefficients(sde: SDE, nodes: torch.Tensor, t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """C_j = ∫_t^s ℓ_j(τ) dσ̃(τ) for the Lagrange basis ℓ_j on `nodes` (times, newest first): (len(nodes),) float64.

    By parts, ∫ ℓ_j dσ̃ = [ℓ_j σ̃]_t^s − ∫_t^s σ̃(τ)·ℓ_j'(τ) dτ, so only σ̃ itself is integrated (Gauss–Legendre).
    """
    nodes, t, s = nodes.double(), t.double(), s.double()
    u, w = (torch.from_numpy(a).to(nodes.device) for a in np.polynomial.legendre.leggauss(DEIS_QUADRATURE_NODES))
    tau = 0.5 * (s - t) * u + 0.5 * (s + t)
    sig_tau = torch.exp(-sde.log_snr(tau))
    ends = torch.stack([t, s])
    sig_ends = torch.exp(-sde.log_snr(ends))
    coefficients = []
    for j in range(len(nodes)):
        boundary = _lagrange(nodes, j, ends) * sig_ends
        inner = 0.5 * (s - t) * (w * sig_tau * _lagrange_derivative(nodes, j, tau)).sum()
        coefficients.append(boundary[1] - boundary[0] - inner)
    return torch.stack(coefficients)




@register_sampler("deis", steps=40)
def deis_sampler(score_fn: ScoreFn, sde: SDE, x: torch.Tensor, timesteps: torch.Tensor, *,
                 order: Literal[1, 2, 3] = 3, lower_order_final: bool = True) -> torch.Tensor:
    """DEIS with time-polynomial extrapolation (tAB, Zhang & Chen 2023): ε̂ is extrapolated by the polynomial in t
    through the last `order` evaluations and integrated exactly against dσ̃, x̃_{i+1} = x̃_i + Σ_j C_ij·ε̂_{i−j}.
    Order 1 is DDIM. Warm start and lower_order_final as in `dpm_solver`. One score call per step.
    """
    n = len(timesteps) - 1
    eps_history: List[torch.Tensor] = []
    for i in range(n):
        t, s = timesteps[i], timesteps[i + 1]
        eps_history = (eps_history + [denoised_and_noise(score_fn, sde, x, t)[1]])[-order:]
        k = min(order, len(eps_history), n - i) if lower_order_final else min(order, len(eps_history))
        nodes = timesteps[i + 1 - k:i + 1].flip(0)  # t_i, t_{i−1}, …
        c = deis_coefficients(sde, nodes, t, s).to(timesteps.device)
        slope = sum(like(c[j], x) * eps_history[-1 - j] for j in range(k))
        x = like(sde.alpha(s), x) * (x / like(sde.alpha(t), x) + slope)
    return x
