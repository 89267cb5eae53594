"""--mode train: the score network, resumable from the newest good preemption checkpoint, on one process or on
every rank of torchrun (rank 0 writes all files).

Writes: config.json, checkpoints/checkpoint_<k>.pth (k = step // training.snapshot_freq),
checkpoints-meta/checkpoint_<step>.pth (with .sha256 sidecars; the newest training.keep_meta_checkpoints are
kept), train_log.jsonl, samples/iter_<step>.png, tensorboard/, diagnostics/ when a step is not finite, and
post_hoc_ema/phema_<step>.pth (with .sha256) when training.post_hoc_ema tracks profiles.
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn
from ..progress import Progress

from .. import distributed, guidance, phema
from ..training import optim
from ..checkpoints import (TrainState, atomic_write, load_checkpoint, newest_good_checkpoint, prune_step_checkpoints,
                           remove_stale_temporaries, rng_state, save_checkpoint, step_checkpoint, step_checkpoints,
                           write_json)
from ..training.ema import ExponentialMovingAverage
from ..errors import ConfigError, DatasetError
from ..models.score_fn import null_condition
from ..models.text_conditioning import dataset_captions
from ..training.step import StepFailure, StepReport, TrainStep
from ..validation import validate_config
from . import builder
from .generation import Conditioning, draw_samples, save_samples_picture

log = logging.getLogger("sde_diffusion")
WORKER_DIED = "DataLoader worker"  # how torch's DataLoader reports a worker process that exited or was killed


class TrainLog:
    """workdir/train_log.jsonl: one JSON line per logged step. A resumed run first drops the lines after the step it
    resumes from, so the file always reads as one uninterrupted run."""

    def __init__(self, path: Path, resumed_step: int):
        self.path = path
        if path.exists():
            kept = []
            for line in path.read_text().splitlines():
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:  # a line cut short by a kill
                    continue
                if entry["step"] <= resumed_step:
                    kept.append(line + "\n")
            atomic_write(path, lambda p: Path(p).write_text("".join(kept)))

    def append(self, **entry) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(entry) + "\n")
            f.flush()


@dataclass
class Training:
    """Everything one training run holds (rank 0 alone has train_log and writer)."""

    config: object
    workdir: Path
    world: distributed.World
    device: torch.device
    sde: object
    dataset: object
    model: nn.Module
    ema: ExponentialMovingAverage
    loss_fn: Callable
    score_fn_for: Callable  # labels ↦ the training score function (through DDP)
    step_fn: TrainStep
    state: TrainState
    train_log: Optional[TrainLog] = None
    writer: object = None
    eval_batch: tuple = ()
    captions: object = None  # a text-conditioned network's captions (text_conditioning.dataset_captions)
    student: object = None  # --mode distill's jobs.distill.Student: the teacher and the loss


def run(config, workdir) -> TrainState:
    """Train, resuming from the newest good checkpoint in workdir/checkpoints-meta; returns the final state. Under
    torchrun, every process runs this with its own rank (see sde_diffusion/distributed.py); rank 0 writes all files."""
    validate_config(config)
    if config.distill.method is not None:
        raise ConfigError(f"this config describes a distilled student (distill.method={config.distill.method!r}): run "
                          "--mode distill, or set distill.method=None to train a model of its own")
    with builder.distributed_job(config) as (world, device), builder.training_lock(workdir, "train", world):
        return train(setup(config, Path(workdir), world, device))


def training_network(model: nn.Module, config, world: distributed.World, device) -> nn.Module:
    """The module the loss calls: the model, wrapped for data parallelism (training.compile compiles the step that
    calls it, `TrainStep`)."""
    if world.distributed:
        return nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    return model


def setup(config, workdir: Path, world: distributed.World, device: torch.device,
          make_student: Optional[Callable] = None) -> Training:
    """Build the run (the same initial weights on every rank), resume it, open its log and tensorboard.
    make_student(sde) -> jobs.distill.Student (--mode distill): it initializes the network from the teacher's
    weights, supplies the loss and pairs the score functions with the teacher's."""
    t = config.training
    if world.is_main:
        builder.prepare_workdir(workdir)
    builder.configure_backends(config, device)
    builder.seed_everything(config.seed)
    sde, dataset, model = builder.build(config, device, *world.shard, workdir=workdir)
    builder.place_training_data(config, dataset, device)
    student = None if make_student is None else make_student(sde)
    if student is not None:
        student.initialize(model)  # before the optimizer and the EMA take the weights
    optimizer = optim.make_optimizer(model.parameters(), config.optim)
    ema = builder.make_ema(config, model)
    noise = torch.Generator(device=device).manual_seed(config.seed)  # the loss's t and z: identical on all ranks
    loss_fn = builder.make_loss_fn(config, sde) if student is None else student.loss_fn
    score_fn_for = builder.labelled_score_fn(config, sde, training_network(model, config, world, device))
    if student is not None:
        score_fn_for = student.paired(score_fn_for)
    step_fn = TrainStep(model, optimizer, ema, loss_fn, config.optim, precision=t.precision, device=device,
                        on_nonfinite=t.on_nonfinite, noise=noise, world=world,
                        compile_backend=t.compile_backend if t.compile else None)
    state = TrainState(model, optimizer, ema, dataset, noise, step_fn.scaler, parts=builder.recorded_parts(config),
                       student=student)
    if t.post_hoc_ema and world.is_main:  # rank 0 alone tracks and writes the profiles
        state.post_hoc_ema = phema.PowerEMA(model, t.post_hoc_ema)
    builder.seed_everything(builder.round_seed(config.seed, world.rank))  # per-rank streams; a resume restores them
    resume(state, workdir, world, device)
    if state.post_hoc_ema is not None:  # snapshots past the resumed step belong to a run that no longer exists
        for path in phema.discard_after(workdir, state.step):
            log.warning("removed the post-hoc EMA snapshot %s, written after step %d by an earlier run", path,
                        state.step)
    if config.model.latent and dataset.scale is None:  # a fresh run; a resumed one restored it
        dataset.measure_scale()
    run = Training(config, workdir, world, device, sde, dataset, model, ema, loss_fn, score_fn_for, step_fn, state,
                   student=student)
    if world.is_main:
        run.train_log = TrainLog(workdir / "train_log.jsonl", state.step)
        write_json(workdir / "config.json", config.to_dict())
    log.info("%s %s (%d parameters) on %s, %s, %s, step %d → %d, %d process(es) × batch %d",
             "training" if student is None else f"distilling ({student.method})", config.model.name, sum(p.numel() for p in model.parameters()), config.data.dataset, type(sde).__name__,
             t.precision, state.step, t.n_iters, world.world_size, t.batch_size)
    if world.is_main:
        from torch.utils.tensorboard import SummaryWriter
        run.writer = SummaryWriter(str(workdir / "tensorboard"))
    run.captions = dataset_captions(config, model, dataset)
    run.eval_batch = next(builder.condition_batches(config, model, dataset, t.batch_size, device))
    return run


