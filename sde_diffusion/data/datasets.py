"""Datasets: sklearn digits, CIFAR-10 (official python format), your own images, and 2-D toy distributions.

Image datasets keep their uint8 pixels (K grey levels per channel) in memory, shape (N, C, H, W).
Training batches are float images in [0, 1] (k/(K−1), or (k + u)/K with uniform dequantization),
optionally flipped, then mapped to the network's input scale by `to_model` ([−1, 1] when
`data.centered`, else [0, 1]); `from_model` inverts that map. Toy datasets are already in model space.
Batching (shuffled, sharded, resumable) is image_dataset.py's; your own images (data.dataset='folder') are read by
image_folder.py.
"""
from __future__ import annotations

import hashlib
import os
import pickle
import tarfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Dict, Iterator, Optional, Tuple

import numpy as np
import torch

from .. import toy
from ..distributed import global_rows
from ..errors import ConfigError, DatasetError, choice
from .image_dataset import (BatchMaker, BatchPlan, ImageDataset, PERMUTATION_SEED_STRIDE,  # noqa: F401
                            ShuffledBatches, batch_seed, require_labels)

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_ARCHIVE = "cifar-10-python.tar.gz"
CIFAR10_DIR = "cifar-10-batches-py"
CIFAR10_TRAIN_BATCHES = [f"data_batch_{i}" for i in range(1, 6)]
CIFAR10_TEST_BATCH = "test_batch"

DIGITS_LEVELS = 17  # sklearn's 8×8 digits have grey levels 0..16
DIGITS_TEST_SIZE = 297  # of 1797 images; the remaining 1500 train
DIGITS_SPLIT_SEED = 0


def load_digits_uint8() -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """sklearn's digits as uint8 levels 0..16, (N, 1, 8, 8), split by a fixed seed: train, test, labels of each."""
    from sklearn.datasets import load_digits
    digits = load_digits()
    images = torch.from_numpy(digits.images.astype(np.uint8))[:, None]
    labels = torch.from_numpy(digits.target.astype(np.int64))
    perm = torch.randperm(len(images), generator=torch.Generator().manual_seed(DIGITS_SPLIT_SEED))
    test_idx, train_idx = perm[:DIGITS_TEST_SIZE], perm[DIGITS_TEST_SIZE:]
    return images[train_idx], images[test_idx], labels[train_idx], labels[test_idx]


DIGITS_UPSAMPLED_SIZES = (16, 32, 64)  # data.image_size for digits besides 8: upsampled bilinearly once
UPSAMPLED_LEVELS = 256


def upsample_levels(images: torch.Tensor, levels: int, size: int) -> torch.Tensor:
    """uint8 images with `levels` grey levels (N, C, h, w) → 8-bit images (N, C, size, size), bilinear."""
    x = images.float() / (levels - 1)
    x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return (x * (UPSAMPLED_LEVELS - 1)).round().clamp(0, UPSAMPLED_LEVELS - 1).to(torch.uint8)


# --- CIFAR-10 -----------------------------------------------------------------------------------------
def _md5(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "md5").hexdigest()


def _missing_cifar_message(root: Path, reason: str) -> str:
    return (f"CIFAR-10 was not found under data.root={str(root)!r} ({reason}). Download {CIFAR10_URL} "
            f"(MD5 {CIFAR10_MD5}) and put it at {root / CIFAR10_ARCHIVE} (or its extracted folder at "
            f"{root / CIFAR10_DIR}), or point data.root at the folder that holds it.")


