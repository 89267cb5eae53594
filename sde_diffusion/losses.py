"""Training objectives, the public face of sde_diffusion/training/: a noise-level distribution
(`register_time_sampling`), a weighting (`register_weighting`) and the network's target (parameterization.py),
combined by `Objective`; `effective_weighting` gives any configuration's weight per unit log-SNR. See
training/objectives.py for the formula.
"""
from .training.noise_levels import EDM_P_MEAN, EDM_P_STD, TIME_SAMPLINGS, register_time_sampling
from .training.objectives import LOSSES, Noise, Objective, check_config, effective_weighting, get_loss_fn, legacy_parts
from .training.weightings import WEIGHTINGS, register_weighting

__all__ = ["EDM_P_MEAN", "EDM_P_STD", "LOSSES", "Noise", "Objective", "TIME_SAMPLINGS", "WEIGHTINGS", "check_config",
           "effective_weighting", "get_loss_fn", "legacy_parts", "register_time_sampling", "register_weighting"]
