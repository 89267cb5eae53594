"""Text-conditioned quickstart: the VP digits model of vp_digits.py conditioned on captions instead of labels.

Each training image gets a caption made from its label ("a handwritten 7", "the digit seven", … eight templates;
six more are held out of training), read by a small transformer trained with the network; the U-Net attends to it
at 4×4 and in its middle block, and its pooled features join the noise embedding. Caption dropout 0.1 teaches the
empty caption the unconditional score, for classifier-free guidance.

    python main.py --config configs/text_digits.py --mode train
    python main.py --config configs/text_digits.py --mode sample --config.sampling.prompt="a handwritten three" \\
        --config.sampling.guidance_scale=2
"""
from configs.vp_digits import get_config as get_unconditional_config


def get_config():
    config = get_unconditional_config()
    config.data.captions = "labels"
    config.training.caption_dropout = 0.1
    text = config.model.text
    text.encoder = "scratch"
    text.dim = 64
    text.depth = 2
    text.num_heads = 2
    text.max_length = 12
    config.model.cross_attn_resolutions = (4,)
    config.model.cross_attn_heads = 2
    config.sampling.steps = 200
    config.eval.enable_bpd = False  # the quickstart's own measure is the prompt agreement (BENCHMARKS.md)
    return config
