"""DDPM (Ho et al. 2020) on CIFAR-10: VP SDE, discrete DDPM loss, DDPM U-Net (score_sde's configs/vp/ddpm/cifar10.py).

35,218,947 parameters. Sampled by ancestral sampling on the 1000-step chain. Everything else as configs/vp_cifar.py.
"""
from configs.vp_cifar import get_config as get_vp_config


def get_config():
    config = get_vp_config()
    config.training.continuous = False
    config.sampling.predictor = "ancestral_sampling"

    model = config.model
    model.name = "ddpm"
    model.num_res_blocks = 2
    model.embedding_type = "positional"  # the DDPM U-Net always embeds the step sinusoidally
    return config
