"""What every job builds from a config: device, workdir, seeds, data, SDE, network, loss, EMA, sampler settings,
the names of its checkpoints, and the torchrun context it runs in.

Checkpoint names: workdir/checkpoints/checkpoint_<k>.pth (numbered, k = step // training.snapshot_freq) and
workdir/checkpoints-meta/checkpoint_<step>.pth (preemption); both are read by `checkpoints.step_checkpoints`.
"""
from __future__ import annotations

import logging
import os
import random
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Dict, Iterator, Optional, Tuple

import numpy as np
import torch
from torch import nn

from .. import distributed, latent, losses, parameterization, phema, sampling, workdir_lock
from ..checkpoints import load_model_weights, step_checkpoint, step_checkpoints
from ..data.datasets import get_dataset
from ..training.ema import ExponentialMovingAverage
from ..errors import CheckpointError, ConfigError, UsageError, WorkdirBusyError
from ..models import create_model, get_score_fn
from ..models.text_conditioning import dataset_captions
from ..sdes import SDE, sde_class, sde_from_config

log = logging.getLogger("sde_diffusion")

NUMBERED = "checkpoints"  # workdir/NUMBERED/checkpoint_<k>.pth
PREEMPTION = "checkpoints-meta"  # workdir/PREEMPTION/checkpoint_<step>.pth


def resolve_device(name: str) -> torch.device:
    """config.device ('auto', 'cpu', 'cuda', 'cuda:N') as a device; an error when CUDA is asked for but absent."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"config.device={name!r} but no CUDA device is visible: use config.device='cpu' or 'auto'")
    return device


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global random streams."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def round_seed(*keys: int) -> int:
    """A seed for one unit of work (e.g. checkpoint k, sampling round r) that depends only on its keys."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1)[0])


def prepare_workdir(workdir) -> Path:
    """workdir, created and checked to be writable (an error naming it otherwise)."""
    workdir = Path(workdir)
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        probe = workdir / f".write_test_{os.getpid()}"  # one per process: torchrun ranks share it
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise UsageError(f"workdir {workdir} is not writable ({err}): pass another --workdir") from err
    return workdir


@contextmanager
def training_lock(workdir, mode: str, world: distributed.World = distributed.World()) -> Iterator[None]:
    """Hold workdir/.lock (sde_diffusion/workdir_lock.py) for a training job: rank 0 takes it, and every rank stops
    with the same WorkdirBusyError when another live run holds it."""
    path, error = None, None
    if world.is_main:
        prepare_workdir(workdir)
        try:
            path = workdir_lock.acquire(workdir, mode)
        except WorkdirBusyError as err:
            error = str(err)
    if world.distributed:
        error = distributed.broadcast(error, world)
    if error:
        raise WorkdirBusyError(error)
    try:
        yield
    finally:
        if path is not None:
            workdir_lock.release(path)


@contextmanager
def distributed_job(config) -> Iterator[Tuple[distributed.World, torch.device]]:
    """(world, device) of this process: torchrun's ranks when launched by it, else one process."""
    world = distributed.world_from_env()
    device = distributed.setup(world, resolve_device(config.device))
    try:
        yield world, device
    finally:
        distributed.teardown(world)


def configure_backends(config, device: torch.device) -> None:
    """On CUDA, for training: TF32 tensor-core matmuls and convolutions when training.tf32 (products keep 10
    mantissa bits, accumulation stays fp32), and cudnn.benchmark (fixed shapes: the fastest convolution algorithms
    are picked once). Nothing changes on other devices."""
    if device.type != "cuda":
        return
    torch.backends.cuda.matmul.allow_tf32 = bool(config.training.tf32)
    torch.backends.cudnn.allow_tf32 = bool(config.training.tf32)
    torch.backends.cudnn.benchmark = True


def require_one_process(mode: str) -> None:
    """sample and train_classifier are not distributed: under torchrun every rank would repeat the whole job."""
    world = distributed.world_from_env()
    if world.distributed:
        raise UsageError(f"--mode {mode} runs in one process, but WORLD_SIZE={world.world_size}: run it with plain "
                           "python (under torchrun only train, eval and compare share the work among ranks)")


# --------------------------------------------------------------------------------------------------
def build(config, device, rank: int = 0, world_size: int = 1, workdir=None):
    """(sde, dataset, model): the SDE, the data (this rank's shard of it) and a fresh network on device.

    Latent models (model.latent): the dataset is a `latent.LatentDataset` over the first stage (from
    model.autoencoder.pretrained, else workdir/autoencoder/), whose latent scale is still unknown (measure it or
    restore it from a checkpoint), and the network is built for the latents' shape."""
    sde = sde_from_config(config)
    dataset = get_dataset(config, rank, world_size)
    if config.model.latent:
        dataset = latent.LatentDataset(dataset, latent.load_first_stage(config, workdir, device), device)
    return sde, dataset, build_network(config, device)


