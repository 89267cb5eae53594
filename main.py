"""Command line: python main.py --config CONFIG --mode {train,eval,sample,compare,train_classifier,tune_grid}
[--workdir DIR] [--eval_folder NAME] [--verbose] [--config.SECTION.KEY=VALUE ...]

The same as the installed `sde-diffusion` command; see sde_diffusion/cli.py.
"""
import sys

from sde_diffusion.cli import main

if __name__ == "__main__":
    sys.exit(main())
