"""DDPM++ (continuous) on CIFAR-10 with the VP SDE: score_sde's configs/vp/cifar10_ddpmpp_continuous.py.

61,804,419 parameters. Train with `python main.py --config configs/vp_cifar.py --mode train`
(needs CIFAR-10 under data/, see README).
"""
from sde_diffusion.config import default_config


def cifar10_config():
    """score_sde's CIFAR-10 defaults (configs/default_cifar10_configs.py) on top of ours."""
    config = default_config()
    training = config.training
    training.batch_size = 128
    training.n_iters = 1300001
    training.snapshot_freq = 50000
    training.log_freq = 50
    training.eval_freq = 100
    training.snapshot_freq_for_preemption = 10000
    training.snapshot_sampling = True
    training.likelihood_weighting = False
    training.continuous = True
    training.reduce_mean = False
    training.channels_last = True  # ours, not score_sde's: faster convolutions (see BENCHMARKS.md), same numbers

    sampling = config.sampling
    sampling.n_steps_each = 1
    sampling.noise_removal = True
    sampling.probability_flow = False
    sampling.snr = 0.16

    evaluate = config.eval
    evaluate.begin_ckpt = 9
    evaluate.end_ckpt = 26
    evaluate.batch_size = 1024
    evaluate.enable_sampling = False
    evaluate.num_samples = 50000
    evaluate.enable_loss = True

    data = config.data
    data.dataset = "cifar10"
    data.image_size = 32
    data.num_channels = 3
    data.random_flip = True
    data.centered = False
    data.uniform_dequantization = False

    model = config.model
    model.sigma_min = 0.01
    model.sigma_max = 50.0
    model.num_scales = 1000
    model.beta_min = 0.1
    model.beta_max = 20.0
    model.dropout = 0.1
    model.embedding_type = "fourier"

    optim = config.optim
    optim.weight_decay = 0.0
    optim.optimizer = "Adam"
    optim.lr = 2e-4
    optim.beta1 = 0.9
    optim.eps = 1e-8
    optim.warmup = 5000
    optim.grad_clip = 1.0

    config.seed = 42
    return config


def get_config():
    config = cifar10_config()
    training = config.training
    training.sde = "vpsde"
    training.continuous = True
    training.reduce_mean = True

    sampling = config.sampling
    sampling.method = "pc"
    sampling.predictor = "euler_maruyama"
    sampling.corrector = "none"

    config.data.centered = True

    model = config.model
    model.name = "ncsnpp"
    model.scale_by_sigma = False
    model.ema_rate = 0.9999
    model.normalization = "GroupNorm"
    model.nonlinearity = "swish"
    model.nf = 128
    model.ch_mult = (1, 2, 2, 2)
    model.num_res_blocks = 4
    model.attn_resolutions = (16,)
    model.resamp_with_conv = True
    model.conditional = True
    model.fir = False
    model.fir_kernel = (1, 3, 3, 1)
    model.skip_rescale = True
    model.resblock_type = "biggan"
    model.progressive = "none"
    model.progressive_input = "none"
    model.progressive_combine = "sum"
    model.attention_type = "ddpm"
    model.init_scale = 0.0
    model.embedding_type = "positional"
    model.fourier_scale = 16.0
    model.conv_size = 3
    return config
