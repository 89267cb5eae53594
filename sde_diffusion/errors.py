"""The package's exception types and the two value checks every config section uses.

A leaf: it imports nothing from the package, so any module may import it.
"""
from __future__ import annotations

import difflib
from typing import Collection, Type


class UsageError(ValueError):
    """A command-line argument that cannot work (a missing file, an unknown key, an unusable folder); the message
    names it and says what to do."""


class ConfigError(ValueError):
    """A config value or combination that cannot work; the message names the key and the fix."""


class DatasetError(RuntimeError):
    """Data missing, malformed or inconsistent with the config; the message says what to do."""


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable, or made for another config; the message names the file."""


class CorruptCheckpointError(CheckpointError):
    """A checkpoint file is truncated, altered, or not a checkpoint: an earlier one can be used instead."""


class StorageError(OSError):
    """A file could not be written (disk full, I/O error, read-only file system); the message names the path, the
    free space left and what to do. Nothing half-written is left behind."""


class WorkdirBusyError(RuntimeError):
    """Another run holds the workdir's lock; the message names its host, process and start time."""


class NonFiniteError(FloatingPointError):
    """The loss or the gradient of a training step is NaN or infinite; the message names the step."""


def choice(name: str, value, allowed: Collection, error: Type[Exception] = ConfigError) -> None:
    """Raise `error` naming `name` unless value is one of `allowed`."""
    if value not in allowed:
        close = difflib.get_close_matches(value, [str(a) for a in allowed], n=1) if isinstance(value, str) else []
        hint = f": did you mean {name}={close[0]!r}?" if close else ""
        raise error(f"{name}={value!r} is not one of {sorted(allowed)}{hint}")


def positive(name: str, value, error: Type[Exception] = ConfigError) -> None:
    """Raise `error` naming `name` unless value > 0."""
    if not value > 0:
        raise error(f"{name} must be > 0, got {value}")
