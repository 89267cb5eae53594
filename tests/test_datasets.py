"""Datasets: digits split, scaling and augmentation, resumable batch order, and the CIFAR-10 reader on small
files written here in the official python format (real CIFAR-10 is not downloadable in tests)."""
import io
import pickle
import tarfile
import urllib.error

import numpy as np
import pytest
import torch

from sde_diffusion.data import datasets
from sde_diffusion.config import default_config
from sde_diffusion.data.datasets import DatasetError, ImageDataset, ShuffledBatches, load_digits_uint8, read_cifar10


def test_digits_split_is_fixed_and_disjoint():
    train, test, train_y, test_y = load_digits_uint8()
    assert train.shape == (1500, 1, 8, 8) and test.shape == (297, 1, 8, 8)
    assert train.dtype == torch.uint8 and int(train.max()) == 16 and int(train.min()) == 0
    again = load_digits_uint8()
    assert torch.equal(train, again[0]) and torch.equal(test_y, again[3])
    train_rows = {tuple(r.tolist()) + (int(y),) for r, y in zip(train.flatten(1), train_y)}
    overlap = sum(tuple(r.tolist()) + (int(y),) in train_rows for r, y in zip(test.flatten(1), test_y))
    assert overlap <= 3  # sklearn's digits hold a handful of exact duplicates, nothing more


def _dataset(**kw):
    imgs = torch.arange(4 * 1 * 2 * 2, dtype=torch.uint8).reshape(4, 1, 2, 2) % 17
    opts = dict(batch_size=4, seed=0, centered=True, random_flip=False, uniform_dequantization=False)
    opts.update(kw)
    return ImageDataset(imgs, imgs, 17, **opts), imgs


def test_scaling_flip_and_dequantization():
    ds, imgs = _dataset()
    batch = ds.train_batch()
    order = ds.batches._perm
    torch.testing.assert_close(batch, imgs[order].float() / 16 * 2 - 1)
    uncentered, _ = _dataset(centered=False)
    assert uncentered.train_batch().min() >= 0
    deq, imgs = _dataset(uniform_dequantization=True, centered=False)
    x = deq.train_batch()
    levels = imgs[deq.batches._perm].float()
    assert torch.all((x * 17 >= levels) & (x * 17 < levels + 1))  # (k + u)/K with u ∈ [0, 1)
    assert not torch.allclose(x * 17, levels)
    flipped, imgs = _dataset(random_flip=True, batch_size=4, seed=3, centered=False)
    x = flipped.train_batch()
    src = imgs[flipped.batches._perm].float() / 16
    is_flip = [torch.equal(a, b.flip(-1)) and not torch.equal(a, b) for a, b in zip(x, src)]
    is_same = [torch.equal(a, b) for a, b in zip(x, src)]
    assert all(f or s for f, s in zip(is_flip, is_same)) and any(is_flip)


def test_scalers_are_inverse():
    ds, _ = _dataset()
    x = torch.rand(5)
    torch.testing.assert_close(ds.from_model(ds.to_model(x)), x)
    torch.testing.assert_close(ds.to_model(torch.tensor([0.0, 1.0])), torch.tensor([-1.0, 1.0]))


def test_batch_order_resumes_exactly():
    a = ShuffledBatches(10, 3, seed=5)
    first = [a.next() for _ in range(4)]
    state = a.state_dict()
    rest = [a.next() for _ in range(5)]
    b = ShuffledBatches(10, 3, seed=5)
    b.load_state_dict(state)
    assert all(torch.equal(x, y) for x, y in zip(rest, [b.next() for _ in range(5)]))
    assert sorted(torch.cat(first[:3]).tolist()) == sorted(set(torch.cat(first[:3]).tolist()))  # no repeats in an epoch
    with pytest.raises(DatasetError, match="batch size"):
        ShuffledBatches(3, 4, seed=0)


# --- CIFAR-10 ------------------------------------------------------------------------------------------
def _fake_batch(n, seed):
    rng = np.random.default_rng(seed)
    return {b"batch_label": b"fake", b"labels": rng.integers(0, 10, n).tolist(),
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"filenames": [b"x.png"] * n}


