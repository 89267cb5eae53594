"""Training, evaluation and sampling jobs. Orchestration only: the math lives in sde_diffusion/.

Workdir layout:
    config.json                     the resolved config of the last run
    checkpoints/checkpoint_<k>.pth  numbered checkpoints, k = step // training.snapshot_freq
    checkpoints-meta/checkpoint_<step>.pth  the newest training.keep_meta_checkpoints preemption checkpoints;
                                    `train` resumes from the newest that verifies (each .pth has a .sha256 sidecar)
    train_log.jsonl                 loss, gradient norm and learning rate at every training.log_freq step
    samples/iter_<step>.png         sample grids (EMA weights) taken at numbered checkpoints
    tensorboard/                    scalars (loss, learning rate, gradient norm, eval loss)
    <eval_folder>/report_<k>.json   evaluation reports, with samples_<k>.png and samples_<k>.npz
    classifier/checkpoint.pth       the noise-conditional classifier of `train_classifier` (classifier guidance),
                                    with classifier/report.json (its test accuracy at several t)
"""
from __future__ import annotations

import json
import logging
import os
import random
import time
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

import numpy as np
import torch
from tqdm.auto import tqdm

from torch import nn

from sde_diffusion import classifier as noisy_classifier
from sde_diffusion import controllable, distributed, guidance, likelihood, losses, parameterization, sampling
from sde_diffusion.checkpoints import (CheckpointError, TrainState, atomic_write, load_checkpoint, load_model_weights,
                                       newest_good_checkpoint, prune_step_checkpoints, remove_stale_temporaries,
                                       rng_state, save_checkpoint, save_npz, step_checkpoint, step_checkpoints,
                                       write_json)
from sde_diffusion.config import sample_label_rows, validate_config
from sde_diffusion.datasets import dataset_classes, get_dataset
from sde_diffusion.ema import ExponentialMovingAverage
from sde_diffusion.models import create_model, get_score_fn
from sde_diffusion.sdes import sde_from_config
from sde_diffusion.train_step import NonFiniteError, TrainStep, nonfinite_parameters
from sde_diffusion.visualize import (TrajectoryRecorder, forward_noising_strip, save_image_grid, save_scatter,
                                     save_strip, unit_scale)

log = logging.getLogger("sde_diffusion")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"config.device={name!r} but no CUDA device is visible: use config.device='cpu' or 'auto'")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _prepare_workdir(workdir) -> Path:
    workdir = Path(workdir)
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        probe = workdir / f".write_test_{os.getpid()}"  # one per process: torchrun ranks share the folder
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise RuntimeError(f"workdir {workdir} is not writable ({err}): pass another --workdir") from err
    return workdir


def numbered_checkpoint(workdir: Path, k: int) -> Path:
    return workdir / "checkpoints" / f"checkpoint_{k}.pth"


def sampler_settings(config, sde) -> Dict:
    """Keyword arguments for `sampling.sample` from config.sampling (only the options the method takes)."""
    s = config.sampling
    settings = dict(method=s.method, steps=s.steps if s.steps is not None else sde.N, eps=s.eps,
                    denoise=s.noise_removal)
    settings.update({
        "pc": dict(predictor=s.predictor, corrector=s.corrector, snr=s.snr, n_steps=s.n_steps_each,
                   probability_flow=s.probability_flow),
        "ode": dict(rtol=s.rtol, atol=s.atol, backend=s.ode_backend),
        "sde": dict(sde_method=s.sde_method),
        "ddim": dict(eta=s.eta),
        "dpm_solver": dict(order=s.order),
        "heun": dict(rho=s.rho),
    }.get(s.method, {}))
    if s.grid is not None and s.method != "ode":
        settings["grid"] = s.grid
    return settings


class Conditioning:
    """What samples are conditioned on (config.sampling): class labels, classifier-free guidance with
    sampling.guidance_scale, classifier guidance with sampling.classifier_scale.

    Sample i gets label `label_sequence[i mod len]`: by default the labels of the test split in order, so that a
    conditional model's samples follow the data's class frequencies (eval, snapshots); `--mode sample` with
    sampling.class_labels passes its own sequence (one block per grid row). Unconditional (no class-conditional
    model, no classifier guidance): every score function is the network's plain score.
    """

    def __init__(self, config, sde, model, dataset, *, classifier: Optional[torch.nn.Module] = None,
                 label_sequence: Optional[torch.Tensor] = None):
        s = config.sampling
        self.sde, self.model, self.continuous = sde, model, config.training.continuous
        self.parameterization = parameterization.from_config(config, sde)
        self.classifier = classifier
        self.guidance_scale = s.guidance_scale
        self.classifier_scale = s.classifier_scale if classifier is not None else 0.0
        self.labelled = config.model.num_classes > 0 or self.classifier_scale > 0
        self.from_test_split = label_sequence is None
        self.label_sequence = None
        if self.labelled:
            self.label_sequence = dataset.test_labels.long() if label_sequence is None else label_sequence.long()

    def labels(self, start: int, n: int) -> Optional[torch.Tensor]:
        """Labels (n,) of samples start..start+n−1, or None when unconditional."""
        if not self.labelled:
            return None
        return self.label_sequence[(start + torch.arange(n)) % len(self.label_sequence)]

    def score_fn(self, start: int, n: int, device):
        """The (guided) score function for samples start..start+n−1."""
        labels = self.labels(start, n)
        if labels is not None:
            labels = labels.to(device)
        grad = None
        if self.classifier_scale:
            grad = noisy_classifier.grad_log_p_y_fn(self.sde, self.classifier, labels)
        return guidance.guided_score_fn(self.sde, self.model, labels, guidance_scale=self.guidance_scale,
                                        continuous=self.continuous, grad_log_p_y=grad,
                                        classifier_scale=self.classifier_scale,
                                        parameterization=self.parameterization)

    def describe(self) -> Dict:
        """For reports and round fingerprints: {} when unconditional."""
        if not self.labelled:
            return {}
        return {"labels": "test split, in order" if self.from_test_split else "sampling.class_labels",
                "guidance_scale": self.guidance_scale, "classifier_scale": self.classifier_scale}


