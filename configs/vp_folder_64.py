"""DDPM++ (continuous) with the VP SDE on your own images at 64×64: set data.root, nothing else.

    python main.py --config configs/vp_folder_64.py --mode train --config.data.root=/path/to/images

data.root is a folder of .png/.jpg/.jpeg/.webp images (any depth), a .zip of one, or a uint8 array
(N, 64-or-more, 64-or-more, 3) in a .npy/.npz; images are center-cropped and resized to 64×64 once and cached
(see sde_diffusion/data/image_folder.py). The data, training and evaluation settings are score_sde's CelebA 64×64
defaults (configs/default_celeba_configs.py: batch 128, random flips, 1.3M steps, 50k samples for FID); the network
is configs/vp_cifar.py's DDPM++ with the layout score_sde uses for CelebA 64×64 (configs/ncsnpp/celeba.py:
ch_mult (1, 2, 2, 2) → resolutions 64, 32, 16, 8, four residual blocks each, attention at 16×16).
61,804,419 parameters: a GPU job. FID reference statistics come from the training images themselves.
"""
from configs.vp_cifar import get_config as get_cifar_config

FOLDER_ROOT = "data/my_images"  # ← point this (or --config.data.root) at your images


def celeba64_data(config):
    """score_sde's CelebA 64×64 data, sampling and evaluation defaults, reading your own images."""
    data = config.data
    data.dataset = "folder"
    data.root = FOLDER_ROOT
    data.image_size = 64
    data.num_channels = 3
    data.random_flip = True
    data.uniform_dequantization = False
    data.resize_filter = "lanczos"
    data.num_workers = 2
    data.pin_memory = True

    config.sampling.snr = 0.17
    evaluate = config.eval
    evaluate.begin_ckpt = 1
    evaluate.end_ckpt = 26
    evaluate.batch_size = 1024
    evaluate.enable_sampling = True
    evaluate.num_samples = 50000
    evaluate.fid_split = "train"
    return config


def get_config():
    config = celeba64_data(get_cifar_config())  # DDPM++ continuous, VP SDE, centered data, EMA 0.9999
    model = config.model
    model.ch_mult = (1, 2, 2, 2)
    model.num_res_blocks = 4
    model.attn_resolutions = (16,)
    return config
