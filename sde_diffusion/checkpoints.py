"""Checkpoints: atomic writes, safe (weights-only) loads, and the full training state for exact resumption."""
from __future__ import annotations

import ast
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict

import numpy as np
import torch
from torch import nn

from .ema import ExponentialMovingAverage


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable, or made for another config; the message names the file."""


def atomic_write(path, write) -> None:
    """Call write(tmp_path), fsync it, then rename over `path`: readers see the old file or the new, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def write_json(path, obj) -> None:
    atomic_write(path, lambda p: Path(p).write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n"))


def save_npz(path, **arrays) -> None:
    """np.savez_compressed, atomically."""
    def write(tmp):
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **arrays)
    atomic_write(path, write)


def save_checkpoint(path, state: Dict[str, Any]) -> None:
    atomic_write(path, lambda p: torch.save(state, p))


def load_checkpoint(path, map_location="cpu") -> Dict[str, Any]:
    """Load a checkpoint written by `save_checkpoint` with torch.load(weights_only=True)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001 - truncated zip, bad pickle, foreign objects
        raise CheckpointError(f"checkpoint {path} is unreadable ({type(err).__name__}: {err}); it may be truncated "
                              "or not written by sde_diffusion — delete it to fall back to an earlier one") from err


def rng_state() -> Dict[str, Any]:
    _, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "numpy": [keys.tolist(), int(pos), int(has_gauss), float(cached)],
             "python": repr(random.getstate())}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state(("MT19937", np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    random.setstate(ast.literal_eval(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class TrainState:
    """Everything a resumed run needs to continue exactly where it stopped."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    ema: ExponentialMovingAverage
    dataset: Any
    step: int = 0

    def state_dict(self) -> Dict[str, Any]:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "ema": self.ema.state_dict(), "data": self.dataset.state_dict(), "step": self.step,
                "rng": rng_state()}

    def load_state_dict(self, state: Dict[str, Any], path="checkpoint") -> None:
        try:
            self.model.load_state_dict(state["model"], strict=True)
            self.ema.load_state_dict(state["ema"])
            self.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as err:
            raise CheckpointError(f"{path} does not fit the model built from this config: {err}") from err
        self.dataset.load_state_dict(state["data"])
        self.step = int(state["step"])
        set_rng_state(state["rng"])


def load_model_weights(path, model: nn.Module, use_ema: bool = True, map_location="cpu") -> Dict[str, Any]:
    """Load a checkpoint's weights into `model` (EMA weights by default); returns the checkpoint dict."""
    state = load_checkpoint(path, map_location)
    try:
        model.load_state_dict(state["model"], strict=True)
        if use_ema:
            ema = ExponentialMovingAverage(model.parameters(), decay=0.0)
            ema.load_state_dict(state["ema"])
            ema.copy_to(model.parameters())
    except (RuntimeError, ValueError, KeyError) as err:
        raise CheckpointError(f"{path} does not fit the model built from this config: {err}") from err
    return state
