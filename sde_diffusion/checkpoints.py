"""Checkpoints: atomic writes, safe (weights-only) loads, and the full training state for exact resumption.

Every checkpoint `X.pth` is written to a temporary file, fsynced and renamed, and then gets a sidecar `X.pth.sha256`
(written the same way) holding its SHA-256. A load verifies the digest when the sidecar exists, so a truncated or
bit-flipped file is reported as corrupt (`CorruptCheckpointError`) instead of being half-loaded; a file whose
sidecar is missing (the process died between the two renames) is still loaded, since it was renamed complete.
"""
from __future__ import annotations

import ast
import errno
import hashlib
import json
import logging
import os
import random
import re
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import nn

from .training.ema import ExponentialMovingAverage
from .errors import CheckpointError, CorruptCheckpointError, StorageError  # noqa: F401  (importable from here too)


log = logging.getLogger("sde_diffusion")


def atomic_write(path, write) -> None:
    """Call write(tmp_path), fsync it, then rename over `path`: readers see the old file or the new, never half.

    A write that fails for want of storage (disk full, I/O error, read-only file system, quota) raises
    StorageError naming the path, the free space left and what to do; the temporary file is removed and `path`
    keeps its previous content."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as err:
        if err.errno in STORAGE_ERRNOS or isinstance(err.__cause__, OSError) and err.__cause__.errno in STORAGE_ERRNOS:
            raise storage_error(path, err) from err
        raise
    except RuntimeError as err:  # torch.save reports a failed write as RuntimeError ("... file write failed")
        if "write failed" in str(err) or "No space left" in str(err):
            raise storage_error(path, err) from err
        raise
    finally:
        tmp.unlink(missing_ok=True)


STORAGE_ERRNOS = {errno.ENOSPC, errno.EIO, errno.EROFS, errno.EDQUOT, errno.EFBIG}


def free_space(folder: Path) -> str:
    """The free space of the file system holding folder (or its nearest existing parent), e.g. '1.5 GB'."""
    for candidate in (folder, *folder.parents):
        if candidate.exists():
            try:
                free = shutil.disk_usage(candidate).free
            except OSError:
                return "unknown"
            return f"{free / 1e9:.1f} GB" if free >= 1e8 else f"{free / 1e6:.1f} MB"
    return "unknown"


def storage_error(path: Path, err: Exception) -> StorageError:
    """The StorageError for a failed write of `path`."""
    reason = os.strerror(err.errno) if getattr(err, "errno", None) else str(err)
    return StorageError(f"could not write {path}: {reason} ({free_space(path.parent)} free on its file system). "
                        "Nothing half-written was left and the files written before are intact: free space (older "
                        "checkpoints, samples) or point --workdir at another disk, then run the same command again "
                        "to resume from the newest checkpoint")


def write_json(path, obj) -> None:
    atomic_write(path, lambda p: Path(p).write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n"))


def save_npz(path, **arrays) -> None:
    """np.savez_compressed, atomically."""
    def write(tmp):
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **arrays)
    atomic_write(path, write)


def sha256_of(path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def files_sha256(paths) -> str:
    """SHA-256 over each file's name and bytes, in the given order: the fingerprint of a model stored as files."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(Path(path).name.encode() + b"\0")
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def digest_path(path) -> Path:
    """The sidecar file holding a checkpoint's SHA-256."""
    path = Path(path)
    return path.with_name(path.name + ".sha256")


def save_verified(path, write) -> None:
    """write(tmp_path) atomically (`atomic_write`), then the file's SHA-256 into the sidecar `path.sha256`."""
    digest = {}

    def write_and_hash(tmp):
        write(tmp)
        digest["sha256"] = sha256_of(tmp)

    digest_path(path).unlink(missing_ok=True)  # a stale digest must never vouch for the new file
    atomic_write(path, write_and_hash)
    atomic_write(digest_path(path), lambda p: Path(p).write_text(digest["sha256"] + "\n"))


