"""Deep NCSN++ (continuous) on CIFAR-10 with the VE SDE: score_sde's configs/ve/cifar10_ncsnpp_deep_continuous.py.

ve_cifar.py with 8 residual blocks per resolution: 107,587,075 parameters.
"""
from configs.ve_cifar import get_config as get_ve_config


def get_config():
    config = get_ve_config()
    config.training.n_iters = 950001
    config.model.num_res_blocks = 8
    return config
