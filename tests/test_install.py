"""The package installs (pyproject.toml) and works from outside the repository: the installed tree imports and the
`sde-diffusion` console script runs, offline (no build isolation, no dependencies fetched)."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def pins(lines):
    return {line.split("#")[0].strip() for line in lines if line.split("#")[0].strip()}


def test_pyproject_dependencies_are_the_requirements():
    import tomllib
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = set(project["dependencies"]) | set(project["optional-dependencies"]["test"])
    assert declared == pins((ROOT / "requirements.txt").read_text().splitlines())
    assert project["scripts"]["sde-diffusion"] == "sde_diffusion.cli:console"


def test_installed_package_imports_and_runs_from_elsewhere(tmp_path):
    import setuptools
    if int(setuptools.__version__.split(".")[0]) < 70:
        pytest.skip(f"setuptools {setuptools.__version__} cannot build a wheel offline; requirements.txt pins 84.2.1")
    source = tmp_path / "source"
    source.mkdir()
    for name in ("sde_diffusion", "evaluation"):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--target", str(site), str(source)], check=True, capture_output=True, timeout=300)
    installed = sorted(p.name for p in site.iterdir())
    assert {"sde_diffusion", "evaluation", "bin"} <= set(installed) and "tests" not in installed
    assert (site / "sde_diffusion" / "sampling" / "core.py").is_file()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = dict(os.environ, PYTHONPATH=str(site), OMP_NUM_THREADS="1")
    where = subprocess.run([sys.executable, "-c", "import sde_diffusion, evaluation; print(sde_diffusion.__file__)"],
                           cwd=elsewhere, env=env, capture_output=True, text=True, timeout=120)
    assert Path(where.stdout.strip()).is_relative_to(site), where.stderr
    script = site / "bin" / "sde-diffusion"
    usage = subprocess.run([sys.executable, str(script), "--help"], cwd=elsewhere, env=env, capture_output=True,
                           text=True, timeout=120)
    assert usage.returncode == 0 and "--mode" in usage.stdout, usage.stderr
    mistake = subprocess.run([sys.executable, str(script), "--config", str(ROOT / "configs" / "vp_digits.py"),
                              "--mode", "train", "--config.training.n_iter=3"], cwd=elsewhere, env=env,
                             capture_output=True, text=True, timeout=120)
    assert mistake.returncode == 2, mistake.stderr
    assert re.search(r"did you mean --config\.training\.n_iters\?", mistake.stderr)
