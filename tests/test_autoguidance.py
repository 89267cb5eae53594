"""Guidance interval and autoguidance (sde_diffusion/guidance.py, jobs/guide.py): the compositions against exact
mixture scores, the config checks, and the jobs with a guide read from an earlier checkpoint or another workdir."""
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import run_lib
from configs import toy_gmm, vp_digits, vp_digits_cond
from sde_diffusion import guidance
from sde_diffusion.config import ConfigError, default_config, validate_config
from sde_diffusion.data.datasets import ToyDataset
from sde_diffusion.models import create_model, get_score_fn
from sde_diffusion.sampling import sample
from sde_diffusion.sdes import EDMSDE, VESDE, VPSDE
from sde_diffusion.toy import GaussianMixture, LabelledMixture, default_mixture

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py

SQUARE = LabelledMixture(default_mixture(), [[0, 1], [2, 3]])
# the same classes with every component 1.5× wider: an exact "bad version" of SQUARE
WIDE = LabelledMixture(GaussianMixture(default_mixture().weights, default_mixture().means,
                                       1.5 * default_mixture().stds), [[0, 1], [2, 3]])
N = 64


def points(sde, t, seed=0):
    """(x, labels): N points about the scale of p_t, float64, and their wanted classes."""
    gen = torch.Generator().manual_seed(seed)
    scale = float(torch.as_tensor(sde.alpha(torch.tensor(t))).max() + torch.as_tensor(sde.sigma(torch.tensor(t))).max())
    return torch.randn(N, 2, generator=gen, dtype=torch.float64) * 2 * scale, torch.randint(0, 2, (N,), generator=gen)


def counted(score_fn, calls, name):
    def wrapped(x, t):
        calls.append(name)
        return score_fn(x, t)
    return wrapped


def vp_level(t: float, beta_min: float = 0.1, beta_max: float = 20.0) -> float:
    """σ(t)/α(t) of the linear VP SDE in closed form: √(exp(∫β) − 1)."""
    return math.sqrt(math.expm1(beta_min * t + 0.5 * (beta_max - beta_min) * t * t))


# --------------------------------------------------------------------------------------------------
# The guidance interval
# --------------------------------------------------------------------------------------------------
# (SDE, interval, times, whether each time's σ(t)/α(t) lies inside). VP: σ/α = 0.32, 1.0, 3.3, 23 at these t;
# EDM: σ/α = t, with both ends of the closed interval.
INTERVAL_CASES = {
    "vp": (VPSDE(), (0.5, 5.0), (0.1, 0.25, 0.45, 0.8), (False, True, True, False)),
    "ve": (VESDE(), (0.5, 5.0), (0.2, 0.5, 0.8), (False, True, False)),
    "edm": (EDMSDE(), (0.5, 5.0), (0.002, 0.5, 2.0, 5.0, 5.01, 80.0), (False, True, True, True, False, False)),
}


@pytest.mark.parametrize("name", INTERVAL_CASES)
def test_interval_is_the_guided_score_inside_and_the_conditional_outside(name):
    sde, (lo, hi), times, inside = INTERVAL_CASES[name]
    for t, expected in zip(times, inside):
        level = vp_level(t) if name == "vp" else float(sde.sigma(torch.tensor(t, dtype=torch.float64)) /
                                                       sde.alpha(torch.tensor(t, dtype=torch.float64)))
        assert (lo <= level <= hi) == expected, (name, t, level)  # the table's times are on the said side
        x, labels = points(sde, t)
        cond, uncond = SQUARE.conditional_score_fn(sde, labels), SQUARE.mixture.marginal_score_fn(sde)
        calls = []
        guided = counted(guidance.classifier_free(cond, uncond, 2.0), calls, "guided")
        plain = counted(cond, calls, "plain")
        for time in (t, torch.full((N,), t, dtype=torch.float64)):  # a float, and per-sample times
            calls.clear()
            got = guidance.interval(guided, plain, sde, lo, hi)(x, time)
            want = guidance.classifier_free(cond, uncond, 2.0)(x, t) if expected else cond(x, t)
            assert torch.equal(got, want), (name, t)
            assert calls == ["guided" if expected else "plain"]  # only the score it returns is evaluated
        assert not torch.equal(guidance.classifier_free(cond, uncond, 2.0)(x, t), cond(x, t))


