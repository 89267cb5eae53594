"""Deep DDPM++ (continuous) on CIFAR-10 with the VP SDE: score_sde's configs/vp/cifar10_ddpmpp_deep_continuous.py.

vp_cifar.py with 8 residual blocks per resolution: 106,632,579 parameters.
"""
from configs.vp_cifar import get_config as get_vp_config


def get_config():
    config = get_vp_config()
    config.training.n_iters = 950001
    config.model.num_res_blocks = 8
    return config
