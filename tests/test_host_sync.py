"""Host synchronisations per training step: none on steps that do not log, in every precision and under data
parallelism; failures are still caught (masked on the device, raised at the next read-back).

The counter (`sde_diffusion.host_sync.HostSyncCounter`) records the operators that make the host wait for the
device; on CPU the same calls are made, so counting them here tells what a GPU would wait for.
"""
import collections
import os

import pytest
import torch
import torch.multiprocessing as mp

import run_lib
from configs.toy_gmm import get_config
from sde_diffusion.errors import NonFiniteError
from sde_diffusion.host_sync import HostSyncCounter
from sde_diffusion.jobs import train as train_job
from sde_diffusion.training.step import LossScale
from tests.test_crash_safety import NaNAt

STEPS = 6


def small_config(precision="fp32", log_freq=STEPS, steps=STEPS):
    config = get_config()
    t = config.training
    t.batch_size, t.n_iters, t.log_freq, t.eval_freq = 32, steps, log_freq, 10**6
    t.snapshot_freq = t.snapshot_freq_for_preemption = steps
    t.snapshot_sampling, t.precision = False, precision
    config.model.nf, config.model.num_res_blocks = 32, 1
    config.device = "cpu"
    return config


class CountedSteps:
    """Replaces jobs.train.take_step (batch, loss, backward, clipping, Adam, EMA) and counts syncs per step;
    `patch`: monkeypatch.setattr in a test, plain setattr in a spawned rank."""

    def __init__(self, patch):
        self.counts, self.events = [], collections.Counter()
        take_step = train_job.take_step

        def counted(run, step):
            with HostSyncCounter() as syncs:
                take_step(run, step)
            self.counts.append(syncs.count)
            self.events.update(syncs.events)
        patch(train_job, "take_step", counted)


def test_the_counter_sees_what_makes_the_host_wait():
    x = torch.randn(8)
    with HostSyncCounter() as syncs:
        float(x.sum())
        bool((x > 0).any())
        x[x > 0]  # boolean-mask indexing: a data-dependent shape
        torch.nonzero(x)
        y = x.to("cpu", copy=True) * 2  # host to host: not a synchronisation
        torch.where(x > 0, x, y).sum()
    assert syncs.count == 4, syncs.events
    assert all(where.startswith("test_host_sync.py:") for _, where in syncs.events)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_training_steps_make_no_host_synchronisation(tmp_path, monkeypatch, precision):
    steps = CountedSteps(monkeypatch.setattr)
    state = run_lib.train(small_config(precision), tmp_path)
    assert state.step == STEPS and steps.counts == [0] * STEPS, steps.events
    assert all(torch.isfinite(p).all() for p in state.model.parameters())
    # the log line (read back once, at step 6) holds the mean over the applied steps
    entry = (tmp_path / "train_log.jsonl").read_text().splitlines()
    assert len(entry) == 1 and '"step": 6' in entry[0] and "NaN" not in entry[0]


@pytest.mark.usefixtures("one_thread")
def test_class_conditional_steps_with_label_dropout_make_no_host_synchronisation(tmp_path, monkeypatch):
    steps = CountedSteps(monkeypatch.setattr)
    config = small_config()
    config.model.num_classes, config.training.label_dropout = 4, 0.2
    run_lib.train(config, tmp_path)
    assert steps.counts == [0] * STEPS, steps.events


