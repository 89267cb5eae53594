"""Deep DDPM++ (continuous) on CIFAR-10 with the sub-VP SDE: score_sde's
configs/subvp/cifar10_ddpmpp_deep_continuous.py.

vp_cifar_deep.py with training.sde='subvpsde': 106,632,579 parameters.
"""
from configs.vp_cifar_deep import get_config as get_vp_deep_config


def get_config():
    config = get_vp_deep_config()
    config.training.sde = "subvpsde"
    return config
