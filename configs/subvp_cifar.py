"""DDPM++ (continuous) on CIFAR-10 with the sub-VP SDE: score_sde's configs/subvp/cifar10_ddpmpp_continuous.py.

vp_cifar.py with training.sde='subvpsde': 61,804,419 parameters.
"""
from configs.vp_cifar import get_config as get_vp_config


def get_config():
    config = get_vp_config()
    config.training.sde = "subvpsde"
    return config