@pytest.mark.usefixtures("one_thread")
def test_a_failure_is_masked_on_the_device_and_raised_at_the_next_read_back(tmp_path, monkeypatch):
    get_loss_fn = run_lib.losses.get_loss_fn
    monkeypatch.setattr(run_lib.losses, "get_loss_fn", lambda *a, **k: NaNAt(get_loss_fn(*a, **k), {3}))
    batches = {}
    take_step = train_job.take_step

    def recording(run, step):
        take_step(run, step)
        batches[step] = run.step_fn.bad_batch.clone()
    monkeypatch.setattr(train_job, "take_step", recording)
    config = small_config(log_freq=5, steps=10)
    config.training.snapshot_freq_for_preemption = 2
    with pytest.raises(NonFiniteError, match=r"step 3: the loss is nan") as info:
        run_lib.train(config, tmp_path)
    assert "checkpoint_2.pth (step 2), is untouched" in str(info.value)
    assert sorted(batches) == [1, 2, 3, 4]  # raised at step 4's checkpoint, before writing it
    assert not (tmp_path / "checkpoints-meta" / "checkpoint_4.pth").exists()
    diagnostics = torch.load(tmp_path / "diagnostics" / "nonfinite_step_3.pt", weights_only=True)
    assert diagnostics["step"] == 3 and torch.equal(diagnostics["batch"], batches[3])
    assert len(diagnostics["nonfinite_gradients"]) > 0


@pytest.mark.usefixtures("one_thread")
def test_skipped_steps_leave_weights_optimizer_and_ema_untouched(tmp_path, monkeypatch):
    """Under 'skip' a NaN step is masked in the fused Adam kernel and the EMA: the run equals one whose loss at that
    step was never taken... up to the batch and noise it consumed, so compare the step counters instead."""
    get_loss_fn = run_lib.losses.get_loss_fn
    monkeypatch.setattr(run_lib.losses, "get_loss_fn", lambda *a, **k: NaNAt(get_loss_fn(*a, **k), {2, 3}))
    steps = CountedSteps(monkeypatch.setattr)
    config = small_config()
    config.training.on_nonfinite = "skip"
    state = run_lib.train(config, tmp_path)
    assert steps.counts == [0] * STEPS and state.skipped_steps == 2
    assert int(state.ema.num_updates) == STEPS - 2
    assert {int(s["step"]) for s in state.optimizer.state.values()} == {STEPS - 2}  # Adam's bias correction too
    assert all(torch.isfinite(p).all() for p in state.model.parameters())
    assert all(torch.isfinite(s).all() for s in state.ema.shadow_params)


def test_fp16_loss_scale_state_is_grad_scalers():
    scale = LossScale(torch.device("cpu"), init_scale=1024.0, growth_interval=3)
    scale.update(torch.ones(()))  # an overflow halves it
    for _ in range(3):
        scale.update(torch.zeros(()))  # three clean steps double it
    assert scale.state_dict() == {"scale": 1024.0, "growth_factor": 2.0, "backoff_factor": 0.5,
                                  "growth_interval": 3, "_growth_tracker": 0}
    scaler = torch.amp.GradScaler("cpu")
    scaler.load_state_dict(scale.state_dict())
    assert scaler.get_scale() == 1024.0
    again = LossScale(torch.device("cpu"))
    again.load_state_dict(scaler.state_dict())
    assert again.state_dict() == scale.state_dict()