def load_classifier(config, workdir: Path, device, num_classes: Optional[int] = None) -> torch.nn.Module:
    """The classifier written by `train_classifier` (eval mode); a clear error when it is missing or mismatched.
    num_classes: datasets.dataset_classes(config, dataset); None: a built-in dataset's count."""
    if num_classes is None:
        num_classes = dataset_classes(config)
    path = noisy_classifier.checkpoint_path(workdir)
    if not path.exists():
        raise CheckpointError(f"sampling.classifier_scale={config.sampling.classifier_scale} needs the classifier "
                              f"{path}, which does not exist: run --mode train_classifier first (same --workdir)")
    model = noisy_classifier.create_classifier(config, num_classes).to(device)
    try:
        model.load_state_dict(load_checkpoint(path, device)["model"], strict=True)
    except (RuntimeError, KeyError) as err:
        raise CheckpointError(f"{path} does not fit the classifier built from config.classifier: {err}") from err
    return model.eval()


def make_conditioning(config, sde, model, dataset, workdir: Path, device, *,
                      label_sequence: Optional[torch.Tensor] = None) -> Conditioning:
    """Conditioning from config.sampling, loading the classifier when sampling.classifier_scale > 0."""
    classifier = (load_classifier(config, workdir, device, dataset_classes(config, dataset))
                  if config.sampling.classifier_scale > 0 else None)
    return Conditioning(config, sde, model, dataset, classifier=classifier, label_sequence=label_sequence)


def draw_samples(config, sde, model, dataset, num: int, device, seed: int,
                 conditioning: Optional[Conditioning] = None) -> Tuple[torch.Tensor, int]:
    """num samples in [0, 1] (images) or data space (toy), generated in rounds of eval.batch_size."""
    model.eval()
    conditioning = conditioning or Conditioning(config, sde, model, dataset)
    generator = torch.Generator(device=device).manual_seed(seed)
    settings, chunks, nfe = sampler_settings(config, sde), [], 0
    for start in range(0, num, config.eval.batch_size):
        n = min(config.eval.batch_size, num - start)
        x, nfe = sampling.sample(conditioning.score_fn(start, n, device), sde, (n, *dataset.shape),
                                 generator=generator, device=device, progress=True, **settings)
        chunks.append(dataset.from_model(x).cpu())
    return torch.cat(chunks), nfe


def save_samples_picture(samples: torch.Tensor, dataset, path: Path, title: str = "") -> None:
    if dataset.is_image:
        save_image_grid(samples, path)
    else:
        save_scatter(samples, path, reference=dataset.test, title=title)


def _build(config, device):
    sde = sde_from_config(config)
    dataset = get_dataset(config)
    model = create_model(config).to(device)
    if config.training.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return sde, dataset, model


# --------------------------------------------------------------------------------------------------
def train(config, workdir) -> TrainState:
    """Train, resuming from the newest good checkpoint in workdir/checkpoints-meta; returns the final state. Under
    torchrun, every process runs this with its own rank (see sde_diffusion/distributed.py); rank 0 writes all files."""
    validate_config(config)
    world = distributed.world_from_env()
    device = distributed.setup(world, resolve_device(config.device))
    try:
        return _train(config, Path(workdir), world, device)
    finally:
        distributed.teardown(world)


