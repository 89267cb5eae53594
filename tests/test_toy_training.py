"""Train the MLP score network on the 2-D Gaussian mixture through run_lib.train (about 20 s of CPU) and check the
samples against the mixture: mode weights (total variation) and per-mode means.

800 steps and 100 sampler steps (4000 samples) pass with total variation 0.005 and mode means within 0.042, while a
score off by a factor 0.7 or 1.4 fails (total variation 0.078 / 0.067); 600 steps no longer catch the 1.4 factor."""

import torch

import run_lib
from configs import toy_gmm
from sde_diffusion import sampling
from sde_diffusion.checkpoints import load_model_weights
from sde_diffusion.models import create_model, get_score_fn
from sde_diffusion.sdes import sde_from_config
from sde_diffusion.toy import default_mixture

def test_mlp_learns_the_gaussian_mixture(tmp_path):
    config = toy_gmm.get_config()
    config.training.n_iters = 800
    config.training.snapshot_freq = 800
    config.training.snapshot_freq_for_preemption = 800
    config.training.eval_freq = 800
    config.training.snapshot_sampling = False
    config.device = "cpu"
    run_lib.train(config, tmp_path)

    sde = sde_from_config(config)
    model = create_model(config)
    load_model_weights(run_lib.numbered_checkpoint(tmp_path, 1), model, use_ema=True)
    model.eval()
    x, nfe = sampling.sample(get_score_fn(sde, model), sde, (4000, 2), "pc", steps=100,
                             generator=torch.Generator().manual_seed(0))
    assert nfe == 101  # 100 predictor steps + the final denoising step

    mixture = default_mixture()
    assignment = mixture.posterior(x).argmax(1)
    weights = torch.bincount(assignment, minlength=4).double() / len(x)
    total_variation = 0.5 * (weights - mixture.weights).abs().sum().item()
    assert total_variation <= 0.05, (weights, total_variation)
    for k in range(4):
        mean = x[assignment == k].double().mean(0)
        assert (mean - mixture.means[k]).abs().max().item() <= 0.1, (k, mean)
    # a sample that lands far from every mode is a failure of the score, not of the assignment
    nearest = torch.cdist(x.double(), mixture.means).min(1).values
    assert (nearest > 1.5).double().mean().item() < 0.02
