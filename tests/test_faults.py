"""Faults of shared machines: a write that fails for want of storage stops training with the path and the free
space, leaves nothing half-written and resumes from the previous checkpoint bit-identically; a second training run
on a workdir in use stops naming the run that holds it, a stale lock is taken over, and eval may read a workdir
that is training."""
import errno
import json
import logging
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from configs import toy_gmm
from sde_diffusion.checkpoints import atomic_write, load_checkpoint, step_checkpoints
from sde_diffusion.errors import DatasetError, StorageError, WorkdirBusyError
from sde_diffusion.jobs import evaluate as evaluate_job
from sde_diffusion.jobs import train as train_job

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py
ROOT = Path(__file__).resolve().parents[1]


def toy_config(**changes):
    config = toy_gmm.get_config()
    config.update_from_flattened_dict({
        "training.n_iters": 6, "training.snapshot_freq": 6, "training.snapshot_freq_for_preemption": 2,
        "training.eval_freq": 6, "training.log_freq": 2, "training.batch_size": 64, "training.snapshot_sampling": False,
        "model.nf": 32, "model.num_res_blocks": 1, "sampling.steps": 3, "eval.num_samples": 64,
        "eval.batch_size": 64, "device": "cpu", **changes})
    return config


def same_weights(a, b):
    """Two checkpoints hold equal weights, EMA and Adam state, bit for bit."""
    assert a["step"] == b["step"] and a["model"].keys() == b["model"].keys()
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
    for x, y in zip(a["ema"]["shadow_params"], b["ema"]["shadow_params"]):
        assert torch.equal(x, y)
    for key in a["optimizer"]["state"]:
        for name, value in a["optimizer"]["state"][key].items():
            assert torch.equal(value, b["optimizer"]["state"][key][name]), (key, name)


# --------------------------------------------------------------------------------------------------
# Storage
# --------------------------------------------------------------------------------------------------
def test_a_full_disk_stops_training_naming_the_path_and_the_rerun_resumes_bit_identically(tmp_path, monkeypatch):
    config = toy_config()
    train_job.run(config, tmp_path / "straight")
    real_save = torch.save

    def disk_fills_at_step_4(obj, f, *args, **kwargs):
        if "checkpoint_4.pth" in str(f):
            Path(f).write_bytes(b"half a checkpoint")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, f, *args, **kwargs)

    faulty = tmp_path / "faulty"
    monkeypatch.setattr(torch, "save", disk_fills_at_step_4)
    with pytest.raises(StorageError, match=r"could not write \S+checkpoints-meta/checkpoint_4\.pth: No space left on "
                                           r"device \([\d.]+ [GM]B free on its file system\)\. Nothing half-written"):
        train_job.run(config, faulty)
    monkeypatch.setattr(torch, "save", real_save)
    meta = faulty / "checkpoints-meta"
    assert sorted(p.name for p in meta.iterdir()) == ["checkpoint_2.pth", "checkpoint_2.pth.sha256"]
    assert load_checkpoint(meta / "checkpoint_2.pth")["step"] == 2  # the previous checkpoint verifies
    assert not (faulty / ".lock").exists()  # the failed run let go of its workdir
    train_job.run(config, faulty)
    same_weights(load_checkpoint(tmp_path / "straight" / "checkpoints" / "checkpoint_1.pth"),
                 load_checkpoint(faulty / "checkpoints" / "checkpoint_1.pth"))


@pytest.mark.parametrize("failure", [OSError(errno.EROFS, os.strerror(errno.EROFS)),
                                     OSError(errno.EIO, os.strerror(errno.EIO)),
                                     RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")])
def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path, failure):
    target = tmp_path / "report.json"
    target.write_text("old")

    def write(tmp):
        Path(tmp).write_text("half")
        raise failure

    with pytest.raises(StorageError, match=r"could not write \S+report\.json: .* free on its file system"):
        atomic_write(target, write)
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]
    with pytest.raises(PermissionError):  # not a storage failure: raised as it is
        atomic_write(target, lambda tmp: (_ for _ in ()).throw(PermissionError(errno.EACCES, "denied")))


# --------------------------------------------------------------------------------------------------
# One training run per workdir
# --------------------------------------------------------------------------------------------------
def hold_lock(workdir: Path, pid: int, host: str = None):
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / ".lock").write_text(json.dumps({"host": host or socket.gethostname(), "pid": pid, "mode": "train",
                                               "started": "2026-12-03T10:00:00+00:00"}))


