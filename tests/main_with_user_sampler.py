"""`python tests/main_with_user_sampler.py --config ... --mode ... [--then_modes=m1,m2]`: main.py with the user's
sampler module imported first, as a user runs the command line with a sampler of their own (tests/user_sampler.py
registers "user_euler"). --then_modes runs further modes in the same process (one torch import for all)."""
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

import user_sampler  # noqa: E402,F401  (registers "user_euler")
from absl import flags  # noqa: E402

from sde_diffusion import cli  # noqa: E402

flags.DEFINE_list("then_modes", [], "Modes to run after --mode, in order, with the same flags.")


def run():
    cli.run_job()
    for mode in flags.FLAGS.then_modes:
        flags.FLAGS.mode = mode
        cli.run_job()


if __name__ == "__main__":
    sys.exit(cli.main(job=run))
