"""Autoguidance's guide (Karras et al. 2024): a weaker model of the same task and conditioning, named by
sampling.guide_workdir and sampling.guide_checkpoint, read like distillation's teacher (sources.py) and checked to
fit the model it guides before any sampling.

* guide_checkpoint alone: an earlier numbered checkpoint of the job's own workdir, read with the job's config;
* guide_workdir: another run (e.g. a smaller network's), its config from its config.json; its checkpoint
  guide_checkpoint, or the newest.

The guide uses its checkpoint's regular EMA weights (eval.ema_sigma_rel applies to the main model only). It must
share the data, the SDE, the conditioning (classes, text encoder) and the parameterization of the model it guides;
its network may differ. A latent model's guide comes from the same workdir (its latents' scale).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from .. import guidance, parameterization
from ..checkpoints import load_model_weights
from ..errors import CheckpointError, ConfigError
from ..sdes import SDE, ScoreFn
from . import builder
from .sources import DATA_AND_SDE_KEYS, ModelSource, config_value, differing, overrides, read_source

log = logging.getLogger("sde_diffusion")

# What the guide must share with the model it guides besides the data and the SDE: its conditioning.
CONDITIONING_KEYS = ("model.num_classes", "model.text.encoder", "model.text.pretrained", "model.text.max_length",
                     "data.captions")


@dataclass
class Guide:
    """A loaded guide: where it comes from, and labels ↦ its score function (labels as the main model gets them)."""

    source: ModelSource
    score_for: Callable[[Optional[torch.Tensor]], ScoreFn]

    def describe(self) -> str:
        return str(self.source.checkpoint)


def find_guide(config, workdir) -> Optional[ModelSource]:
    """The guide config.sampling names (None when it names none), read and checked to fit config's model before any
    compute; ConfigError or CheckpointError naming the keys otherwise."""
    if not guidance.guide_set(config):
        return None
    s, workdir = config.sampling, Path(workdir)
    if s.guide_workdir is None or Path(s.guide_workdir).resolve() == workdir.resolve():
        _, path = builder.chosen_checkpoint(workdir, s.guide_checkpoint, "sampling.guide_checkpoint")
        return ModelSource(workdir, config, path)
    folder = Path(s.guide_workdir)
    source = read_source(folder, s.guide_checkpoint, "sampling.guide_workdir", "sampling.guide_checkpoint", "guide")
    check_guide_fits(config, source.config, folder)
    return source


def check_guide_fits(config, guide, folder: Path) -> None:
    """The guide in folder (config `guide`) shares the data, the SDE, the conditioning and the parameterization of
    config's model; a latent model's guide is of the same run."""
    differ = differing(config, guide, DATA_AND_SDE_KEYS + CONDITIONING_KEYS)
    mine, theirs = parameterization.resolved_names(config)[0], parameterization.resolved_names(guide)[0]
    if mine != theirs:
        differ.append("model.parameterization")
    if differ:
        shown = ", ".join(f"{key}={config_value(guide, key)!r} (guided model: {config_value(config, key)!r})"
                          for key in differ)
        raise ConfigError(f"the guide in {folder} does not fit the model it guides: {shown}. Autoguidance needs a "
                          "weaker model of the same data, SDE, conditioning and parameterization: point "
                          "sampling.guide_workdir at such a run, or this run's config at the guide's: "
                          f"{overrides(guide, differ)}")
    if config.model.latent:
        raise ConfigError(f"sampling.guide_workdir={str(folder)!r}: a latent model's guide must be a checkpoint of its "
                          "own run (the latents' scale is the run's): set sampling.guide_checkpoint alone")


def load_guide(config, workdir, sde: SDE, device) -> Optional[Guide]:
    """The guide config.sampling names, on device in eval mode (None when it names none)."""
    source = find_guide(config, workdir)
    if source is None:
        return None
    model = builder.build_network(source.config, device)
    checkpoint = load_model_weights(source.checkpoint, model, use_ema=True, map_location="cpu")
    try:
        builder.check_recorded_parts(checkpoint, source.checkpoint, builder.recorded_parts(source.config))
    except CheckpointError as err:
        raise CheckpointError(f"the guide (sampling.guide_workdir / guide_checkpoint): {err}") from None
    log.info("autoguidance: w = %g, guide %s (step %s)", config.sampling.guidance_scale, source.checkpoint,
             checkpoint.get("step"))
    return Guide(source, builder.labelled_score_fn(source.config, sde, model.eval().requires_grad_(False)))