def _train(config, workdir: Path, world: distributed.World, device: torch.device) -> TrainState:
    t = config.training
    if world.is_main:
        _prepare_workdir(workdir)
    seed_everything(config.seed)  # the same initial weights on every rank
    sde = sde_from_config(config)
    dataset = get_dataset(config, *world.shard)
    model = create_model(config).to(device)
    if t.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = losses.make_optimizer(model.parameters(), config.optim)
    ema = ExponentialMovingAverage(model.parameters(), config.model.ema_rate)
    noise = torch.Generator(device=device).manual_seed(config.seed)  # the loss's t and z: identical on all ranks
    loss_fn = losses.get_loss_fn(sde, continuous=t.continuous, reduce_mean=t.reduce_mean,
                                 likelihood_weighting=t.likelihood_weighting, eps=t.eps,
                                 importance_sampling=t.importance_sampling, loss=t.loss,
                                 sigma_data=config.model.sigma_data)
    network = model
    if world.distributed:
        network = nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    if t.compile:
        network = torch.compile(network, backend=t.compile_backend)
    conditional = config.model.num_classes > 0
    score_fn_for = labelled_score_fn(config, sde, network)  # labels ↦ the training score function
    step_fn = TrainStep(model, optimizer, ema, loss_fn, config.optim, precision=t.precision, device=device,
                        on_nonfinite=t.on_nonfinite, noise=noise, world=world)
    state = TrainState(model, optimizer, ema, dataset, noise, step_fn.scaler)
    seed_everything(round_seed(config.seed, world.rank))  # per-rank streams (dropout); a resume restores them
    _resume(state, workdir, world, device)
    train_log = TrainLog(workdir / "train_log.jsonl", state.step) if world.is_main else None
    if world.is_main:
        write_json(workdir / "config.json", config.to_dict())
    log.info("training %s (%d parameters) on %s, %s, %s, step %d → %d, %d process(es) × batch %d",
             config.model.name, sum(p.numel() for p in model.parameters()), config.data.dataset, type(sde).__name__,
             t.precision, state.step, t.n_iters, world.world_size, t.batch_size)

    writer = None
    if world.is_main:
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(str(workdir / "tensorboard"))
    eval_batch = next(labelled_batches(dataset, t.batch_size, conditional, device))
    start = time.time()
    for step in tqdm(range(state.step + 1, t.n_iters + 1), desc="train", initial=state.step, total=t.n_iters,
                     disable=not world.is_main):
        network.train()
        labels = None
        if conditional:  # labels of the batch, each replaced by the null label with probability label_dropout
            x, labels = (v.to(device) for v in dataset.train_batch(with_labels=True))
            labels = guidance.drop_labels(labels, t.label_dropout, config.model.num_classes)
        else:
            x = dataset.train_batch().to(device)
        if t.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        try:
            result = step_fn(x, step, score_fn_for(labels))
        except NonFiniteError as err:
            raise _stopped_on_nonfinite(err, step, x, model, workdir, world) from None
        state.step = step
        if not result.applied:
            state.skipped_steps += 1
            log.warning("step %d skipped (%s); %d skipped so far", step, result.reason, state.skipped_steps)

        if step % t.log_freq == 0 and world.is_main:
            log.info("step %d  loss %.5f  grad_norm %.3f  lr %.2e  (%.1f s)", step, result.loss, result.grad_norm,
                     result.lr, time.time() - start)
            train_log.append(step=step, loss=result.loss, grad_norm=result.grad_norm, lr=result.lr,
                             skipped_steps=state.skipped_steps)
            writer.add_scalar("training_loss", result.loss, step)
            writer.add_scalar("grad_norm", result.grad_norm, step)
            writer.add_scalar("learning_rate", result.lr, step)
        if step % t.eval_freq == 0 and world.is_main:
            with ema.average_parameters(model):
                eval_loss = evaluation_loss(loss_fn, labelled_score_fn(config, sde, model), model, [eval_batch],
                                            seed=config.seed)
            log.info("step %d  eval_loss %.5f", step, eval_loss)
            writer.add_scalar("eval_loss", eval_loss, step)
        numbered = step % t.snapshot_freq == 0 or step == t.n_iters
        if numbered or step % t.snapshot_freq_for_preemption == 0:
            checkpoint = state.state_dict(distributed.gather(rng_state(), world))
            if world.is_main:
                save_checkpoint(step_checkpoint(workdir / "checkpoints-meta", step), checkpoint)
                prune_step_checkpoints(workdir / "checkpoints-meta", t.keep_meta_checkpoints)
                if numbered:
                    k = step // t.snapshot_freq
                    save_checkpoint(numbered_checkpoint(workdir, k), checkpoint)
                    log.info("saved %s", numbered_checkpoint(workdir, k))
            if numbered and t.snapshot_sampling and world.is_main:
                _snapshot_samples(config, sde, model, ema, dataset, device, workdir, step, writer)
    if writer is not None:
        writer.close()
    log.info("training finished at step %d in %.1f s (%d steps skipped)", state.step, time.time() - start,
             state.skipped_steps)
    return state


def _resume(state: TrainState, workdir: Path, world: distributed.World, device) -> None:
    """Load the newest preemption checkpoint that verifies (rank 0 picks it, every rank loads it)."""
    found = None
    if world.is_main:
        for folder in (workdir / "checkpoints-meta", workdir / "checkpoints"):
            for stale in remove_stale_temporaries(folder):
                log.warning("removed %s, left by a run killed while writing it", stale)
        found = newest_good_checkpoint(workdir / "checkpoints-meta", map_location=device)
    path = distributed.broadcast(None if found is None else str(found[0]), world)
    if path is None:
        return
    checkpoint = found[1] if world.is_main else load_checkpoint(path, device)
    state.load_state_dict(checkpoint, path, rank=world.rank)
    log.info("resuming from %s at step %d", path, state.step)


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


def _stopped_on_nonfinite(err: NonFiniteError, step: int, x: torch.Tensor, model, workdir: Path,
                          world: distributed.World) -> NonFiniteError:
    """Save the batch and the names of parameters with non-finite gradients; the error to raise instead."""
    path = workdir / "diagnostics" / f"nonfinite_step_{step}.pt"
    if world.is_main:
        diagnostics = {"step": step, "error": str(err), "batch": x.detach().cpu(),
                       "nonfinite_gradients": nonfinite_parameters(model)}
        atomic_write(path, lambda p: torch.save(diagnostics, p))
    good = step_checkpoints(workdir / "checkpoints-meta")
    last = f"the last good checkpoint, {good[0][1]} (step {good[0][0]}), is untouched" if good else "no checkpoint yet"
    return NonFiniteError(f"training stopped: {err}. Diagnostics (batch, parameters with non-finite gradients) are in "
                          f"{path}; {last}. Lower optim.lr, keep optim.grad_clip ≥ 0, try training.precision='fp32', "
                          "or set training.on_nonfinite='skip' to skip such steps.")


