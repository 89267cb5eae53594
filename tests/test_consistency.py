"""Consistency models (sde_diffusion/consistency.py) against exact oracles on the 2-D Gaussian mixture: the boundary
condition of the parameterization, one-step sampling with the exact consistency map (the probability-flow map to
eps), and consistency distillation from the exact score checked against that map."""
import copy
import importlib

import pytest
import torch
from torch import nn

from sde_diffusion import parameterization as P
from sde_diffusion import sampling
from sde_diffusion.metrics_toy import cross_entropy_gap, mixture_entropy
from sde_diffusion.sdes import EDMSDE, VPSDE, per_sample
from sde_diffusion.toy import default_mixture

SDES = {"vp": VPSDE, "edm": EDMSDE}
MIXTURE = default_mixture()
# Samples for the cross-entropy gap: its scatter is std(log p)/(d·√n) ≈ 0.01 nats/dim at n = 4000.
GAP_SAMPLES = 4000
# The package's tolerance for a sampler at its documented count on the exact score (sampling/__init__.py): ±0.03.
MAX_GAP = 0.03
# The noise level at which the deliberately wrong map stops (EDM's σ_data): its samples are p_t there, not p_eps.
WRONG_END_NOISE = 0.5
# Distillation: EDM SDE, Song et al.'s N = 18 levels, EMA target, small MLP, Adam.
LEVELS, TRAIN_STEPS, BATCH, LEARNING_RATE, EMA_DECAY, HIDDEN = 18, 800, 256, 3e-3, 0.95, 128
# E‖f(x_T, T) − Φ_{T→eps}(x_T)‖² / tr Cov(data) after TRAIN_STEPS: measured 0.076, 0.071, 0.080 (seeds 0, 1, 2;
# 0.094 at lr 2e-3, 0.27 after 300 steps); Tweedie's one-step x̂₀(x_T) ≈ E[x_0] scores 0.96.
MAX_DISTILLED_ERROR = 0.2
# A teacher flowing the wrong way (negated score) or a student without the boundary condition, trained for
# BROKEN_TRAIN_STEPS (enough to show it, short for time): measured 940–10⁴ and 1.05–1.11 (seeds 0–2).
MIN_BROKEN_ERROR = 0.5
BROKEN_TRAIN_STEPS = 300


@pytest.fixture(scope="module")
def cm():
    """sde_diffusion.consistency, imported (registering the "consistency" sampler and parameterization) only while
    this module's tests run: other test modules enumerate every registered sampler and parameterization as the
    package's own. Entries that were registered before are left alone."""
    samplers, parameterizations = set(sampling.SAMPLERS), set(P.PARAMETERIZATIONS)
    module = importlib.import_module("sde_diffusion.consistency")
    if "consistency" not in sampling.SAMPLERS:  # imported before and unregistered since: register again
        module = importlib.reload(module)
    yield module
    for name in set(sampling.SAMPLERS) - samplers:
        sampling.SAMPLERS.pop(name)
    for name in set(P.PARAMETERIZATIONS) - parameterizations:
        P.PARAMETERIZATIONS.pop(name)


class TinyMLP(nn.Module):
    """F(input (batch, d), condition (batch,)) → (batch, d): two SiLU hidden layers on [input, condition]."""

    def __init__(self, dim: int = 2, width: int = HIDDEN):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(dim + 1, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(),
                                  nn.Linear(width, dim))

    def forward(self, x, cond):
        return self.body(torch.cat([x, cond[:, None].to(x.dtype)], 1))


def alpha_at(sde, t: float) -> float:
    return sde.alpha(torch.tensor(t, dtype=torch.float64)).item()


def score_of(sde, f):
    """The score function whose Tweedie x̂₀ is the consistency function f: (α·f − x)/σ²."""
    def score_fn(x, t):
        t = torch.as_tensor(t, dtype=torch.float64).expand(x.shape[0])
        alpha, sigma = (per_sample(v(t).to(x.dtype), x) for v in (sde.alpha, sde.sigma))
        return (alpha * f(x, t) - x) / sigma**2
    return score_fn


def flow_to(cm, sde, t_end: float):
    """f(x, t) = Φ_{t→t_end}(x)/α(t_end) with the mixture's exact score (one time for the batch)."""
    exact, scale = MIXTURE.marginal_score_fn(sde), alpha_at(sde, t_end)

    def f(x, t):
        start = float(t[0])
        moved = x if abs(start - t_end) <= 1e-12 * max(1.0, t_end) else cm.flow_map(exact, sde, x.double(), start,
                                                                                     t_end).to(x.dtype)
        return moved / scale
    return f


@pytest.fixture(scope="module")
def entropy():
    return mixture_entropy(MIXTURE, n=50_000)


