"""NCSN++ (continuous) on CIFAR-10 with the VE SDE: score_sde's configs/ve/cifar10_ncsnpp_continuous.py.

62,758,915 parameters (128 of them the fixed Fourier projection of log σ). Inputs stay in [0, 1]
(data.centered=False); the network maps them to [−1, 1] and divides its output by σ (scale_by_sigma).
The same U-Net as configs/vp_cifar.py (DDPM++); only what differs is set here.
"""
from configs.vp_cifar import get_config as get_vp_config


def get_config():
    config = get_vp_config()
    training = config.training
    training.sde = "vesde"
    training.reduce_mean = False

    sampling = config.sampling
    sampling.predictor = "reverse_diffusion"
    sampling.corrector = "langevin"

    config.data.centered = False

    model = config.model
    model.scale_by_sigma = True
    model.ema_rate = 0.999
    model.fir = True
    model.progressive_input = "residual"
    model.embedding_type = "fourier"
    return config
