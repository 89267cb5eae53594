"""--mode eval over eval.begin_ckpt..eval.end_ckpt: the checkpoints that exist are evaluated and the missing ones
skipped (one log line); an empty range is the only error; eval.wait=True waits for each missing checkpoint (a fake
clock and sleep here, so nothing waits) until eval.wait_timeout, taking a checkpoint once its sidecar is written."""
import json
import shutil

import pytest

from configs import toy_gmm
from sde_diffusion.checkpoints import CheckpointError, CorruptCheckpointError, digest_path
from sde_diffusion.jobs import evaluate as evaluate_job
from sde_diffusion.jobs import train as train_job


def tiny_toy_config():
    config = toy_gmm.get_config()
    t = config.training
    t.n_iters, t.batch_size, t.snapshot_freq, t.snapshot_freq_for_preemption, t.eval_freq = 3, 16, 1, 3, 3
    t.snapshot_sampling, t.log_freq = False, 3
    config.model.nf, config.device = 16, "cpu"
    config.sampling.steps, config.sampling.num_grid_samples = 2, 16
    config.eval.num_samples, config.eval.batch_size = 16, 16
    return config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """workdir/checkpoints/checkpoint_{1,2,3}.pth (with sidecars) of a 3-step toy run, trained once."""
    workdir = tmp_path_factory.mktemp("trained")
    train_job.run(tiny_toy_config(), workdir)
    return workdir / "checkpoints"


def workdir_with(tmp_path, trained, ks):
    """A workdir holding copies of the trained numbered checkpoints ks (and their sidecars)."""
    folder = tmp_path / "run" / "checkpoints"
    folder.mkdir(parents=True)
    for k in ks:
        for name in (f"checkpoint_{k}.pth", f"checkpoint_{k}.pth.sha256"):
            shutil.copy(trained / name, folder / name)
    return tmp_path / "run"


def evaluate(workdir, begin, end, **eval_keys):
    config = tiny_toy_config()
    config.eval.begin_ckpt, config.eval.end_ckpt = begin, end
    for key, value in eval_keys.items():
        config.eval[key] = value
    evaluate_job.run(config, workdir)


def reports(workdir):
    return sorted(int(p.stem.split("_")[1]) for p in (workdir / "eval").glob("report_*.json"))


@pytest.fixture
def loads(monkeypatch):
    """The names of the checkpoints eval loads, in order (and the fake sleeps between them as 'sleep')."""
    events = []
    real = evaluate_job.builder.load_weights

    def recording(path, *args, **kwargs):
        events.append(path.name)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(evaluate_job.builder, "load_weights", recording)
    return events


def fake_time(monkeypatch, events, on_sleep):
    """A clock that only the fake sleep advances (by its argument); on_sleep(n) runs at the n-th sleep."""
    now = [1000.0]

    def sleep(seconds):
        now[0] += seconds
        events.append("sleep")
        on_sleep(events.count("sleep"))

    monkeypatch.setattr(evaluate_job, "clock", lambda: now[0])
    monkeypatch.setattr(evaluate_job, "sleep", sleep)


@pytest.mark.usefixtures("one_thread")
def test_missing_checkpoints_of_the_range_are_skipped_and_named(tmp_path, trained, loads, caplog):
    workdir = workdir_with(tmp_path, trained, [1, 3])
    caplog.set_level("INFO", logger="sde_diffusion")
    evaluate(workdir, 1, 5)
    assert loads == ["checkpoint_1.pth", "checkpoint_3.pth"] and reports(workdir) == [1, 3]
    assert json.loads((workdir / "eval" / "report_3.json").read_text())["step"] == 3
    skipped = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert skipped == [f"skipped checkpoints 2, 4-5 of eval.begin_ckpt..eval.end_ckpt = 1..5 (not written yet in "
                       f"{workdir / 'checkpoints'}); evaluating 1, 3"]


@pytest.mark.usefixtures("one_thread")
def test_an_empty_range_is_an_error_naming_the_range_and_the_fix(tmp_path, trained):
    workdir = workdir_with(tmp_path, trained, [1, 2, 3])
    with pytest.raises(CheckpointError) as info:
        evaluate(workdir, 4, 9)
    assert str(info.value) == (f"none of the checkpoints eval.begin_ckpt..eval.end_ckpt = 4..9 is in "
                               f"{workdir / 'checkpoints'} (it holds checkpoints 1-3). Train first (--mode train), "
                               "set eval.begin_ckpt and eval.end_ckpt to checkpoints it holds, or set eval.wait=True "
                               "to wait for them.")
    with pytest.raises(CheckpointError, match=r"= 1\.\.1 is in .*checkpoints \(that folder does not exist\)\. Train "):
        evaluate(tmp_path / "untrained", 1, 1)
    assert not (workdir / "eval" / "report_1.json").exists()


