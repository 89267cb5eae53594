"""Few-step students (sde_diffusion/distillation.py, the "consistency" parameterization and sampler) against exact
oracles on the 2-D Gaussian mixture: the boundary condition of the parameterization, one-step sampling with the
exact consistency map (the probability-flow map to eps), consistency distillation from the exact score checked
against that map and the exact density, and progressive distillation of the exact score's DDIM sampler."""
import copy

import pytest
import torch
from torch import nn

from sde_diffusion import distillation as cm
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
# Cross-entropy gap (nats/dim) of the distilled student's samples at 1, 2, 4 steps: measured 2.09–2.47, 1.37–1.67,
# 1.04–1.16 (seeds 0–2). A target read at the student's level t_{n+1} instead of t_n (a wrong target) gives 19–21
# at every count and a one-step error far above MIN_BROKEN_ERROR.
MAX_STUDENT_GAPS = {1: 3.5, 2: 2.5, 4: 2.0}
MIN_WRONG_TARGET_GAP = 10.0


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


def flow_to(sde, t_end: float):
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
def test_the_boundary_condition_holds_exactly_for_any_network(sde_name):
    sde = SDES[sde_name]()
    p = P.resolve(sde, True, "consistency")
    assert isinstance(p, P.ConsistencyParameterization) and p.eps == sde.default_eps
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


def test_coefficients_and_levels():
    s = torch.tensor([0.002, 0.5, 80.0], dtype=torch.float64)
    c_skip, c_out, c_in, c_noise = P.consistency_coefficients(s, 0.002)
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


def heun_error(sde, N: int) -> float:
    """‖Heun − exact flow‖ (all 256 points) of one teacher step on an N-level grid, ending at the level where
    s = s(levels_18[10]) (≈ 4 on EDM, 9 on VP: the grids are nested, so every N ending there is comparable)."""
    levels, exact = cm.karras_times(sde, N), MIXTURE.marginal_score_fn(sde)
    n = 10 * N // LEVELS
    generator = torch.Generator().manual_seed(0)
    x = MIXTURE.sample(256, generator)[0].double()
    x = sde.alpha(levels[n + 1]) * x + sde.sigma(levels[n + 1]) * torch.randn(x.shape, generator=generator,
                                                                              dtype=torch.float64)
    heun = cm.heun_step(exact, sde, x, levels[n + 1].expand(256), levels[n].expand(256))
    return (heun - cm.flow_map(exact, sde, x, levels[n + 1], levels[n])).norm().item()


@pytest.mark.parametrize("sde_name", SDES)
def test_the_teacher_heun_step_is_second_order(sde_name):
    """Halving the step divides Heun's local error by ≈ 2³ (measured 7.1–7.5 on VP and EDM; > 5 asserted)."""
    sde = SDES[sde_name]()
    coarse, fine = heun_error(sde, LEVELS), heun_error(sde, 2 * LEVELS)
    assert coarse / fine > 5, (coarse, fine)


def test_any_deterministic_solver_steps_the_teacher():
    """One step of a registered solver on its two-point grid, per distinct pair of levels: DPM-Solver++'s first
    step is DDIM's exactly (the vectorized DDIM step's), and the Heun step is not first order."""
    sde = EDMSDE()
    exact = MIXTURE.marginal_score_fn(sde)
    levels = cm.karras_times(sde, LEVELS)
    generator = torch.Generator().manual_seed(0)
    n = torch.randint(0, LEVELS, (64,), generator=generator)
    x = MIXTURE.sample(64, generator)[0].double() + levels[n + 1][:, None] * torch.randn(64, 2, generator=generator,
                                                                                          dtype=torch.float64)
    t_from, t_to = levels[n + 1], levels[n]
    ddim = cm.solver_step(exact, sde, x, t_from, t_to, "ddim")
    torch.testing.assert_close(cm.solver_step(exact, sde, x, t_from, t_to, "dpm_solver"), ddim)
    assert (cm.solver_step(exact, sde, x, t_from, t_to, "heun") - ddim).abs().max() > 1e-3
    for bad in ("pc", "ode", "consistency", "dpm_solver_sde"):
        with pytest.raises(ValueError, match="deterministic fixed-step sampler"):
            cm.check_solver(bad)