def _snapshot_samples(config, sde, model, ema, dataset, device, workdir, step, writer) -> None:
    # labels of the test split with classifier-free guidance; no classifier guidance (it may not be trained yet)
    conditioning = Conditioning(config, sde, model, dataset)
    with ema.average_parameters(model):
        samples, nfe = draw_samples(config, sde, model, dataset, config.sampling.num_grid_samples, device,
                                    config.seed, conditioning)
    path = workdir / "samples" / f"iter_{step}.png"
    save_samples_picture(samples, dataset, path, title=f"step {step}, NFE {nfe}")
    if dataset.is_image:
        writer.add_images("samples", samples[:64], step)
    log.info("sample grid %s (NFE %d)", path, nfe)


def labelled_score_fn(config, sde, model) -> Callable:
    """labels (batch,) or None ↦ the network's score function given those labels (None: unconditional)."""
    param = parameterization.from_config(config, sde)
    plain = get_score_fn(sde, model, continuous=config.training.continuous, parameterization=param)

    def score_fn_for(labels: Optional[torch.Tensor]):
        if labels is None:
            return plain
        return get_score_fn(sde, model, continuous=config.training.continuous, labels=labels, parameterization=param)

    return score_fn_for


def labelled_batches(dataset, batch_size: int, with_labels: bool, device, split: str = "test"):
    """(x, labels) test batches on device; labels None unless with_labels."""
    for batch in dataset.eval_batches(batch_size, split, with_labels=with_labels):
        x, labels = batch if with_labels else (batch, None)
        yield x.to(device), None if labels is None else labels.to(device)


@torch.no_grad()
def evaluation_loss(loss_fn, score_fn_for: Callable, model, batches, seed: int) -> float:
    """Mean loss over (x, labels) batches in eval mode with its own seeded random stream (comparable across steps);
    score_fn_for(labels) gives the score function (labels None: unconditional; class-conditional models are
    evaluated with the true labels)."""
    was_training = model.training
    model.eval()
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    total, count = 0.0, 0
    for x, labels in batches:
        total += loss_fn(score_fn_for(labels), x, generator=generator).item() * len(x)
        count += len(x)
    model.train(was_training)
    return total / count


# --------------------------------------------------------------------------------------------------
def _checkpoint_range(config, workdir: Path):
    e = config.eval
    paths = [(k, numbered_checkpoint(workdir, k)) for k in range(e.begin_ckpt, e.end_ckpt + 1)]
    missing = [str(p) for _, p in paths if not p.exists()]
    if missing:
        found = sorted(p.name for p in (workdir / "checkpoints").glob("checkpoint_*.pth"))
        raise CheckpointError(f"eval.begin_ckpt..eval.end_ckpt = {e.begin_ckpt}..{e.end_ckpt} asks for {missing}, "
                              f"which do not exist; {workdir / 'checkpoints'} holds {found or 'nothing'}. Train "
                              "first or set eval.begin_ckpt/eval.end_ckpt.")
    return paths


