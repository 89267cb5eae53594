"""What a distilled student is (config.distill.method): the parameterization `model.parameterization="auto"` gives
it and the sampler `sampling.method="auto"` gives it. Read by the parameterization and sampling sections, which
resolve "auto"; the distillation itself is sde_diffusion/distillation.py."""
from __future__ import annotations

from typing import Dict, Optional, Tuple

AUTO = "auto"

# distill.method → (the student's parameterization, None: the SDE's automatic one, as its teacher's; its sampler)
DISTILL_METHODS: Dict[str, Tuple[Optional[str], str]] = {
    "consistency": ("consistency", "consistency"),
    "consistency_training": ("consistency", "consistency"),
    "progressive": (None, "ddim"),
}


def student_method(config) -> Optional[str]:
    """config.distill.method when it names a method (None otherwise, or for a config without a distill section)."""
    method = config.distill.method if "distill" in config else None
    return method if method in DISTILL_METHODS else None
