"""Latent score-based models: the exact oracle of an orthogonal linear first stage, the latent scale, diffusers'
AutoencoderKL loaded from disk, and the first stage's training job with the latent model's train → sample → eval."""
import importlib.util
import json
import math

import numpy as np
import pytest
import torch

from sde_diffusion import latent, sampling
from sde_diffusion.config import load_config_file
from sde_diffusion.errors import CheckpointError, ConfigError
from sde_diffusion.metrics_toy import sliced_w2, sliced_w2_noise_floor
from sde_diffusion.sdes import VPSDE, VESDE
from sde_diffusion.toy import GaussianMixture
from sde_diffusion.validation import validate_config

# --------------------------------------------------------------------------------------------------
# The oracle: pixels x ~ a Gaussian mixture in 4 dimensions (a 1×2×2 "image"), first stage z = c·Q x with Q
# orthogonal, so the scaled latents follow the mixture with means s·c·Qμ_k and stds s·c·σ_k: its exact score
# drives the sampler in latent space, and the decoded samples must follow the pixel mixture.
# --------------------------------------------------------------------------------------------------
GAIN = 3.0  # c: the first stage's latents are not unit-variance, so the measured scale matters
PIXELS = GaussianMixture([0.3, 0.5, 0.2], [[1.0, -1.0, 0.5, 0.0], [-1.0, 0.5, -0.5, 1.0], [0.0, 1.0, 1.0, -1.0]],
                         [0.3, 0.2, 0.4])
N = 2000