def build_network(config, device) -> nn.Module:
    """A fresh network of config.model on device (for a latent model, the one its latents need)."""
    model = create_model(latent.network_config(config)).to(device)
    if config.training.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


# data.on_device='auto' puts the uint8 training set on a CUDA device when it takes under this fraction of the free
# memory (CIFAR-10's 150 MB against tens of GB: always).
DEVICE_DATA_FRACTION = 0.25


def place_training_data(config, dataset, device: torch.device) -> None:
    """Move an image dataset's training split to `device` as data.on_device says (module constant for 'auto');
    toy datasets draw on the host and stay there."""
    setting = config.data.on_device
    if not hasattr(dataset, "to_device") or setting is False:
        return
    if setting == "auto":
        if device.type != "cuda":
            return
        free, _ = torch.cuda.mem_get_info(device)
        size = dataset.train.numel() * dataset.train.element_size()
        if size >= DEVICE_DATA_FRACTION * free:
            log.info("training data (%.0f MB) stays on the host: over %.0f%% of the device's free memory",
                     size / 2**20, 100 * DEVICE_DATA_FRACTION)
            return
    dataset.to_device(device)
    log.info("training data on %s: batches, flips and dequantization built there", device)


def make_ema(config, model: nn.Module) -> ExponentialMovingAverage:
    """The EMA of the model's weights at rate model.ema_rate."""
    return ExponentialMovingAverage(model.parameters(), config.model.ema_rate)


def make_loss_fn(config, sde: SDE) -> Callable:
    """The training objective of config.training (losses.Objective)."""
    t = config.training
    return losses.get_loss_fn(sde, continuous=t.continuous, reduce_mean=t.reduce_mean,
                              likelihood_weighting=t.likelihood_weighting, eps=t.eps,
                              importance_sampling=t.importance_sampling, loss=t.loss,
                              sigma_data=config.model.sigma_data, time_sampling=t.time_sampling,
                              weighting=t.weighting)


def labelled_score_fn(config, sde: SDE, model: nn.Module) -> Callable:
    """labels ↦ the network's score function given them: class labels (batch,), caption token ids (batch, L), or
    None (unconditional)."""
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


def condition_batches(config, model: nn.Module, dataset, batch_size: int, device, split: str = "test"):
    """(x, condition) batches of a split on device, the condition as the network takes it: class labels of a
    class-conditional network, a caption's token ids per image for a text-conditioned one (captions of labels
    drawn by a generator seeded with config.seed, so every call gives the same), None for an unconditional one."""
    captions = dataset_captions(config, model, dataset)
    if captions is None:
        yield from labelled_batches(dataset, batch_size, config.model.num_classes > 0, device, split)
        return
    tokens = captions.split_tokens(dataset, split, torch.Generator(device=device).manual_seed(config.seed))
    for start, x in zip(range(0, len(tokens), batch_size), dataset.eval_batches(batch_size, split)):
        yield x.to(device), tokens[start:start + len(x)].to(device)


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


def sampler_settings(config, sde: SDE) -> Dict:
    """Keyword arguments for `sampling.sample` from config.sampling (sampling.settings_from_config)."""
    return sampling.settings_from_config(config, sde)


# --------------------------------------------------------------------------------------------------
def recorded_parts(config) -> Dict[str, str]:
    """The registered names a run trains with (config key → spec), recorded in its checkpoints."""
    t = config.training
    sampling_spec, weighting_spec = losses.legacy_parts(continuous=t.continuous,
                                                        likelihood_weighting=t.likelihood_weighting,
                                                        importance_sampling=t.importance_sampling, loss=t.loss,
                                                        sigma_data=config.model.sigma_data)
    return {"training.sde": t.sde, "training.time_sampling": t.time_sampling or sampling_spec,
            "training.weighting": t.weighting or weighting_spec,
            "model.parameterization": parameterization.resolved_names(config)[0]}


REGISTRIES = {"training.sde": lambda name: sde_class(name) is not None,
              "training.time_sampling": lambda name: name in losses.TIME_SAMPLINGS,
              "training.weighting": lambda name: name in losses.WEIGHTINGS,
              "model.parameterization": lambda name: name in parameterization.PARAMETERIZATIONS}