def test_the_sampler_is_registered_with_one_call_per_step():
    sampler = sampling.SAMPLERS["consistency"]
    assert (sampler.steps, sampler.grid, sampler.grid_for(1), list(sampler.options)) == (1, "edm", "edm", [])
    assert sampler.returns_x0 and sampler.parameterization == "consistency"
    sde = EDMSDE()
    score_fn = MIXTURE.marginal_score_fn(sde)
    for steps, denoise in ((1, True), (3, True), (3, False)):  # x̂₀ is the result: no Tweedie step is added
        x, nfe = sampling.sample(score_fn, sde, (8, 2), "consistency", steps=steps, denoise=denoise,
                                 generator=torch.Generator().manual_seed(0))
        assert nfe == steps and torch.isfinite(x).all()


@pytest.mark.parametrize("sde_name", SDES)
def test_the_exact_consistency_map_samples_the_mixture(sde_name, entropy):
    """f = the exact probability-flow map to eps: one step from the prior gives p_eps (cross-entropy gap measured
    +0.0005 nats/dim on VP, +0.0004 on EDM, one call), and so do 4 steps with fresh
    noise (measured −0.003, +0.004); all within MAX_GAP. A map that stops at noise WRONG_END_NOISE (measured +6.1)
    or returns its input (> 10⁴) does not."""
    sde = SDES[sde_name]()
    p = P.resolve(sde, True, "consistency")
    wrong_end = sde.t_from_log_snr(-torch.log(torch.tensor(WRONG_END_NOISE, dtype=torch.float64))).item()
    runs = {"exact": (flow_to(sde, p.eps), 1), "exact, 4 steps": (flow_to(sde, p.eps), 4),
            "wrong end": (flow_to(sde, wrong_end), 1),
            "identity": (lambda x, t: x / per_sample(sde.alpha(t).to(x.dtype), x), 1)}
    gaps, calls = {}, {}
    for name, (f, steps) in runs.items():
        x, calls[name] = sampling.sample(score_of(sde, f), sde, (GAP_SAMPLES, 2), "consistency", steps=steps,
                                         generator=torch.Generator().manual_seed(0))
        gaps[name] = cross_entropy_gap(x, MIXTURE, entropy)
    assert calls["exact"] == 1 and calls["exact, 4 steps"] == 4
    assert abs(gaps["exact"]) < MAX_GAP and abs(gaps["exact, 4 steps"]) < MAX_GAP, gaps
    assert gaps["wrong end"] > 10 * MAX_GAP and gaps["identity"] > 10 * MAX_GAP, gaps


def distilled_error(entropy=None, *, teacher_sign: float = 1.0, boundary: bool = True, wrong_target: bool = False,
                    seed: int = 0, steps: int = TRAIN_STEPS):
    """Distill the exact EDM teacher into TinyMLP for `steps` Adam steps; returns the one-step error
    E‖f(x_T, T) − Φ_{T→eps}(x_T)‖² / tr Cov(data) over 2000 prior draws, and with `entropy` also the
    cross-entropy gaps of the student's samples at 1, 2 and 4 steps ({steps: gap})."""
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
    if wrong_target:  # the anchor read at the next level up, t_{n+1}, instead of t_n
        right_target = target

        def target(x, t):
            n = torch.searchsorted(levels.to(t.dtype), t)
            return right_target(x, levels[(n + 1).clamp(max=LEVELS)].to(t.dtype))
    for _ in range(steps):
        x0 = MIXTURE.sample(BATCH, generator)[0]
        loss = cm.consistency_loss(student, sde, x0, levels, generator, target=target,
                                   teacher=lambda x, t: teacher_sign * exact(x, t))
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
    error = (((one_step - reference) ** 2).sum(1).mean() / data_variance).item()
    if entropy is None:
        return error
    gaps = {}
    for count in MAX_STUDENT_GAPS:
        with torch.no_grad():
            x, nfe = sampling.sample(score_of(sde, student), sde, (GAP_SAMPLES, 2), "consistency", steps=count,
                                     generator=torch.Generator().manual_seed(0))
        assert nfe == count
        gaps[count] = cross_entropy_gap(x, MIXTURE, entropy)
    return error, gaps


@pytest.mark.usefixtures("one_thread")
def test_distillation_from_the_exact_score_learns_the_flow_map(entropy):
    error, gaps = distilled_error(entropy)
    wrong_error, wrong_gaps = distilled_error(entropy, wrong_target=True, steps=BROKEN_TRAIN_STEPS)
    errors = {"distilled": error, "wrong target": wrong_error,
              "wrong-way teacher": distilled_error(teacher_sign=-1.0, steps=BROKEN_TRAIN_STEPS),
              "no boundary": distilled_error(boundary=False, steps=BROKEN_TRAIN_STEPS)}
    assert errors["distilled"] < MAX_DISTILLED_ERROR, errors
    assert min(v for k, v in errors.items() if k != "distilled") > MIN_BROKEN_ERROR, errors
    assert all(gaps[n] < MAX_STUDENT_GAPS[n] for n in gaps), gaps
    assert min(wrong_gaps.values()) > MIN_WRONG_TARGET_GAP, wrong_gaps


