"""configs/toy_gmm.py trained with the SDE, weighting and noise levels of tests/user_objective.py."""
import user_objective  # noqa: F401  (registers user_cubic_vp, user_truncated_snr, user_power)
from configs import toy_gmm


def get_config():
    config = toy_gmm.get_config()
    config.training.sde = "user_cubic_vp"
    config.training.sde_options = "scale=8"
    config.training.weighting = "user_truncated_snr:floor=0.5"
    config.training.time_sampling = "user_power:power=1.5"
    config.model.parameterization = "eps"  # a new SDE has no automatic choice
    return config