def round_seed(*keys: int) -> int:
    """A seed for one unit of work (e.g. checkpoint k, sampling round r) that depends only on its keys."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1)[0])


def evaluate(config, workdir, eval_folder: str = "eval") -> None:
    """For each checkpoint eval.begin_ckpt..eval.end_ckpt, with EMA weights: eval loss, samples in resumable
    rounds, FID/KID/IS (images) or sliced W₂/NLL (toy data), a sample grid and report_<k>.json. Under torchrun the
    ranks share the sampling rounds; rank 0 alone computes the rest and writes the files (the same report as one
    process: every round is seeded by its index)."""
    validate_config(config)
    world = distributed.world_from_env()
    device = distributed.setup(world, resolve_device(config.device))
    try:
        _evaluate(config, Path(workdir), eval_folder, world, device)
    finally:
        distributed.teardown(world)


def _evaluate(config, workdir: Path, eval_folder: str, world: distributed.World, device: torch.device) -> None:
    seed_everything(config.seed)
    sde, dataset, model = _build(config, device)
    out = _prepare_workdir(workdir / eval_folder)
    checkpoints = _checkpoint_range(config, workdir)
    e, t = config.eval, config.training
    image_metrics = None
    if e.enable_sampling and e.enable_fid and dataset.is_image:  # fail on missing weights before any sampling
        image_metrics = _image_metrics(config, dataset, device, world)
    loss_fn = losses.get_loss_fn(sde, continuous=t.continuous, reduce_mean=t.reduce_mean,
                                 likelihood_weighting=t.likelihood_weighting, eps=t.eps,
                                 importance_sampling=t.importance_sampling, loss=t.loss,
                                 sigma_data=config.model.sigma_data)
    conditional = config.model.num_classes > 0
    conditioning = make_conditioning(config, sde, model, dataset, workdir, device)  # loads a classifier first
    if dataset.is_image and world.is_main:
        _save_forward_noising_picture(config, sde, dataset, out / "forward_noising.png")
    for k, path in checkpoints:
        start = time.time()
        ckpt = load_model_weights(path, model, use_ema=True, map_location=device)
        model.eval()
        if not world.is_main:  # the other ranks only help with the sampling rounds
            if e.enable_sampling:
                _evaluate_samples(config, sde, conditioning, dataset, device, out, k, path, image_metrics, world)
            continue
        score_fn_for = labelled_score_fn(config, sde, model)
        report = {"checkpoint": path.name, "step": int(ckpt["step"]), "config": config.to_dict()}
        if conditioning.describe():
            report["conditioning"] = conditioning.describe()
        if e.enable_loss:  # class-conditional models: with the test split's labels
            batches = labelled_batches(dataset, e.batch_size, conditional, device)
            report["eval_loss"] = evaluation_loss(loss_fn, score_fn_for, model, batches, seed=config.seed)
        if e.enable_bpd:  # class-conditional models: the null label's unconditional score, so bpd of p(x)
            generator = torch.Generator(device=device).manual_seed(round_seed(config.seed, k))
            report.update(likelihood.evaluate_bpd(score_fn_for(None), sde, dataset, config, device, generator))
        if e.enable_sampling:
            report.update(_evaluate_samples(config, sde, conditioning, dataset, device, out, k, path,
                                            image_metrics, world))
        if world.distributed:
            report["world_size"] = world.world_size
        if e.enable_sampling and dataset.is_image:
            _save_trajectory_picture(config, sde, conditioning, dataset, device, out / f"trajectory_{k}.png", k)
        report["eval_seconds"] = time.time() - start
        write_json(out / f"report_{k}.json", report)
        log.info("wrote %s: %s", out / f"report_{k}.json",
                 {key: v for key, v in report.items() if key not in ("config", "sampler", "inception_weights")})


def _image_metrics(config, dataset, device, world: distributed.World):
    """Inception and the reference statistics; rank 0 first, so that the others read its cached statistics."""
    from evaluation.sample_quality import ImageMetrics
    metrics = ImageMetrics(config, dataset, device) if world.is_main else None
    distributed.barrier(world)
    return metrics if metrics is not None else ImageMetrics(config, dataset, device)


def _evaluate_samples(config, sde, conditioning, dataset, device, out: Path, k: int, path: Path,
                      image_metrics, world: distributed.World) -> Optional[Dict]:
    """Generate eval.num_samples in rounds (each saved, so a killed eval resumes), score them, save a grid.
    Under torchrun every rank makes its share of the rounds; rank 0 gets the report, the others None."""
    settings = sampler_settings(config, sde)
    samples, report = _generate_and_score(config, sde, conditioning, dataset, device, out / f"rounds_{k}",
                                          (config.seed, k), settings, config.eval.num_samples, image_metrics,
                                          {"checkpoint": path.name}, world)
    if not world.is_main:
        return None
    save_npz(out / f"samples_{k}.npz", samples=samples.numpy())
    save_samples_picture(samples[:config.sampling.num_grid_samples], dataset, out / f"samples_{k}.png",
                         title=f"{path.name}, NFE {report['nfe']}")
    return report


PICTURE_IMAGES = 8  # rows of the forward-noising and trajectory strips
TRAJECTORY_SEED_KEY = 2**31 - 1  # seeds the trajectory picture apart from every sampling round
NOISING_TIMES = (0.0, 0.02, 0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1.0)  # columns of the forward-noising strip


def _save_forward_noising_picture(config, sde, dataset, path: Path) -> None:
    """Test images diffused to x_t for several t (one row per image), rescaled to unit variance."""
    x0 = next(dataset.eval_batches(PICTURE_IMAGES))
    times = [max(t, sde.default_eps) for t in NOISING_TIMES]
    columns = forward_noising_strip(sde, x0, times, generator=torch.Generator().manual_seed(config.seed))
    save_strip([dataset.from_model(c) for c in columns], path)


def _save_trajectory_picture(config, sde, conditioning, dataset, device, path: Path, k: int) -> None:
    """The sampler's states from the prior to the data for a few samples (rescaled to unit variance)."""
    recorder = TrajectoryRecorder()
    generator = torch.Generator(device=device).manual_seed(round_seed(config.seed, k, TRAJECTORY_SEED_KEY))
    x, _ = sampling.sample(conditioning.score_fn(0, PICTURE_IMAGES, device), sde, (PICTURE_IMAGES, *dataset.shape),
                           generator=generator, device=device, callback=recorder, **sampler_settings(config, sde))
    columns = [dataset.from_model(unit_scale(sde, state, t)) for t, state in recorder.pick(8)]
    save_strip(columns + [dataset.from_model(x).cpu()], path)


