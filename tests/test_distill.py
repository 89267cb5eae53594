"""--mode distill end to end on the toy mixture: each method from a small trained teacher, its checkpoints evaluated
and compared like any other (the student's own sampler through sampling.method="auto", the teacher's rows in the
same table), a resumed run equal bit for bit to an uninterrupted one across a progressive round, and the errors for
a teacher the student cannot learn from — all before any compute."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import run_lib
from configs import toy_gmm
from sde_diffusion import distillation
from sde_diffusion.checkpoints import load_checkpoint, save_checkpoint
from sde_diffusion.errors import CheckpointError, ConfigError
from sde_diffusion.jobs import distill as distill_job
from sde_diffusion.jobs import train as train_job

pytestmark = pytest.mark.usefixtures("one_thread")


def small(config):
    """toy_gmm made small: a narrow MLP, short runs, a checkpoint every 10 steps, no sample grids."""
    config.device = "cpu"
    config.model.nf, config.model.num_res_blocks = 32, 1
    t = config.training
    t.batch_size, t.n_iters, t.log_freq, t.eval_freq = 128, 60, 20, 1000
    t.snapshot_freq, t.snapshot_freq_for_preemption, t.snapshot_sampling = 60, 10, False
    config.optim.warmup = 5
    config.eval.num_samples = config.eval.batch_size = 256
    config.sampling.steps = None
    return config


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    workdir = tmp_path_factory.mktemp("distill") / "teacher"
    run_lib.train(small(toy_gmm.get_config()), workdir)
    return workdir


def student(teacher: Path, method: str, **distill):
    config = small(toy_gmm.get_config())
    config.distill.method, config.distill.teacher_workdir = method, str(teacher)
    config.model.parameterization, config.sampling.method = "auto", "auto"
    config.distill.teacher_steps, config.distill.steps = 8, 2
    config.training.n_iters = config.training.snapshot_freq = 40
    for key, value in distill.items():
        setattr(config.distill, key, value)
    return config


@pytest.mark.parametrize("method, settings", [("consistency", {}), ("consistency", {"level_sampling": "lognormal",
                                                                                    "target_ema": 0.0}),
                                              ("consistency_training", {}), ("progressive", {})])
def test_each_method_distills_and_evaluates_like_any_run(teacher, tmp_path, method, settings):
    config = student(teacher, method, **settings)
    workdir = tmp_path / method
    run_lib.distill(config, workdir)
    checkpoint = load_checkpoint(workdir / "checkpoints" / "checkpoint_1.pth")
    assert checkpoint["step"] == 40 and checkpoint["distill"]["method"] == method
    wanted = "consistency" if method.startswith("consistency") else "eps"  # progressive keeps VP's auto: eps
    assert checkpoint["parts"]["model.parameterization"] == wanted
    assert json.loads((workdir / "config.json").read_text())["distill"]["method"] == method
    # the student moved away from the teacher's weights it started from
    start = load_checkpoint(teacher / "checkpoints" / "checkpoint_1.pth")["model"]
    assert any(not torch.equal(start[k], v) for k, v in checkpoint["model"].items())
    run_lib.evaluate(config, workdir)
    report = json.loads((workdir / "eval" / "report_1.json").read_text())
    assert report["nfe"] == (1 if wanted == "consistency" else config.distill.steps)
    assert math.isfinite(report["sliced_w2"])  # quality: tests/test_distillation.py, against exact answers
    assert report["sampler"]["method"] == ("consistency" if wanted == "consistency" else "ddim")


def test_a_converted_model_is_a_teacher_like_a_trained_one(teacher, tmp_path):
    """What python -m sde_diffusion.interop writes for a released model: a config file (config.py) and a checkpoint
    with the weights in `model` and `ema`, no optimizer or recorded parts, placed as checkpoints/checkpoint_1.pth."""
    from sde_diffusion.config import config_from_dict
    from sde_diffusion.interop.__main__ import config_file_text
    folder = tmp_path / "converted"
    (folder / "checkpoints").mkdir(parents=True)
    trained = load_checkpoint(teacher / "checkpoints" / "checkpoint_1.pth")
    converted = {"model": trained["model"], "ema": trained["ema"], "step": 0, "converted_from": "diffusers:test"}
    save_checkpoint(folder / "checkpoints" / "checkpoint_1.pth", converted)
    values = json.loads((teacher / "config.json").read_text())
    (folder / "config.py").write_text(config_file_text(config_from_dict(values), "a test"))
    config = student(teacher, "progressive")
    config.distill.teacher_workdir = str(folder)
    config.training.n_iters = config.training.snapshot_freq = 4
    state = run_lib.distill(config, tmp_path / "student")
    assert state.step == 4 and state.student.source.checkpoint == folder / "checkpoints" / "checkpoint_1.pth"


def test_compare_puts_the_teacher_in_the_students_table(teacher, tmp_path):
    config = student(teacher, "consistency")
    config.training.n_iters = 10
    config.training.snapshot_freq = 10
    workdir = tmp_path / "cd"
    run_lib.distill(config, workdir)
    config.compare.samplers = ("consistency:grid=edm@1,2",)
    config.compare.teacher_samplers = ("ddim@4",)
    config.compare.resamples = 0
    run_lib.compare(config, workdir)
    rows = json.loads((workdir / "compare" / "compare.json").read_text())["rows"]
    assert [(r["sampler"], r["nfe"]) for r in rows] == [("consistency:grid=edm", 1), ("consistency:grid=edm", 2),
                                                        ("teacher ddim", 5)]
    # the teacher rows are the teacher's model: its own eval at the same settings gives the same numbers
    assert all(r["sliced_w2"] > 0 for r in rows)


@pytest.mark.parametrize("method", ["consistency", "progressive"])
def test_a_resumed_distillation_equals_an_uninterrupted_one(teacher, tmp_path, monkeypatch, method):
    """Killed after step 30 (the last checkpoint) and resumed: the final weights equal the uninterrupted run's bit for
    bit. Progressive runs 8 → 4 → 2 steps in rounds of 20, so the resumed run restores round 2's teacher."""
    config = student(teacher, method)
    run_lib.distill(config, tmp_path / "straight")

    take_step = train_job.take_step

    def preempted(run, step):
        if step == 31:
            raise KeyboardInterrupt("preempted")
        take_step(run, step)

    monkeypatch.setattr(train_job, "take_step", preempted)
    with pytest.raises(KeyboardInterrupt):
        run_lib.distill(config, tmp_path / "resumed")
    monkeypatch.setattr(train_job, "take_step", take_step)
    run_lib.distill(config, tmp_path / "resumed")
    a, b = (load_checkpoint(tmp_path / name / "checkpoints" / "checkpoint_1.pth") for name in ("straight", "resumed"))
    for part in ("model",):
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part])
    assert a["ema"]["shadow_params"] and all(torch.equal(x, y) for x, y in zip(a["ema"]["shadow_params"],
                                                                                 b["ema"]["shadow_params"]))
    if method == "progressive":
        assert b["distill"]["round"] == 1 and b["distill"]["teacher"] is not None