class LinearFirstStage:
    fingerprint = "orthogonal-linear"

    def __init__(self, seed=0):
        q, _ = torch.linalg.qr(torch.randn(4, 4, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
        self.q = q.float()

    def encode(self, x):
        return (GAIN * x.flatten(1) @ self.q.T).reshape(len(x), 4, 1, 1)

    def decode(self, z):
        return (z.flatten(1) @ self.q / GAIN).reshape(len(z), 1, 2, 2)

    def latent_shape(self, image_shape):
        return (4, 1, 1)


class PixelMixtureImages:
    """An image dataset stand-in: mixture draws as 1×2×2 images, model space = [−1, 1]-scaled pixels."""

    shape = (1, 2, 2)
    is_image = True

    def __init__(self):
        self.train = PIXELS.sample(4096, torch.Generator().manual_seed(1))[0].reshape(-1, 1, 2, 2)

    def from_model(self, x):
        return (x + 1) / 2

    def to_model(self, x):
        return 2 * x - 1

    def eval_batches(self, batch_size, split="test", with_labels=False):
        for start in range(0, len(self.train), batch_size):
            yield self.train[start:start + batch_size]

    def state_dict(self):
        return {"batches": 7}

    def load_state_dict(self, state):
        assert state["batches"] == 7


def latent_mixture(scale):
    q = LinearFirstStage().q.double()
    return GaussianMixture(PIXELS.weights, scale * GAIN * PIXELS.means @ q.T, scale * GAIN * PIXELS.stds)


def decoded_samples(data, sde, method, steps, seed):
    mixture = latent_mixture(data.scale)
    exact = mixture.marginal_score_fn(sde)

    def score_fn(z, t):
        return exact(z.flatten(1), t).reshape(z.shape)

    z, _ = sampling.sample(score_fn, sde, (N, *data.shape), method, steps=steps,
                           generator=torch.Generator().manual_seed(seed))
    return (2 * data.from_model(z) - 1).flatten(1)  # back to pixels, (N, 4)


def test_the_scale_is_one_over_the_std_of_the_training_latents_and_is_stored():
    images = PixelMixtureImages()
    data = latent.LatentDataset(images, LinearFirstStage(), "cpu")
    scale = data.measure_scale(num_images=3000)
    expected = 1 / (GAIN * images.train[:3000].flatten(1).double() @ LinearFirstStage().q.T.double()).std()
    assert scale == pytest.approx(float(expected), rel=1e-6)
    z = next(data.eval_batches(3000, "train"))
    assert float(z.double().std()) == pytest.approx(1.0, abs=1e-5)  # unit variance, as latent diffusion wants
    state = data.state_dict()
    assert state["latent_scale"] == scale and state["first_stage"] == "orthogonal-linear" and state["batches"] == 7
    restored = latent.LatentDataset(images, LinearFirstStage(), "cpu")
    restored.load_state_dict(state)
    assert restored.scale == scale
    other = LinearFirstStage()
    other.fingerprint = "another"
    with pytest.raises(CheckpointError, match="another first stage"):
        latent.LatentDataset(images, other, "cpu").restore({"data": state})
    with pytest.raises(RuntimeError, match="latent scale is unknown"):
        latent.LatentDataset(images, LinearFirstStage(), "cpu").from_model(z)


@pytest.mark.parametrize("sde,method,steps", [(VPSDE(), "dpm_solver", 25), (VESDE(), "heun", 30)])
def test_sampling_latents_and_decoding_draws_the_pixel_distribution(sde, method, steps):
    data = latent.LatentDataset(PixelMixtureImages(), LinearFirstStage(), "cpu")
    data.measure_scale()
    x = decoded_samples(data, sde, method, steps, seed=3)
    floor = sliced_w2_noise_floor(PIXELS, N)
    reference = PIXELS.sample(N, torch.Generator().manual_seed(99))[0]
    assert sliced_w2(x, reference) < 1.5 * floor
    # the same latents decoded with a wrong scale are far off: the test sees the scale
    true_scale = data.scale
    data.scale = 1.3 * true_scale
    z = data.encode(x.reshape(-1, 1, 2, 2))  # re-encode with the wrong scale, then decode with the true one
    data.scale = true_scale
    assert sliced_w2((2 * data.from_model(z) - 1).flatten(1), reference) > 3 * floor


# --------------------------------------------------------------------------------------------------
# diffusers' AutoencoderKL from a local folder
# --------------------------------------------------------------------------------------------------
needs_diffusers = pytest.mark.skipif(importlib.util.find_spec("diffusers") is None, reason="needs diffusers")


def tiny_vae(in_channels=1):
    from diffusers import AutoencoderKL
    torch.manual_seed(0)
    return AutoencoderKL(in_channels=in_channels, out_channels=in_channels, latent_channels=3,
                         down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                         up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(8, 16),
                         layers_per_block=1, norm_num_groups=4, sample_size=16).eval()


def ldm_config(**changes):
    config = load_config_file("configs/ldm_digits.py")
    config.update_from_flattened_dict(changes)
    return config


@needs_diffusers
@pytest.mark.parametrize("layout", ["vae folder", "pipeline folder"])
def test_a_diffusers_autoencoder_round_trips_a_batch_as_diffusers_does(tmp_path, layout):
    vae = tiny_vae()
    folder = tmp_path / "vae" if layout == "pipeline folder" else tmp_path
    vae.save_pretrained(folder)
    config = ldm_config(**{"model.autoencoder.pretrained": str(tmp_path)})
    validate_config(config)
    network = latent.network_config(config)
    assert (network.data.num_channels, network.data.image_size, network.data.centered) == (3, 8, True)
    stage = latent.load_first_stage(config, None, "cpu")
    x = torch.rand(5, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        z_ref = vae.encode(x).latent_dist.mean
        x_ref = vae.decode(z_ref).sample
    z = stage.encode(x)
    assert z.shape == (5, 3, 8, 8) and torch.equal(z, z_ref)
    assert torch.equal(stage.decode(z), x_ref)
    assert stage.latent_shape((1, 16, 16)) == (3, 8, 8)
    assert len(stage.fingerprint) == 64


@needs_diffusers
def test_a_diffusers_autoencoder_of_other_channels_or_a_wrong_folder_is_refused(tmp_path):
    tiny_vae(in_channels=3).save_pretrained(tmp_path / "rgb")
    with pytest.raises(ConfigError, match="3-channel images"):
        latent.load_first_stage(ldm_config(**{"model.autoencoder.pretrained": str(tmp_path / "rgb")}), None, "cpu")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="holds no diffusers AutoencoderKL"):
        latent.load_first_stage(ldm_config(**{"model.autoencoder.pretrained": str(tmp_path / "empty")}), None, "cpu")
    with pytest.raises(ConfigError, match="does not exist"):
        validate_config(ldm_config(**{"model.autoencoder.pretrained": str(tmp_path / "nowhere")}))


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="eval.enable_bpd=True: bits/dim needs a likelihood of the pixels"):
        validate_config(ldm_config(**{"eval.enable_bpd": True}))
    with pytest.raises(ConfigError, match="model.autoencoder.downsample must be one of"):
        validate_config(ldm_config(**{"model.autoencoder.downsample": 3}))
    with pytest.raises(ConfigError, match="ch_mult=.* has 3 levels"):
        validate_config(ldm_config(**{"model.autoencoder.ch_mult": (1, 2, 2)}))
    with pytest.raises(ConfigError, match="network sees 2×8×8 latents"):
        validate_config(ldm_config(**{"model.attn_resolutions": (16,)}))
    with pytest.raises(ConfigError, match="enable_latent_nll"):
        validate_config(ldm_config(**{"model.latent": False, "eval.enable_bpd": False}))
    with pytest.raises(ConfigError, match="constrain pixels"):
        validate_config(ldm_config(**{"sampling.colorize": True}))


# --------------------------------------------------------------------------------------------------
# The jobs: train_autoencoder (resumable, its report), then a latent model trained, sampled and evaluated
# --------------------------------------------------------------------------------------------------
def small_ldm_config(tmp_path, **changes):
    base = {"model.autoencoder.nf": 8, "model.autoencoder.n_iters": 12, "model.autoencoder.batch_size": 16,
            "model.autoencoder.snapshot_freq_for_preemption": 6, "model.autoencoder.log_freq": 6,
            "model.autoencoder.eval_fid": False, "eval.batch_size": 64, "device": "cpu",
            "model.nf": 32, "model.ch_mult": (1, 1), "training.batch_size": 16, "training.n_iters": 4, "training.snapshot_freq": 4,
            "training.snapshot_freq_for_preemption": 2, "training.log_freq": 2, "training.eval_freq": 2,
            "sampling.steps": 5, "eval.num_samples": 6, "eval.enable_fid": False, "eval.bpd_num_batches": 1,
            "eval.bpd_rtol": 1e-3, "eval.bpd_atol": 1e-3}
    base.update(changes)
    return ldm_config(**base)


@pytest.fixture(scope="module")
def autoencoder_runs(tmp_path_factory):
    from sde_diffusion.jobs import train_autoencoder
    straight, resumed = tmp_path_factory.mktemp("straight"), tmp_path_factory.mktemp("resumed")
    report = train_autoencoder.run(small_ldm_config(straight), straight)
    train_autoencoder.run(small_ldm_config(resumed, **{"model.autoencoder.n_iters": 6}), resumed)
    train_autoencoder.run(small_ldm_config(resumed), resumed)
    return straight, resumed, report


def test_train_autoencoder_resumes_exactly_and_reports_psnr(autoencoder_runs):
    from sde_diffusion.checkpoints import load_checkpoint
    from sde_diffusion.data.datasets import get_dataset
    from sde_diffusion.jobs.train_autoencoder import reconstructions
    from sde_diffusion.models.autoencoder import KLAutoencoder, options_from_config
    straight, resumed, report = autoencoder_runs
    a = load_checkpoint(straight / "autoencoder" / "autoencoder.pth")
    b = load_checkpoint(resumed / "autoencoder" / "autoencoder.pth")
    assert a["fingerprint"] == b["fingerprint"]
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
    assert report["latent_shape"] == [2, 8, 8] and report["downsample"] == 2 and report["steps"] == 12
    assert (straight / "autoencoder" / "reconstructions.png").stat().st_size > 0
    config = small_ldm_config(straight)
    model = KLAutoencoder(options_from_config(config))
    model.load_state_dict(a["model"])
    originals, recons = reconstructions(model.eval(), get_dataset(config), "cpu", 64)
    mse = ((recons.clamp(0, 1) - originals) ** 2).flatten(1).mean(1)
    assert report["psnr"] == pytest.approx(float((10 * torch.log10(1 / mse)).mean()), rel=1e-5)
    assert report["test_images"] == 297 and math.isfinite(report["reconstruction_l1"])
    assert json.loads((straight / "autoencoder" / "report.json").read_text())["psnr"] == report["psnr"]


def test_a_latent_model_trains_samples_decoded_images_and_reports_its_latent_nll(autoencoder_runs):
    from sde_diffusion.checkpoints import load_checkpoint
    from sde_diffusion.jobs import evaluate, sample, train
    from sde_diffusion.jobs import train_autoencoder
    workdir = autoencoder_runs[0]
    config = small_ldm_config(workdir)
    train.run(config, workdir)
    checkpoint = load_checkpoint(workdir / "checkpoints" / "checkpoint_1.pth")
    fingerprint = load_checkpoint(workdir / "autoencoder" / "autoencoder.pth")["fingerprint"]
    assert checkpoint["data"]["first_stage"] == fingerprint and checkpoint["data"]["latent_scale"] > 0
    assert checkpoint["model"]["conv_in.weight"].shape[1] == 2  # the network takes the 2 latent channels
    sample.run(config, workdir, "samples")
    files = list((workdir / "samples").glob("*.npz"))
    images = np.load(files[0])["images"]
    assert images.dtype == np.uint8 and images.shape == (6, 16, 16, 1)  # decoded to pixels, N×H×W×C
    evaluate.run(small_ldm_config(workdir, **{"eval.enable_sampling": False}), workdir, "eval")
    report = json.loads((workdir / "eval" / "report_1.json").read_text())
    assert report["latent_nll_count"] == 64 and math.isfinite(report["latent_nll"])
    assert report["latent_nll_bits"] == pytest.approx(report["latent_nll"] / math.log(2))
    # a first stage retrained since: the checkpoint's latents are no longer its latents
    train_autoencoder.run(small_ldm_config(workdir, **{"seed": 7, "model.autoencoder.n_iters": 13}), workdir)
    with pytest.raises(CheckpointError, match="another first stage"):
        sample.run(config, workdir, "samples")