def _write_cifar(root, as_archive, n=6):
    batches = {name: _fake_batch(n, i) for i, name in enumerate(datasets.CIFAR10_TRAIN_BATCHES + ["test_batch"])}
    if as_archive:
        with tarfile.open(root / datasets.CIFAR10_ARCHIVE, "w:gz") as tar:
            for name, content in batches.items():
                raw = pickle.dumps(content)
                info = tarfile.TarInfo(f"{datasets.CIFAR10_DIR}/{name}")
                info.size = len(raw)
                tar.addfile(info, io.BytesIO(raw))
    else:
        folder = root / datasets.CIFAR10_DIR
        folder.mkdir()
        for name, content in batches.items():
            (folder / name).write_bytes(pickle.dumps(content))
    return batches


@pytest.mark.parametrize("as_archive", [False, True])
def test_cifar10_reader_on_official_format(tmp_path, as_archive):
    batches = _write_cifar(tmp_path, as_archive)
    train, test, train_y, test_y = read_cifar10(tmp_path)
    assert train.shape == (30, 3, 32, 32) and test.shape == (6, 3, 32, 32) and train.dtype == torch.uint8
    # row-major 3072 = 3 channels × 32 rows × 32 columns (red plane first), as the official format documents
    first = batches["data_batch_1"][b"data"][0]
    assert torch.equal(train[0, 0, 0], torch.from_numpy(first[:32]))
    assert torch.equal(train[0, 1, 0], torch.from_numpy(first[1024:1056]))
    assert torch.equal(train[6], torch.from_numpy(batches["data_batch_2"][b"data"][0].reshape(3, 32, 32)))
    assert test_y.tolist() == batches["test_batch"][b"labels"]
    assert train_y[:6].tolist() == batches["data_batch_1"][b"labels"]


def test_cifar10_through_get_dataset(tmp_path):
    _write_cifar(tmp_path, as_archive=False)
    config = default_config()
    config.data.dataset, config.data.root = "cifar10", str(tmp_path)
    config.data.image_size, config.data.num_channels, config.training.batch_size = 32, 3, 5
    config.data.random_flip = True
    ds = datasets.get_dataset(config)
    batch = ds.train_batch()
    assert batch.shape == (5, 3, 32, 32) and -1 <= batch.min() and batch.max() <= 1
    config.data.image_size = 64
    with pytest.raises(DatasetError, match="image_size"):
        datasets.get_dataset(config)


def test_cifar10_missing_gives_instructions(tmp_path):
    with pytest.raises(DatasetError) as err:
        read_cifar10(tmp_path / "nowhere", download=False)
    msg = str(err.value)
    assert "cifar-10-python.tar.gz" in msg and "c58f30108f718f92721af3b95e74349a" in msg and "data.root" in msg


def test_cifar10_offline_download_fails_with_instructions(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")
    monkeypatch.setattr(datasets.urllib.request, "urlopen", offline)
    with pytest.raises(DatasetError, match="download failed.*no network"):
        read_cifar10(tmp_path, download=True)
    assert not list(tmp_path.iterdir())  # nothing half-written is left behind


def test_cifar10_download_checks_md5(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.urllib.request, "urlopen", lambda *a, **k: io.BytesIO(b"not the archive"))
    with pytest.raises(DatasetError, match="MD5"):
        read_cifar10(tmp_path, download=True)
    assert not (tmp_path / datasets.CIFAR10_ARCHIVE).exists()


def test_cifar10_corrupt_files_are_named(tmp_path):
    _write_cifar(tmp_path, as_archive=False)
    (tmp_path / datasets.CIFAR10_DIR / "data_batch_3").write_bytes(b"garbage")
    with pytest.raises(DatasetError, match="data_batch_3"):
        read_cifar10(tmp_path)
    (tmp_path / datasets.CIFAR10_DIR / "data_batch_3").unlink()
    with pytest.raises(DatasetError, match="lacks data_batch_3"):
        read_cifar10(tmp_path)
