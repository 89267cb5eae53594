"""Checkpoints from the ecosystem: score_sde_pytorch (`score_sde.py`) and diffusers-format models
(`diffusers_format.py`), both ways for diffusers. `python -m sde_diffusion.interop` converts either to our
checkpoint format (see __main__.py)."""
from .diffusers_format import (DiffusersFormatError, config_from_diffusers, diffusers_configs, load_diffusers,
                               save_diffusers)
from .score_sde import (NUMPY_SAFE_GLOBALS, PREFIX, SIGMAS, ReferenceCheckpointError, TensorMap, config_from_score_sde,
                        convert_checkpoint, convert_weights, ema_weights, has_level_table_quirk,
                        load_score_sde_pytorch, read_reference_checkpoint, reference_layout, reference_network_output,
                        reference_parameterization, reference_sigmas, to_our_checkpoint)

__all__ = ["DiffusersFormatError", "config_from_diffusers", "diffusers_configs", "load_diffusers", "save_diffusers",
           "NUMPY_SAFE_GLOBALS", "PREFIX", "SIGMAS", "ReferenceCheckpointError", "TensorMap", "config_from_score_sde",
           "convert_checkpoint", "convert_weights", "ema_weights", "has_level_table_quirk", "load_score_sde_pytorch",
           "read_reference_checkpoint", "reference_layout", "reference_network_output", "reference_parameterization",
           "reference_sigmas", "to_our_checkpoint"]