def download_cifar10(root: Path) -> Path:
    """Fetch the official archive into root, verify its MD5, and move it into place atomically."""
    root.mkdir(parents=True, exist_ok=True)
    target = root / CIFAR10_ARCHIVE
    partial = target.with_suffix(".part")
    try:
        with urllib.request.urlopen(CIFAR10_URL, timeout=60) as response, open(partial, "wb") as f:
            while chunk := response.read(1 << 20):
                f.write(chunk)
    except (urllib.error.URLError, OSError) as err:
        partial.unlink(missing_ok=True)
        raise DatasetError(_missing_cifar_message(root, f"download failed: {err}")) from err
    if (digest := _md5(partial)) != CIFAR10_MD5:
        partial.unlink(missing_ok=True)
        raise DatasetError(f"the downloaded {CIFAR10_ARCHIVE} has MD5 {digest}, expected {CIFAR10_MD5}: "
                           "the download is corrupt; try again")
    os.replace(partial, target)
    return target


def _parse_cifar_batch(raw: bytes, name: str) -> Tuple[np.ndarray, np.ndarray]:
    try:
        batch = pickle.loads(raw, encoding="bytes")
        data, labels = np.asarray(batch[b"data"]), np.asarray(batch[b"labels"], dtype=np.int64)
    except Exception as err:  # noqa: BLE001 - any unpickling problem means a corrupt file
        raise DatasetError(f"CIFAR-10 file {name} is not a valid python-format batch ({err}); re-download it") from err
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(labels) != len(data):
        raise DatasetError(f"CIFAR-10 file {name} holds data of shape {data.shape} ({data.dtype}) with "
                           f"{len(labels)} labels; expected (n, 3072) uint8 with n labels: re-download it")
    return data.reshape(-1, 3, 32, 32), labels


