"""One training run per workdir: `workdir/.lock` names the run that holds it (host, PID, start time, mode).

A second training run (train, train_autoencoder, train_classifier) on the same workdir stops at once with an
error naming the holder. A lock whose process is gone (a killed run, on this host) is stale: it is reported and
taken over. Eval and sample take no lock: they read only verified checkpoints, so they may follow a run.
"""
from __future__ import annotations

import datetime
import json
import logging
import os
import socket
from pathlib import Path
from typing import Dict, Optional

from .errors import WorkdirBusyError

log = logging.getLogger("sde_diffusion")

LOCK_NAME = ".lock"
TAKEOVER_ATTEMPTS = 3  # stale locks removed in a row before giving up (another run races for the same workdir)


def process_alive(host: str, pid: int) -> bool:
    """Whether process pid runs on host; a process of another host counts as alive (it cannot be checked)."""
    if host != socket.gethostname():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


def describe(holder: Dict) -> str:
    return (f"--mode {holder.get('mode', '?')} started {holder.get('started', '?')} by PID {holder.get('pid', '?')} "
            f"on {holder.get('host', '?')}")


def read_holder(path: Path) -> Optional[Dict]:
    """The lock's record, or None when it is unreadable (a run killed while writing it)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def acquire(workdir, mode: str) -> Path:
    """Create workdir/.lock for this process; WorkdirBusyError if a live run holds it; a stale lock is taken over."""
    path = Path(workdir) / LOCK_NAME
    record = {"host": socket.gethostname(), "pid": os.getpid(), "mode": mode,
              "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
    for _ in range(TAKEOVER_ATTEMPTS):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = read_holder(path)
            if holder is not None and process_alive(holder.get("host", ""), int(holder.get("pid", -1))):
                raise WorkdirBusyError(
                    f"{Path(workdir)} is in use by another run: {describe(holder)}. Wait for it to finish or stop "
                    f"it, or use another --workdir; if that run is gone (e.g. it ran on another machine), delete "
                    f"{path}") from None
            what = describe(holder) if holder else "unreadable"
            log.warning("took over the stale lock %s (%s): that process is gone", path, what)
            path.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
        return path
    raise WorkdirBusyError(f"could not take the lock {path}: other runs keep taking it; start one run per workdir")


def release(path: Path) -> None:
    """Remove the lock if this process still holds it."""
    holder = read_holder(path)
    if holder is not None and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
        path.unlink(missing_ok=True)