def _rank_main(rank: int, world_size: int, ports, workdir: str) -> None:
    """One rank of both runs (one process start and torch import per rank, not two): the compiled step first, as
    CountedSteps then replaces take_step for the rest of the process; each run joins its own group on its own port."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1")
    torch.set_num_threads(1)
    os.environ["MASTER_PORT"] = str(ports[0])
    config = small_config()  # dynamo does not trace under the counter's dispatch mode: compare the weights instead
    config.training.compile, config.training.compile_backend = True, "eager"
    state = run_lib.train(config, os.path.join(workdir, "eager"))
    torch.save(state.model.state_dict(), os.path.join(workdir, "eager", f"model_rank{rank}.pt"))
    os.environ["MASTER_PORT"] = str(ports[1])
    steps = CountedSteps(setattr)
    state = run_lib.train(small_config(), os.path.join(workdir, "plain"))
    torch.save(steps.counts, os.path.join(workdir, "plain", f"syncs_rank{rank}.pt"))
    torch.save(state.model.state_dict(), os.path.join(workdir, "plain", f"model_rank{rank}.pt"))


def test_data_parallel_steps_make_no_host_synchronisation_and_compile_to_the_same_weights(tmp_path):
    """Two gloo ranks: no synchronisation per step; with the compiled step (DDP inside the compiled loss, dynamo's
    eager backend) the same weights."""
    from tests.test_distributed import free_port
    ports = [free_port()]
    while len(ports) < 2:
        port = free_port()
        ports += [port] if port != ports[0] else []
    mp.spawn(_rank_main, args=(2, ports, str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        assert torch.load(tmp_path / "plain" / f"syncs_rank{rank}.pt") == [0] * STEPS
        plain, compiled = (torch.load(tmp_path / w / f"model_rank{rank}.pt") for w in ("plain", "eager"))
        assert all(torch.equal(plain[k], compiled[k]) for k in plain)


def test_cuda_backends_follow_training_tf32():
    from sde_diffusion.jobs.builder import configure_backends
    flags = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark)
    config = small_config()
    try:
        configure_backends(config, torch.device("cpu"))
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
                torch.backends.cudnn.benchmark) == flags
        for tf32 in (True, False):
            config.training.tf32 = tf32
            configure_backends(config, torch.device("cuda"))  # only sets flags: no GPU needed
            assert torch.backends.cuda.matmul.allow_tf32 is tf32 and torch.backends.cudnn.allow_tf32 is tf32
            assert torch.backends.cudnn.benchmark
    finally:
        (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
         torch.backends.cudnn.benchmark) = flags


# --------------------------------------------------------------------------------------------------
# Training data on the device
# --------------------------------------------------------------------------------------------------
def _splitmix64_reference(z: int) -> int:
    """splitmix64 in Python's unbounded integers, reduced mod 2⁶⁴ (the published algorithm)."""
    mask = (1 << 64) - 1
    z = (z + 0x9E3779B97F4A7C15) & mask
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    return z ^ (z >> 31)


def test_augmentation_noise_is_the_same_bits_on_every_device():
    """Flips and dequantization noise come from integer hashing (wrapping int64 arithmetic, the same on CPU and
    CUDA), so a batch built on the device equals the host's bit for bit; here: exact against Python integers."""
    from sde_diffusion.data.image_dataset import hashed_uniform, splitmix64
    inputs = [0, 1, 2**40 + 7, -1, -(2**63)]
    mask = (1 << 64) - 1
    assert [v & mask for v in splitmix64(torch.tensor(inputs)).tolist()] == \
        [_splitmix64_reference(v & mask) for v in inputs]
    u = hashed_uniform(1234, 1, (4, 1000))
    key = _splitmix64_reference((1234 * 0x100000001B3 + 1) & mask)
    expected = [(_splitmix64_reference((key + k) & mask) >> 40) / 2**24 for k in (0, 1, 999, 3999)]
    assert u.flatten()[[0, 1, 999, 3999]].tolist() == expected
    assert 0 <= u.min() and u.max() < 1 and abs(u.mean() - 0.5) < 0.01 and abs(u.std() - 12**-0.5) < 0.01
    assert not torch.equal(u, hashed_uniform(1234, 2, (4, 1000)))  # streams differ


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("labels", [False, True])
def test_image_batches_on_the_device_are_the_hosts_and_cost_no_synchronisation(tmp_path, monkeypatch, labels):
    from configs.vp_digits import get_config as digits_config
    config = digits_config()
    t = config.training
    t.batch_size, t.n_iters, t.log_freq, t.eval_freq = 16, 3, 3, 10**6
    t.snapshot_freq = t.snapshot_freq_for_preemption = 3
    t.snapshot_sampling = False
    config.data.random_flip = config.data.uniform_dequantization = True
    config.model.nf, config.model.ch_mult, config.model.num_res_blocks, config.model.attn_resolutions = 32, (1,), 1, ()
    config.model.num_classes = 10 if labels else 0
    config.device, config.data.on_device = "cpu", True
    batches = {}
    take_step = train_job.take_step

    def counted(run, step):
        assert run.dataset.batches._perm.device == run.dataset.train.device
        with HostSyncCounter() as syncs:
            x = run.dataset.train_batch(with_labels=labels)
        batches[step] = x
        assert syncs.count == 0, syncs.events
        take_step(run, step)
    monkeypatch.setattr(train_job, "take_step", counted)
    run_lib.train(config, tmp_path)
    from sde_diffusion.data.datasets import get_dataset
    host = get_dataset(config)
    for step in range(1, 4):
        expected = host.train_batch(with_labels=labels)
        host.train_batch(with_labels=labels)  # the batch take_step drew after the recorded one
        if labels:
            assert torch.equal(batches[step][0], expected[0]) and torch.equal(batches[step][1], expected[1])
        else:
            assert torch.equal(batches[step], expected)