@pytest.mark.parametrize("sde_name", SDES)
def test_the_boundary_condition_holds_exactly_for_any_network(cm, sde_name):
    sde = SDES[sde_name]()
    p = P.resolve(sde, True, "consistency")
    assert isinstance(p, cm.ConsistencyParameterization) and p.eps == sde.default_eps
    torch.manual_seed(0)
    f = p.consistency_fn(TinyMLP())
    x = 3 * torch.randn(64, 2)
    at_eps = torch.full((64,), p.eps)
    assert torch.equal(f(x, at_eps), x / per_sample(sde.alpha(at_eps), x))
    t = torch.full((64,), 0.5 * sde.t_max)
    assert (f(x, t) - x / per_sample(sde.alpha(t), x)).abs().max() > 1e-3  # away from eps the network counts
    # score ↔ output round trip away from the boundary (float64); at the boundary F is free and 0 is returned
    x64, out = torch.randn(4, 2, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)
    times = torch.tensor([2 * p.eps, 0.01 * sde.t_max, 0.3 * sde.t_max, sde.t_max], dtype=torch.float64)
    torch.testing.assert_close(p.output(p.score(out, x64, times), x64, times), out)
    assert torch.equal(p.output(torch.randn(4, 2, dtype=torch.float64), x64, torch.full((4,), p.eps)),
                       torch.zeros(4, 2, dtype=torch.float64))


def test_coefficients_and_levels(cm):
    s = torch.tensor([0.002, 0.5, 80.0], dtype=torch.float64)
    c_skip, c_out, c_in, c_noise = cm.consistency_coefficients(s, 0.002)
    assert c_skip[0] == 1 and c_out[0] == 0 and c_skip[2] < 1e-4
    torch.testing.assert_close(c_in, 1 / torch.sqrt(s**2 + 0.25))
    torch.testing.assert_close(c_noise, 0.25 * torch.log(s))
    sde = EDMSDE()
    levels = cm.karras_times(sde, LEVELS)
    assert len(levels) == LEVELS + 1 and levels[0] == sde.default_eps and levels[-1] == sde.t_max
    roots = levels ** (1 / 7)
    torch.testing.assert_close(roots.diff(), roots.diff().mean().expand(LEVELS))  # uniform in s^{1/ρ}
    c = 0.1
    a, b = torch.zeros(3, 2), torch.tensor([[3.0, 4.0], [0.0, 0.0], [0.0, 1e-3]])
    torch.testing.assert_close(cm.pseudo_huber(a, b, c), torch.sqrt(b.pow(2).sum(1) + c**2) - c)


def heun_error(cm, sde, N: int) -> float:
    """‖Heun − exact flow‖ (all 256 points) of one teacher step on an N-level grid, ending at the level where
    s = s(levels_18[10]) (≈ 4 on EDM, 9 on VP: the grids are nested, so every N ending there is comparable)."""
    levels, exact = cm.karras_times(sde, N), MIXTURE.marginal_score_fn(sde)
    n = 10 * N // LEVELS
    generator = torch.Generator().manual_seed(0)
    x = MIXTURE.sample(256, generator)[0].double()
    x = sde.alpha(levels[n + 1]) * x + sde.sigma(levels[n + 1]) * torch.randn(x.shape, generator=generator,
                                                                              dtype=torch.float64)
    heun = cm.teacher_heun_step(exact, sde, x, levels[n + 1].expand(256), levels[n].expand(256))
    return (heun - cm.flow_map(exact, sde, x, levels[n + 1], levels[n])).norm().item()


@pytest.mark.parametrize("sde_name", SDES)
def test_the_teacher_heun_step_is_second_order(cm, sde_name):
    """Halving the step divides Heun's local error by ≈ 2³ (measured 7.1–7.5 on VP and EDM; > 5 asserted)."""
    sde = SDES[sde_name]()
    coarse, fine = heun_error(cm, sde, LEVELS), heun_error(cm, sde, 2 * LEVELS)
    assert coarse / fine > 5, (coarse, fine)


def test_the_sampler_is_registered_with_one_call_per_step(cm):
    sampler = sampling.SAMPLERS["consistency"]
    assert (sampler.steps, sampler.grid, sampler.grid_for(1), list(sampler.options)) == (1, "edm", "edm", [])
    sde = EDMSDE()
    score_fn = MIXTURE.marginal_score_fn(sde)
    for steps in (1, 3):
        x, nfe = sampling.sample(score_fn, sde, (8, 2), "consistency", steps=steps, denoise=False,
                                 generator=torch.Generator().manual_seed(0))
        assert nfe == steps and torch.isfinite(x).all()
    _, nfe = sampling.sample(score_fn, sde, (8, 2), "consistency", generator=torch.Generator().manual_seed(0))
    assert nfe == 2  # the default: one step, and the framework's Tweedie step at eps