def check_recorded_parts(checkpoint: Dict, path, expected: Optional[Dict[str, str]] = None) -> None:
    """The names a checkpoint was trained with are registered here (a user's part: the config must import the module
    that defines it) and its SDE is the config's; CheckpointError naming the key otherwise."""
    recorded = checkpoint.get("parts") or {}
    for key, spec in recorded.items():
        name = str(spec).partition(":")[0]
        if key in REGISTRIES and not REGISTRIES[key](name):
            raise CheckpointError(f"{path} was trained with {key}={spec!r}, which is not registered in this process: "
                                  f"the config must import the module that defines {name!r} (as it did in training)")
    if expected and "training.sde" in recorded and sde_class(recorded["training.sde"]) is not \
            sde_class(expected["training.sde"]):
        raise CheckpointError(f"{path} was trained with training.sde={recorded['training.sde']!r}, and the config "
                              f"says {expected['training.sde']!r}: set training.sde as in training")
    key = "model.parameterization"
    if expected and key in recorded and key in expected and recorded[key] != expected[key]:
        raise CheckpointError(f"{path}'s network predicts {recorded[key]!r} and the config reads it as "
                              f"{expected[key]!r}: set {key}={recorded[key]!r} (a distilled student: its config, "
                              "with the distill.method it was distilled by)")


def load_weights(path, model: nn.Module, dataset, config=None) -> Dict:
    """A numbered checkpoint's EMA weights into model (eval and sampling jobs); a latent dataset takes the latent
    scale the checkpoint recorded. With `config`, the names it was trained with are checked
    (`check_recorded_parts`). Returns the checkpoint."""
    # read on the host: the weights are copied into the model, and the rest (optimizer, post-hoc EMA profiles)
    # never needs the device
    checkpoint = load_model_weights(path, model, use_ema=True, map_location="cpu")
    if config is not None:
        check_recorded_parts(checkpoint, path, recorded_parts(config))
        if config.eval.ema_sigma_rel > 0:
            checkpoint["ema_reconstruction"] = load_post_hoc_ema(path, model, config.eval.ema_sigma_rel,
                                                                 int(checkpoint["step"]))
    if isinstance(dataset, latent.LatentDataset):
        try:
            dataset.restore(checkpoint)
        except CheckpointError as err:
            raise CheckpointError(f"{path}: {err}") from err
    return checkpoint


def load_post_hoc_ema(path, model: nn.Module, sigma_rel: float, step: int,
                      plan: Optional[phema.Plan] = None) -> Dict:
    """Replace model's weights by the post-hoc EMA of `sigma_rel` at `step`, reconstructed from the snapshots of
    the workdir that holds the checkpoint `path` (eval.ema_sigma_rel), or by `plan` (phema.plan, solved for it);
    returns its provenance for reports."""
    workdir = Path(path).parent.parent
    rec = (plan or phema.plan(workdir, [sigma_rel], step)).build(sigma_rel)
    phema.load_into(model, rec.state_dict, f"the post-hoc EMA reconstruction from {workdir / phema.FOLDER}")
    log.info("post-hoc EMA σ_rel = %g at step %d from %d snapshot file(s) of %s (density error %.2g%s)", sigma_rel,
             rec.step, len(rec.snapshots), workdir / phema.FOLDER, rec.profile_error,
             f"; skipped corrupt {', '.join(rec.skipped)}" if rec.skipped else "")
    return rec.report()


def check_post_hoc_ema(config, workdir) -> None:
    """Before any compute: eval.ema_sigma_rel > 0 needs snapshots in workdir/post_hoc_ema/ (CheckpointError naming
    the keys otherwise)."""
    if config.eval.ema_sigma_rel > 0:
        phema.require_snapshots(workdir, "eval.ema_sigma_rel")


def weights_suffix(config) -> str:
    """'' for the regular EMA, '_sigma_rel<σ>' for a post-hoc EMA (eval.ema_sigma_rel): the end of the names of
    what a job writes from those weights, sample rounds included (so rounds of other weights are never reused)."""
    sigma_rel = config.eval.ema_sigma_rel
    return f"_sigma_rel{sigma_rel:g}" if sigma_rel else ""


def numbered_checkpoint(workdir: Path, k: int) -> Path:
    """workdir/checkpoints/checkpoint_<k>.pth."""
    return step_checkpoint(Path(workdir) / NUMBERED, k)


def newest_checkpoint(workdir: Path) -> Tuple[int, Path]:
    """(k, path) of the newest numbered checkpoint; an error when there is none."""
    found = step_checkpoints(workdir / NUMBERED)
    if not found:
        raise CheckpointError(f"no checkpoints in {workdir / NUMBERED}: train first (--mode train)")
    return found[0]


def chosen_checkpoint(workdir: Path, k: Optional[int], key: str) -> Tuple[int, Path]:
    """(k, path) of numbered checkpoint k (the config key `key` names it), or of the newest when k is None."""
    if k is None:
        return newest_checkpoint(workdir)
    path = numbered_checkpoint(workdir, k)
    if not path.exists():
        raise CheckpointError(f"{key}={k}: {path} does not exist")
    return k, path