def _generate_and_score(config, sde, conditioning, dataset, device, folder: Path, seed_keys, settings: Dict,
                        num: int, image_metrics, fingerprint: Dict,
                        world: distributed.World = distributed.World()) -> Tuple[torch.Tensor, Dict]:
    """num samples with `settings` and `conditioning` (labels, guidance), in resumable rounds of eval.batch_size
    seeded by (*seed_keys, round), and their metrics: FID/KID/IS for images (when image_metrics is given), sliced
    W₂ / NLL for toy data. Under torchrun the ranks share the rounds and only rank 0 gets results ((None, None)
    on the others)."""
    from evaluation.inception import to_uint8_rgb
    from evaluation.rounds import run_in_rounds
    from evaluation.sample_quality import toy_scores

    def make_round(r: int, n: int) -> Dict[str, np.ndarray]:
        round_start = time.time()
        generator = torch.Generator(device=device).manual_seed(round_seed(*seed_keys, r))
        score_fn = conditioning.score_fn(r * config.eval.batch_size, n, device)
        x, nfe = sampling.sample(score_fn, sde, (n, *dataset.shape), generator=generator, device=device,
                                 progress=True, **settings)
        samples = dataset.from_model(x).cpu()
        result = {"samples": samples.numpy(), "nfe": np.full(n, nfe),
                  "sample_seconds": np.full(n, (time.time() - round_start) / n)}  # per sample, so sums add up
        if image_metrics is not None:
            pixels = to_uint8_rgb(samples)
            result["features"] = image_metrics.network.features(pixels)
            probabilities = image_metrics.network.probabilities(pixels)
            if probabilities is not None:
                result["probabilities"] = probabilities
        return result

    fingerprint = {**fingerprint, "sampler": settings, "seed_keys": list(seed_keys),
                   "round_size": config.eval.batch_size,
                   "inception_sha256": image_metrics.weights.sha256 if image_metrics else None}
    if conditioning.describe():
        fingerprint["conditioning"] = conditioning.describe()
    rounds = run_in_rounds(folder, num, config.eval.batch_size, make_round, fingerprint, desc=folder.name,
                           rank=world.rank, world_size=world.world_size, barrier=lambda: distributed.barrier(world))
    if rounds is None:
        return None, None
    samples = torch.from_numpy(rounds["samples"])
    report = {"sampler": settings, "nfe": int(rounds["nfe"][0]), "num_samples": len(samples),
              "sampling_seconds": float(rounds["sample_seconds"].sum())}
    if image_metrics is not None:
        report.update(image_metrics.describe())
        report.update(image_metrics.scores(rounds["features"], rounds.get("probabilities")))
    elif not dataset.is_image:
        report.update(toy_scores(samples, dataset))
    return samples, report


def compare(config, workdir, eval_folder: str = "compare") -> None:
    """Every entry of config.compare.samplers on one checkpoint (EMA weights): a table (Markdown + CSV) with NFE,
    wall time and FID/KID (images) or sliced W₂/NLL (toy data), a plot of each metric against NFE, a grid each."""
    from evaluation.compare import parse_entry

    validate_config(config)
    entries = [parse_entry(text) for text in config.compare.samplers]
    for entry in entries:
        if entry.method not in sampling.SAMPLERS:
            raise ValueError(f"compare.samplers entry {entry.label}@{entry.steps}: unknown method {entry.method!r}; "
                             f"available: {sorted(sampling.SAMPLERS)}")
    world = distributed.world_from_env()  # under torchrun the ranks share each sampler's rounds
    device = distributed.setup(world, resolve_device(config.device))
    try:
        _compare(config, Path(workdir), eval_folder, entries, world, device)
    finally:
        distributed.teardown(world)


def _compare(config, workdir: Path, eval_folder: str, entries, world: distributed.World, device) -> None:
    from evaluation.compare import plot_metrics, write_table

    seed_everything(config.seed)
    sde, dataset, model = _build(config, device)
    k, path = _compare_checkpoint(config, workdir)
    out = _prepare_workdir(workdir / eval_folder)
    image_metrics = None
    if dataset.is_image and config.eval.enable_fid:
        image_metrics = _image_metrics(config, dataset, device, world)
    load_model_weights(path, model, use_ema=True, map_location=device)
    model.eval()
    conditioning = make_conditioning(config, sde, model, dataset, workdir, device)
    num = config.compare.num_samples or config.eval.num_samples
    s = config.sampling
    metrics = (["fid", "kid"] if image_metrics else []) if dataset.is_image else ["sliced_w2"]
    if not dataset.is_image and dataset.log_prob is not None:
        metrics.append("nll")
    rows = []
    for entry in entries:
        settings = dict(method=entry.method, steps=entry.steps, eps=s.eps, denoise=s.noise_removal, **entry.options)
        samples, report = _generate_and_score(config, sde, conditioning, dataset, device, out / f"rounds_{entry.slug}",
                                              (config.seed, k), settings, num, image_metrics,
                                              {"checkpoint": path.name}, world)
        if not world.is_main:
            continue
        save_samples_picture(samples[:config.sampling.num_grid_samples], dataset, out / f"samples_{entry.slug}.png",
                             title=f"{entry.label}, NFE {report['nfe']}")
        rows.append({"sampler": entry.label, "steps": entry.steps, "nfe": report["nfe"],
                     "seconds": report["sampling_seconds"], **{m: report.get(m) for m in metrics}})
        log.info("%s@%d: %s", entry.label, entry.steps, rows[-1])
    if not world.is_main:
        return
    columns = ["sampler", "steps", "nfe", "seconds", *metrics]
    write_table(rows, columns, out)
    if metrics:
        plot_metrics(rows, metrics, out / "compare.png",
                     title=f"{config.data.dataset}, {path.name}, {num} samples per sampler")
    write_json(out / "compare.json", {"checkpoint": path.name, "num_samples": num, "rows": rows})
    log.info("wrote %s (.md, .csv, .png)", out / "compare")


def _newest_checkpoint(workdir: Path) -> Tuple[int, Path]:
    found = sorted((workdir / "checkpoints").glob("checkpoint_*.pth"), key=lambda p: int(p.stem.split("_")[1]))
    if not found:
        raise CheckpointError(f"no checkpoints in {workdir / 'checkpoints'}: train first (--mode train)")
    return int(found[-1].stem.split("_")[1]), found[-1]


