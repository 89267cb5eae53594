"""Trained models read from a workdir other than the job's: distillation's teacher (distill.teacher_workdir) and
autoguidance's guide (sampling.guide_workdir). Each is its workdir's config (config.json, written by --mode train,
or config.py, as python -m sde_diffusion.interop writes for a converted model) and one numbered checkpoint, found
and checked before any compute; the jobs check that it fits the model it serves (`differing` keys)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, List, Optional

from ..config import config_from_dict, load_config_file
from ..errors import CheckpointError, ConfigError
from ..validation import validate_config
from . import builder

# The keys of the data and the SDE: a teacher and its student, a guide and the model it guides share them.
DATA_AND_SDE_KEYS = ("data.dataset", "data.image_size", "data.num_channels", "data.dim", "data.centered",
                     "training.sde", "training.sde_options", "model.beta_min", "model.beta_max", "model.beta_schedule",
                     "model.num_scales", "model.zero_terminal_snr", "model.sigma_min", "model.sigma_max",
                     "model.latent")


@dataclass
class ModelSource:
    """Where a trained model comes from: its workdir, its config and the numbered checkpoint read."""

    workdir: Path
    config: Any
    checkpoint: Path


def workdir_config(folder: Path, key: str) -> Any:
    """The config of the run in folder: folder/config.json, else folder/config.py; key: the config key that named
    the folder (for the errors)."""
    if (folder / "config.json").is_file():
        try:
            values = json.loads((folder / "config.json").read_text())
        except json.JSONDecodeError as err:
            raise ConfigError(f"{key}: {folder / 'config.json'} is not valid JSON ({err})") from None
        return config_from_dict(values, str(folder / "config.json"))
    if (folder / "config.py").is_file():
        return load_config_file(folder / "config.py")
    raise ConfigError(f"{key}={str(folder)!r} holds no config.json (written by --mode train) or config.py (a "
                      "converted model's config file): point it at a trained model's workdir")


def read_source(folder: Path, k: Optional[int], key: str, checkpoint_key: str, role: str) -> ModelSource:
    """The run in folder (named by config key `key`) and its numbered checkpoint k (checkpoint_key; None: the
    newest), its config validated; ConfigError or CheckpointError naming the key otherwise. role: 'teacher', ..."""
    if not folder.is_dir():
        raise ConfigError(f"{key}={str(folder)!r} is not a folder: train the {role} first (--mode train --workdir "
                          "...) and name its workdir")
    config = workdir_config(folder, key)
    try:
        validate_config(config)
    except ConfigError as err:
        raise ConfigError(f"the {role}'s config in {folder}: {err}") from None
    try:
        _, path = builder.chosen_checkpoint(folder, k, checkpoint_key)
    except CheckpointError as err:
        raise CheckpointError(f"{key}: {err}") from None
    return ModelSource(folder, config, path)


def config_value(config, dotted: str):
    """config['a']['b'] for 'a.b'."""
    for part in dotted.split("."):
        config = config[part]
    return config


def differing(config, other, keys: Iterable[str]) -> List[str]:
    """The dotted keys whose values differ between two configs."""
    return [key for key in keys if config_value(config, key) != config_value(other, key)]


def overrides(config, keys) -> str:
    """--config.KEY=VALUE for each dotted key, with config's values (for an error message to paste from)."""
    return " ".join(f"--config.{key}={config_value(config, key)!r}".replace(" ", "") for key in keys)
