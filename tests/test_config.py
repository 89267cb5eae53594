"""Config schema: misspelled keys, wrong types and impossible values or combinations fail with a message that
names the key, before any compute is spent."""
import pytest

from configs import toy_gmm, vp_digits
from evaluation import compare
from sde_diffusion import (classifier, controllable, guidance, likelihood, losses, models, parameterization, sampling,
                           sdes)
from sde_diffusion.data import datasets
from sde_diffusion.training import step as train_step
from sde_diffusion.config import ConfigError, default_config, validate_config


def test_shipped_configs_are_valid():
    for module in (vp_digits, toy_gmm):
        validate_config(module.get_config())


def test_misspelled_key_is_rejected():
    config = default_config()
    with pytest.raises(AttributeError, match="nff"):
        config.model.nff = 3


def test_wrong_type_is_rejected():
    config = default_config()
    with pytest.raises(TypeError):
        config.training.batch_size = "large"


@pytest.mark.parametrize("key, value, message", [
    ("training.sde", "vpsdee", "training.sde"),
    ("model.name", "unet9", "model.name"),
    ("data.dataset", "mnist", "data.dataset"),
    ("model.beta_schedule", "sigmoid", "model.beta_schedule"),
    ("sampling.method", "magic", "sampling.method"),
    ("training.batch_size", 0, "training.batch_size"),
    ("optim.lr", -1e-3, "optim.lr"),
    ("training.eps", 1.5, "training.eps"),
    ("sampling.steps", 0, "sampling.steps"),
    ("eval.begin_ckpt", 5, "eval.begin_ckpt"),
    ("model.attn_resolutions", (3,), "attn_resolutions"),
    ("data.image_size", 10, "data.image_size"),
])
def test_bad_values_name_the_key(key, value, message):
    config = vp_digits.get_config()
    section, name = key.split(".")
    config[section][name] = value
    with pytest.raises(ConfigError, match=message):
        validate_config(config)


def test_impossible_combinations():
    config = vp_digits.get_config()
    config.training.sde, config.training.continuous = "subvpsde", False
    with pytest.raises(ConfigError, match="no discrete chain"):
        validate_config(config)
    config = vp_digits.get_config()
    config.training.continuous, config.training.likelihood_weighting = False, True
    with pytest.raises(ConfigError, match="likelihood_weighting"):
        validate_config(config)
    config = vp_digits.get_config()
    config.model.name = "mlp"
    with pytest.raises(ConfigError, match="vector data"):
        validate_config(config)
    config = toy_gmm.get_config()
    config.model.name = "ddpm"
    with pytest.raises(ConfigError, match="vector data"):
        validate_config(config)


# Each section's owner checks it by itself: (its check, key, bad value, words of the message).
OWNER_CHECKS = [
    (datasets.check_config, "data.dataset", "mnist", "data.dataset='mnist'"),
    (datasets.check_config, "data.num_workers", -1, "data.num_workers"),
    (sdes.check_config, "training.sde", "vpsdee", "training.sde='vpsdee'"),
    (sdes.check_config, "model.num_scales", 0, "model.num_scales .*must be ≥ 2"),
    (models.check_config, "model.name", "unet9", "model.name='unet9'"),
    (models.check_config, "model.attn_resolutions", (3,), "never reaches"),
    (sampling.check_config, "sampling.corrector", "magic", "sampling.corrector: .*corrector='magic'"),
    (sampling.check_config, "sampling.eta", -1.0, "sampling.eta"),
    (train_step.check_config, "training.precision", "fp8", "training.precision='fp8'"),
    (losses.check_config, "training.eps", 0.0, "training.eps"),
    (losses.check_config, "training.loss", "l3", "training.loss='l3'"),
    (parameterization.check_config, "model.parameterization", "vee", "model.parameterization='vee'"),
    (likelihood.check_config, "eval.bpd_divergence", "magic", "eval.bpd_divergence='magic'"),
    (controllable.check_config, "sampling.conditioning_method", "magic", "sampling.conditioning_method"),
    (guidance.check_config, "sampling.guidance_scale", -1.0, "sampling.guidance_scale must be ≥ 0"),
    (classifier.check_config, "classifier.nf", 0, "classifier.nf must be > 0"),
    (compare.check_config, "compare.samplers", ("pc@10", "ddim@5,,10"), "compare.samplers entry 'ddim@5,,10'"),
    (compare.check_config, "compare.resamples", 1, "compare.resamples must be 0"),
]


@pytest.mark.parametrize("check, key, value, message", OWNER_CHECKS)
def test_each_section_is_checked_by_its_owner(check, key, value, message):
    config = vp_digits.get_config()
    check(config)  # the shipped config passes every owner's check
    section, name = key.split(".")
    config[section][name] = value
    with pytest.raises(ConfigError, match=message):
        check(config)


def test_a_network_declares_what_data_it_takes():
    assert [name for name in sorted(models.MODELS) if models.takes_vectors(name)] == ["mlp"]
    assert not models.is_convolutional("mlp") and not models.is_convolutional("dit")
    assert models.is_convolutional("ncsnpp") and models.is_convolutional("ddpm")
