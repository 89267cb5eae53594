"""2-D Gaussian mixture (4 modes, unequal weights) with an MLP score network on a VP SDE: about a minute on CPU."""
from sde_diffusion.config import default_config


def get_config():
    config = default_config()
    training = config.training
    training.sde = "vpsde"
    training.continuous = True
    training.reduce_mean = True
    training.batch_size = 512
    training.n_iters = 3000
    training.log_freq = 250
    training.eval_freq = 500
    training.snapshot_freq = 3000
    training.snapshot_freq_for_preemption = 1000

    config.sampling.steps = 500
    config.sampling.num_grid_samples = 2000
    config.eval.num_samples = 4096
    config.eval.batch_size = 4096

    data = config.data
    data.dataset = "gmm"
    data.dim = 2

    model = config.model
    model.name = "mlp"
    model.nf = 128
    model.num_res_blocks = 3
    model.embedding_type = "positional"
    model.ema_rate = 0.999

    optim = config.optim
    optim.lr = 2e-3
    optim.warmup = 100
    return config
