"""The command line (`python main.py`, or `sde-diffusion` once installed):

    --config CONFIG --mode {train,eval,sample,compare,ema_sweep,train_classifier,tune_grid,train_autoencoder,distill}
    [--workdir DIR] [--eval_folder NAME] [--verbose] [--config.SECTION.KEY=VALUE ...]

--workdir defaults to runs/<config file stem>. Unknown --config.* keys are rejected (the config is locked).

A mistake (a misspelled or mistyped key, a missing config file, an unusable workdir, missing data or checkpoints,
an impossible combination) prints `error: ...` on stderr, saying what is wrong and what to do, and exits with
status 2 before any compute; --verbose adds the traceback. Anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import difflib
import importlib.util
import logging
import os
import sys
import traceback
from pathlib import Path
from typing import Callable, List, Optional, Sequence

from absl import flags
from ml_collections import ConfigDict, config_flags

from .errors import (CheckpointError, ConfigError, DatasetError, NonFiniteError, StorageError, UsageError,
                     WorkdirBusyError)
from .jobs.modes import MODES, run_mode

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py) with get_config().", lock_config=True)
flags.DEFINE_enum("mode", None, list(MODES),
                  "What to run (train_classifier: the noise-conditional classifier for classifier guidance).")
flags.DEFINE_string("workdir", None, "Run directory (default: runs/<config file stem>).")
flags.DEFINE_string("eval_folder", None, "Subfolder of workdir for eval reports (default 'eval'), samples "
                    "(default 'samples') or sampler comparisons (default 'compare').")
flags.DEFINE_bool("verbose", False, "Show the traceback of an expected error too.")

# What a user's input can cause (exit status 2, one message); anything else is a bug (traceback, status 1).
EXPECTED_ERRORS = (UsageError, ConfigError, DatasetError, CheckpointError, NonFiniteError, StorageError,
                   WorkdirBusyError)
USAGE_STATUS = 2
HELP_FLAGS = ("-h", "--help", "-?", "--helpshort", "--helpfull")
CONFIG_PREFIXES = ("--config.", "--noconfig.")


def main(argv: Optional[Sequence[str]] = None, job: Optional[Callable[[], None]] = None) -> int:
    """Parse argv (sys.argv by default), run the mode (or `job()`, with FLAGS parsed) and return the exit status."""
    argv = list(sys.argv if argv is None else argv)
    if any(arg in HELP_FLAGS for arg in argv[1:]):
        print_help("--helpfull" in argv)
        return 0
    verbose = "--verbose" in argv
    try:
        parse_flags(argv)
        (job or run_job)()
    except EXPECTED_ERRORS as err:
        if verbose:
            traceback.print_exc()
        print(f"error: {err}", file=sys.stderr)
        return USAGE_STATUS
    return 0


def console() -> None:
    """The `sde-diffusion` console script."""
    sys.exit(main())


def print_help(full: bool) -> None:
    """The usage and the flags on stdout (absl's own help flags would exit with status 1)."""
    print(__doc__)
    print(FLAGS.get_help() if full else FLAGS.main_module_help())
    if not full:
        print("\nTry --helpfull for absl's own flags too.")


def parse_flags(argv: List[str]) -> None:
    """Check the config file and the --config.* keys, then let absl parse; UsageError names what is wrong."""
    for name in ("config", "mode"):
        if not any(arg == f"--{name}" or arg.startswith(f"--{name}=") for arg in argv[1:]):
            hint = "e.g. --config configs/vp_digits.py" if name == "config" else f"one of {', '.join(MODES)}"
            raise UsageError(f"--{name} is required ({hint}); --help lists the flags")
    config = load_config_file(flag_value(argv, "config"))
    for arg in argv[1:]:
        if arg.startswith(CONFIG_PREFIXES):
            check_config_key(config, arg)
    try:
        rest = FLAGS(argv)
    except flags.Error as err:
        raise UsageError(f"{err} (--help lists the flags)") from err
    except (AttributeError, KeyError, TypeError, ValueError) as err:  # ml_collections rejecting an override
        raise UsageError(f"the command line's --config.* overrides cannot be applied: {err}") from err
    if len(rest) > 1:
        raise UsageError(f"unexpected arguments {rest[1:]}: flags take the form --name=value")


def flag_value(argv: List[str], name: str) -> str:
    for i, arg in enumerate(argv):
        if arg.startswith(f"--{name}="):
            return arg.split("=", 1)[1]
        if arg == f"--{name}" and i + 1 < len(argv):
            return argv[i + 1]
    raise UsageError(f"--{name} needs a value")


def load_config_file(value: str) -> ConfigDict:
    """get_config() of the config file `value` (`path` or `path:argument`, as ml_collections reads it), loaded with
    the folder above it importable (configs import each other as `configs.<name>`) and its own folder too (a config
    imports the user's modules beside it: their registered SDEs, objectives, samplers)."""
    path = Path(value.split(":", 1)[0])
    if not path.is_file():
        raise UsageError(f"--config {path}: no such file{_similar_files(path)}")
    for folder in (str(path.resolve().parent.parent), str(path.resolve().parent)):
        if folder not in sys.path:  # kept for absl's own load of the file, and for the job
            sys.path.append(folder)
    try:
        spec = importlib.util.spec_from_file_location(f"_config_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        if not hasattr(module, "get_config"):
            raise UsageError(f"--config {path} defines no get_config(): a config file returns its ConfigDict from "
                             "get_config() (see configs/vp_digits.py)")
        return module.get_config(*value.split(":", 1)[1:])
    except UsageError:
        raise
    except Exception as err:  # a mistake in the user's config file: its own message, with file and line
        where = "".join(traceback.format_exception_only(type(err), err)).strip().replace("\n", " ")
        raise UsageError(f"--config {path} cannot be loaded: {where}") from err


def _similar_files(path: Path) -> str:
    folder = path.parent if path.parent.is_dir() else Path("configs")
    names = sorted(p.name for p in folder.glob("*.py")) if folder.is_dir() else []
    close = difflib.get_close_matches(path.name, names, n=1)
    if close:
        return f"; did you mean {folder / close[0]}?"
    return f"; the configs in {folder}/ are {', '.join(names)}" if names else ""


def check_config_key(config: ConfigDict, arg: str) -> None:
    """UsageError unless the key of `--config.a.b=value` (or `--noconfig.a.b`) names an entry of config; the
    message suggests the closest key."""
    key = arg.split("=", 1)[0].split(".", 1)[1]
    problem = key_problem(config, key.split("."))
    if problem:
        raise UsageError(f"--config.{key}: {problem}")


def key_problem(config: ConfigDict, parts: List[str]) -> Optional[str]:
    """Why config has no entry at the dotted path `parts` (None when it has), with the closest key that exists."""
    node, path = config, []
    for i, part in enumerate(parts):
        name = part.split("[", 1)[0]  # ml_collections' element syntax key[0]
        if not isinstance(node, ConfigDict):
            return f"config.{'.'.join(path)} is a value, not a section"
        if name not in node:
            section = f"config.{'.'.join(path)}" if path else "the config"
            close = difflib.get_close_matches(name, list(node.keys()), n=1)
            if not close:
                return f"{section} has no key {name!r}; its keys are {', '.join(sorted(node.keys()))}"
            guess = path + close + parts[i + 1:]
            if key_problem(config, guess) is not None:
                guess = path + close
            return f"{section} has no key {name!r}; did you mean --config.{'.'.join(guess)}?"
        node, path = node[name], path + [name]
    return None


def prepare_workdir(workdir: Path) -> Path:
    """workdir, created if missing; UsageError when it is a file, cannot be created or is not writable."""
    if workdir.exists() and not workdir.is_dir():
        raise UsageError(f"--workdir {workdir} is a file, not a folder: pass a folder (it is created if missing)")
    try:
        workdir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UsageError(f"--workdir {workdir} cannot be created ({err.strerror}: {err.filename}): pass a folder "
                         "inside one you can write to") from err
    if not os.access(workdir, os.W_OK | os.X_OK):
        raise UsageError(f"--workdir {workdir} is not writable: pass a folder you can write to, or fix its "
                         "permissions")
    return workdir


def run_job() -> None:
    """Run FLAGS.mode on FLAGS.config in the workdir, logging to stdout and workdir/<mode>.log."""
    workdir = prepare_workdir(Path(FLAGS.workdir or Path("runs") / Path(
        config_flags.get_config_filename(FLAGS["config"])).stem))
    rank = int(os.environ.get("RANK", "0"))  # under torchrun only rank 0 logs (other ranks: warnings and errors)
    handlers = [logging.StreamHandler(sys.stdout)]
    if rank == 0:
        handlers.append(logging.FileHandler(workdir / f"{FLAGS.mode}.log"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s %(levelname)s {f'[rank {rank}] ' if rank else ''}%(message)s",
                        handlers=handlers, force=True)
    run_mode(FLAGS.mode, FLAGS.config, workdir, FLAGS.eval_folder)