def save_checkpoint(path, state: Dict[str, Any]) -> None:
    """torch.save(state) atomically, then its SHA-256 into the sidecar `path.sha256` (also atomically)."""
    save_verified(path, lambda tmp: torch.save(state, tmp))


def unverified_reason(path) -> Optional[str]:
    """Why a cache file written by `save_verified` cannot be trusted (no sidecar, or a SHA-256 that differs from
    it), or None when it verifies."""
    sidecar = digest_path(path)
    if not sidecar.is_file():
        return "it has no .sha256 sidecar (written by an older version, or cut off while being written)"
    expected, actual = sidecar.read_text().strip(), sha256_of(path)
    if expected != actual:
        return f"its SHA-256 {actual[:16]}… differs from the {expected[:16]}… recorded when it was written"
    return None


def load_verified_npz(path, what: str) -> Optional[Dict[str, np.ndarray]]:
    """The arrays of a cache .npz written by `save_verified_npz`, or None (with a warning naming the file, what it
    holds and why) when it is missing a sidecar, fails its checksum or cannot be read: the caller rebuilds it."""
    path = Path(path)
    if not path.is_file():
        return None
    reason = unverified_reason(path)
    if reason is None:
        try:
            with np.load(path) as cached:
                return {key: cached[key] for key in cached.files}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
            reason = f"it is unreadable ({err})"
    log.warning("the cached %s %s is not used: %s; computing it again", what, path, reason)
    return None


def save_verified_npz(path, compressed: bool = True, **arrays) -> None:
    """np.savez(_compressed) atomically, with a .sha256 sidecar (`load_verified_npz` checks it)."""
    def write(tmp):
        with open(tmp, "wb") as f:
            (np.savez_compressed if compressed else np.savez)(f, **arrays)
    save_verified(path, write)


def verify_checkpoint(path) -> None:
    """Raise CorruptCheckpointError when the file's SHA-256 differs from its sidecar's (no sidecar: nothing to check)."""
    path = Path(path)
    sidecar = digest_path(path)
    if not sidecar.is_file():
        return
    expected, actual = sidecar.read_text().strip(), sha256_of(path)
    if expected != actual:
        raise CorruptCheckpointError(f"checkpoint {path} is corrupt: its SHA-256 is {actual[:16]}… but {sidecar.name} "
                                     f"records {expected[:16]}… (truncated or altered after it was written)")