def resume(state: TrainState, workdir: Path, world: distributed.World, device) -> None:
    """Load the newest preemption checkpoint that verifies (rank 0 picks it, every rank loads it)."""
    found = None
    if world.is_main:
        for folder in (workdir / builder.PREEMPTION, workdir / builder.NUMBERED, workdir / phema.FOLDER):
            for stale in remove_stale_temporaries(folder):
                log.warning("removed %s, left by a run killed while writing it", stale)
        found = newest_good_checkpoint(workdir / builder.PREEMPTION, map_location=device)
    path = distributed.broadcast(None if found is None else str(found[0]), world)
    if path is None:
        return
    checkpoint = found[1] if world.is_main else load_checkpoint(path, device)
    builder.check_recorded_parts(checkpoint, path, state.parts)
    state.load_state_dict(checkpoint, path, rank=world.rank)
    restarts = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if restarts and world.is_main:  # torchrun restarted the group after a rank failed (it logs which one)
        log.warning("torchrun restart %d of the group: %d ranks resume from %s at step %d", restarts,
                    world.world_size, path, state.step)
    log.info("resuming from %s at step %d", path, state.step)


def train(run: Training) -> TrainState:
    """Steps state.step + 1 .. training.n_iters: log, held-out loss, checkpoints and sample grids as configured.
    Steps read nothing back from the device; the statistics are read (and a failure under 'stop' raised) on log and
    checkpoint steps only."""
    t, state = run.config.training, run.state
    start = time.time()
    try:
        for step in Progress(range(state.step + 1, t.n_iters + 1), desc="train", initial=state.step,
                             total=t.n_iters, enabled=run.world.is_main):
            take_step(run, step)
            logs, saves = step % t.log_freq == 0, is_save_step(t, step)
            if logs or saves:
                report = read_back(run, step)
                if logs and run.world.is_main:
                    log_step(run, step, report, start)
            if step % t.eval_freq == 0 and run.world.is_main:
                log_eval_loss(run, step)
            save_step(run, step)
    except RuntimeError as err:
        if WORKER_DIED not in str(err):
            raise
        raise DatasetError(f"a data-loader worker died at step {state.step + 1}: {str(err).strip()} Most likely the "
                           f"out-of-memory killer ended it (each of the data.num_workers={run.config.data.num_workers} "
                           "workers holds its own copy of the data): lower data.num_workers or training.batch_size, "
                           "or set data.num_workers=0, then run the same command again to resume from the newest "
                           "checkpoint") from err
    if run.writer is not None:
        run.writer.close()
    log.info("training finished at step %d in %.1f s (%d steps skipped)", state.step, time.time() - start,
             state.skipped_steps)
    return state


