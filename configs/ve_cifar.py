"""NCSN++ (continuous) on CIFAR-10 with the VE SDE: score_sde's configs/ve/cifar10_ncsnpp_continuous.py.

62,758,915 parameters (128 of them the fixed Fourier projection of log σ). Inputs stay in [0, 1]
(data.centered=False); the network maps them to [−1, 1] and divides its output by σ (scale_by_sigma).
"""
from configs.vp_cifar import cifar10_config


def get_config():
    config = cifar10_config()
    training = config.training
    training.sde = "vesde"
    training.continuous = True

    sampling = config.sampling
    sampling.method = "pc"
    sampling.predictor = "reverse_diffusion"
    sampling.corrector = "langevin"

    model = config.model
    model.name = "ncsnpp"
    model.scale_by_sigma = True
    model.ema_rate = 0.999
    model.normalization = "GroupNorm"
    model.nonlinearity = "swish"
    model.nf = 128
    model.ch_mult = (1, 2, 2, 2)
    model.num_res_blocks = 4
    model.attn_resolutions = (16,)
    model.resamp_with_conv = True
    model.conditional = True
    model.fir = True
    model.fir_kernel = (1, 3, 3, 1)
    model.skip_rescale = True
    model.resblock_type = "biggan"
    model.progressive = "none"
    model.progressive_input = "residual"
    model.progressive_combine = "sum"
    model.attention_type = "ddpm"
    model.init_scale = 0.0
    model.embedding_type = "fourier"
    model.fourier_scale = 16.0
    model.conv_size = 3
    return config