def read_cifar10(root, download: bool = False) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Train/test uint8 images (N, 3, 32, 32) and labels from the extracted folder or the archive under root."""
    root = Path(root).expanduser()
    folder, archive = root / CIFAR10_DIR, root / CIFAR10_ARCHIVE
    names = CIFAR10_TRAIN_BATCHES + [CIFAR10_TEST_BATCH]
    if folder.is_dir():
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise DatasetError(_missing_cifar_message(root, f"{folder} lacks {', '.join(missing)}"))
        raw = {n: (folder / n).read_bytes() for n in names}
    else:
        if not archive.is_file():
            if not download:
                raise DatasetError(_missing_cifar_message(root, "no archive or extracted folder; downloads are off "
                                                                "(data.download=False)"))
            archive = download_cifar10(root)
        try:
            with tarfile.open(archive, "r:gz") as tar:
                members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
                missing = [n for n in names if n not in members]
                if missing:
                    raise DatasetError(_missing_cifar_message(root, f"{archive} lacks {', '.join(missing)}"))
                raw = {n: tar.extractfile(members[n]).read() for n in names}
        except (tarfile.TarError, OSError, EOFError) as err:
            raise DatasetError(f"{archive} is not a readable .tar.gz ({err}): delete it and download it again") from err
    train = [_parse_cifar_batch(raw[n], n) for n in CIFAR10_TRAIN_BATCHES]
    test_x, test_y = _parse_cifar_batch(raw[CIFAR10_TEST_BATCH], CIFAR10_TEST_BATCH)
    train_x, train_y = np.concatenate([b[0] for b in train]), np.concatenate([b[1] for b in train])
    return (torch.from_numpy(train_x), torch.from_numpy(test_x), torch.from_numpy(train_y), torch.from_numpy(test_y))


# --------------------------------------------------------------------------------------------------
# Toy datasets
# --------------------------------------------------------------------------------------------------
TOY_SAMPLERS = {
    "gmm": lambda n, g: toy.default_mixture().sample(n, g)[0],
    "moons": toy.two_moons,
    "swiss_roll": toy.swiss_roll,
}
TOY_LABELLED_SAMPLERS = {  # the same draws as TOY_SAMPLERS (same random numbers) with their (n,) class labels
    "gmm": lambda n, g: toy.default_mixture().sample(n, g),  # label = mixture component
}
TOY_DENSITIES = {  # exact log-densities (n, d) → (n,) nats, where the distribution has one in closed form
    "gmm": lambda x: toy.default_mixture().log_prob(x),
}
TOY_TEST_SIZE = 4096


class ToyDataset:
    """An endless stream of fresh samples of a 2-D distribution; a fixed test set of TOY_TEST_SIZE points."""

    is_image = False

    def __init__(self, name: str, *, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        self.name, self.batch_size, self.rank, self.world_size = name, batch_size, rank, world_size
        self._draw = TOY_SAMPLERS[name]
        self.log_prob = TOY_DENSITIES.get(name)  # exact density of the data, or None
        self._draw_labelled = TOY_LABELLED_SAMPLERS.get(name)
        test_generator = torch.Generator().manual_seed(seed + 12345)
        if self._draw_labelled is not None:
            self.test, self.test_labels = self._draw_labelled(TOY_TEST_SIZE, test_generator)
        else:
            self.test, self.test_labels = self._draw(TOY_TEST_SIZE, test_generator), None
        self.test = self.test.float()
        self.shape = tuple(self.test.shape[1:])
        self.rng = torch.Generator().manual_seed(seed)

    def to_model(self, x):
        return x

    def from_model(self, x):
        return x

    def train_batch(self, with_labels: bool = False):
        """This rank's rows of a global batch of batch_size × world_size fresh samples; with_labels: the pair
        (samples, (batch,) class labels), from the same draws."""
        n, rows = global_rows(self.batch_size, self.rank, self.world_size)
        if not with_labels:
            return self._draw(n, self.rng).float()[rows]
        if self._draw_labelled is None:
            require_labels(None, "train")
        x, labels = self._draw_labelled(n, self.rng)
        return x.float()[rows], labels[rows]

    def eval_batches(self, batch_size: int, split: str = "test", with_labels: bool = False) -> Iterator:
        labels = require_labels(self.test_labels, "test") if with_labels else None
        for start in range(0, len(self.test), batch_size):
            x = self.test[start:start + batch_size]
            yield (x, labels[start:start + batch_size]) if with_labels else x

    def state_dict(self) -> Dict:
        return {"rng": self.rng.get_state()}

    def load_state_dict(self, state: Dict) -> None:
        self.rng.set_state(state["rng"])


# --------------------------------------------------------------------------------------------------
FOLDER = "folder"  # your own images (sde_diffusion/data/image_folder.py): channels and size come from the config
IMAGE_DATASETS = {"digits": (1, 8, DIGITS_LEVELS), "cifar10": (3, 32, 256),
                  FOLDER: (None, None, 256)}  # channels, size, levels
NUM_CLASSES = {"digits": 10, "cifar10": 10, "gmm": 4}  # datasets with class labels 0..n−1 (folder: data.labels)
DATASETS = sorted(list(IMAGE_DATASETS) + list(TOY_SAMPLERS))


def dataset_classes(config, dataset=None) -> int:
    """Number of classes (labels 0..n−1) of the dataset named by config.data.dataset, 0 when unlabelled: NUM_CLASSES
    for the built-in ones; for folder data, counted from the labels of the loaded `dataset` (data.labels)."""
    name = config.data.dataset.lower()
    if name != FOLDER:
        return NUM_CLASSES.get(name, 0)
    if dataset is None:
        raise ValueError("the classes of folder data are counted from its labels: pass the loaded dataset")
    labels = [y for y in (dataset.train_labels, dataset.test_labels) if y is not None and len(y)]
    return max([len(dataset.class_names or [])] + [int(y.max()) + 1 for y in labels])


def declared_classes(config) -> Optional[int]:
    """Number of classes config.data promises before any image is read: NUM_CLASSES for the built-in datasets
    (0 when unlabelled), None for folder data with data.labels (counted when the images are loaded)."""
    d = config.data
    if d.dataset.lower() == FOLDER and d.labels != "none":
        return None
    return NUM_CLASSES.get(d.dataset.lower(), 0)


def is_image_data(config) -> bool:
    """Whether config.data names an image dataset (else vector data)."""
    return config.data.dataset.lower() in IMAGE_DATASETS


def check_config(config) -> None:
    """The data.* keys: the dataset's name, the loader, and the folder keys (image_folder.check_config)."""
    d = config.data
    choice("data.dataset", d.dataset.lower(), DATASETS)
    if d.num_workers < 0:
        raise ConfigError(f"data.num_workers must be ≥ 0 (0: batches built in the main process), got {d.num_workers}")
    if d.on_device not in ("auto", True, False):
        raise ConfigError(f"data.on_device must be 'auto', True or False, got {d.on_device!r}")
    if d.dataset.lower() == FOLDER:
        from .image_folder import check_config as check_folder  # Pillow, only for your own images
        check_folder(d)