def load_checkpoint(path, map_location="cpu", mmap: bool = False) -> Dict[str, Any]:
    """Verify (see `verify_checkpoint`) and load a checkpoint with torch.load(weights_only=True); mmap: tensors are
    mapped from the file, read when used."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    verify_checkpoint(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as err:  # noqa: BLE001 - truncated zip, bad pickle, foreign objects
        raise CorruptCheckpointError(f"checkpoint {path} is unreadable ({type(err).__name__}: {err}); it may be "
                                     "truncated or not written by sde_diffusion") from err


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
    """Everything a resumed run needs to continue exactly where it stopped.

    `noise` is the generator of the loss's random times and noise (the same on every rank, which draws the whole
    global batch's noise and keeps its rows); `rng` holds each rank's global RNG states (dropout and the like).
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    ema: ExponentialMovingAverage
    dataset: Any
    noise: Optional[torch.Generator] = None
    scaler: Any = None  # torch.amp.GradScaler for fp16 training
    step: int = 0
    skipped_steps: int = 0  # steps skipped for a non-finite loss or gradient (training.on_nonfinite='skip')
    parts: Optional[Dict[str, str]] = None  # the registered names it was trained with (config key → spec)
    post_hoc_ema: Any = None  # phema.PowerEMA: the tracked power-function EMA profiles (training.post_hoc_ema)
    student: Any = None  # jobs.distill.Student of --mode distill (its round and teacher)

    def state_dict(self, rng_states: Optional[List[Dict[str, Any]]] = None) -> Dict[str, Any]:
        """rng_states: one entry per rank (default: this process's only)."""
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "ema": self.ema.state_dict(), "data": self.dataset.state_dict(), "step": self.step,
                "skipped_steps": self.skipped_steps, "rng": rng_states or [rng_state()],
                "noise": None if self.noise is None else self.noise.get_state(),
                "scaler": None if self.scaler is None else self.scaler.state_dict(), "parts": self.parts,
                "post_hoc_ema": None if self.post_hoc_ema is None else self.post_hoc_ema.state_dict(),
                "distill": None if self.student is None else self.student.state_dict()}

    def load_state_dict(self, state: Dict[str, Any], path="checkpoint", rank: int = 0) -> None:
        try:
            self.model.load_state_dict(state["model"], strict=True)
            self.ema.load_state_dict(state["ema"])
            self.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as err:
            raise CheckpointError(f"{path} does not fit the model built from this config: {err}") from err
        if self.post_hoc_ema is not None:
            if state.get("post_hoc_ema") is None:
                raise CheckpointError(f"{path} was written without post-hoc EMA profiles, and the config tracks "
                                      "training.post_hoc_ema: a profile averages the whole run, so it cannot start "
                                      "midway; train in a new workdir, or set training.post_hoc_ema = () to resume")
            self.post_hoc_ema.load_state_dict(state["post_hoc_ema"], path)
        if self.student is None and state.get("distill") is not None:
            raise CheckpointError(f"{path} was written by --mode distill: resume it with --mode distill and its config")
        if self.student is not None:
            if state.get("distill") is None:
                raise CheckpointError(f"{path} was written by --mode train, not --mode distill: distill into a new "
                                      "workdir")
            self.student.load_state_dict(state["distill"], path)
        self.dataset.load_state_dict(state["data"])
        self.step = int(state["step"])
        self.skipped_steps = int(state.get("skipped_steps", 0))
        if self.noise is not None and state.get("noise") is not None:
            self.noise.set_state(state["noise"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        rngs = state["rng"] if isinstance(state["rng"], list) else [state["rng"]]
        if rank < len(rngs):
            set_rng_state(rngs[rank])
        else:
            log.warning("%s holds RNG states of %d ranks; rank %d keeps its fresh seed (dropout noise differs from "
                        "an uninterrupted run)", path, len(rngs), rank)


# --------------------------------------------------------------------------------------------------
# Preemption checkpoints: the newest K, resumed from the newest one that verifies
# --------------------------------------------------------------------------------------------------
_STEP_NAME = re.compile(r"^checkpoint_(\d+)\.pth$")


def step_checkpoint(folder, step: int) -> Path:
    return Path(folder) / f"checkpoint_{step}.pth"


def step_checkpoints(folder) -> List[Tuple[int, Path]]:
    """(step, path) of the `checkpoint_<step>.pth` files in folder, newest first."""
    found = [(int(m.group(1)), p) for p in Path(folder).glob("checkpoint_*.pth") if (m := _STEP_NAME.match(p.name))]
    return sorted(found, reverse=True)


def prune_step_checkpoints(folder, keep: int) -> None:
    """Delete all but the newest `keep` step checkpoints (and their digests)."""
    for _, path in step_checkpoints(folder)[keep:]:
        path.unlink(missing_ok=True)
        digest_path(path).unlink(missing_ok=True)


def remove_stale_temporaries(folder) -> List[Path]:
    """Delete temporary files left by a process killed inside `atomic_write`; returns them."""
    stale = [p for p in Path(folder).glob(".*.tmp*") if p.is_file()]
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def newest_good_checkpoint(folder, map_location="cpu") -> Optional[Tuple[Path, Dict[str, Any]]]:
    """The newest step checkpoint in folder that verifies and loads, with its state; None when there is none.

    A corrupt one is logged, renamed to `*.corrupt` (kept for inspection, never tried again) and the previous one
    is tried.
    """
    for _, path in step_checkpoints(folder):
        try:
            return path, load_checkpoint(path, map_location)
        except CorruptCheckpointError as err:
            aside = path.with_name(path.name + ".corrupt")
            os.replace(path, aside)
            digest_path(path).unlink(missing_ok=True)
            log.error("%s. Moved it to %s and falling back to the previous checkpoint.", err, aside.name)
    return None


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