@pytest.mark.parametrize("sde_name", SDES)
def test_the_exact_consistency_map_samples_the_mixture(cm, sde_name, entropy):
    """f = the exact probability-flow map to eps: one step from the prior gives p_eps (cross-entropy gap measured
    +0.0005 nats/dim on VP, +0.0004 on EDM, 2 calls with the framework's Tweedie step), and so do 4 steps with fresh
    noise (measured −0.003, +0.004); all within MAX_GAP. A map that stops at noise WRONG_END_NOISE (measured +6.1)
    or returns its input (> 10⁴) does not."""
    sde = SDES[sde_name]()
    p = P.resolve(sde, True, "consistency")
    wrong_end = sde.t_from_log_snr(-torch.log(torch.tensor(WRONG_END_NOISE, dtype=torch.float64))).item()
    runs = {"exact": (flow_to(cm, sde, p.eps), 1), "exact, 4 steps": (flow_to(cm, sde, p.eps), 4),
            "wrong end": (flow_to(cm, sde, wrong_end), 1),
            "identity": (lambda x, t: x / per_sample(sde.alpha(t).to(x.dtype), x), 1)}
    gaps, calls = {}, {}
    for name, (f, steps) in runs.items():
        x, calls[name] = sampling.sample(score_of(sde, f), sde, (GAP_SAMPLES, 2), "consistency", steps=steps,
                                         generator=torch.Generator().manual_seed(0))
        gaps[name] = cross_entropy_gap(x, MIXTURE, entropy)
    assert calls["exact"] == 2 and calls["exact, 4 steps"] == 5
    assert abs(gaps["exact"]) < MAX_GAP and abs(gaps["exact, 4 steps"]) < MAX_GAP, gaps
    assert gaps["wrong end"] > 10 * MAX_GAP and gaps["identity"] > 10 * MAX_GAP, gaps


def distilled_error(cm, *, teacher_sign: float = 1.0, boundary: bool = True, seed: int = 0,
                    steps: int = TRAIN_STEPS) -> float:
    """Distill the exact EDM teacher into TinyMLP for `steps` Adam steps; returns the one-step error
    E‖f(x_T, T) − Φ_{T→eps}(x_T)‖² / tr Cov(data) over 2000 prior draws."""
    sde = EDMSDE()
    p = P.resolve(sde, True, "consistency")
    exact = MIXTURE.marginal_score_fn(sde)
    torch.manual_seed(seed)
    net = TinyMLP()
    ema = copy.deepcopy(net).requires_grad_(False)
    if boundary:
        student, target = p.consistency_fn(net), p.consistency_fn(ema)
    else:  # the network's output is f itself: nothing pins f(x, eps) = x̃
        student, target = (lambda x, t, m=m: m(p.network_input(x, t), p.condition(t)) for m in (net, ema))
    optimizer = torch.optim.Adam(net.parameters(), lr=LEARNING_RATE)
    generator = torch.Generator().manual_seed(seed)
    levels = cm.karras_times(sde, LEVELS)
    for _ in range(steps):
        x0 = MIXTURE.sample(BATCH, generator)[0]
        loss = cm.consistency_distillation_loss(student, target, lambda x, t: teacher_sign * exact(x, t), sde, x0,
                                                levels, generator)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            for slow, fast in zip(ema.parameters(), net.parameters()):
                slow.lerp_(fast, 1 - EMA_DECAY)
    x_T = sde.prior_sampling((2000, 2), generator=torch.Generator().manual_seed(7))
    reference = cm.flow_map(exact, sde, x_T.double(), sde.t_max, p.eps).float()
    with torch.no_grad():
        one_step = student(x_T, torch.full((2000,), sde.t_max))
    data_variance = MIXTURE.sample(20_000, torch.Generator().manual_seed(3))[0].var(0).sum()
    return (((one_step - reference) ** 2).sum(1).mean() / data_variance).item()


@pytest.mark.usefixtures("one_thread")
def test_distillation_from_the_exact_score_learns_the_flow_map(cm):
    errors = {"distilled": distilled_error(cm),
              "wrong-way teacher": distilled_error(cm, teacher_sign=-1.0, steps=BROKEN_TRAIN_STEPS),
              "no boundary": distilled_error(cm, boundary=False, steps=BROKEN_TRAIN_STEPS)}
    assert errors["distilled"] < MAX_DISTILLED_ERROR, errors
    assert errors["wrong-way teacher"] > MIN_BROKEN_ERROR and errors["no boundary"] > MIN_BROKEN_ERROR, errors