def check_classes(config, dataset) -> None:
    """model.num_classes must equal the loaded dataset's class count (folder labels are only known now)."""
    wanted, found = config.model.num_classes, dataset_classes(config, dataset)
    if wanted and wanted != found:
        names = dataset.class_names
        shown = f" ({', '.join(names[:8])}{', …' if len(names) > 8 else ''})" if names else ""
        raise ConfigError(f"model.num_classes={wanted}, but the labels of data.root={config.data.root!r} "
                          f"(data.labels={config.data.labels!r}) have {found} classes{shown}: set "
                          f"model.num_classes={found}")


def get_dataset(config, rank: int = 0, world_size: int = 1):
    """Build the dataset named by config.data.dataset (case-insensitive), checking it against the config.

    Image datasets are sharded for distributed training: this process is `rank` of `world_size`, each drawing
    training.batch_size images of every global batch (see ShuffledBatches)."""
    d = config.data
    name = d.dataset.lower()
    seed, batch_size = config.seed, config.training.batch_size
    if name in TOY_SAMPLERS:
        if d.dim != 2:
            raise DatasetError(f"toy dataset {name!r} is 2-D but data.dim={d.dim}: set data.dim=2")
        return ToyDataset(name, batch_size=batch_size, seed=seed, rank=rank, world_size=world_size)
    if name not in IMAGE_DATASETS:
        raise DatasetError(f"data.dataset={d.dataset!r} is not one of {DATASETS}")
    loading = dict(batch_size=batch_size, seed=seed, centered=d.centered, random_flip=d.random_flip,
                   uniform_dequantization=d.uniform_dequantization, rank=rank, world_size=world_size,
                   num_workers=d.num_workers, pin_memory=d.pin_memory)
    if name == FOLDER:
        from .image_folder import load_folder_dataset  # late import: Pillow only when it is needed
        dataset = load_folder_dataset(d, **loading)
        check_classes(config, dataset)
        return dataset
    channels, size, levels = IMAGE_DATASETS[name]
    if name == "digits" and d.num_channels == channels and d.image_size in DIGITS_UPSAMPLED_SIZES:
        train, test, train_y, test_y = (upsample_levels(v, DIGITS_LEVELS, d.image_size) if i < 2 else v
                                        for i, v in enumerate(load_digits_uint8()))
        dataset = ImageDataset(train, test, UPSAMPLED_LEVELS, train_labels=train_y, test_labels=test_y, **loading)
        dataset.reference_name = f"digits_{d.image_size}px"  # FID statistics apart from the 8×8 ones
        return dataset
    if (d.num_channels, d.image_size) != (channels, size):
        also = f" (digits: or image_size {', '.join(map(str, DIGITS_UPSAMPLED_SIZES))}, upsampled)" \
            if name == "digits" else ""
        raise DatasetError(f"{name} images are {channels}×{size}×{size} but the config says data.num_channels="
                           f"{d.num_channels}, data.image_size={d.image_size}: set them to {channels} and {size}"
                           f"{also}")
    if name == "digits":
        train, test, train_y, test_y = load_digits_uint8()
    else:
        train, test, train_y, test_y = read_cifar10(d.root, download=d.download)
    return ImageDataset(train, test, levels, train_labels=train_y, test_labels=test_y, **loading)
