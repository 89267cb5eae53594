"""The jobs behind `main.py --mode`: train, distill, eval, sample, compare, ema_sweep, train_classifier, tune_grid,
train_autoencoder (sde_diffusion/jobs/, one module each over one builder). Orchestration only: the math lives in
sde_diffusion/.

Workdir layout:
    config.json                     the resolved config of the last run
    checkpoints/checkpoint_<k>.pth  numbered checkpoints, k = step // training.snapshot_freq
    checkpoints-meta/checkpoint_<step>.pth  the newest training.keep_meta_checkpoints preemption checkpoints;
                                    `train` resumes from the newest that verifies (each .pth has a .sha256 sidecar)
    train_log.jsonl                 loss, gradient norm and learning rate at every training.log_freq step
    samples/iter_<step>.png         sample grids (EMA weights) taken at numbered checkpoints
    tensorboard/                    scalars (loss, learning rate, gradient norm, eval loss)
    <eval_folder>/report_<k>.json   evaluation reports, with samples_<k>.png and samples_<k>.npz
    post_hoc_ema/phema_<step>.pth   post-hoc EMA snapshots (training.post_hoc_ema), each with a .sha256 sidecar
    ema_sweep/ema_sweep.md          `ema_sweep`: metrics against σ_rel of the post-hoc EMA (.csv, .json, .png)
    grids/<method>_nfe<n>.json      time grids of `tune_grid` (name one in sampling.grid)
    classifier/checkpoint.pth       the noise-conditional classifier of `train_classifier` (classifier guidance),
                                    with classifier/report.json (its test accuracy at several t)
    autoencoder/autoencoder.pth     the first stage of a latent model (`train_autoencoder`), with
                                    autoencoder/report.json (PSNR, rFID) and reconstructions.png
"""
from __future__ import annotations

import functools
from typing import Callable, Dict

from sde_diffusion import losses, sampling  # noqa: F401  (the modules the jobs call, for tests that patch them)
from sde_diffusion.checkpoints import TrainState
from sde_diffusion.jobs import compare as compare_job
from sde_diffusion.jobs import distill as distill_job
from sde_diffusion.jobs import ema_sweep as ema_sweep_job
from sde_diffusion.jobs import evaluate as evaluate_job
from sde_diffusion.jobs import sample as sample_job
from sde_diffusion.jobs import train as train_job
from sde_diffusion.jobs import train_autoencoder as train_autoencoder_job
from sde_diffusion.jobs import train_classifier as train_classifier_job
from sde_diffusion.jobs import tune_grid as tune_grid_job
from sde_diffusion.jobs.builder import numbered_checkpoint, resolve_device, sampler_settings  # noqa: F401
from sde_diffusion.jobs.modes import MODES, run_mode
from sde_diffusion.jobs.generation import Conditioning, load_classifier, make_conditioning  # noqa: F401


def train(config, workdir) -> TrainState:
    """Train, resuming from the newest good checkpoint in workdir/checkpoints-meta; returns the final state."""
    return train_job.run(config, workdir)


def distill(config, workdir) -> TrainState:
    """Distill a few-step student of distill.teacher_workdir's model into workdir (resuming); the final state."""
    return distill_job.run(config, workdir)


def evaluate(config, workdir, eval_folder: str = "eval") -> None:
    """Evaluate the numbered checkpoints eval.begin_ckpt..eval.end_ckpt into workdir/<eval_folder>."""
    evaluate_job.run(config, workdir, eval_folder)


def sample(config, workdir, eval_folder: str = "samples") -> None:
    """Samples (or inpainted / colourized images) from the newest numbered checkpoint into workdir/<eval_folder>."""
    sample_job.run(config, workdir, eval_folder)


def compare(config, workdir, eval_folder: str = "compare") -> None:
    """The samplers of config.compare.samplers on one checkpoint, tabulated in workdir/<eval_folder>."""
    compare_job.run(config, workdir, eval_folder)


def ema_sweep(config, workdir, eval_folder: str = "ema_sweep") -> None:
    """The post-hoc EMA of each σ_rel in eval.ema_sweep on one checkpoint, tabulated and plotted in
    workdir/<eval_folder>."""
    ema_sweep_job.run(config, workdir, eval_folder)


def train_classifier(config, workdir) -> None:
    """The noise-conditional classifier for classifier guidance, into workdir/classifier/."""
    train_classifier_job.run(config, workdir)


def tune_grid(config, workdir):
    """A time grid tuned for one sampler and NFE on one checkpoint, written as JSON (workdir/grids/ by default)."""
    return tune_grid_job.run(config, workdir)


def train_autoencoder(config, workdir):
    """The first-stage autoencoder of a latent model (model.autoencoder), into workdir/autoencoder/; its report."""
    return train_autoencoder_job.run(config, workdir)


# --mode NAME → job(config, workdir, eval_folder or None); eval, sample and compare have their own default folder
JOBS: Dict[str, Callable] = {mode: functools.partial(run_mode, mode) for mode in MODES}
