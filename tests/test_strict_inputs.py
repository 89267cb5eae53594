"""Bad input of every kind fails at start-up with a message that names the problem and the fix.

Each row builds a bad situation and asserts the exception and every fragment its message must contain. Rows that
reach `run_lib.train` must fail before any training step: no checkpoint may exist afterwards.
"""
import os
import pickle

import numpy as np
import pytest

import run_lib
from configs import toy_gmm, vp_digits
from sde_diffusion.checkpoints import CheckpointError
from sde_diffusion.config import ConfigError, validate_config
from sde_diffusion.data.datasets import DatasetError, get_dataset
from sde_diffusion.errors import UsageError


def changed(module, **changes):
    """module.get_config() with SECTION__KEY=value changes."""
    config = module.get_config()
    for key, value in changes.items():
        section, name = key.split("__")
        config[section][name] = value
    return config


def digits(**changes):
    return changed(vp_digits, **changes)


def toy(**changes):
    return changed(toy_gmm, **changes)


def assign(key, value):
    def run(tmp_path):
        section, name = key.split(".")
        setattr(vp_digits.get_config()[section], name, value)
    return run


def validate(config):
    return lambda tmp_path: validate_config(config)


def train(config):
    def run(tmp_path):
        config.device = "cpu"
        run_lib.train(config, tmp_path / "run")
    return run


def cifar_with_a_corrupt_batch(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1]}
        (folder / name).write_bytes(pickle.dumps(batch) if name != "data_batch_3" else b"garbage")
    get_dataset(digits(data__dataset="cifar10", data__root=str(tmp_path), data__image_size=32,
                       data__num_channels=3, model__attn_resolutions=(16,)))


def unwritable_workdir(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the workdir should be")
    config = toy(training__n_iters=2)
    config.device = "cpu"
    run_lib.train(config, blocker / "run")


def checkpoint_of_another_config(tmp_path):
    small = toy(training__n_iters=2, training__snapshot_freq_for_preemption=1, training__batch_size=8,
                training__snapshot_sampling=False)  # the final step's grid: 2000 samples × 500 steps, ~5 s
    small.model.nf, small.device = 16, "cpu"
    run_lib.train(small, tmp_path / "run")
    small.model.nf, small.training.n_iters = 32, 4
    run_lib.train(small, tmp_path / "run")


def torchrun_variables_incomplete(tmp_path):
    os.environ["WORLD_SIZE"] = "2"
    try:
        train(toy(training__n_iters=2))(tmp_path)
    finally:
        del os.environ["WORLD_SIZE"]


def sample_under_torchrun(tmp_path):
    variables = dict(WORLD_SIZE="2", RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="29500")
    os.environ.update(variables)
    try:
        run_lib.sample(toy(), tmp_path)
    finally:
        for key in variables:
            del os.environ[key]


CASES = {
    # config schema
    "misspelled key": (assign("model.nff", 3), AttributeError, ["nff"]),
    "wrong type": (assign("training.batch_size", "128"), TypeError, ["batch_size"]),
    "unknown SDE": (validate(digits(training__sde="vpsdee")), ConfigError, ["training.sde", "vpsde"]),
    "unknown precision": (validate(digits(training__precision="fp8")), ConfigError, ["training.precision", "bf16"]),
    "unknown non-finite policy": (validate(digits(training__on_nonfinite="ignore")), ConfigError,
                                  ["training.on_nonfinite", "skip"]),
    "unknown compile backend": (validate(digits(training__compile=True, training__compile_backend="fast")),
                                ConfigError, ["training.compile_backend", "inductor"]),
    "zero checkpoints kept": (validate(digits(training__keep_meta_checkpoints=0)), ConfigError,
                              ["training.keep_meta_checkpoints"]),
    # impossible combinations
    "sub-VP with a discrete loss": (validate(digits(training__sde="subvpsde", training__continuous=False)),
                                    ConfigError, ["training.sde='subvpsde'", "training.continuous=True"]),
    "attention resolution never reached": (validate(digits(model__attn_resolutions=(3,))), ConfigError,
                                           ["attn_resolutions", "[3]", "never reaches"]),
    "image size the U-Net cannot halve": (validate(digits(data__image_size=6)), ConfigError,
                                          ["data.image_size=6", "halved"]),
    "bits/dim of continuous data": (validate(toy(eval__enable_bpd=True)), ConfigError,
                                    ["eval.enable_bpd", "discrete", "continuous"]),
    "channels_last for an MLP": (validate(toy(training__channels_last=True)), ConfigError,
                                 ["training.channels_last", "mlp"]),
    "likelihood weighting with a discrete loss": (
        validate(digits(training__continuous=False, training__likelihood_weighting=True)), ConfigError,
        ["likelihood_weighting", "continuous=True"]),
    "MLP on images": (validate(digits(model__name="mlp")), ConfigError, ["model.name='mlp'", "digits"]),
    # data
    "digits at the wrong size": (lambda p: get_dataset(digits(data__image_size=12, model__attn_resolutions=(6,))),
                                 DatasetError, ["1×8×8", "data.image_size=12", "or image_size 16, 32, 64"]),
    "CIFAR-10 absent": (lambda p: get_dataset(digits(data__dataset="cifar10", data__root=str(p), data__image_size=32,
                                                     data__num_channels=3)),
                        DatasetError, ["CIFAR-10 was not found", "cifar-10-python.tar.gz", "MD5"]),
    "CIFAR-10 batch corrupt": (cifar_with_a_corrupt_batch, DatasetError, ["data_batch_3", "re-download"]),
    "batch larger than the data": (train(digits(training__batch_size=4096)), DatasetError,
                                   ["batch size 4096", "training.batch_size"]),
    # run time, before any step
    "unwritable workdir": (unwritable_workdir, UsageError, ["not writable", "--workdir"]),
    "checkpoint of another config": (checkpoint_of_another_config, CheckpointError,
                                     ["does not fit the model built from this config", "size mismatch for"]),
    "incomplete torchrun environment": (torchrun_variables_incomplete, UsageError,
                                        ["WORLD_SIZE=2", "RANK", "torchrun"]),
    "sample under torchrun": (sample_under_torchrun, UsageError,
                              ["--mode sample runs in one process", "WORLD_SIZE=2", "plain python"]),
}


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_fails_with_a_message_naming_the_problem(case, tmp_path):
    run, error, fragments = CASES[case]
    with pytest.raises(error) as info:
        run(tmp_path)
    for fragment in fragments:
        assert fragment in str(info.value), f"{case}: {fragment!r} not in {info.value}"
    if case != "checkpoint of another config":
        assert not list(tmp_path.rglob("checkpoint_*.pth")), "failed only after training had started"
