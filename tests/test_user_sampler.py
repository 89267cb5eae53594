"""A sampler from a user's own file (tests/user_sampler.py: Euler on the probability-flow ODE, one option), registered
with `sampling.register_sampler` and no package edit, works by name: in `sample`, from config strings, under
constraints, with callbacks and progress, and through main.py's --mode sample/eval/compare."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import user_sampler  # noqa: F401  (registers "user_euler"; tests/ is on sys.path under pytest)
from sde_diffusion import controllable, sampling
from sde_diffusion.config import ConfigError, default_config, load_config_file, validate_config
from sde_diffusion.metrics_toy import gaussian_moment_errors, mixture_failures, sliced_w2_noise_floor, sliced_w2_ratio
from sde_diffusion.sdes import VESDE, VPSDE
from sde_diffusion.toy import default_mixture, inpainting_oracle

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


def draw(sde, n=64, steps=10, seed=0, **kwargs):
    mixture = default_mixture()
    return sampling.sample(mixture.marginal_score_fn(sde), sde, (n, 2), "user_euler", steps=steps,
                           generator=torch.Generator().manual_seed(seed), **kwargs)


def test_registered_by_name_with_nfe_steps_plus_denoising():
    assert sampling.SAMPLERS["user_euler"].fn is user_sampler.user_euler
    assert list(sampling.SAMPLERS["user_euler"].options) == ["score_scale"]
    for denoise in (True, False):
        x, nfe = draw(VPSDE(), steps=7, denoise=denoise)
        assert nfe == 7 + denoise and x.shape == (64, 2) and torch.isfinite(x).all()


def test_option_from_the_signature_and_from_config_strings():
    sde = VPSDE()
    default, _ = draw(sde)
    half, _ = draw(sde, score_scale=0.5)
    method, options = sampling.parse_spec("user_euler:score_scale=0.5")
    from_text, _ = draw(sde, **options)
    assert method == "user_euler" and options == {"score_scale": 0.5}
    assert torch.equal(half, from_text) and not torch.allclose(default, half)
    assert sampling.parse_entry("user_euler:score_scale=0.5@10") == ("user_euler", {"score_scale": 0.5}, 10)
    config = default_config()
    config.sampling.method, config.sampling.options, config.sampling.steps = "user_euler", "score_scale=0.5", 10
    sampling.check_config(config)
    settings = sampling.settings_from_config(config, sde)
    assert settings["method"] == "user_euler" and settings["score_scale"] == 0.5 and settings["steps"] == 10
    assert "eta" not in settings and "predictor" not in settings  # other methods' keys are not its options


@pytest.mark.parametrize("call, message", [
    (lambda: draw(VPSDE(), scale=0.5), r"'user_euler' has no option 'scale'.*score_scale=1.0"),
    (lambda: draw(VPSDE(), score_scale="big"), r"'user_euler': option score_scale='big'.*score_scale=1.0"),
    (lambda: sampling.parse_spec("user_euler:score_scale=x"), r"'user_euler': option score_scale='x'"),
    (lambda: sampling.parse_entry("user_euler:scale=1@5"), r"no option 'scale'"),
    (lambda: sampling.register_sampler("user_euler")(user_sampler.user_euler), "already registered"),
    (lambda: sampling.register_sampler("needs_default")(lambda score_fn, sde, x, timesteps, k: x), "needs a default"),
    (lambda: sampling.register_sampler("takes_steps")(lambda score_fn, sde, x, timesteps, steps=1: x),
     "framework"),
])
def test_bad_options_and_registrations_fail_clearly(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_bad_config_option_names_the_key():
    config = load_config_file(Path(__file__).parents[1] / "configs" / "vp_digits.py")
    config.sampling.method, config.sampling.options = "user_euler", "score_scale=1,scale=2"
    with pytest.raises(ConfigError, match=r"sampling.options: sampler 'user_euler' has no option 'scale'"):
        validate_config(config)


def test_replace_true_swaps_a_registration():
    def scaled(score_fn, sde, x, timesteps, *, factor: float = 2.0):
        return user_sampler.user_euler(score_fn, sde, x, timesteps) * factor
    sampling.register_sampler("user_euler_twice")(scaled)
    try:
        sampling.register_sampler("user_euler_twice", replace=True)(user_sampler.user_euler)
        assert sampling.SAMPLERS["user_euler_twice"].fn is user_sampler.user_euler
    finally:
        del sampling.SAMPLERS["user_euler_twice"]


def test_callback_and_progress_fire_once_per_step(capsys, monkeypatch):
    from sde_diffusion import progress
    monkeypatch.setattr(progress, "on_terminal", lambda: True)  # a bar, as on a terminal
    sde, seen = VPSDE(), []
    x, _ = draw(sde, steps=6, denoise=False, progress=True, callback=lambda i, t, x: seen.append((i, t.item(), x)))
    assert sampling.SAMPLERS["user_euler"].grid_for(6) == "auto"  # a user's sampler: the built-ins' rule
    centre = sampling.auto_centre(default_mixture().marginal_score_fn(sde), sde, (64, 2))
    grid = sampling.solver_grid(sde, sampling.time_grid(sde, 6, sde.default_eps), "auto", centre=centre)
    assert [i for i, _, _ in seen] == list(range(6))
    assert [t for _, t, _ in seen] == grid[1:].tolist()
    assert torch.equal(seen[-1][2], x)  # the last call gets the returned sample
    assert "user_euler" in capsys.readouterr().err  # the framework's bar, named after the method


def test_inpainting_constraint_is_applied_at_every_step():
    """RePaint (5 rounds) through the framework's hook brings the free coordinates to the exact Gaussian
    conditional within a few noise floors (measured mean / covariance errors 0.068 / 0.113 at 50 steps); plain
    replacement stays about one conditional std off (1.65 / 2.14). A hook that skipped the rounds, or constrained
    only the end, would be as far off as replacement or worse."""
    sde, (data, mask, x_known) = VPSDE(), inpainting_oracle()
    errors = {}
    for method in ("replacement", "repaint"):
        constraint = controllable.inpainting(sde, x_known[None].float(), mask[None], method=method, resample=5)
        x, nfe = sampling.sample(data.marginal_score_fn(sde), sde, (2000, data.dim), "user_euler", steps=50,
                                 generator=torch.Generator().manual_seed(1), constraint=constraint)
        assert torch.equal(x[:, mask], x_known[mask].float().expand(2000, -1))
        assert nfe == 50 + 1 + (5 * 50 if method == "repaint" else 0)
        errors[method] = gaussian_moment_errors(x[:, ~mask], *data.conditional(mask, x_known[mask]))
    assert errors["repaint"][0] < 0.1 and errors["repaint"][1] < 0.16, errors
    assert errors["replacement"][0] > 1.0, errors


def test_samples_converge_to_the_exact_mixture():
    """Sliced W₂ to the exact mixture (units of its noise floor) falls as the steps grow (measured on VE with
    4 × 1000 points: about 11, 3.8, 1.45 at 10, 30, 100 steps); at 100 steps the mixture checks pass."""
    sde, mixture, chunk = VESDE(), default_mixture(), 1000
    floor = sliced_w2_noise_floor(mixture, chunk)
    ratios = []
    for steps in (10, 30, 100):
        x, _ = draw(sde, n=4 * chunk, steps=steps, seed=1)
        ratios.append(sliced_w2_ratio(x, mixture, chunk, floor))
    assert ratios[0] > 5 and ratios[0] > ratios[1] > ratios[2], ratios
    assert not mixture_failures(mixture, x, chunk, floor)


def main_py(workdir, mode, *flags):
    cmd = [sys.executable, str(ROOT / "tests" / "main_with_user_sampler.py"), "--config", "configs/toy_gmm.py",
           "--mode", mode, "--workdir", str(workdir), "--config.device=cpu", "--config.training.n_iters=2",
           "--config.training.batch_size=64", "--config.training.snapshot_freq=2",
           "--config.training.snapshot_freq_for_preemption=2", "--config.training.eval_freq=2",
           "--config.training.snapshot_sampling=False", "--config.sampling.method=user_euler",
           "--config.sampling.options=score_scale=0.5", "--config.sampling.steps=4",
           "--config.sampling.num_grid_samples=64", "--config.eval.num_samples=64", "--config.eval.batch_size=64",
           *flags]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, f"{' '.join(cmd)}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def test_main_modes_use_the_registered_sampler(tmp_path):
    """train, then --mode sample, eval and compare with the user's sampler (one process: torch imports once)."""
    main_py(tmp_path, "train", "--then_modes=sample,eval,compare",
            "--config.compare.samplers=('user_euler@3', 'user_euler:score_scale=0.5@3')")
    assert (tmp_path / "samples" / "checkpoint_1_user_euler_nfe5.npz").stat().st_size > 0
    report = json.loads((tmp_path / "eval" / "report_1.json").read_text())
    assert report["nfe"] == 5 and report["sampler"]["method"] == "user_euler"
    assert report["sampler"]["score_scale"] == 0.5 and report["sliced_w2"] > 0
    rows = json.loads((tmp_path / "compare" / "compare.json").read_text())["rows"]
    assert [(r["sampler"], r["nfe"]) for r in rows] == [("user_euler", 4), ("user_euler:score_scale=0.5", 4)]
    assert rows[0]["sliced_w2"] != rows[1]["sliced_w2"]
