"""Data-parallel training on CPU with gloo: two spawned ranks against one process with the same global batch.

Each rank runs `run_lib.train` exactly as under torchrun (the RANK / WORLD_SIZE / MASTER_* variables set).
The ranks must end with identical weights, only rank 0 may write files, and the logged loss (the mean over ranks)
must equal the single-process loss at every step: the ranks split each global batch and the noise drawn for it.
"""
import json
import os
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

import run_lib
from configs.toy_gmm import get_config

STEPS = 12
PER_RANK_BATCH = 64


def small_config(batch_size: int):
    config = get_config()
    t = config.training
    t.batch_size, t.n_iters, t.log_freq, t.eval_freq = batch_size, STEPS, 1, 1000
    t.snapshot_freq = t.snapshot_freq_for_preemption = STEPS
    t.snapshot_sampling = False
    t.post_hoc_ema, t.post_hoc_ema_freq = (0.05, 0.1), STEPS // 2  # tracked and written by rank 0
    config.model.nf, config.model.num_res_blocks = 64, 2
    config.optim.warmup = 2
    config.device = "cpu"
    return config


def _rank_main(rank: int, world_size: int, port: int, workdir: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    state = run_lib.train(small_config(PER_RANK_BATCH), workdir)
    torch.save({name: p.detach().clone() for name, p in state.model.named_parameters()},
               os.path.join(workdir, f"params_rank{rank}.pt"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def losses(workdir):
    return [json.loads(line)["loss"] for line in (workdir / "train_log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    parallel, single = tmp_path_factory.mktemp("ddp"), tmp_path_factory.mktemp("single")
    mp.spawn(_rank_main, args=(2, free_port(), str(parallel)), nprocs=2, join=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        state = run_lib.train(small_config(2 * PER_RANK_BATCH), single)
    finally:
        torch.set_num_threads(threads)
    return parallel, single, state


def test_ranks_hold_identical_weights(runs):
    parallel, _, _ = runs
    a, b = (torch.load(parallel / f"params_rank{r}.pt", weights_only=True) for r in (0, 1))
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_only_rank_0_writes_one_checkpoint(runs):
    parallel, _, _ = runs
    assert sorted(p.name for p in (parallel / "checkpoints").iterdir()) == ["checkpoint_1.pth",
                                                                            "checkpoint_1.pth.sha256"]
    assert sorted(p.name for p in (parallel / "checkpoints-meta").iterdir()) == [
        f"checkpoint_{STEPS}.pth", f"checkpoint_{STEPS}.pth.sha256"]
    state = torch.load(parallel / "checkpoints" / "checkpoint_1.pth", weights_only=True)
    assert len(state["rng"]) == 2  # both ranks' RNG states, for an exact resume
    assert sorted(p.name for p in (parallel / "post_hoc_ema").iterdir()) == [
        f"phema_{s}.pth{x}" for s in (STEPS, STEPS // 2) for x in ("", ".sha256")]


def test_loss_equals_a_single_process_with_the_global_batch(runs):
    parallel, single, state = runs
    ddp, one = losses(parallel), losses(single)
    assert len(ddp) == len(one) == STEPS
    # the same examples and noise; only the floating-point order of the batch reductions differs
    torch.testing.assert_close(torch.tensor(ddp), torch.tensor(one), rtol=1e-5, atol=0)
    ranks = torch.load(parallel / "params_rank0.pt", weights_only=True)
    for name, p in state.model.named_parameters():
        torch.testing.assert_close(ranks[name], p.detach(), rtol=1e-4, atol=1e-6)


def _eval_rank_main(rank: int, world_size: int, port: int, workdir: str, mode: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    getattr(run_lib, mode)(eval_config(), workdir)


EVAL_ROUNDS, EVAL_BATCH = 5, 64


def eval_config():
    config = small_config(PER_RANK_BATCH)
    config.sampling.steps = 20
    config.eval.num_samples, config.eval.batch_size = EVAL_ROUNDS * EVAL_BATCH - 10, EVAL_BATCH  # a short last round
    config.compare.samplers = ("ddim@10", "pc@10")
    return config


@pytest.mark.parametrize("mode,report", [("evaluate", "eval/report_1.json"), ("compare", "compare/compare.json")])
def test_ranks_share_the_sampling_rounds_and_report_what_one_process_reports(runs, tmp_path, mode, report):
    """evaluate / compare under torchrun: rank r makes rounds r, r + 2, …; rank 0 alone writes the report, which
    equals a single process's (every round is seeded by its index)."""
    import shutil
    trained, _, _ = runs
    parallel, single = tmp_path / "parallel", tmp_path / "single"
    for workdir in (parallel, single):
        shutil.copytree(trained / "checkpoints", workdir / "checkpoints")
    mp.spawn(_eval_rank_main, args=(2, free_port(), str(parallel), mode), nprocs=2, join=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        getattr(run_lib, mode)(eval_config(), single)
    finally:
        torch.set_num_threads(threads)
    a, b = (json.loads((w / report).read_text()) for w in (parallel, single))
    volatile = ("eval_seconds", "sampling_seconds", "seconds", "world_size")
    strip = lambda r: {k: strip(v) if isinstance(v, dict) else [strip(x) for x in v] if isinstance(v, list) else v
                       for k, v in r.items() if k not in volatile} if isinstance(r, dict) else r
    assert strip(a) == strip(b)
    if mode == "evaluate":
        assert a["world_size"] == 2 and "world_size" not in b
        assert a["num_samples"] == EVAL_ROUNDS * EVAL_BATCH - 10
        rounds = sorted(p.name for p in (parallel / "eval" / "rounds_1").glob("round_*.npz"))
        assert rounds == [f"round_{r:05d}.npz" for r in range(EVAL_ROUNDS)]
        with np.load(parallel / "eval" / "samples_1.npz") as x, np.load(single / "eval" / "samples_1.npz") as y:
            assert np.array_equal(x["samples"], y["samples"])


def test_each_rank_makes_only_its_own_rounds(tmp_path):
    from evaluation.rounds import run_in_rounds
    made = []

    def make_round(r, n):
        made.append(r)
        return {"x": np.full(n, r)}

    assert run_in_rounds(tmp_path, 9, 2, make_round, {"run": 1}, rank=1, world_size=2) is None
    assert made == [1, 3]
    out = run_in_rounds(tmp_path, 9, 2, make_round, {"run": 1}, rank=0, world_size=2)
    assert made == [1, 3, 0, 2, 4] and out["x"].tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4]


DISTILL_STEPS = 6


def distill_config(teacher, batch_size: int):
    """Consistency distillation of the single-process run above (an EMA target and the teacher's Heun steps)."""
    config = small_config(batch_size)
    t = config.training
    t.n_iters = t.snapshot_freq = t.snapshot_freq_for_preemption = DISTILL_STEPS
    t.post_hoc_ema = ()
    config.distill.method, config.distill.teacher_workdir = "consistency", str(teacher)
    config.model.parameterization, config.sampling.method = "auto", "auto"
    return config


def _distill_rank_main(rank: int, world_size: int, port: int, workdir: str, teacher: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    run_lib.distill(distill_config(teacher, PER_RANK_BATCH), workdir)


def test_distillation_under_ranks_equals_one_process_with_the_global_batch(runs, tmp_path):
    """--mode distill under torchrun: the ranks split each global batch and its levels and noise, so the logged
    loss equals one process's with the global batch, and rank 0 alone writes the checkpoint."""
    _, teacher, _ = runs
    parallel, single = tmp_path / "ddp", tmp_path / "single"
    mp.spawn(_distill_rank_main, args=(2, free_port(), str(parallel), str(teacher)), nprocs=2, join=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_lib.distill(distill_config(teacher, 2 * PER_RANK_BATCH), single)
    finally:
        torch.set_num_threads(threads)
    ddp, one = losses(parallel), losses(single)
    assert len(ddp) == len(one) == DISTILL_STEPS
    torch.testing.assert_close(torch.tensor(ddp), torch.tensor(one), rtol=1e-5, atol=0)
    assert sorted(p.name for p in (parallel / "checkpoints").iterdir()) == ["checkpoint_1.pth",
                                                                            "checkpoint_1.pth.sha256"]
