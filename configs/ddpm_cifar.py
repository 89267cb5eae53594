"""DDPM (Ho et al. 2020) on CIFAR-10: VP SDE, discrete DDPM loss, DDPM U-Net (score_sde's configs/vp/ddpm/cifar10.py).

35,218,947 parameters. Sampled by ancestral sampling on the 1000-step chain.
"""
from configs.vp_cifar import cifar10_config


def get_config():
    config = cifar10_config()
    training = config.training
    training.sde = "vpsde"
    training.continuous = False
    training.reduce_mean = True

    sampling = config.sampling
    sampling.method = "pc"
    sampling.predictor = "ancestral_sampling"
    sampling.corrector = "none"

    config.data.centered = True

    model = config.model
    model.name = "ddpm"
    model.scale_by_sigma = False
    model.ema_rate = 0.9999
    model.normalization = "GroupNorm"
    model.nonlinearity = "swish"
    model.nf = 128
    model.ch_mult = (1, 2, 2, 2)
    model.num_res_blocks = 2
    model.attn_resolutions = (16,)
    model.resamp_with_conv = True
    model.conditional = True
    model.embedding_type = "positional"  # the DDPM U-Net always embeds the step sinusoidally
    return config