def test_data_on_device_setting_is_checked():
    from sde_diffusion.data.datasets import check_config
    from sde_diffusion.errors import ConfigError
    config = small_config()
    config.data.on_device = "yes"
    with pytest.raises(ConfigError, match="data.on_device"):
        check_config(config)


# --------------------------------------------------------------------------------------------------
# Samplers
# --------------------------------------------------------------------------------------------------
def _linear_score(x, t):
    return -x / (1 + t.reshape(-1, *([1] * (x.ndim - 1))))


@pytest.mark.parametrize("sde_name", ["vp", "ve"])
def test_fixed_grid_samplers_make_no_host_synchronisation_per_step(sde_name):
    """Syncs at 8 steps minus syncs at 4 (set-up reads, e.g. restart's choice of interval, cancel): 0 for every
    fixed-step built-in sampler; the adaptive ODE reads its error norm once per step attempt."""
    from sde_diffusion.sampling import SAMPLERS, auto_centre, sample
    from sde_diffusion.sdes import VESDE, VPSDE
    sde = VPSDE() if sde_name == "vp" else VESDE()
    variants = [(name, {}) for name, sampler in SAMPLERS.items() if not sampler.adaptive
                and sampler.fn.__module__.startswith("sde_diffusion.")]
    variants += [("pc", dict(predictor="reverse_diffusion", corrector="langevin")), ("ddim", dict(eta=1.0)),
                 ("edm_sde", dict(s_churn=10.0)), ("unipc", dict(order=3, variant="bh1")),
                 ("sde", dict(sde_method="milstein")), ("sde", dict(sde_method="srk"))]
    assert len(variants) == 19
    auto_centre(_linear_score, sde, (8, 3))  # the few-step grid's one-off probe, outside the counts
    per_step = {}
    for name, options in variants:
        counts = []
        for steps in (4, 8):
            with HostSyncCounter() as syncs:
                sample(_linear_score, sde, (8, 3), name, steps=steps, generator=torch.Generator().manual_seed(0),
                       **options)
            counts.append(syncs.count)
        per_step[name, str(options)] = (counts[1] - counts[0]) / 4
    assert per_step == {key: 0.0 for key in per_step}
    with HostSyncCounter() as syncs:
        _, nfe = sample(_linear_score, sde, (8, 3), "ode")
    assert syncs.count <= nfe / 6 + 8  # dopri5: 6 evaluations per attempt, one accept/reject read each


def test_a_callback_still_sees_every_step_and_a_progress_bar_reads_rarely():
    from sde_diffusion.sampling import sample
    from sde_diffusion.sdes import VPSDE
    seen = []
    sample(_linear_score, VPSDE(), (4, 2), "heun", steps=6, callback=lambda i, t, x: seen.append(i))
    assert seen == list(range(6))
    with HostSyncCounter() as syncs:
        sample(_linear_score, VPSDE(), (4, 2), "ddim", steps=200, progress=True)
    assert syncs.count < 20  # a read every PROGRESS_READ_SECONDS, not 3 per evaluation (600)
