"""`--mode NAME` → its job: the module under sde_diffusion/jobs/ whose `run` it calls, and its default output
folder (eval, sample and compare write into workdir/<eval_folder>)."""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import Dict, Optional, Tuple

# mode → (job module, default eval_folder or None when the job takes none)
MODES: Dict[str, Tuple[str, Optional[str]]] = {
    "train": ("train", None),
    "eval": ("evaluate", "eval"),
    "sample": ("sample", "samples"),
    "compare": ("compare", "compare"),
    "ema_sweep": ("ema_sweep", "ema_sweep"),
    "train_classifier": ("train_classifier", None),
    "tune_grid": ("tune_grid", None),
    "train_autoencoder": ("train_autoencoder", None),
    "distill": ("distill", None),
}


def run_mode(mode: str, config, workdir: Path, eval_folder: Optional[str] = None):
    """Run the job of `mode` on config in workdir (eval_folder: the job's own default when None)."""
    module_name, default_folder = MODES[mode]
    job = importlib.import_module(f"sde_diffusion.jobs.{module_name}")
    if default_folder is None:
        return job.run(config, workdir)
    return job.run(config, workdir, eval_folder or default_folder)
