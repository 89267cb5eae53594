"""Command line: python main.py --config CONFIG --mode {train,eval,sample,compare,train_classifier,tune_grid} [--workdir DIR]
[--eval_folder NAME] [--config.SECTION.KEY=VALUE ...]

--workdir defaults to runs/<config file stem>. Unknown --config.* keys are rejected (the config is locked).
"""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from absl import app, flags
from ml_collections import config_flags

import run_lib

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py) with get_config().", lock_config=True)
flags.DEFINE_enum("mode", None, list(run_lib.JOBS),
                  "What to run (train_classifier: the noise-conditional classifier for classifier guidance).")
flags.DEFINE_string("workdir", None, "Run directory (default: runs/<config file stem>).")
flags.DEFINE_string("eval_folder", None, "Subfolder of workdir for eval reports (default 'eval'), samples "
                    "(default 'samples') or sampler comparisons (default 'compare').")
flags.mark_flags_as_required(["config", "mode"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    workdir = Path(FLAGS.workdir or Path("runs") / Path(config_flags.get_config_filename(FLAGS["config"])).stem)
    workdir.mkdir(parents=True, exist_ok=True)
    rank = int(os.environ.get("RANK", "0"))  # under torchrun only rank 0 logs (other ranks: warnings and errors)
    handlers = [logging.StreamHandler(sys.stdout)]
    if rank == 0:
        handlers.append(logging.FileHandler(workdir / f"{FLAGS.mode}.log"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s %(levelname)s {f'[rank {rank}] ' if rank else ''}%(message)s",
                        handlers=handlers, force=True)
    run_lib.JOBS[FLAGS.mode](FLAGS.config, workdir, FLAGS.eval_folder)


HELP_FLAGS = ("-h", "--help", "-?", "--helpshort", "--helpfull")


def print_help_and_exit(argv) -> None:
    """Asked for help: the usage and the flags on stdout, exit status 0 (absl's own help flags exit with 1)."""
    full = "--helpfull" in argv
    print(__doc__)
    print(FLAGS.get_help() if full else FLAGS.main_module_help())
    print("\nTry --helpfull for absl's own flags too." if not full else "")
    sys.exit(0)


if __name__ == "__main__":
    if any(arg in HELP_FLAGS for arg in sys.argv[1:]):
        print_help_and_exit(sys.argv[1:])
    app.run(main)
