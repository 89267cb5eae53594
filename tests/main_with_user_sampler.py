"""`python tests/main_with_user_sampler.py --config ... --mode ... [--then_modes=m1,m2]`: main.py with the user's
sampler module imported first, as a user runs the command line with a sampler of their own (tests/user_sampler.py
registers "user_euler"). --then_modes runs further modes in the same process (one torch import for all)."""
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

import user_sampler  # noqa: E402,F401  (registers "user_euler")
from absl import app, flags  # noqa: E402

import main  # noqa: E402

flags.DEFINE_list("then_modes", [], "Modes to run after --mode, in order, with the same flags.")


def run(argv):
    main.main(argv)
    for mode in flags.FLAGS.then_modes:
        flags.FLAGS.mode = mode
        main.main(argv)


if __name__ == "__main__":
    app.run(run)