# Progressive distillation of the exact score's DDIM sampler, one round 8 → 4 steps on the EDM grid (EDM SDE).
PD_TEACHER_STEPS, PD_TRAIN_STEPS = 8, 800
# E‖student 4 steps − teacher 8 steps‖² / tr Cov(data) from the same x_T: measured 0.0038–0.0050 (seeds 0–2), while
# the teacher's own 4 steps miss its 8 by 0.070. Gap of the student's 4-step samples: 0.81–0.89 (teacher at 8 steps
# 0.57, at 4 steps 2.98). A target that is the teacher's landing point x̃″ instead of the x̂₀ whose one DDIM step
# lands there: error 700–1400.
MAX_PD_ERROR, MAX_PD_GAP, MIN_WRONG_PD_ERROR = 0.02, 1.5, 1.0


def progressive_student(wrong_target: bool = False, seed: int = 0):
    """(error against the teacher's 8 steps, gap of the student's 4-step samples) after PD_TRAIN_STEPS."""
    sde = EDMSDE()
    exact, p = MIXTURE.marginal_score_fn(sde), P.resolve(sde, True, "edm")
    torch.manual_seed(seed)
    net = TinyMLP()
    student = p.score_fn(net)
    optimizer = torch.optim.Adam(net.parameters(), lr=LEARNING_RATE)
    generator = torch.Generator().manual_seed(seed)
    grid = cm.progressive_grid(sde, PD_TEACHER_STEPS)
    for _ in range(PD_TRAIN_STEPS if not wrong_target else BROKEN_TRAIN_STEPS):
        x0 = MIXTURE.sample(BATCH, generator)[0]
        loss = (landing_point_loss if wrong_target else cm.progressive_loss)(student, exact, sde, x0, grid, generator)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    x_T = sde.prior_sampling((GAP_SAMPLES, 2), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        mine, nfe = sampling.sample(student, sde, x_T.shape, "ddim", steps=PD_TEACHER_STEPS // 2, grid="edm",
                                    denoise=False, x_T=x_T)
        theirs, _ = sampling.sample(exact, sde, x_T.shape, "ddim", steps=PD_TEACHER_STEPS, grid="edm",
                                    denoise=False, x_T=x_T)
    assert nfe == PD_TEACHER_STEPS // 2
    data_variance = MIXTURE.sample(20_000, torch.Generator().manual_seed(3))[0].var(0).sum()
    return (((mine - theirs) ** 2).sum(1).mean() / data_variance).item(), mine


def landing_point_loss(student, teacher, sde, x0, grid, generator):
    """progressive_loss with the wrong target x̃″ (where the teacher's two steps land) for the student's x̂₀."""
    n, z = cm._draw(x0, (len(grid) - 1) // 2, generator, (0, 1))
    t, t_mid, t_end = grid[2 * n], grid[2 * n + 1], grid[2 * n + 2]
    x = per_sample(sde.alpha(t), x0).float() * x0 + per_sample(sde.sigma(t), x0).float() * z
    with torch.no_grad():
        landing = cm.ddim_step(teacher, sde, cm.ddim_step(teacher, sde, x, t, t_mid), t_mid, t_end)
        landing = landing / per_sample(sde.alpha(t_end), x).float()
    s = per_sample(sde.sigma(t) / sde.alpha(t), x).float()
    error = (sampling.tweedie_denoise(student, sde, x, t.float()) - landing).pow(2).mean(1)
    return ((1 + 1 / s.flatten() ** 2) * error).mean()


@pytest.mark.usefixtures("one_thread")
def test_progressive_distillation_halves_the_exact_samplers_steps(entropy):
    error, samples = progressive_student()
    wrong_error, _ = progressive_student(wrong_target=True)
    gap = cross_entropy_gap(samples, MIXTURE, entropy)
    assert error < MAX_PD_ERROR and gap < MAX_PD_GAP, (error, gap)
    assert wrong_error > MIN_WRONG_PD_ERROR, wrong_error
