"""Resumable work in rounds: each finished round is saved atomically, a restarted job skips finished rounds.

A round's result depends only on its index (callers seed each round from it), so a run killed after round k and
restarted produces exactly what an uninterrupted run produces, and several processes (torchrun ranks) can share
the rounds: rank i makes rounds i, i + world_size, …, and rank 0 collects them all from the folder.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Callable, Dict, Optional

import numpy as np

from sde_diffusion.checkpoints import atomic_write, save_npz
from sde_diffusion.progress import Progress

log = logging.getLogger("sde_diffusion")

RoundFn = Callable[[int, int], Dict[str, np.ndarray]]  # (round index, round size) → named arrays of length size


def run_in_rounds(folder: Path, total: int, round_size: int, make_round: RoundFn, fingerprint: dict,
                  desc: str = "rounds", rank: int = 0, world_size: int = 1,
                  barrier: Callable[[], None] = lambda: None) -> Optional[Dict[str, np.ndarray]]:
    """Produce `total` items in rounds of `round_size` under `folder`; returns every array concatenated.

    `fingerprint` (JSON-able) describes what the rounds compute (checkpoint, sampler, seed, ...). A folder holding
    rounds of a different fingerprint is an error rather than silently mixed results. With world_size > 1 every
    rank calls this (`barrier` waits for all of them); rank 0 gets the arrays, the other ranks None.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    stamp = folder / "fingerprint.json"
    expected = json.dumps(fingerprint, sort_keys=True, default=str)
    if stamp.exists() and stamp.read_text() != expected:
        raise RuntimeError(f"{folder} holds rounds of a different run ({stamp.read_text()}), not {expected}: "
                           "delete the folder or use another --eval_folder")
    barrier()  # every rank has checked the old stamp before rank 0 replaces it
    if rank == 0:
        atomic_write(stamp, lambda tmp: tmp.write_text(expected))
    sizes = [min(round_size, total - start) for start in range(0, total, round_size)]
    paths = [folder / f"round_{r:05d}.npz" for r in range(len(sizes))]
    made = {}  # this rank's new rounds, kept in memory
    for r in Progress(range(rank, len(sizes), world_size), desc=desc, enabled=rank == 0):
        if paths[r].exists():
            log.info("round %d/%d: reusing %s", r + 1, len(sizes), paths[r])
            continue
        made[r] = make_round(r, sizes[r])
        save_npz(paths[r], **made[r])
    barrier()  # all rounds are on disk
    if rank != 0:
        return None
    parts = [made[r] if r in made else _load(paths[r]) for r in range(len(sizes))]
    return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]} if parts else {}


def _load(path: Path) -> Dict[str, np.ndarray]:
    with np.load(path) as saved:
        return {key: saved[key] for key in saved.files}
