"""Latent quickstart: sklearn's digits upsampled to 16×16, a KL autoencoder (f = 2, 2 latent channels) as the
first stage, and the VP score model of vp_digits.py on its 2×8×8 latents; samples are decoded to pixels.

    python main.py --config configs/ldm_digits.py --mode train_autoencoder   # workdir/autoencoder/
    python main.py --config configs/ldm_digits.py --mode train
    python main.py --config configs/ldm_digits.py --mode sample              # decoded PNG grid and .npz
"""
from configs.vp_digits import get_config as get_pixel_config


def get_config():
    config = get_pixel_config()
    config.data.image_size = 16  # the 8×8 digits, upsampled bilinearly once (256 grey levels)

    model = config.model
    model.latent = True
    autoencoder = model.autoencoder
    autoencoder.downsample = 2
    autoencoder.latent_channels = 2
    autoencoder.nf = 16
    autoencoder.ch_mult = (1, 2)
    autoencoder.kl_weight = 1e-6
    autoencoder.loss = "l1"
    autoencoder.batch_size = 64
    autoencoder.n_iters = 800
    autoencoder.lr = 2e-3
    autoencoder.log_freq = 250

    config.training.n_iters = 1000  # the first stage's training and report take the rest of the 10 minutes
    config.training.snapshot_freq = 1000

    config.eval.enable_bpd = False  # bits/dim is undefined for a latent model; the latents' NLL instead:
    config.eval.enable_latent_nll = True
    return config
