"""NCSN++ (continuous) with the VE SDE on your own images at 64×64: set data.root, nothing else.

    python main.py --config configs/ve_folder_64.py --mode train --config.data.root=/path/to/images

score_sde's CelebA 64×64 NCSN++ (configs/ncsnpp/celeba.py with configs/default_celeba_configs.py), trained in
continuous time as configs/ve_cifar.py: σ_max = 90 (score_sde's CelebA value; for very different data, Song &
Ermon's rule puts σ_max near the largest distance between two training images), FIR resampling, residual input
pyramid, outputs divided by σ, data in [0, 1], EMA 0.999, reverse-diffusion predictor with a Langevin corrector at
snr 0.17. 62,758,915 parameters. Data handling as configs/vp_folder_64.py.
"""
from configs.ve_cifar import get_config as get_ve_cifar_config
from configs.vp_folder_64 import celeba64_data

CELEBA_SIGMA_MAX = 90.0


def get_config():
    config = celeba64_data(get_ve_cifar_config())
    config.model.sigma_max = CELEBA_SIGMA_MAX
    model = config.model
    model.ch_mult = (1, 2, 2, 2)
    model.num_res_blocks = 4
    model.attn_resolutions = (16,)
    return config