def is_save_step(t, step: int) -> bool:
    return step % t.snapshot_freq == 0 or step == t.n_iters or step % t.snapshot_freq_for_preemption == 0


def take_step(run: Training, step: int) -> None:
    """One optimization step on the next training batch (labels dropped with probability training.label_dropout
    for class-conditional models; captions drawn for the labels and replaced by the empty caption with probability
    training.caption_dropout for text-conditioned ones); nothing is read back from the device."""
    config, device = run.config, run.device
    labels = None
    run.model.train()
    if run.student is not None:
        run.student.before_step(step, run.model, run.ema)
    if config.model.num_classes > 0:
        x, labels = (v.to(device) for v in run.dataset.train_batch(with_labels=True))
        labels = guidance.drop_labels(labels, config.training.label_dropout, config.model.num_classes)
    elif run.captions is not None:
        x, tokens = run.captions.train_batch(run.dataset, device)
        labels = guidance.drop_conditions(tokens, config.training.caption_dropout,
                                          null_condition(run.model, len(tokens), device))
    else:
        x = run.dataset.train_batch().to(device)
    if config.training.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    run.step_fn(x, step, run.score_fn_for(labels))
    if run.state.post_hoc_ema is not None:
        run.state.post_hoc_ema.update(run.model.parameters(), step)
    run.state.step = step


def read_back(run: Training, step: int) -> StepReport:
    """The step statistics since the last read (one host synchronisation); counts skipped steps; a failure under
    'stop' saves diagnostics and raises before anything is written."""
    try:
        report = run.step_fn.report()
    except StepFailure as err:
        raise stopped_on_nonfinite(err, run) from None
    if report.skipped:
        run.state.skipped_steps += report.skipped
        log.warning("%d of the steps up to %d skipped (non-finite loss or gradient, or fp16 overflow); %d skipped so "
                    "far", report.skipped, step, run.state.skipped_steps)
    return report


def log_step(run: Training, step: int, report: StepReport, start: float) -> None:
    """Loss and gradient norm: means over the applied steps since the previous read-back (log or checkpoint step)."""
    log.info("step %d  loss %.5f  grad_norm %.3f  lr %.2e  (%.1f s)", step, report.loss, report.grad_norm,
             report.lr, time.time() - start)
    run.train_log.append(step=step, loss=report.loss, grad_norm=report.grad_norm, lr=report.lr,
                         skipped_steps=run.state.skipped_steps)
    run.writer.add_scalar("training_loss", report.loss, step)
    run.writer.add_scalar("grad_norm", report.grad_norm, step)
    run.writer.add_scalar("learning_rate", report.lr, step)


