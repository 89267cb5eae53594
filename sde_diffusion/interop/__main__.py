"""Convert a released checkpoint to our format (`model`, `ema`, `step`), ready for `main.py --mode eval`:

    python -m sde_diffusion.interop CHECKPOINT.pth --config configs/ve_cifar.py --out OUT.pth   # score_sde_pytorch
    python -m sde_diffusion.interop FOLDER --out OUT.pth --config_out CONFIG.py                   # diffusers folder

A score_sde_pytorch checkpoint needs the config of its network (--config, with --config.KEY=VALUE overrides); a
diffusers folder carries its own, which is written as a config file (--config_out) for main.py. The weights go in
both `model` and `ema` for diffusers models (released ones hold the EMA weights only).
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

from absl import app, flags
from ml_collections import config_flags

from ..checkpoints import atomic_write, save_checkpoint
from ..config import default_config
from ..validation import validate_config
from .diffusers_format import DiffusersFormatError, load_diffusers
from .score_sde import (ReferenceCheckpointError, read_reference_checkpoint, reference_parameterization,
                        to_our_checkpoint)

FLAGS = flags.FLAGS
USAGE = ("usage: python -m sde_diffusion.interop CHECKPOINT.pth --config configs/X.py --out OUT.pth "
         "[--config.KEY=VALUE ...]\n       python -m sde_diffusion.interop DIFFUSERS_FOLDER --out OUT.pth "
         "--config_out CONFIG.py")


def config_file_text(config, source: str) -> str:
    """A configs/*.py-style file whose get_config() is `config` (default_config() plus the keys that differ)."""
    base = default_config()
    lines = [f'"""Config of the network converted from {source} (written by python -m sde_diffusion.interop)."""',
             "from sde_diffusion.config import default_config", "", "", "def get_config():",
             "    config = default_config()"]
    for section, values in config.items():
        if not hasattr(values, "items"):
            if values != base[section]:
                lines.append(f"    config.{section} = {values!r}")
            continue
        for key, value in values.items():
            if key not in base[section] or value != base[section][key]:
                lines.append(f"    config.{section}.{key} = {value!r}")
    return "\n".join(lines + ["    return config", ""])


def convert_score_sde(path: str) -> None:
    config = FLAGS.config
    if config is None:
        raise SystemExit(f"error: {path} is a file, so a score_sde_pytorch checkpoint: give its network's config "
                         f"with --config\n{USAGE}")
    validate_config(config)
    state = read_reference_checkpoint(path)
    try:
        converted = to_our_checkpoint(state, config)
    except ReferenceCheckpointError as err:
        raise SystemExit(f"error: {path}: {err}") from err
    wanted = reference_parameterization(config)
    if wanted != config.model.parameterization:
        print(f"note: this network's score is the reference's only with model.parameterization='{wanted}' (see "
              f"sde_diffusion.interop): evaluate and sample it with --config.model.parameterization={wanted}",
              file=sys.stderr)
    save_checkpoint(FLAGS.out, converted)
    params = sum(v.numel() for v in converted["model"].values())
    print(f"wrote {FLAGS.out}: {config.model.name}, {params:,} values, step {converted['step']}, "
          f"{len(converted['ema']['shadow_params'])} EMA tensors")


def convert_diffusers(path: str) -> None:
    if FLAGS.config_out is None:
        raise SystemExit(f"error: {path} is a diffusers folder: say where its config goes with --config_out\n{USAGE}")
    try:
        model, config = load_diffusers(path)
    except DiffusersFormatError as err:
        raise SystemExit(f"error: {path}: {err}") from err
    weights = model.state_dict()
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    save_checkpoint(FLAGS.out, {"model": weights, "ema": {"decay": config.model.ema_rate, "num_updates": None,
                                                          "shadow_params": [weights[n] for n in trainable]},
                                "step": 0, "converted_from": f"diffusers:{Path(path).resolve().name}"})
    text = config_file_text(config, Path(path).resolve().name)
    atomic_write(FLAGS.config_out, lambda tmp: Path(tmp).write_text(text))
    params = sum(v.numel() for v in weights.values())
    print(f"wrote {FLAGS.out} ({config.model.name}, {params:,} values) and its config {FLAGS.config_out}")


def main(argv: Sequence[str]) -> None:
    if len(argv) != 2:
        raise SystemExit(USAGE)
    if Path(argv[1]).is_dir():
        convert_diffusers(argv[1])
    else:
        convert_score_sde(argv[1])


if __name__ == "__main__":
    config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py) of a score_sde_pytorch checkpoint's "
                                    "network.", lock_config=True)
    flags.DEFINE_string("out", None, "Where to write the converted checkpoint (our format).")
    flags.DEFINE_string("config_out", None, "diffusers folders: where to write the network's config file.")
    flags.mark_flags_as_required(["out"])
    app.run(main)