@pytest.mark.usefixtures("one_thread")
def test_a_corrupt_checkpoint_still_stops_eval_after_the_earlier_ones(tmp_path, trained, loads):
    workdir = workdir_with(tmp_path, trained, [1, 3])
    path = workdir / "checkpoints" / "checkpoint_3.pth"
    path.write_bytes(path.read_bytes()[:-100])  # truncated after its sidecar was written
    with pytest.raises(CorruptCheckpointError, match="checkpoint_3.pth is corrupt"):
        evaluate(workdir, 1, 4)
    assert loads == ["checkpoint_1.pth", "checkpoint_3.pth"] and reports(workdir) == [1]


@pytest.mark.usefixtures("one_thread")
def test_wait_evaluates_a_checkpoint_once_it_and_its_sidecar_are_written(tmp_path, trained, loads, caplog,
                                                                         monkeypatch):
    workdir = workdir_with(tmp_path, trained, [1])
    folder = workdir / "checkpoints"

    def training_writes_checkpoint_2(n):  # as save_checkpoint does: the file, then its sidecar, each by a rename
        if n == 2:
            shutil.copy(trained / "checkpoint_2.pth", folder / "checkpoint_2.pth")
        if n == 3:
            shutil.copy(digest_path(trained / "checkpoint_2.pth"), digest_path(folder / "checkpoint_2.pth"))

    fake_time(monkeypatch, loads, training_writes_checkpoint_2)
    caplog.set_level("INFO", logger="sde_diffusion")
    evaluate(workdir, 1, 2, wait=True)
    assert loads == ["checkpoint_1.pth", "sleep", "sleep", "sleep", "checkpoint_2.pth"]
    assert reports(workdir) == [1, 2]
    waiting = [r.getMessage() for r in caplog.records if "waiting" in r.getMessage()]
    assert waiting == [f"eval.wait=True: waiting for checkpoint_2.pth in {folder} (looking every 30 s, for up to "
                       "eval.wait_timeout=3600 s)"]


@pytest.mark.usefixtures("one_thread")
def test_wait_skips_a_checkpoint_training_wrote_past_and_times_out_clearly(tmp_path, trained, loads, caplog,
                                                                          monkeypatch):
    workdir = workdir_with(tmp_path, trained, [1])
    folder = workdir / "checkpoints"

    def training_writes_checkpoint_3(n):
        if n == 1:
            for name in ("checkpoint_3.pth", "checkpoint_3.pth.sha256"):
                shutil.copy(trained / name, folder / name)

    fake_time(monkeypatch, loads, training_writes_checkpoint_3)
    caplog.set_level("INFO", logger="sde_diffusion")
    with pytest.raises(CheckpointError) as info:
        evaluate(workdir, 1, 4, wait=True, wait_timeout=100.0)
    assert str(info.value) == (f"eval.wait=True: checkpoint_4.pth did not appear in {folder} within "
                               "eval.wait_timeout=100 s (eval.begin_ckpt..eval.end_ckpt = 1..4, evaluated 1, 3 so "
                               "far). Check that training is still running, or raise eval.wait_timeout.")
    # 100 s of waiting for checkpoint 4 are four polls of 30 s (all fake)
    assert loads == ["checkpoint_1.pth", "sleep", "checkpoint_3.pth"] + ["sleep"] * 4
    assert reports(workdir) == [1, 3]
    messages = [r.getMessage() for r in caplog.records]
    assert f"skipped checkpoint 2 of eval.begin_ckpt..eval.end_ckpt = 1..4 (not in {folder}, but checkpoint_3.pth " \
           "is: training wrote past it)" in messages
    assert sum("waiting for" in m for m in messages) == 2  # once for checkpoint 2, once for checkpoint 4


@pytest.mark.usefixtures("one_thread")
def test_wait_takes_a_checkpoint_whose_sidecar_never_comes_after_a_grace(tmp_path, trained, loads, caplog,
                                                                         monkeypatch):
    workdir = workdir_with(tmp_path, trained, [1])
    digest_path(workdir / "checkpoints" / "checkpoint_1.pth").unlink()  # its writer died between the renames
    fake_time(monkeypatch, loads, lambda n: None)
    caplog.set_level("INFO", logger="sde_diffusion")
    evaluate(workdir, 1, 1, wait=True)
    polls = int(evaluate_job.SIDECAR_GRACE_SECONDS // evaluate_job.POLL_SECONDS)
    assert loads == ["sleep"] * polls + ["checkpoint_1.pth"] and reports(workdir) == [1]
    assert "taking it unverified" in caplog.text


def test_checkpoint_numbers_are_listed_compactly():
    spans = evaluate_job.spans
    assert evaluate_job.compact(spans([1, 3, 4, 5, 9])) == "1, 3-5, 9"
    assert evaluate_job.gaps(1, 10, [1, 3, 9]) == [(2, 2), (4, 8), (10, 10)]
    assert evaluate_job.gaps(3, 5, [3, 4, 5]) == []
    assert evaluate_job.numbered("checkpoint", [(4, 4)]) == "checkpoint 4"
    assert evaluate_job.numbered("checkpoint", [(3, 25)]) == "checkpoints 3-25"
