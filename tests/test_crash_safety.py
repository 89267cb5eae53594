"""Crash safety: SIGKILL at random moments (and inside a checkpoint write), corrupt checkpoints, non-finite losses.

The SIGKILL test trains the 2-D mixture through `python main.py` and kills the process repeatedly; every restart
resumes from the newest checkpoint that verifies. The logged loss sequence (train_log.jsonl, rewritten on resume to
read as one run), the final weights and the post-hoc EMA snapshots must be bit-identical to an uninterrupted run's.
"""
import ast
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import run_lib
from configs.toy_gmm import get_config
from sde_diffusion.checkpoints import (CorruptCheckpointError, digest_path, load_checkpoint, newest_good_checkpoint,
                                       save_checkpoint, step_checkpoints)
from sde_diffusion.training.step import NonFiniteError

ROOT = Path(__file__).resolve().parents[1]
STEPS = 240
FLAGS = [f"--config.training.n_iters={STEPS}", "--config.training.batch_size=128", "--config.training.log_freq=1",
         "--config.training.eval_freq=100000", "--config.training.snapshot_freq_for_preemption=8",
         f"--config.training.snapshot_freq={STEPS}", "--config.training.snapshot_sampling=False",
         "--config.model.nf=128", "--config.device=cpu",
         "--config.training.post_hoc_ema=(0.05, 0.1)", "--config.training.post_hoc_ema_freq=20"]


