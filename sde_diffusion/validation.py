"""Start-up validation of a whole config, before any compute is spent.

Each section is checked by the code that owns it: data.* by `datasets` (and `image_folder`), the SDE keys by
`sdes`, what the network predicts by `parameterization`, the loss keys by `losses`, model.* by the model registry and each network's `check_config`, sampling.* by `sampling`,
`controllable` (inpainting, colorization) and `guidance` (class labels, guidance scales), the training step's
keys by `train_step`, the post-hoc EMA keys by `phema`, eval.bpd_* by `likelihood`, classifier.* by `classifier`, compare.* by `evaluation.compare`.
This module calls them in turn and owns what none of them can see alone: the rules that join two sections (a
network for the data's kind, classes of the model against those of the data), and the keys only the jobs read
(loop lengths, frequencies, eval range).
"""
from __future__ import annotations

from evaluation import compare

from . import (classifier, controllable, distillation, guidance, latent, likelihood, losses, models, parameterization,
               phema, sampling, sdes)
from .data import datasets
from .inverse import config as inverse_config
from .training import step as train_step
from .models import text_conditioning
from .errors import ConfigError, positive

JOB_KEYS = ("training.batch_size", "training.n_iters", "training.log_freq", "training.eval_freq",
            "training.snapshot_freq", "training.snapshot_freq_for_preemption", "training.keep_meta_checkpoints",
            "eval.batch_size", "eval.num_samples", "eval.wait_timeout", "sampling.num_grid_samples")  # each > 0


def validate_config(config) -> None:
    """Check values and combinations of every section; raises ConfigError naming the key and the fix."""
    datasets.check_config(config)
    sdes.check_config(config)
    parameterization.check_config(config)
    losses.check_config(config)
    latent.check_config(config)
    text_conditioning.check_config(config)
    check_network_fits_data(config)
    check_latent_network(config)
    sampling.check_config(config)
    distillation.check_config(config)
    check_sampler_fits_model(config)
    train_step.check_config(config)
    phema.check_config(config)
    likelihood.check_config(config)
    check_bpd_data(config)
    check_conditional_task_data(config)
    controllable.check_config(config)
    inverse_config.check_config(config)
    check_classes(config)
    classifier.check_config(config)
    compare.check_config(config)
    check_job_keys(config)


def check_sampler_fits_model(config) -> None:
    """A sampler made for one parameterization (the consistency sampler) runs only on such a model."""
    sampler = sampling.SAMPLERS.get(sampling.resolved_method(config))
    if sampler is None or sampler.parameterization is None or config.training.sde not in sdes.SDES:
        return
    name = parameterization.resolved_names(config)[0]
    if name != sampler.parameterization:
        raise ConfigError(f"sampling.method={sampler.name!r} needs a {sampler.parameterization!r} model, and this one "
                          f"is {name!r} (model.parameterization={config.model.parameterization!r}): choose another "
                          f"sampler, or distill a student with --mode distill --config.distill.method=consistency")


def check_network_fits_data(config) -> None:
    """A vector network for vector data, an image network for images; channels_last only for convolutions."""
    name, dataset = config.model.name, config.data.dataset
    if name not in models.MODELS:
        return  # models.check_config names the unknown network
    vector_networks = sorted(n for n in models.MODELS if models.takes_vectors(n))
    if datasets.is_image_data(config) and models.takes_vectors(name):
        raise ConfigError(f"model.name={name!r} is for vector data, not the image dataset {dataset!r}")
    if not datasets.is_image_data(config) and not models.takes_vectors(name):
        raise ConfigError(f"data.dataset={dataset!r} is vector data: use "
                          + " or ".join(f"model.name={n!r}" for n in vector_networks))
    if config.training.channels_last and not models.is_convolutional(name):
        raise ConfigError(f"training.channels_last=True applies to convolutional networks; model.name={name!r} has "
                          "none: set training.channels_last=False")


def check_latent_network(config) -> None:
    """model.* against the data the network sees: the images, or a latent model's latents."""
    if not config.model.latent:
        models.check_config(config)
        return
    network = latent.network_config(config)
    try:
        models.check_config(network)
    except ConfigError as err:
        d = network.data
        raise ConfigError(f"{err} (model.latent=True: the network sees {d.num_channels}×{d.image_size}×"
                          f"{d.image_size} latents)") from err


def check_bpd_data(config) -> None:
    """eval.enable_bpd measures discrete images."""
    if config.eval.enable_bpd and not datasets.is_image_data(config):
        raise ConfigError(f"eval.enable_bpd=True measures bits/dim of K-level discrete images, but data.dataset="
                          f"{config.data.dataset!r} is continuous vector data: set eval.enable_bpd=False (eval "
                          "reports its exact NLL where the data has a density)")


def check_conditional_task_data(config) -> None:
    """Inpainting and colorization need images."""
    if controllable.conditional_task(config) and not datasets.is_image_data(config):
        raise ConfigError(f"inpainting and colorization need image data, not data.dataset={config.data.dataset!r}")


def check_classes(config) -> None:
    """The classes of the model, of label dropout, of sampling.class_labels and of a classifier against the data's
    (guidance.check_config checks the keys among themselves)."""
    t, s, m, d = config.training, config.sampling, config.model, config.data
    classes = datasets.declared_classes(config)  # None: folder labels, counted when the images are loaded
    if classes is None:
        has_labels = f"has labels (data.labels={d.labels!r})"
    else:
        has_labels = f"has {classes} classes" if classes else "has no class labels"
    if m.num_classes < 0 or (m.num_classes and classes is not None and m.num_classes != classes):
        raise ConfigError(f"model.num_classes={m.num_classes}, but data.dataset={d.dataset!r} {has_labels}: set "
                          f"model.num_classes={classes or 0} (or 0 for an unconditional model)")
    if t.label_dropout and not m.num_classes:
        raise ConfigError("training.label_dropout > 0 drops class labels, but the model is unconditional: set "
                          f"model.num_classes={classes or 'N (the number of classes)'} or training.label_dropout=0")
    guidance.check_config(config)
    if s.classifier_scale and classes == 0:
        raise ConfigError(f"sampling.classifier_scale > 0 needs a classifier, but data.dataset={d.dataset!r} "
                          f"{has_labels} to train one on")
    labels = tuple(s.class_labels)
    if classes is not None and labels != (guidance.PER_CLASS,) and not all(0 <= y < classes for y in labels):
        raise ConfigError(f"sampling.class_labels={labels!r}: data.dataset={d.dataset!r} {has_labels}, so "
                          f"labels must lie in 0..{classes - 1}")


def check_job_keys(config) -> None:
    """The keys only the jobs read: loop lengths, frequencies, batch sizes and sample counts, the eval range."""
    for key in JOB_KEYS:
        section, name = key.split(".")
        positive(key, config[section][name])
    e = config.eval
    if e.begin_ckpt > e.end_ckpt:
        raise ConfigError(f"eval.begin_ckpt={e.begin_ckpt} is after eval.end_ckpt={e.end_ckpt}")
