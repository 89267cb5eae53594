"""`python tests/main_with_user_sampler.py --config ... --mode ...`: main.py with the user's sampler module imported
first, as a user runs the command line with a sampler of their own (tests/user_sampler.py registers "user_euler")."""
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

import user_sampler  # noqa: E402,F401  (registers "user_euler")
from absl import app  # noqa: E402

import main  # noqa: E402

if __name__ == "__main__":
    app.run(main.main)