def _compare_checkpoint(config, workdir: Path) -> Tuple[int, Path]:
    if config.compare.checkpoint is None:
        return _newest_checkpoint(workdir)
    path = numbered_checkpoint(workdir, config.compare.checkpoint)
    if not path.exists():
        raise CheckpointError(f"compare.checkpoint={config.compare.checkpoint}: {path} does not exist")
    return config.compare.checkpoint, path


def _require_one_process(mode: str) -> None:
    """sample and train_classifier are not distributed: under torchrun every rank would repeat the whole job."""
    world = distributed.world_from_env()
    if world.distributed:
        raise RuntimeError(f"--mode {mode} runs in one process, but WORLD_SIZE={world.world_size}: run it with plain "
                           "python (under torchrun only train, eval and compare share the work among ranks)")


def sample(config, workdir, eval_folder: str = "samples") -> None:
    """Draw eval.num_samples with config.sampling from the newest numbered checkpoint: PNG grid and .npz.

    With sampling.class_labels (e.g. (3, 5) or ("per_class",)) the samples are split evenly over those labels and
    the grid has one row per label; guidance follows sampling.guidance_scale and sampling.classifier_scale.
    """
    validate_config(config)
    _require_one_process("sample")
    workdir = Path(workdir)
    device = resolve_device(config.device)
    seed_everything(config.seed)
    sde, dataset, model = _build(config, device)
    _, path = _newest_checkpoint(workdir)
    rows = sample_label_rows(config, dataset_classes(config, dataset))
    num, label_sequence = config.eval.num_samples, None
    if rows:  # each label's samples side by side, one grid row per label
        per_row = max(1, num // len(rows))
        num, label_sequence = per_row * len(rows), torch.tensor(rows).repeat_interleave(per_row)
    conditioning = make_conditioning(config, sde, model, dataset, workdir, device, label_sequence=label_sequence)
    load_model_weights(path, model, use_ema=True, map_location=device)
    if config.sampling.inpaint_mask is not None or config.sampling.colorize:
        sample_conditional(config, sde, model, dataset, device, path, _prepare_workdir(workdir / eval_folder))
        return
    samples, nfe = draw_samples(config, sde, model, dataset, num, device, config.seed, conditioning)
    out = _prepare_workdir(workdir / eval_folder)
    stem = f"{path.stem}_{config.sampling.method}_nfe{nfe}" + _conditioning_suffix(config, rows)
    save_npz(out / f"{stem}.npz", samples=samples.numpy(),
             **({"labels": conditioning.labels(0, num).numpy()} if conditioning.labelled else {}))
    title = f"{path.name}, {config.sampling.method}, NFE {nfe}"
    if rows and dataset.is_image:
        save_image_grid(samples, out / f"{stem}.png", nrow=num // len(rows))
    else:
        save_samples_picture(samples[:config.sampling.num_grid_samples], dataset, out / f"{stem}.png", title=title)
    log.info("wrote %s.png and .npz (%d samples, NFE %d%s)", out / stem, len(samples), nfe,
             f", rows = labels {list(rows)}" if rows else "")


MASKED_LEVELS = (0.35, 0.65)  # unknown pixels in the picture's "input" column: a checkerboard of these grey levels


def conditioning_inputs(config, dataset) -> Tuple[torch.Tensor, torch.Tensor]:
    """(originals, mask): images in [0, 1] whose known part is kept, (n, C, H, W), and the known-pixel mask
    (1, C, H, W), all True for colorization (where the known part is the grey level)."""
    s = config.sampling
    if s.inpaint_image is not None:
        originals = controllable.load_image(s.inpaint_image, dataset.shape).expand(config.eval.num_samples,
                                                                                   *dataset.shape)
    else:
        originals = dataset.to_float(dataset.test[:config.eval.num_samples])
        if len(originals) < config.eval.num_samples:
            log.info("eval.num_samples=%d but the test split has %d images: using those",
                     config.eval.num_samples, len(originals))
    if s.colorize:
        return originals, torch.ones((1, *dataset.shape), dtype=torch.bool)
    return originals, controllable.load_mask(s.inpaint_mask, dataset.shape)


def conditioning_constraint(config, sde, dataset, originals: torch.Tensor, mask: torch.Tensor):
    """The constraint for model-space images `originals` (in [0, 1]): colorization of their grey level, or
    inpainting of their pixels where mask is True."""
    s, x = config.sampling, dataset.to_model(originals)
    if s.colorize:
        return controllable.colorization(sde, controllable.to_grey(x), method=s.conditioning_method,
                                         resample=s.resample)
    return controllable.inpainting(sde, x, mask, method=s.conditioning_method, resample=s.resample)


def conditioning_picture_inputs(config, originals: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """What the sampler was given, viewable in [0, 1]: the grey images, or the known pixels with a checkerboard
    (MASKED_LEVELS) where pixels are unknown."""
    if config.sampling.colorize:
        return controllable.to_grey(originals).expand_as(originals)
    rows, cols = torch.meshgrid(torch.arange(originals.shape[-2]), torch.arange(originals.shape[-1]), indexing="ij")
    dark, light = MASKED_LEVELS
    checker = torch.where((rows + cols) % 2 == 0, dark, light).to(originals)
    return torch.where(mask, originals, checker.expand_as(originals))


def sample_conditional(config, sde, model, dataset, device, path: Path, out: Path) -> None:
    """Inpaint or colourize (config.sampling.inpaint_mask / colorize) in rounds of eval.batch_size; writes a PNG
    whose rows show input, sample and original side by side, and an .npz with all three (and the inpainting mask)."""
    s = config.sampling
    model.eval()
    score_fn = get_score_fn(sde, model, continuous=config.training.continuous,
                            parameterization=parameterization.from_config(config, sde))
    generator = torch.Generator(device=device).manual_seed(config.seed)
    settings = sampler_settings(config, sde)
    originals, mask = conditioning_inputs(config, dataset)
    chunks, nfe = [], 0
    for start in range(0, len(originals), config.eval.batch_size):
        batch = originals[start:start + config.eval.batch_size].to(device)
        constraint = conditioning_constraint(config, sde, dataset, batch, mask.to(device))
        x, nfe = sampling.sample(score_fn, sde, tuple(batch.shape), generator=generator, device=device,
                                 progress=True, constraint=constraint, **settings)
        chunks.append(dataset.from_model(x).cpu())
    samples = torch.cat(chunks)
    inputs = conditioning_picture_inputs(config, originals, mask)
    task = "colorize" if s.colorize else "inpaint"
    stem = f"{path.stem}_{task}_{s.conditioning_method}_{s.method}_nfe{nfe}"
    arrays = dict(samples=samples.numpy(), inputs=inputs.numpy(), originals=originals.numpy())
    save_npz(out / f"{stem}.npz", **arrays, **({} if s.colorize else {"mask": mask.numpy()}))
    rows = s.num_grid_samples
    save_strip([inputs[:rows], samples[:rows].clamp(0, 1), originals[:rows]], out / f"{stem}.png")
    log.info("wrote %s.png (input | sample | original) and .npz (%d samples, NFE %d)", out / stem, len(samples), nfe)


def _conditioning_suffix(config, rows) -> str:
    """File-name part for conditional sampling: which labels and which guidance ('' when unconditional)."""
    s = config.sampling
    parts = []
    if rows:
        parts.append("per_class" if tuple(s.class_labels) == ("per_class",) else
                     "labels" + "-".join(str(y) for y in rows))
    if config.model.num_classes > 0:
        parts.append(f"w{s.guidance_scale:g}")
    if s.classifier_scale > 0:
        parts.append(f"cls{s.classifier_scale:g}")
    return "".join(f"_{p}" for p in parts)


# --------------------------------------------------------------------------------------------------
CLASSIFIER_REPORT_TIMES = (0.01, 0.1, 0.25, 0.5, 0.75, 1.0)  # times of the classifier's test accuracy


def train_classifier(config, workdir) -> None:
    """Train the noise-conditional classifier p_t(y | x_t) for classifier guidance (config.classifier) on
    training batches diffused to t ~ U(training.eps, T); writes workdir/classifier/checkpoint.pth and report.json
    (test accuracy at CLASSIFIER_REPORT_TIMES)."""
    from sde_diffusion.datasets import NUM_CLASSES
    validate_config(config)
    _require_one_process("train_classifier")
    seed_everything(config.seed)
    sde, dataset = sde_from_config(config), get_dataset(config)
    num_classes = dataset_classes(config, dataset)
    if not num_classes:
        raise ValueError(f"data.dataset={config.data.dataset!r} has no class labels to train a classifier on; "
                         f"labelled datasets: {sorted(NUM_CLASSES)}, or folder data with data.labels")
    workdir = _prepare_workdir(workdir)
    device = resolve_device(config.device)
    c, t = config.classifier, config.training
    model = noisy_classifier.create_classifier(config, num_classes).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=c.lr)
    log.info("training a classifier (%d parameters) on %s, %s, %d steps", sum(p.numel() for p in model.parameters()),
             config.data.dataset, type(sde).__name__, c.n_iters)
    start = time.time()
    model.train()
    for step in tqdm(range(1, c.n_iters + 1), desc="train_classifier"):
        x, labels = (v.to(device) for v in dataset.train_batch(with_labels=True))
        loss = noisy_classifier.classifier_loss(model, sde, x, labels, eps=t.eps)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % c.log_freq == 0:
            log.info("step %d  cross-entropy %.4f  (%.1f s)", step, loss.item(), time.time() - start)
    model.eval()
    path = noisy_classifier.checkpoint_path(workdir)
    save_checkpoint(path, {"model": model.state_dict(), "step": c.n_iters})
    report = {"checkpoint": str(path), "steps": c.n_iters, "seconds": time.time() - start,
              "test_accuracy": classifier_accuracy(config, sde, model, dataset, device)}
    write_json(path.parent / "report.json", report)
    log.info("wrote %s; test accuracy by t: %s", path, report["test_accuracy"])


def classifier_accuracy(config, sde, model, dataset, device) -> Dict[str, float]:
    """Test-split accuracy of the classifier at each of CLASSIFIER_REPORT_TIMES (seeded noise)."""
    generator = torch.Generator(device=device).manual_seed(config.seed)
    result = {}
    for t in CLASSIFIER_REPORT_TIMES:
        correct = total = 0
        for x, labels in labelled_batches(dataset, config.eval.batch_size, True, device):
            correct += noisy_classifier.accuracy(model, sde, x, labels, t, generator) * len(x)
            total += len(x)
        result[f"{t:g}"] = correct / total
    return result
