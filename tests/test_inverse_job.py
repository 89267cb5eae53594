"""--mode sample with sampling.inverse: the observation, the files, and the config checks."""
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

import run_lib
from sde_diffusion import inverse
from sde_diffusion.config import ConfigError, validate_config
from test_controllable import tiny_config, write_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")


def inverse_config(**sampling):
    config = tiny_config()
    config.sampling.inverse = "super_resolution:factor=2"
    config.sampling.inverse_method = "mmps:cg_steps=2"
    for key, value in sampling.items():
        config.sampling[key] = value
    return config


def test_super_resolution_of_test_images_writes_consistent_files(tmp_path):
    config = inverse_config(noise_std=0.1)
    write_checkpoint(config, tmp_path)
    run_lib.sample(config, tmp_path)
    (report_path,) = (tmp_path / "samples").glob("checkpoint_1_inverse_super_resolution_mmps_ddim_nfe4.json")
    report = json.loads(report_path.read_text())
    saved = np.load(report_path.with_suffix(".npz"))
    samples, truth, y = (torch.from_numpy(saved[k]).double() for k in ("samples", "ground_truth", "observation"))
    assert samples.shape == truth.shape == (5, 1, 8, 8) and y.shape == (5, 1, 4, 4)
    assert report["method"] == "mmps:cg_steps=2" and report["num_observations"] == 5
    A = inverse.AveragePool(2, (1, 8, 8))
    noise = 2 * (y - A(truth))  # pixel units → the network's [−1, 1]: σ_y = 0.1 there
    assert 0.06 < noise.std() < 0.14 and abs(noise.mean()) < 0.05
    residual = (2 * (A(samples) - y)).flatten(1).norm(dim=1)  # recomputed from the saved samples
    torch.testing.assert_close(residual, torch.from_numpy(saved["residual"]).double(), rtol=1e-4, atol=1e-5)
    psnr = -10 * torch.log10((samples.clamp(0, 1) - truth).pow(2).flatten(1).mean(1))
    torch.testing.assert_close(psnr, torch.from_numpy(saved["psnr"]).double(), rtol=1e-4, atol=1e-4)
    assert report["psnr_mean"] == pytest.approx(psnr.mean().item(), rel=1e-4)
    assert report["residual_expected"] == pytest.approx(0.1 * math.sqrt(16))
    torch.testing.assert_close(torch.from_numpy(saved["preview"])[:, :, ::2, ::2].double(), y.clamp(0, 1))
    assert Image.open(report_path.with_suffix(".png")).size[0] > 0


def test_an_observation_file_is_measured_or_used_as_given(tmp_path):
    low = np.linspace(0, 1, 16).reshape(4, 4)
    Image.fromarray((low * 255).round().astype(np.uint8)).save(tmp_path / "low.png")
    config = inverse_config(observation=str(tmp_path / "low.png"), noise_std=0.0, inverse_method="pigdm")
    write_checkpoint(config, tmp_path)
    run_lib.sample(config, tmp_path)
    (npz,) = (tmp_path / "samples").glob("*_inverse_super_resolution_pigdm_*.npz")
    saved = np.load(npz)
    assert "ground_truth" not in saved and "psnr" not in saved
    np.testing.assert_allclose(saved["observation"], low[None, None], atol=0.5 / 255)  # one y, shared
    truth = np.random.default_rng(0).random((1, 8, 8))
    np.savez(tmp_path / "full.npz", observation=truth)  # shaped like the data: measured, its own ground truth
    config.sampling.observation = str(tmp_path / "full.npz")
    run_lib.sample(config, tmp_path, eval_folder="full")
    (npz,) = (tmp_path / "full").glob("*.npz")
    saved = np.load(npz)
    np.testing.assert_allclose(saved["ground_truth"][0], truth, atol=1e-6)
    A = inverse.AveragePool(2, (1, 8, 8))
    np.testing.assert_allclose(saved["observation"][0], A(torch.from_numpy(truth)[None]).numpy()[0], atol=1e-6)


@pytest.mark.parametrize("keys, words", [
    (dict(inverse="super_resolution:factor=3"), "divisible"),
    (dict(inverse="super_res"), "did you mean 'super_resolution'"),
    (dict(inverse_method="dps:step=likelihood", noise_std=0.0), "sampling.noise_std > 0"),
    (dict(inverse_method="mmps:cg=3"), "has no option 'cg'"),
    (dict(noise_std=-1.0), "sampling.noise_std must be ≥ 0"),
    (dict(inverse=None, observation="y.png"), "sampling.inverse is not"),
    (dict(observation="wrong_size.png"), "neither the measurement's (1, 4, 4) nor the data's (1, 8, 8)"),
    (dict(inpaint_mask="mask.png"), "different tasks"),
])
def test_inverse_config_errors_name_the_key(keys, words, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Image.fromarray(np.zeros((5, 5), dtype=np.uint8)).save("wrong_size.png")
    Image.fromarray(np.full((8, 8), 255, dtype=np.uint8)).save("mask.png")
    config = inverse_config(**keys)
    config.data.root = str(run_lib.__file__).rsplit("/", 1)[0] + "/data"
    with pytest.raises(ConfigError, match=words.replace("(", r"\(").replace(")", r"\)").replace("'", "'")):
        validate_config(config)
