"""An SDE, a weighting and a noise-level distribution from the user's own file (tests/user_objective.py), used by a
config that imports it (tests/user_objective_config.py), through main.py: train, eval and sample; the checkpoint
records the names, and a process that lacks them says which name is missing and what to import."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import user_objective  # noqa: F401  (registers user_cubic_vp, user_truncated_snr, user_power)
from sde_diffusion import losses, sdes
from sde_diffusion.cli import load_config_file
from sde_diffusion.config import validate_config
from sde_diffusion.errors import CheckpointError, ConfigError
from sde_diffusion.jobs import builder

ROOT = Path(__file__).resolve().parents[1]
CONFIG = "tests/user_objective_config.py"
TINY = ["--config.device=cpu", "--config.training.n_iters=2", "--config.training.batch_size=64",
        "--config.training.snapshot_freq=2", "--config.training.snapshot_freq_for_preemption=2",
        "--config.training.eval_freq=2", "--config.training.snapshot_sampling=False", "--config.sampling.method=ddim",
        "--config.sampling.steps=4", "--config.sampling.num_grid_samples=64", "--config.eval.num_samples=64",
        "--config.eval.batch_size=64", "--config.eval.enable_bpd=False"]


def main_py(*args):
    """main.py (through tests/main_with_user_sampler.py, whose --then_modes runs more modes in one process)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(ROOT / "tests" / "main_with_user_sampler.py"), *args], cwd=ROOT,
                          capture_output=True, text=True, env=env, timeout=300)


def test_the_users_parts_train_eval_and_sample_from_main(tmp_path):
    result = main_py("--config", CONFIG, "--mode", "train", "--then_modes=eval,sample", "--workdir", str(tmp_path),
                     *TINY)
    assert result.returncode == 0, f"{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    checkpoint = torch.load(tmp_path / "checkpoints" / "checkpoint_1.pth", weights_only=False)
    assert checkpoint["parts"] == {"training.sde": "user_cubic_vp", "training.time_sampling": "user_power:power=1.5",
                                   "training.weighting": "user_truncated_snr:floor=0.5",
                                   "model.parameterization": "eps"}
    assert (tmp_path / "eval" / "report_1.json").is_file()
    assert any((tmp_path / "samples").iterdir())
    config = load_config_file(CONFIG)
    sde = sdes.sde_from_config(config)
    assert isinstance(sde, user_objective.CubicVP) and sde.scale == 8.0 and sde.N == config.model.num_scales
    # a config that names the SDE without importing its module (main.py prints the ConfigError as one line)
    config.training.sde = "user_cubic_vq"
    with pytest.raises(ConfigError, match=r"training.sde='user_cubic_vq' is not one of .*did you mean "
                                          r"'user_cubic_vp'\? .*@sdes.register_sde\('name'\); import its module in "
                                          "your config file"):
        validate_config(config)


def test_a_checkpoint_names_what_this_process_lacks():
    recorded = {"parts": {"training.sde": "vpsde", "training.weighting": "someone_elses:k=2",
                          "training.time_sampling": "uniform", "model.parameterization": "eps"}}
    with pytest.raises(CheckpointError, match=r"training.weighting='someone_elses:k=2', which is not registered .* "
                                              r"must import the module that defines 'someone_elses'"):
        builder.check_recorded_parts(recorded, "ckpt.pth")
    recorded["parts"]["training.weighting"] = "eps"
    with pytest.raises(CheckpointError, match="trained with training.sde='vpsde', and the config says 'vesde'"):
        builder.check_recorded_parts(recorded, "ckpt.pth", {"training.sde": "vesde"})
    builder.check_recorded_parts(recorded, "ckpt.pth", {"training.sde": "VPSDE"})


def test_sde_options_are_checked_against_the_signature():
    config = load_config_file(CONFIG)
    config.training.sde_options = "scal=3"
    with pytest.raises(Exception, match=r"SDE 'user_cubic_vp' has no option 'scal'; did you mean 'scale'"):
        sdes.check_config(config)
    config.training.sde, config.training.sde_options = "vpsde", "beta_max=3"
    with pytest.raises(Exception, match="the built-in training.sde='vpsde' takes score_sde's keys model.beta_min"):
        sdes.check_config(config)
    with pytest.raises(TypeError, match="decorates a subclass of sdes.SDE"):
        sdes.register_sde("not_an_sde")(int)
    assert "user_truncated_snr" in losses.WEIGHTINGS and "user_power" in losses.TIME_SAMPLINGS
