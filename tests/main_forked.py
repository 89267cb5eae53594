"""`python tests/main_forked.py CASES.json RESULTS.json`: many `python main.py ...` command lines for the price of one
torch import. CASES.json is a list of {"argv": [...], "cwd": "..."}; each runs as `python main.py *argv` in cwd, in a
child forked from this process after it imported what main.py and its jobs import, so every command line still
starts with fresh flags, logging and config (a separate process), and exits as main.py does: main()'s status, or a
traceback and status 1 for an exception it lets through. RESULTS.json gets {"returncode", "stdout", "stderr"} per
case, in order."""
import importlib
import json
import os
import sys
import tempfile
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[0] = str(ROOT)  # as for `python main.py`: the script's folder first

from sde_diffusion import cli  # noqa: E402  (main.py's import)
from sde_diffusion.jobs.modes import MODES  # noqa: E402

for _module, _ in MODES.values():  # what the jobs import (torch, the networks, the data code): once, here
    importlib.import_module(f"sde_diffusion.jobs.{_module}")


def child(argv):
    """The body of `python main.py *argv`; returns the exit status."""
    sys.argv = ["main.py", *argv]
    try:
        status = cli.main()
    except SystemExit as exit_:
        status = exit_.code
    except BaseException:  # noqa: BLE001  (the interpreter prints an uncaught exception's traceback, status 1)
        traceback.print_exc()
        status = 1
    if status is None:
        status = 0
    elif not isinstance(status, int):
        print(status, file=sys.stderr)
        status = 1
    return status


def run(argv, cwd):
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            status = 1
            try:
                os.dup2(out.fileno(), 1)
                os.dup2(err.fileno(), 2)
                os.chdir(cwd)
                status = child(argv)
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(status)
        _, wait_status = os.waitpid(pid, 0)
        out.seek(0)
        err.seek(0)
        return {"returncode": os.waitstatus_to_exitcode(wait_status), "stdout": out.read(), "stderr": err.read()}


if __name__ == "__main__":
    cases = json.loads(Path(sys.argv[1]).read_text())
    results = [run(case["argv"], case["cwd"]) for case in cases]
    Path(sys.argv[2]).write_text(json.dumps(results))
