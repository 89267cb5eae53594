"""Checks that need a GPU (marked `cuda`: skipped here without one, run by benchmarks/gpu_check.py): what the CPU
tests can only count, measured where a device really waits."""
import pytest
import torch

import run_lib
from sde_diffusion.data.image_dataset import hashed_uniform
from tests.test_host_sync import CountedSteps

pytestmark = pytest.mark.cuda


def test_augmentation_noise_on_the_gpu_is_the_hosts():
    for seed, stream in ((0, 1), (2**40 + 3, 2)):
        assert torch.equal(hashed_uniform(seed, stream, (64, 3, 32, 32), "cuda").cpu(),
                           hashed_uniform(seed, stream, (64, 3, 32, 32)))


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_gpu_training_steps_make_no_host_synchronisation(tmp_path, monkeypatch, precision):
    from configs.vp_digits import get_config
    config = get_config()
    t = config.training
    t.batch_size, t.n_iters, t.log_freq, t.eval_freq = 32, 5, 5, 10**6
    t.snapshot_freq = t.snapshot_freq_for_preemption = 5
    t.snapshot_sampling, t.precision = False, precision
    config.data.random_flip = config.data.uniform_dequantization = True
    config.device, config.data.on_device = "cuda", True
    steps = CountedSteps(monkeypatch.setattr)
    state = run_lib.train(config, tmp_path)
    assert steps.counts[1:] == [0] * 4, steps.events  # the first step may initialise lazily
    assert all(torch.isfinite(p).all() for p in state.model.parameters())


def test_gpu_batches_equal_the_hosts(tmp_path):
    from configs.vp_digits import get_config
    from sde_diffusion.data.datasets import get_dataset
    config = get_config()
    config.data.random_flip = config.data.uniform_dequantization = True
    host, device = get_dataset(config), get_dataset(config).to_device("cuda")
    for _ in range(3):
        x, y = device.train_batch(with_labels=True)
        assert x.is_cuda and y.is_cuda
        hx, hy = host.train_batch(with_labels=True)
        assert torch.equal(x.cpu(), hx) and torch.equal(y.cpu(), hy)