def log_eval_loss(run: Training, step: int) -> None:
    """The loss of the EMA weights on one fixed test batch."""
    score_fn_for = builder.labelled_score_fn(run.config, run.sde, run.model)
    if run.student is not None:
        score_fn_for = run.student.paired(score_fn_for)
    with run.ema.average_parameters(run.model):
        eval_loss = builder.evaluation_loss(run.loss_fn, score_fn_for, run.model, [run.eval_batch],
                                            seed=run.config.seed)
    log.info("step %d  eval_loss %.5f", step, eval_loss)
    run.writer.add_scalar("eval_loss", eval_loss, step)


def save_step(run: Training, step: int) -> None:
    """Preemption and numbered checkpoints (every rank's RNG state gathered into them), then a sample grid."""
    t, world, workdir = run.config.training, run.world, run.workdir
    numbered = step % t.snapshot_freq == 0 or step == t.n_iters
    tracker = run.state.post_hoc_ema
    if tracker is not None and (step % t.post_hoc_ema_freq == 0 or numbered):  # numbered: eval reconstructs there
        phema.save_snapshot(workdir, tracker, step, t.post_hoc_ema_precision)
    if not is_save_step(t, step):
        return
    checkpoint = run.state.state_dict(distributed.gather(rng_state(), world))
    if world.is_main:
        save_checkpoint(step_checkpoint(workdir / builder.PREEMPTION, step), checkpoint)
        prune_step_checkpoints(workdir / builder.PREEMPTION, t.keep_meta_checkpoints)
        if numbered:
            path = builder.numbered_checkpoint(workdir, step // t.snapshot_freq)
            save_checkpoint(path, checkpoint)
            log.info("saved %s", path)
    if numbered and t.snapshot_sampling and world.is_main:
        snapshot_samples(run, step)


def stopped_on_nonfinite(err: StepFailure, run: Training) -> StepFailure:
    """Save the failed step's batch and the names of parameters with non-finite gradients; the error to raise
    instead (its step's update was masked, and no checkpoint was written since)."""
    path = run.workdir / "diagnostics" / f"nonfinite_step_{err.step}.pt"
    if run.world.is_main:
        diagnostics = {"step": err.step, "error": str(err), "batch": err.batch,
                       "nonfinite_gradients": err.nonfinite_gradients}
        atomic_write(path, lambda p: torch.save(diagnostics, p))
    good = step_checkpoints(run.workdir / builder.PREEMPTION)
    last = f"the last good checkpoint, {good[0][1]} (step {good[0][0]}), is untouched" if good else "no checkpoint yet"
    return StepFailure(f"training stopped: {err}. Diagnostics (batch, parameters with non-finite gradients) are in "
                       f"{path}; {last}. Lower optim.lr, keep optim.grad_clip ≥ 0, try training.precision='fp32', "
                       "or set training.on_nonfinite='skip' to skip such steps.", err.step, err.batch,
                       err.nonfinite_gradients)


def snapshot_samples(run: Training, step: int) -> None:
    """A grid of samples with the EMA weights: labels of the test split with classifier-free guidance, no
    classifier guidance (the classifier may not be trained yet)."""
    config, model, dataset = run.config, run.model, run.dataset
    conditioning = Conditioning(config, run.sde, model, dataset)
    with run.ema.average_parameters(model):
        samples, nfe = draw_samples(config, run.sde, model, dataset, config.sampling.num_grid_samples, run.device,
                                    config.seed, conditioning)
    path = run.workdir / "samples" / f"iter_{step}.png"
    save_samples_picture(samples, dataset, path, title=f"step {step}, NFE {nfe}")
    if dataset.is_image:
        run.writer.add_images("samples", samples[:64], step)
    log.info("sample grid %s (NFE %d)", path, nfe)
