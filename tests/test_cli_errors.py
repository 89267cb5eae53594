"""Every expected mistake on the command line prints `error: …` (what is wrong, the key or file, what to do) and
exits with status 2, without a traceback; --verbose adds it; --help exits 0; a bug keeps its traceback.

Each row of CASES builds the bad situation, then runs `python main.py` on it: all rows' command lines in one
subprocess, tests/main_forked.py, which imports torch and the jobs once and forks a fresh process per command line
(the one-process-per-row launches cost ~3 s of imports each). The tests below run main.py itself."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

import run_lib
from configs import toy_gmm

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--config.device=cpu", "--config.training.n_iters=1"]


def main_py(*args, cwd=ROOT):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(ROOT / "main.py"), *args], cwd=cwd, capture_output=True, text=True,
                          env=env, timeout=300)


def digits(tmp_path, mode="train", *extra):
    return ["--config", "configs/vp_digits.py", "--mode", mode, "--workdir", str(tmp_path / "run"), *FAST, *extra]


def a_file(tmp_path):
    path = tmp_path / "file"
    path.write_text("not a folder")
    return path


def config_with_a_syntax_error(tmp_path):
    path = tmp_path / "broken.py"
    path.write_text("def get_config():\n    return {'a': 1\n")
    return ["--config", str(path), "--mode", "train", "--workdir", str(tmp_path / "run")]


def checkpoint_of_another_config(tmp_path):
    config = toy_gmm.get_config()
    config.training.n_iters = config.training.snapshot_freq = 1
    config.training.batch_size, config.model.nf, config.device = 8, 16, "cpu"
    config.training.snapshot_sampling = False  # the step's grid: 2000 samples × 500 steps, ~5 s
    run_lib.train(config, tmp_path / "run")
    return ["--config", "configs/toy_gmm.py", "--mode", "eval", "--workdir", str(tmp_path / "run"),
            "--config.device=cpu", "--config.model.nf=32", "--config.eval.end_ckpt=1"]


def empty_image_folder(tmp_path):
    (tmp_path / "images").mkdir()
    return ["--config", "configs/vp_folder_64.py", "--mode", "train", "--workdir", str(tmp_path / "run"),
            f"--config.data.root={tmp_path / 'images'}", *FAST]


# case → (argv builder, words the message must contain)
CASES = {
    "misspelled key": (lambda p: digits(p, "train", "--config.training.n_iter=60"),
                       ["--config.training.n_iter", "no key 'n_iter'", "did you mean --config.training.n_iters?"]),
    "misspelled section": (lambda p: digits(p, "train", "--config.trainig.n_iters=60"),
                           ["no key 'trainig'", "did you mean --config.training.n_iters?"]),
    "key below a value": (lambda p: digits(p, "train", "--config.training.n_iters.x=1"),
                          ["config.training.n_iters is a value, not a section"]),
    "wrong type": (lambda p: digits(p, "train", "--config.training.n_iters=abc"),
                   ["--config.training.n_iters=abc", "invalid literal for int()"]),
    "missing config file": (lambda p: ["--config", "configs/vp_digit.py", "--mode", "train"],
                            ["--config configs/vp_digit.py: no such file", "did you mean configs/vp_digits.py?"]),
    "config file with a syntax error": (config_with_a_syntax_error, ["broken.py cannot be loaded", "SyntaxError"]),
    "no --config": (lambda p: ["--mode", "train"], ["--config is required", "configs/vp_digits.py"]),
    "unknown mode": (lambda p: ["--config", "configs/vp_digits.py", "--mode", "trian"],
                     ["--mode=trian", "train|eval|sample"]),
    "stray argument": (lambda p: digits(p, "train", "extra"), ["unexpected arguments ['extra']"]),
    "workdir is a file": (lambda p: ["--config", "configs/vp_digits.py", "--mode", "train", "--workdir",
                                     str(a_file(p))], ["is a file, not a folder", "--workdir"]),
    "workdir cannot be created": (lambda p: ["--config", "configs/vp_digits.py", "--mode", "train", "--workdir",
                                             str(a_file(p) / "run")], ["cannot be created", "Not a directory"]),
    "distill without its teacher": (lambda p: ["--config", "configs/cd_digits.py", "--mode", "distill", "--workdir",
                                               str(p / "run"), f"--config.distill.teacher_workdir={p / 'none'}"],
                                    ["distill.teacher_workdir=", "is not a folder", "train the teacher first"]),
    "unknown SDE": (lambda p: digits(p, "train", "--config.training.sde=vpsd"),
                    ["training.sde='vpsd' is not one of", "vpsde"]),
    "unknown sampler": (lambda p: digits(p, "sample", "--config.sampling.method=dpm_solverr"),
                        ["sampling.method", "dpm_solver"]),
    "malformed compare entry": (lambda p: digits(p, "compare", "--config.compare.samplers=('ddim@5,,10',)"),
                                ["compare.samplers entry 'ddim@5,,10'", "step count ''"]),
    "colorize greyscale data": (lambda p: digits(p, "sample", "--config.sampling.colorize=True"),
                                ["sampling.colorize=True needs 3-channel", "sampling.colorize=False"]),
    "CIFAR-10 absent": (lambda p: ["--config", "configs/vp_cifar.py", "--mode", "train", "--workdir",
                                   str(p / "run"), f"--config.data.root={p}", *FAST],
                        ["CIFAR-10 was not found", "cifar-10-python.tar.gz"]),
    "no images in the folder": (empty_image_folder, ["holds no images", "data.root="]),
    "no checkpoints to evaluate": (lambda p: digits(p, "eval"), ["Train first"]),
    "guidance of an unconditional model": (lambda p: digits(p, "sample", "--config.sampling.guidance_scale=1",
                                                            "--config.sampling.guidance_interval=(0.3,5)"),
                                           ["needs a class- or text-conditional model", "sampling.guide_checkpoint"]),
    "checkpoint of another config": (checkpoint_of_another_config,
                                     ["does not fit the model built from this config"]),
}


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    """case → (its folder, the result of `python main.py` on the command line its setup built)."""
    folders = {case: tmp_path_factory.mktemp("mistake") for case in CASES}
    argvs = [[str(arg) for arg in build(folders[case])] for case, (build, _) in CASES.items()]
    io = tmp_path_factory.mktemp("forked")
    (io / "cases.json").write_text(json.dumps([{"argv": argv, "cwd": str(ROOT)} for argv in argvs]))
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "main_forked.py"), str(io / "cases.json"),
                           str(io / "results.json")], cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((io / "results.json").read_text())
    return {case: (folders[case], SimpleNamespace(**result)) for case, result in zip(CASES, results)}


@pytest.mark.parametrize("case", list(CASES))
def test_a_mistake_is_one_error_line_and_status_2(case, outcomes):
    _, words = CASES[case]
    tmp_path, result = outcomes[case]
    assert result.returncode == 2, f"{case}: status {result.returncode}\n{result.stdout[-2000:]}\n{result.stderr}"
    assert "Traceback" not in result.stderr + result.stdout, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    for word in words:
        assert word in errors[0], f"{case}: {word!r} not in {errors[0]!r}"
    assert not list(tmp_path.rglob("checkpoint_*.pth")) or case == "checkpoint of another config"


def test_verbose_adds_the_traceback_and_help_exits_0(tmp_path):
    result = main_py(*digits(tmp_path, "train", "--config.training.sde=vpsd", "--verbose"))
    assert result.returncode == 2 and "Traceback" in result.stderr
    assert result.stderr.rstrip().splitlines()[-1].startswith("error: training.sde='vpsd'")
    for flag in ("--help", "-h", "--helpfull"):
        result = main_py(flag)
        assert result.returncode == 0, result.stderr
        assert "--mode" in result.stdout and "tune_grid" in result.stdout and "Traceback" not in result.stderr


def test_an_unexpected_exception_keeps_its_traceback(tmp_path):
    from sde_diffusion import cli

    def bug():
        raise ZeroDivisionError("a bug")
    with pytest.raises(ZeroDivisionError):
        cli.main(["main.py", "--config", "configs/toy_gmm.py", "--mode", "train", "--workdir", str(tmp_path)],
                 job=bug)


def test_a_config_in_another_folder_runs_from_any_directory(tmp_path):
    """A user's config that imports the package's configs by their module path, run from elsewhere."""
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "configs").mkdir()
    (tmp_path / "mine" / "configs" / "tiny.py").write_text(
        "from configs.toy_gmm import get_config as base\n\n\ndef get_config():\n    config = base()\n"
        "    config.training.n_iters = 0\n    return config\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    result = subprocess.run([sys.executable, str(ROOT / "main.py"), "--config", "mine/configs/tiny.py", "--mode",
                             "train", "--config.training.n_iter=2"], cwd=tmp_path, capture_output=True, text=True,
                            env=env, timeout=300)
    assert result.returncode == 2 and "did you mean --config.training.n_iters?" in result.stderr, result.stderr