def train_process(workdir: Path) -> subprocess.Popen:
    cmd = [sys.executable, "main.py", "--config", "configs/toy_gmm.py", "--mode", "train", "--workdir", str(workdir),
           *FLAGS]
    return subprocess.Popen(cmd, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def straight_run(workdir: Path) -> None:
    """The uninterrupted run of FLAGS by run_lib.train in this process, on one thread as the killed processes (one
    torch import fewer than `python main.py`); their result must equal it bit for bit."""
    config = get_config()
    for flag in FLAGS:
        key, value = flag[len("--config."):].split("=", 1)
        config.update_from_flattened_dict({key: ast.literal_eval(value) if value != "cpu" else value})
    run_lib.train(config, workdir)


def finish(process: subprocess.Popen) -> None:
    _, err = process.communicate(timeout=600)
    assert process.returncode == 0, err[-3000:]


def logged_steps(workdir: Path) -> int:
    path = workdir / "train_log.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def writing(meta: Path) -> bool:
    """A checkpoint or digest temporary file exists: a write is under way."""
    try:
        return any(entry.name.startswith(".") for entry in os.scandir(meta))
    except FileNotFoundError:
        return False


def kill_at(process: subprocess.Popen, workdir: Path, delay: float, during_write: bool) -> bool:
    """SIGKILL once training has logged a step and `delay` seconds passed (or, with during_write, as soon as a
    checkpoint write is seen after that); True if it was killed before finishing, and whether inside a write."""
    start_steps = logged_steps(workdir)
    while logged_steps(workdir) <= start_steps:
        if process.poll() is not None:
            return False, False
        time.sleep(0.01)
    deadline = time.time() + delay
    while time.time() < deadline or during_write:
        if process.poll() is not None:
            return False, False
        if during_write and writing(workdir / "checkpoints-meta"):
            break
    process.send_signal(signal.SIGKILL)
    process.wait()
    return True, writing(workdir / "checkpoints-meta")


@pytest.mark.usefixtures("one_thread")
def test_sigkill_at_random_moments_resumes_bit_identically(tmp_path):
    straight = tmp_path / "straight"
    straight_run(straight)
    killed = tmp_path / "killed"
    rng = random.Random(0)
    kills, inside_writes = 0, 0
    for attempt in range(8):
        during_write = attempt % 2 == 1
        was_killed, inside = kill_at(train_process(killed), killed, rng.uniform(0.0, 0.5), during_write)
        kills += was_killed
        inside_writes += inside
        if kills >= 4 and inside_writes >= 1:
            break
    assert kills >= 4 and inside_writes >= 1, (kills, inside_writes)
    finish(train_process(killed))
    assert not writing(killed / "checkpoints-meta")  # the temporaries left by the kills were cleaned up
    a, b = ((w / "train_log.jsonl").read_text().splitlines() for w in (straight, killed))
    assert len(a) == STEPS and [json.loads(x)["step"] for x in b] == list(range(1, STEPS + 1))
    assert [json.loads(x)["loss"] for x in a] == [json.loads(x)["loss"] for x in b]
    final_a, final_b = (load_checkpoint(w / "checkpoints" / "checkpoint_1.pth") for w in (straight, killed))
    for part in ("model", "ema"):
        for key in final_a[part] if part == "model" else ["shadow_params"]:
            x, y = final_a[part][key], final_b[part][key]
            assert all(torch.equal(u, v) for u, v in zip(x, y)) if isinstance(x, list) else torch.equal(x, y)
    # the post-hoc EMA snapshots too, every one of them (some were written by runs killed later)
    snapshots = [p.name for p in sorted((straight / "post_hoc_ema").glob("phema_*.pth"))]
    assert len(snapshots) == STEPS // 20
    for name in snapshots:
        x, y = (torch.load(w / "post_hoc_ema" / name, weights_only=True) for w in (straight, killed))
        assert x["step"] == y["step"] and all(torch.equal(u, v) for u, v in zip(x["profiles"], y["profiles"]))


# --------------------------------------------------------------------------------------------------
def small_config(steps: int):
    config = get_config()
    t = config.training
    t.batch_size, t.n_iters, t.log_freq, t.eval_freq = 64, steps, 1, 100000
    t.snapshot_freq, t.snapshot_freq_for_preemption, t.snapshot_sampling = 100000, 2, False
    t.keep_meta_checkpoints = 3
    config.model.nf, config.model.num_res_blocks = 32, 1
    config.device = "cpu"
    return config


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_corrupt_newest_checkpoint_falls_back_to_the_previous(tmp_path, damage, caplog):
    run_lib.train(small_config(6), tmp_path)
    meta = tmp_path / "checkpoints-meta"
    assert [s for s, _ in step_checkpoints(meta)] == [6, 4, 2]  # the newest 3 kept
    newest = meta / "checkpoint_6.pth"
    data = bytearray(newest.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    else:
        for i in range(len(data) // 2, len(data) // 2 + 8):
            data[i] ^= 0xFF
    newest.write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpointError, match="checkpoint_6.pth is corrupt"):
        load_checkpoint(newest)
    caplog.set_level("INFO", logger="sde_diffusion")
    state = run_lib.train(small_config(8), tmp_path)
    assert "checkpoint_6.pth is corrupt" in caplog.text and "falling back" in caplog.text
    assert "resuming from" in caplog.text and "checkpoint_4.pth at step 4" in caplog.text
    assert state.step == 8 and (meta / "checkpoint_6.pth.corrupt").exists()
    steps = [json.loads(line)["step"] for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))  # the log of steps 5 and 6 was rewritten by the resumed run


def test_a_complete_file_without_its_digest_still_loads_and_a_foreign_file_is_corrupt(tmp_path):
    path = tmp_path / "checkpoint_3.pth"
    save_checkpoint(path, {"step": 3, "x": torch.arange(4)})
    digest_path(path).unlink()  # killed between the two renames
    assert newest_good_checkpoint(tmp_path)[1]["step"] == 3
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(CorruptCheckpointError, match="unreadable"):
        load_checkpoint(path)
    assert newest_good_checkpoint(tmp_path) is None


class NaNAt:
    """Wraps a loss function so that its value is NaN at the given (1-based) calls."""

    def __init__(self, loss_fn, calls):
        self.loss_fn, self.calls, self.count = loss_fn, set(calls), 0

    def __call__(self, *args, **kwargs):
        self.count += 1
        loss = self.loss_fn(*args, **kwargs)
        return loss * float("nan") if self.count in self.calls else loss


@pytest.mark.usefixtures("one_thread")
def test_nonfinite_loss_stops_with_diagnostics_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    get_loss_fn = run_lib.losses.get_loss_fn
    monkeypatch.setattr(run_lib.losses, "get_loss_fn", lambda *a, **k: NaNAt(get_loss_fn(*a, **k), {5}))
    with pytest.raises(NonFiniteError, match=r"step 5: the loss is nan") as info:
        run_lib.train(small_config(10), tmp_path)
    message = str(info.value)
    assert "nonfinite_step_5.pt" in message and "checkpoint_4.pth (step 4), is untouched" in message
    assert "training.on_nonfinite='skip'" in message
    diagnostics = torch.load(tmp_path / "diagnostics" / "nonfinite_step_5.pt", weights_only=True)
    assert diagnostics["step"] == 5 and diagnostics["batch"].shape == (64, 2)
    assert [s for s, _ in step_checkpoints(tmp_path / "checkpoints-meta")] == [4, 2]
    load_checkpoint(tmp_path / "checkpoints-meta" / "checkpoint_4.pth")  # intact


@pytest.mark.usefixtures("one_thread")
def test_nonfinite_gradient_is_skipped_and_counted_when_asked(tmp_path, monkeypatch):
    get_loss_fn = run_lib.losses.get_loss_fn
    config = small_config(6)
    config.training.on_nonfinite = "skip"
    monkeypatch.setattr(run_lib.losses, "get_loss_fn", lambda *a, **k: NaNAt(get_loss_fn(*a, **k), {2, 3}))
    state = run_lib.train(config, tmp_path)
    assert state.step == 6 and state.skipped_steps == 2
    assert state.ema.num_updates == 4  # the EMA saw only the applied steps
    assert all(torch.isfinite(p).all() for p in state.model.parameters())
    log = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert [entry["skipped_steps"] for entry in log] == [0, 1, 2, 2, 2, 2]


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains_and_resumes(tmp_path, precision):
    config = small_config(4)
    config.training.precision = precision
    state = run_lib.train(config, tmp_path)
    assert state.step == 4 and all(torch.isfinite(p).all() for p in state.model.parameters())
    saved = load_checkpoint(tmp_path / "checkpoints-meta" / "checkpoint_4.pth")
    assert (saved["scaler"] is not None) == (precision == "fp16")
    config.training.n_iters = 6
    assert run_lib.train(config, tmp_path).step == 6


@pytest.mark.usefixtures("one_thread")
def test_compiled_training_matches_eager(tmp_path):
    """torch.compile (the graph-capturing frontend; the eager backend keeps the test fast) gives the same losses."""
    eager = small_config(3)
    compiled = small_config(3)
    compiled.training.compile, compiled.training.compile_backend = True, "eager"
    run_lib.train(eager, tmp_path / "eager")
    run_lib.train(compiled, tmp_path / "compiled")
    a, b = ([json.loads(x)["loss"] for x in (tmp_path / w / "train_log.jsonl").read_text().splitlines()]
            for w in ("eager", "compiled"))
    torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=1e-6, atol=0)