@pytest.mark.parametrize("setting", ["bf16", "compile"])
def test_distillation_runs_in_bf16_and_compiled(teacher, tmp_path, setting):
    """The training step's precision and torch.compile apply to a student's loss as to any (bf16 is emulated on
    this CPU: 4 steps)."""
    config = student(teacher, "consistency")
    config.training.n_iters = config.training.snapshot_freq = 4
    if setting == "bf16":
        config.training.precision = "bf16"
    else:
        config.training.compile, config.training.compile_backend = True, "aot_eager"
    state = run_lib.distill(config, tmp_path / setting)
    assert state.step == 4 and state.skipped_steps == 0
    assert all(torch.isfinite(p).all() for p in state.model.parameters())


def test_progressive_rounds_halve_the_steps():
    assert distillation.progressive_rounds(64, 4) == [32, 16, 8, 4]
    for bad in ((48, 4), (4, 4), (6, 4)):
        with pytest.raises(ConfigError, match="power of 2"):
            distillation.progressive_rounds(*bad)


def with_teacher_config(teacher: Path, tmp_path: Path, change) -> Path:
    """A copy of the teacher workdir whose config.json is changed by change(dict)."""
    copy = tmp_path / "teacher_copy"
    (copy / "checkpoints").mkdir(parents=True)
    for path in (teacher / "checkpoints").iterdir():
        (copy / "checkpoints" / path.name).write_bytes(path.read_bytes())
    values = json.loads((teacher / "config.json").read_text())
    change(values)
    (copy / "config.json").write_text(json.dumps(values))
    return copy