def test_a_second_run_on_a_busy_workdir_stops_naming_the_holder_and_a_stale_lock_is_taken_over(tmp_path, caplog):
    config = toy_config()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        hold_lock(tmp_path, holder.pid)
        busy = (rf"{tmp_path} is in use by another run: --mode train started 2026-12-03T10:00:00\+00:00 by PID "
                rf"{holder.pid} on {socket.gethostname()}\. Wait for it to finish")
        with pytest.raises(WorkdirBusyError, match=busy):
            train_job.run(config, tmp_path)
        result = subprocess.run([sys.executable, "main.py", "--config", "configs/toy_gmm.py", "--mode", "train",
                                 "--workdir", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert result.returncode == 2 and result.stderr.strip().splitlines()[-1].startswith(f"error: {tmp_path} is in use")
        assert not (tmp_path / "checkpoints").exists()  # nothing was written
    finally:
        holder.kill()
        holder.wait()
    with caplog.at_level(logging.WARNING, logger="sde_diffusion"):
        train_job.run(config, tmp_path)  # the holder is gone: its lock is stale
    assert f"took over the stale lock {tmp_path / '.lock'} (--mode train started 2026-12-03T10:00:00+00:00 by PID " \
           f"{holder.pid}" in caplog.text
    assert not (tmp_path / ".lock").exists() and (tmp_path / "checkpoints" / "checkpoint_1.pth").exists()
    hold_lock(tmp_path, 1, host="another-machine")  # a run elsewhere cannot be checked: it counts as running
    with pytest.raises(WorkdirBusyError, match=r"on another-machine\. .* delete \S+\.lock"):
        train_job.run(toy_config(**{"training.n_iters": 8}), tmp_path)
    evaluate_job.run(config, tmp_path)  # eval reads a workdir in use
    assert (tmp_path / "eval" / "report_1.json").exists() and (tmp_path / ".lock").exists()


# --------------------------------------------------------------------------------------------------
# Caches: checked against their .sha256 sidecar at every load, rebuilt when they fail
# --------------------------------------------------------------------------------------------------
class CountingInception:
    """Stands in for the Inception network: features that depend on the pixels, and a count of the calls."""

    weights = type("Weights", (), {"sha256": "f" * 64})()

    def __init__(self):
        self.calls = 0

    def features(self, pixels, progress=False):
        self.calls += 1
        flat = pixels.reshape(len(pixels), -1).astype(np.float64)
        return np.stack([flat.mean(1), flat.std(1), flat[:, :7].sum(1)], axis=1)


def flip_byte(path: Path, offset_fraction: float = 0.6) -> None:
    data = bytearray(path.read_bytes())
    data[int(len(data) * offset_fraction)] ^= 0xFF
    path.write_bytes(bytes(data))


def test_corrupt_reference_statistics_are_reported_and_computed_again(tmp_path, caplog):
    from evaluation.reference import reference_statistics
    from sde_diffusion.data.datasets import get_dataset
    dataset, network = get_dataset(toy_config(**{"data.dataset": "digits", "model.name": "ddpm"})), CountingInception()
    first = reference_statistics(dataset, "digits", "test", network, tmp_path, limit=40)
    [path] = tmp_path.glob("digits_test_*.npz")
    assert (tmp_path / (path.name + ".sha256")).is_file()
    assert reference_statistics(dataset, "digits", "test", network, tmp_path, limit=40) and network.calls == 1
    damages = {"altered": flip_byte, "truncated": lambda p: p.write_bytes(p.read_bytes()[:100]),
               "without its sidecar": lambda p: (tmp_path / (p.name + ".sha256")).unlink()}
    for calls, (what, damage) in enumerate(damages.items(), start=2):
        damage(path)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="sde_diffusion"):
            again = reference_statistics(dataset, "digits", "test", network, tmp_path, limit=40)
        assert network.calls == calls, what
        assert f"the cached reference statistics {path} is not used" in caplog.text, what
        assert np.array_equal(again["mu"], first["mu"]) and np.array_equal(again["sigma"], first["sigma"])
    assert "no .sha256 sidecar" in caplog.text


def test_an_altered_preprocessed_image_cache_is_rebuilt_not_used(tmp_path, caplog):
    from PIL import Image
    from configs.vp_folder_64 import get_config
    from sde_diffusion.data.image_folder import load_images
    root = tmp_path / "images"
    root.mkdir()
    rng = np.random.default_rng(0)
    for k in range(6):
        Image.fromarray(rng.integers(0, 256, size=(12, 12, 3), dtype=np.uint8)).save(root / f"{k}.png")
    config = get_config()
    config.update_from_flattened_dict({"data.root": str(root), "data.image_size": 8})
    first = load_images(config.data)
    assert not first.from_cache and load_images(config.data).from_cache
    flip_byte(first.path, 0.5)  # one pixel of the uncompressed array: still a valid .npz, with a wrong pixel
    with caplog.at_level(logging.WARNING, logger="sde_diffusion"):
        again = load_images(config.data)
    assert not again.from_cache and np.array_equal(again.images, first.images)
    assert f"the cached preprocessed images {first.path} is not used: its SHA-256" in caplog.text


# --------------------------------------------------------------------------------------------------
# Data-loader workers
# --------------------------------------------------------------------------------------------------
def test_a_killed_data_loader_worker_stops_the_run_with_the_cause_and_the_rerun_resumes_exactly(tmp_path,
                                                                                                 monkeypatch):
    import signal
    import time
    config = toy_config(**{"data.dataset": "digits", "model.name": "ddpm", "model.nf": 32, "model.ch_mult": (1, 1),
                           "model.attn_resolutions": (4,), "training.batch_size": 8, "data.num_workers": 1,
                           "data.image_size": 8, "data.num_channels": 1, "eval.enable_fid": False,
                           "training.n_iters": 6, "training.snapshot_freq_for_preemption": 2})
    train_job.run(config, tmp_path / "straight")
    real_take_step = train_job.take_step

    def oom_kill_at_step_3(run, step):
        real_take_step(run, step)
        if step == 3:
            os.kill(run.dataset._worker_batches._workers[0].pid, signal.SIGKILL)
            time.sleep(1.0)  # the DataLoader's SIGCHLD handler raises here or at the next batch

    monkeypatch.setattr(train_job, "take_step", oom_kill_at_step_3)
    killed = tmp_path / "killed"
    with pytest.raises(DatasetError, match=r"a data-loader worker died at step [3-5]: DataLoader worker \(pid.*\) "
                                           r"(is killed by signal: Killed\.|exited unexpectedly) Most likely the "
                                           r"out-of-memory killer .* data\.num_workers=1 .* resume from the newest "
                                           r"checkpoint"):
        train_job.run(config, killed)
    monkeypatch.setattr(train_job, "take_step", real_take_step)
    assert [step for step, _ in step_checkpoints(killed / "checkpoints-meta")] == [2]
    train_job.run(config, killed)
    same_weights(load_checkpoint(tmp_path / "straight" / "checkpoints" / "checkpoint_1.pth"),
                 load_checkpoint(killed / "checkpoints" / "checkpoint_1.pth"))


# --------------------------------------------------------------------------------------------------
# torchrun restarts the group when a rank dies
# --------------------------------------------------------------------------------------------------
ELASTIC = ["--config.training.n_iters=400", "--config.training.snapshot_freq=400",
           "--config.training.snapshot_freq_for_preemption=50", "--config.training.log_freq=50",
           "--config.training.eval_freq=400", "--config.training.snapshot_sampling=False",
           "--config.training.batch_size=64", "--config.model.nf=32", "--config.model.num_res_blocks=1",
           "--config.device=cpu"]
KILL_AFTER = ((100, 1), (250, 0))  # (preemption checkpoint, local rank): rank 1 dies after step 100, rank 0 after 250


def torchrun_train(workdir: Path, kills=()):
    """`torchrun --nproc_per_node=2 --max-restarts=3 main.py --mode train` on the toy mixture (gloo); each kill
    SIGKILLs a worker a random few milliseconds after a preemption checkpoint appears. Returns the output."""
    import random
    import signal
    import time
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--max-restarts=3",
           "main.py", "--config", "configs/toy_gmm.py", "--mode", "train", "--workdir", str(workdir), *ELASTIC]
    agent = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             env=dict(os.environ, OMP_NUM_THREADS="1"))
    delays = random.Random(0)
    for step, rank in kills:
        sidecar = workdir / "checkpoints-meta" / f"checkpoint_{step}.pth.sha256"
        deadline = time.time() + 120
        while not sidecar.exists() and agent.poll() is None and time.time() < deadline:
            time.sleep(0.002)
        time.sleep(delays.uniform(0.0, 0.02))
        workers = sorted(int(pid) for pid in subprocess.run(["pgrep", "-P", str(agent.pid)], capture_output=True,
                                                            text=True).stdout.split())
        assert len(workers) == 2, f"the group is not running after step {step}"
        os.kill(workers[rank], signal.SIGKILL)
    output, _ = agent.communicate(timeout=300)
    assert agent.returncode == 0, output[-4000:]
    return output


def test_torchrun_restarts_the_group_after_a_rank_dies_and_the_run_ends_bit_identical(tmp_path):
    torchrun_train(tmp_path / "straight")
    output = torchrun_train(tmp_path / "killed", KILL_AFTER)
    assert "failed (exitcode: -9) local_rank: 1" in output and "failed (exitcode: -9) local_rank: 0" in output
    resumed = [int(s) for s in re.findall(r"torchrun restart \d of the group: 2 ranks resume from \S+checkpoint_(\d+)"
                                          r"\.pth", output)]
    assert len(resumed) == 2 and resumed[0] >= 100 and resumed[1] >= 250, output[-3000:]
    same_weights(load_checkpoint(tmp_path / "straight" / "checkpoints" / "checkpoint_1.pth"),
                 load_checkpoint(tmp_path / "killed" / "checkpoints" / "checkpoint_1.pth"))
    meta = tmp_path / "killed" / "checkpoints-meta"
    assert not [p for p in meta.iterdir() if p.name.startswith(".")]  # no temporary left by a dying rank 0
    assert not (tmp_path / "killed" / ".lock").exists()