def test_interval_picks_per_sample_when_the_times_differ():
    sde = VPSDE()
    t = torch.tensor([0.1, 0.25, 0.45, 0.8] * (N // 4), dtype=torch.float64)
    x, labels = points(sde, 0.8)
    cond, uncond = SQUARE.conditional_score_fn(sde, labels), SQUARE.mixture.marginal_score_fn(sde)
    guided = guidance.classifier_free(cond, uncond, 1.5)
    got = guidance.interval(guided, cond, sde, 0.5, 5.0)(x, t)
    inside = torch.tensor([vp_level(float(s)) for s in t]).clamp(0.5, 5.0) == torch.tensor([vp_level(float(s)) for s in t])
    assert inside.sum() == N // 2
    assert torch.equal(got[inside], guided(x, t)[inside]) and torch.equal(got[~inside], cond(x, t)[~inside])


def test_interval_bounds_are_checked():
    for lo, hi in ((1.0, 1.0), (2.0, 1.0), (-0.1, 1.0)):
        with pytest.raises(ValueError, match="0 ≤ σ_lo < σ_hi"):
            guidance.interval(lambda x, t: x, lambda x, t: x, VPSDE(), lo, hi)


# --------------------------------------------------------------------------------------------------
# Autoguidance
# --------------------------------------------------------------------------------------------------
# times with noise levels σ/α from 0.05 to 5: VP 0.05, 0.7, 5.3; EDM t = σ
TIMES = {"vp": (VPSDE(), (0.005, 0.2, 0.5)), "edm": (EDMSDE(), (0.05, 0.7, 5.0))}


@pytest.mark.parametrize("name", TIMES)
def test_autoguidance_by_the_model_itself_is_the_model(name):
    sde, times = TIMES[name]
    for t in times:
        x, labels = points(sde, t)
        main = SQUARE.conditional_score_fn(sde, labels)
        for w in (0.0, 0.5, 1.0, 3.0):
            torch.testing.assert_close(guidance.autoguidance(main, main, w)(x, t), main(x, t), rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("name", TIMES)
def test_autoguidance_by_a_wider_mixture_is_one_plus_w_main_minus_w_guide(name):
    sde, times = TIMES[name]
    for t in times:
        x, labels = points(sde, t)
        main, guide = SQUARE.conditional_score_fn(sde, labels), WIDE.conditional_score_fn(sde, labels)
        s_main, s_guide = main(x, t), guide(x, t)
        assert (s_main - s_guide).abs().max() > 1e-3 * s_main.abs().max()  # the guide is another model
        for w in (0.5, 2.0):
            torch.testing.assert_close(guidance.autoguidance(main, guide, w)(x, t), (1 + w) * s_main - w * s_guide,
                                       rtol=1e-13, atol=1e-13)


# One Gaussian N(μ, s²I) guided by its wider version N(μ, g²I): both scores are linear in x, so the probability-flow
# ODE of the guided score −c(t)·(x − α(t)μ), c = (1 + w)/(α²s² + σ²) − w/(α²g² + σ²), is the linear map
# x − αμ ↦ its multiple by exp(−∫ (f + ½g²c) dt) (VP: f = −β/2, g² = β), then the final denoising step
# multiplies by (1 − σ²c)/α. The samples' std is that map's factor times their prior draws' std: exactly
# autoguidance narrows 0.5 to 0.3332 (w = 1) and 0.2221 (w = 2) with g = 0.75.
def exact_guided_std_factor(w: float, s: float, g: float, eps: float = 1e-3) -> float:
    from scipy.integrate import quad
    beta = lambda t: 0.1 + 19.9 * t  # noqa: E731 - the default linear VP SDE
    alpha2 = lambda t: math.exp(-(0.1 * t + 0.5 * 19.9 * t * t))  # noqa: E731
    c = lambda t: (1 + w) / (alpha2(t) * s * s + 1 - alpha2(t)) - w / (alpha2(t) * g * g + 1 - alpha2(t))  # noqa
    ode = math.exp(-quad(lambda t: 0.5 * beta(t) * (c(t) - 1), eps, 1.0, limit=200)[0])
    return ode * (1 - (1 - alpha2(eps)) * c(eps)) / math.sqrt(alpha2(eps))


def test_autoguidance_by_a_wider_gaussian_narrows_it_as_the_linear_ode_says():
    sde, n, s, g = VPSDE(), 4000, 0.5, 0.75
    narrow, wide = GaussianMixture([1.0], [[1.0, -1.0]], s), GaussianMixture([1.0], [[1.0, -1.0]], g)
    prior = sde.prior_sampling((n, 2), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    factor = {w: exact_guided_std_factor(w, s, g) for w in (0.0, 1.0, 2.0)}
    assert abs(factor[0.0] - s) < 1e-3 and abs(factor[1.0] - 0.3332) < 1e-4 and abs(factor[2.0] - 0.2221) < 1e-4
    for w in factor:
        score_fn = guidance.autoguidance(narrow.marginal_score_fn(sde), wide.marginal_score_fn(sde), w)
        x, _ = sample(score_fn, sde, (n, 2), "ode", x_T=prior, dtype=torch.float64)
        torch.testing.assert_close(x.std(0), factor[w] * prior.std(0), rtol=1e-3, atol=0)


def conditional_mlp(num_classes: int = 4, seed: int = 0):
    config = default_config()
    config.data.dataset, config.model.name, config.model.nf, config.model.num_res_blocks = "gmm", "mlp", 32, 1
    config.model.num_classes = num_classes
    model = create_model(config).eval()
    with torch.no_grad():  # a random network whose every part matters (the output layers start at zero)
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel() + seed)) * 0.3)
    return model


def test_guided_score_fn_composes_autoguidance_and_the_interval_for_networks():
    sde, main, other = VPSDE(), conditional_mlp(), conditional_mlp(seed=1)
    x, labels = torch.randn(6, 2), torch.tensor([0, 1, 2, 3, 0, 2])
    s, g = get_score_fn(sde, main, labels=labels), get_score_fn(sde, other, labels=labels)
    with torch.no_grad():
        for t in (0.1, 0.45, 0.8):  # σ/α: 0.32 (outside), 3.3 (inside), 23 (outside)
            auto = guidance.guided_score_fn(sde, main, labels, guidance_scale=2.0, guide_score_fn=g)(x, t)
            torch.testing.assert_close(auto, guidance.autoguidance(s, g, 2.0)(x, t))
            both = guidance.guided_score_fn(sde, main, labels, guidance_scale=2.0, guide_score_fn=g,
                                            guidance_interval=(0.5, 5.0))(x, t)
            torch.testing.assert_close(both, auto if t == 0.45 else s(x, t))
            cfg = guidance.guided_score_fn(sde, main, labels, guidance_scale=2.0, guidance_interval=(0.5, 5.0))(x, t)
            want = guidance.classifier_free(s, get_score_fn(sde, main), 2.0)(x, t) if t == 0.45 else s(x, t)
            torch.testing.assert_close(cfg, want)
        unconditional = guidance.guided_score_fn(sde, main, None, guidance_scale=1.0, guide_score_fn=g)
        assert unconditional(x, 0.3).shape == x.shape  # autoguidance needs no labels
    with pytest.raises(ValueError, match="needs guidance"):
        guidance.guided_score_fn(sde, main, labels, guidance_interval=(0.5, 5.0))


# --------------------------------------------------------------------------------------------------
# Config checks
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("conditional, settings, message", [
    (True, {"guidance_scale": 1.0, "guidance_interval": (5.0, 0.3)}, "0 ≤ σ_lo < σ_hi"),
    (True, {"guidance_scale": 1.0, "guidance_interval": (-1.0, 2.0)}, "0 ≤ σ_lo < σ_hi"),
    (True, {"guidance_scale": 1.0, "guidance_interval": (0.3,)}, r"\(σ_lo, σ_hi\)"),
    (True, {"guidance_interval": (0.3, 5.0)}, "sampling.guidance_scale=0 applies none"),
    (False, {"guidance_scale": 1.0, "guidance_interval": (0.3, 5.0)}, "sampling.guide_checkpoint"),
    (False, {"guidance_scale": 1.0}, "autoguidance"),
    (False, {"guide_checkpoint": 1}, "sampling.guidance_scale=0 does not use"),
    (False, {"guide_workdir": "runs/x"}, "sampling.guidance_scale=0 does not use"),
    (False, {"guidance_scale": 1.0, "guide_checkpoint": 0}, "sampling.guide_checkpoint=0"),
])
def test_bad_guidance_settings_name_the_key(conditional, settings, message):
    config = vp_digits_cond.get_config() if conditional else vp_digits.get_config()
    for key, value in settings.items():
        config.sampling[key] = value
    with pytest.raises(ConfigError, match=message):
        validate_config(config)


def test_autoguidance_needs_neither_labels_nor_label_dropout():
    for config in (vp_digits.get_config(), vp_digits_cond.get_config()):
        config.training.label_dropout = 0.0
        config.sampling.guidance_scale, config.sampling.guide_checkpoint = 1.0, 1
        config.sampling.guidance_interval = (0.3, 5.0)
        validate_config(config)


# --------------------------------------------------------------------------------------------------
# Jobs: a tiny class-conditional toy run guided by its first checkpoint
# --------------------------------------------------------------------------------------------------
def toy_config(num_classes: int = 4):
    config = toy_gmm.get_config()
    config.device = "cpu"
    config.model.num_classes, config.training.label_dropout = num_classes, 0.2 if num_classes else 0.0
    config.model.nf, config.model.num_res_blocks = 32, 1
    t = config.training
    t.batch_size, t.n_iters, t.snapshot_freq, t.snapshot_freq_for_preemption = 128, 20, 10, 10
    t.eval_freq, t.log_freq, t.snapshot_sampling = 1000, 10, False
    config.optim.warmup = 5
    config.eval.num_samples = config.eval.batch_size = 64
    config.sampling.method, config.sampling.steps = "dpm_solver", 8
    return config


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    """A conditional toy run with checkpoints 1 (step 10) and 2 (step 20), and an unconditional one."""
    runs = tmp_path_factory.mktemp("guide")
    run_lib.train(toy_config(), runs / "cond")
    run_lib.train(toy_config(num_classes=0), runs / "uncond")
    return runs


def sampled(config, workdir, **sampling):
    """--mode sample's samples with config.sampling updated, and the .npz's name."""
    for key, value in sampling.items():
        config.sampling[key] = value
    out = workdir / "guided"
    before = set(out.glob("*.npz")) if out.exists() else set()
    run_lib.sample(config, workdir, "guided")
    (path,) = set(out.glob("*.npz")) - before
    return np.load(path)["samples"], path.name


def test_sample_mode_guides_by_an_earlier_checkpoint(toy_run):
    workdir = toy_run / "cond"
    plain, _ = sampled(toy_config(), workdir)
    auto, name = sampled(toy_config(), workdir, guidance_scale=2.0, guide_checkpoint=1)
    assert name == "checkpoint_2_dpm_solver_nfe9_w2_guide1.npz"
    assert np.isfinite(auto).all() and np.abs(auto - plain).max() > 1e-2  # guided samples differ
    itself, _ = sampled(toy_config(), workdir, guidance_scale=2.0, guide_checkpoint=2)
    np.testing.assert_allclose(itself, plain, atol=1e-4)  # guided by itself: the unguided samples
    nowhere, name = sampled(toy_config(), workdir, guidance_scale=2.0, guide_checkpoint=1,
                            guidance_interval=(1e4, 1e5))
    assert name == "checkpoint_2_dpm_solver_nfe9_w2_guide1_interval10000-100000.npz"
    np.testing.assert_array_equal(nowhere, plain)  # an interval no step reaches: no guidance at all
    config = toy_config()
    config.sampling.guidance_scale, config.sampling.guide_workdir = 2.0, str(toy_run / "cond")  # the newest: itself
    conditioning = run_lib.make_conditioning(config, VPSDE(), create_model(config), ToyDataset("gmm", batch_size=8, seed=0),
                                             workdir, "cpu")
    assert conditioning.describe()["guide"].endswith("checkpoint_2.pth")


def test_an_unconditional_model_is_guided_by_its_earlier_checkpoint(toy_run):
    workdir = toy_run / "uncond"
    plain, _ = sampled(toy_config(0), workdir)
    auto, name = sampled(toy_config(0), workdir, guidance_scale=1.0, guide_checkpoint=1,
                         guidance_interval=(0.1, 10.0))
    assert name == "checkpoint_2_dpm_solver_nfe9_w1_guide1_interval0.1-10.npz"
    assert np.isfinite(auto).all() and np.abs(auto - plain).max() > 1e-2


def main_py(*args):
    return subprocess.run([sys.executable, str(ROOT / "main.py"), *args], cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)


def test_a_guide_of_another_model_is_one_error_line_before_sampling(toy_run):
    """The conditional run guided by the unconditional one: model.num_classes differs."""
    result = main_py("--config", "configs/toy_gmm.py", "--mode", "sample", "--workdir", str(toy_run / "cond"),
                     "--config.device=cpu", "--config.model.nf=32", "--config.model.num_res_blocks=1",
                     "--config.model.num_classes=4", "--config.training.label_dropout=0.2",
                     "--config.sampling.guidance_scale=1", f"--config.sampling.guide_workdir={toy_run / 'uncond'}",
                     "--eval_folder", "mismatch")
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "model.num_classes=0 (guided model: 4)" in errors[0] and "sampling.guide_workdir" in errors[0], errors[0]
    assert not (toy_run / "cond" / "mismatch").exists()