def without_checkpoints(folder: Path) -> Path:
    for path in (folder / "checkpoints").iterdir():
        path.unlink()
    return folder


def set_key(section, key, value):
    def change(values):
        values[section][key] = value
    return change


@pytest.mark.parametrize("case, make, message", [
    ("no teacher", lambda t, p: None, "needs distill.teacher_workdir"),
    ("missing folder", lambda t, p: p / "nowhere", "is not a folder"),
    ("no config", lambda t, p: (p / "empty").mkdir() or p / "empty", "holds no config.json"),
    ("no checkpoint", lambda t, p: without_checkpoints(with_teacher_config(t, p, lambda v: None)), "no checkpoints"),
    ("other data", lambda t, p: with_teacher_config(t, p, set_key("data", "dim", 3)), "data.dim=3"),
    ("other network", lambda t, p: with_teacher_config(t, p, set_key("model", "nf", 64)), "model.nf"),
    ("other SDE", lambda t, p: with_teacher_config(t, p, set_key("model", "beta_max", 10.0)), "model.beta_max=10.0"),
    ("other conditioning", lambda t, p: with_teacher_config(t, p, set_key("model", "noise_conditioning", "sigma")),
     "model.noise_conditioning='sigma'"),
])
def test_a_teacher_the_student_cannot_learn_from_is_refused_before_compute(teacher, tmp_path, case, make, message):
    config = student(teacher, "consistency")
    folder = make(teacher, tmp_path)
    config.distill.teacher_workdir = None if folder is None else str(folder)
    with pytest.raises((ConfigError, CheckpointError), match=message):
        distill_job.find_teacher(config)


def with_settings(config, **sections):
    """config with {section: {key: value}} set."""
    for section, values in sections.items():
        for key, value in values.items():
            setattr(config[section], key, value)
    return config


# (the config from the teacher's workdir, the job that must refuse it, the words of its error)
MIX_UPS = {
    "progressive student predicting otherwise": (
        lambda t: with_settings(student(t, "progressive"), model={"parameterization": "x0"}),
        lambda c, w: distill_job.find_teacher(c), "set model.parameterization='eps'"),
    "consistency student of another parameterization": (
        lambda t: with_settings(student(t, "consistency"), model={"parameterization": "eps"}),
        run_lib.distill, "trains a 'consistency' model"),
    "consistency sampler on another model": (
        lambda t: with_settings(small(toy_gmm.get_config()), sampling={"method": "consistency"}),
        run_lib.evaluate, "needs a 'consistency' model"),
    "a student's config trained": (lambda t: student(t, "consistency"), run_lib.train, "run --mode distill"),
    "target EMA of 1": (lambda t: with_settings(student(t, "consistency"), distill={"target_ema": 1.0}),
                        run_lib.distill, "distill.target_ema must lie in"),
    "auto sampler without a student": (
        lambda t: with_settings(small(toy_gmm.get_config()), sampling={"method": "auto"}),
        run_lib.evaluate, "distill.method is not set"),
}


@pytest.mark.parametrize("case", MIX_UPS)
def test_configs_that_mix_up_students_and_models_are_refused(teacher, tmp_path, case):
    make, job, message = MIX_UPS[case]
    with pytest.raises(ConfigError, match=message):
        job(make(teacher), tmp_path / "run")


def test_a_student_evaluated_without_its_distill_method_is_refused(teacher, tmp_path):
    """A consistency student's checkpoint read by a config whose "auto" parameterization is the SDE's own (no
    distill.method): one error naming what the network predicts, not silently wrong samples."""
    config = student(teacher, "consistency")
    config.training.n_iters = config.training.snapshot_freq = 4
    run_lib.distill(config, tmp_path / "cd")
    config.distill.method, config.sampling.method = None, "ddim"
    with pytest.raises(CheckpointError, match="network predicts 'consistency'"):
        run_lib.evaluate(config, tmp_path / "cd")
