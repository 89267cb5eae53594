"""uint8 images in memory and their training batches: shuffled, sharded over ranks, augmented, and resumable.

Batch order and augmentation are pure functions of (seed, epoch, position), so they are saved in checkpoints and
resume exactly, whether batches are built in the main process or by DataLoader workers, on one rank or many.
"""
from __future__ import annotations

from typing import Dict, Iterator, NamedTuple, Optional, Tuple

import numpy as np
import torch
import torch.utils.data

from ..distributed import global_rows
from ..errors import DatasetError

# --------------------------------------------------------------------------------------------------
# Augmentation noise: a counter-based hash, the same bits on every device
# --------------------------------------------------------------------------------------------------
_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15  # splitmix64's increment (2⁶⁴/φ)
_MIX1, _MIX2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB  # splitmix64's multipliers
UNIFORM_BITS = 24  # a float32 in [0, 1) holds 24 significant bits
# Streams of one batch seed: dequantization noise and flips are drawn independently.
DEQUANTIZE_STREAM, FLIP_STREAM = 1, 2


def _signed(value: int) -> int:
    """An unsigned 64-bit value as the int64 with the same bits."""
    value &= _MASK64
    return value - (1 << 64) if value >= 1 << 63 else value


def _shift_right(z: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 bits (torch's >> is arithmetic)."""
    return (z >> bits) & ((1 << (64 - bits)) - 1)


def splitmix64(z: torch.Tensor) -> torch.Tensor:
    """splitmix64's output function on int64 tensors (wrapping arithmetic, identical on every device)."""
    z = z + _signed(_GOLDEN)
    z = (z ^ _shift_right(z, 30)) * _signed(_MIX1)
    z = (z ^ _shift_right(z, 27)) * _signed(_MIX2)
    return z ^ _shift_right(z, 31)


def _splitmix64_int(z: int) -> int:
    """splitmix64 on a Python integer (mod 2⁶⁴): `splitmix64` without a tensor."""
    z = (z + _GOLDEN) & _MASK64
    z = ((z ^ (z >> 30)) * _MIX1) & _MASK64
    z = ((z ^ (z >> 27)) * _MIX2) & _MASK64
    return z ^ (z >> 31)


def hashed_uniform(seed: int, stream: int, shape, device=None) -> torch.Tensor:
    """U[0, 1) float32 numbers of `shape`, element k = the top UNIFORM_BITS of splitmix64(key + k), key a hash of
    (seed, stream): a pure function of its arguments, bit-identical on CPU and GPU, drawn where it is used."""
    key = _signed(_splitmix64_int(seed * 0x100000001B3 + stream))  # on the host, in Python integers
    count = int(np.prod(shape)) if len(shape) else 1
    z = splitmix64(torch.arange(count, dtype=torch.int64, device=device) + key)
    top = _shift_right(z, 64 - UNIFORM_BITS)
    return (top.to(torch.float32) * 2.0**-UNIFORM_BITS).reshape(shape)


# --------------------------------------------------------------------------------------------------
# Batch order
# --------------------------------------------------------------------------------------------------
PERMUTATION_SEED_STRIDE = 1_000_003  # epoch e of seed s is shuffled by torch.randperm with seed s·stride + e


class BatchPlan(NamedTuple):
    """One training batch before it is built: this rank's rows of the dataset and the seed of its augmentation."""

    indices: torch.Tensor  # (batch_size,) int64 rows of the training split for this rank
    seed: int  # seeds the flips and dequantization noise of the whole global batch


def batch_seed(seed: int, epoch: int, position: int) -> int:
    """The augmentation seed of the global batch starting at `position` of epoch `epoch`: a pure function."""
    return int(np.random.SeedSequence([seed, epoch, position]).generate_state(1, np.uint64)[0] >> 1)  # < 2⁶³


class ShuffledBatches:
    """Endless batches of indices into n examples: a fresh permutation per epoch, the last partial global batch
    dropped. The order is a pure function of (seed, epoch, position), so `state_dict` resumes it exactly.

    Sharding (an exact, resumable replacement for torch's DistributedSampler): with `world_size` ranks each
    rank draws the same global batch of batch_size·world_size indices from the same permutation and keeps rows
    [rank·batch_size, (rank+1)·batch_size). The ranks' batches, concatenated, are exactly the batches that one
    process with the global batch size draws, and every rank holds the same (epoch, position) state.
    """

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1, device=None):
        if not 0 <= rank < world_size:
            raise DatasetError(f"rank {rank} is outside 0..{world_size - 1} (world_size={world_size})")
        self.global_size = batch_size * world_size
        if self.global_size > n:
            raise DatasetError(f"batch size {batch_size} × {world_size} rank(s) = {self.global_size} exceeds the {n} "
                               "training examples: lower training.batch_size")
        self.n, self.batch_size, self.seed, self.rank, self.world_size = n, batch_size, seed, rank, world_size
        self.device = torch.device("cpu") if device is None else torch.device(device)
        self.epoch, self.position = 0, 0
        self._perm = self._permutation()

    def _permutation(self) -> torch.Tensor:
        """The epoch's order, drawn on the host and copied to `device` once per epoch."""
        generator = torch.Generator().manual_seed(self.seed * PERMUTATION_SEED_STRIDE + self.epoch)
        return torch.randperm(self.n, generator=generator).to(self.device)

    def to(self, device) -> "ShuffledBatches":
        """Hand out indices on `device` from now on (the order is unchanged)."""
        self.device = torch.device(device)
        self._perm = self._perm.to(self.device)
        return self

    def next_plan(self) -> BatchPlan:
        """This rank's next batch with its augmentation seed; advances the shared (epoch, position)."""
        if self.position + self.global_size > self.n:
            self.epoch, self.position = self.epoch + 1, 0
            self._perm = self._permutation()
        start = self.position + self.rank * self.batch_size
        plan = BatchPlan(self._perm[start:start + self.batch_size], batch_seed(self.seed, self.epoch, self.position))
        self.position += self.global_size
        return plan

    def next(self) -> torch.Tensor:
        """This rank's next batch of indices, (batch_size,)."""
        return self.next_plan().indices

    def state_dict(self) -> Dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: Dict[str, int]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._perm = self._permutation()

    def copy(self) -> "ShuffledBatches":
        """An independent cursor at the same state (what a DataLoader's sampler iterates ahead with)."""
        clone = ShuffledBatches(self.n, self.batch_size, self.seed, self.rank, self.world_size, self.device)
        clone.load_state_dict(self.state_dict())
        return clone


LOADER_SEED = 0  # the DataLoader's own generator (its workers' base seed; the batches do not depend on it)


class _PlanStream:
    """The plans a ShuffledBatches cursor would give from its current state on, forever (a DataLoader sampler)."""

    def __init__(self, batches: ShuffledBatches):
        self.start = batches.copy()

    def __iter__(self) -> Iterator[BatchPlan]:
        cursor = self.start.copy()
        while True:
            yield cursor.next_plan()


class BatchMaker:
    """Builds a training batch from its plan: a pure function of (images, plan), so it gives the same tensor in
    the main process, in any DataLoader worker and on the device that holds `images` (`hashed_uniform`). The noise
    of the whole global batch is drawn from the plan's seed and this rank keeps its rows, so the ranks' batches
    together equal the single-process global batch."""

    def __init__(self, images: torch.Tensor, num_levels: int, *, dequantize: bool, random_flip: bool,
                 rank: int, batch_size: int, world_size: int):
        self.images, self.num_levels = images, num_levels
        self.dequantize, self.random_flip = dequantize, random_flip
        self.global_size, self.rows = global_rows(batch_size, rank, world_size)

    def __getitem__(self, plan: BatchPlan) -> Tuple[torch.Tensor, torch.Tensor, int]:
        """(batch, C, H, W) floats in [0, 1], augmented; the plan's indices and seed (to check the order)."""
        device = self.images.device
        images = self.images[plan.indices.to(device)]
        if self.dequantize:  # (k + u)/K, u ~ U[0, 1)
            noise = hashed_uniform(plan.seed, DEQUANTIZE_STREAM, (self.global_size, *images.shape[1:]), device)
            x = (images.float() + noise[self.rows]) / self.num_levels
        else:  # k/(K − 1)
            x = images.float() / (self.num_levels - 1)
        if self.random_flip:
            flip = hashed_uniform(plan.seed, FLIP_STREAM, (self.global_size,), device)[self.rows] < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        return x, plan.indices, plan.seed


# --------------------------------------------------------------------------------------------------
# Image datasets
# --------------------------------------------------------------------------------------------------
class ImageDataset:
    """uint8 images with `num_levels` levels; see the module docstring for the float/scaling conventions.

    Training batches come from `ShuffledBatches` (sharded by `rank` / `world_size`) and are built by
    `BatchMaker`, in the main process (num_workers=0) or by a DataLoader with `num_workers` worker processes
    and pinned memory; both give bit-identical batches, and `state_dict` resumes either exactly.
    """

    is_image = True

    def __init__(self, train: torch.Tensor, test: torch.Tensor, num_levels: int, *, batch_size: int, seed: int,
                 centered: bool, random_flip: bool, uniform_dequantization: bool,
                 train_labels: Optional[torch.Tensor] = None, test_labels: Optional[torch.Tensor] = None,
                 rank: int = 0, world_size: int = 1, num_workers: int = 0, pin_memory: bool = False):
        self.train, self.test, self.num_levels = train, test, num_levels
        self.train_labels, self.test_labels = train_labels, test_labels
        self.centered, self.random_flip, self.dequantize = centered, random_flip, uniform_dequantization
        self.shape = tuple(train.shape[1:])
        self.batches = ShuffledBatches(len(train), batch_size, seed, rank, world_size)
        self.maker = BatchMaker(train, num_levels, dequantize=uniform_dequantization, random_flip=random_flip,
                                rank=rank, batch_size=batch_size, world_size=world_size)
        self.num_workers = num_workers
        self.pin_memory = pin_memory and torch.cuda.is_available()
        self._worker_batches = None  # iterator over a DataLoader, started at the first batch after (re)loading

    # scaling -------------------------------------------------------------------------------------
    def to_float(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 levels k → k/(K−1) in [0, 1]."""
        return images.float() / (self.num_levels - 1)

    def to_model(self, x: torch.Tensor) -> torch.Tensor:
        """[0, 1] → the network's input scale."""
        return 2.0 * x - 1.0 if self.centered else x

    def from_model(self, x: torch.Tensor) -> torch.Tensor:
        """The network's scale → [0, 1] (inverse of `to_model`)."""
        return (x + 1.0) / 2.0 if self.centered else x

    def to_device(self, device) -> "ImageDataset":
        """Hold the training images (uint8) and labels on `device` and build every batch there: indices, flips and
        dequantization noise never cross to the host, and the batches equal the host-built ones bit for bit."""
        device = torch.device(device)
        self.train = self.train.to(device)
        if self.train_labels is not None:
            self.train_labels = self.train_labels.to(device)
        self.batches.to(device)
        self.maker.images = self.train
        self.num_workers, self.pin_memory, self._worker_batches = 0, False, None
        return self

    # batches ---------------------------------------------------------------------------------------
    def train_batch(self, with_labels: bool = False, with_indices: bool = False):
        """(batch, C, H, W) float training batch in model space, augmented as configured; with `with_labels`,
        also the (batch,) int64 class labels of its images; with `with_indices`, instead their (batch,) indices
        into the training split (e.g. for per-image captions)."""
        if with_labels and self.train_labels is None:
            raise DatasetError("class labels were requested but this dataset has none: for data.dataset='folder' "
                               "set data.labels to 'folders' or to a labels file")
        built = self._loader_batches() if self.num_workers > 0 else None  # started from the cursor's state
        plan = self.batches.next_plan()
        if built is not None:
            x, indices, seed = next(built)
            if seed != plan.seed or not torch.equal(indices, plan.indices):  # workers build ahead, in plan order
                raise RuntimeError("DataLoader batches are out of step with the batch order")
        else:
            x, _, _ = self.maker[plan]
            if self.pin_memory:
                x = x.pin_memory()
        x = self.to_model(x)
        if with_indices:
            return x, plan.indices
        return (x, self.train_labels[plan.indices]) if with_labels else x

    def _loader_batches(self) -> Iterator:
        """Batches built by DataLoader workers from the plans the cursor will give next (started lazily).

        The loader gets its own generator: starting it would otherwise draw its workers' base seed from the global
        random stream, so a run resumed from a checkpoint (which starts a new loader) would draw dropout masks
        other than the uninterrupted run's. The batches depend on their plans only, not on the workers' seeds."""
        if self._worker_batches is None:
            loader = torch.utils.data.DataLoader(self.maker, batch_size=None, sampler=_PlanStream(self.batches),
                                                 num_workers=self.num_workers, pin_memory=self.pin_memory,
                                                 generator=torch.Generator().manual_seed(LOADER_SEED))
            self._worker_batches = iter(loader)
        return self._worker_batches

    def eval_batches(self, batch_size: int, split: str = "test", with_labels: bool = False) -> Iterator:
        """Model-space float batches over a whole split, in order, no augmentation; with_labels: (batch, labels)."""
        data = self.test if split == "test" else self.train
        labels = require_labels(self.test_labels if split == "test" else self.train_labels, split) \
            if with_labels else None
        for start in range(0, len(data), batch_size):
            x = self.to_model(self.to_float(data[start:start + batch_size]))
            yield (x, labels[start:start + batch_size]) if with_labels else x

    def state_dict(self) -> Dict:
        return {"batches": self.batches.state_dict()}

    def load_state_dict(self, state: Dict) -> None:
        """Resume the batch order (an 'rng' entry, which some checkpoints hold, is ignored)."""
        self.batches.load_state_dict(state["batches"])
        self._worker_batches = None  # workers restart from the restored position


def require_labels(labels: Optional[torch.Tensor], split: str) -> torch.Tensor:
    """labels, or a DatasetError when the split has none."""
    if labels is None:
        raise DatasetError(f"this dataset has no class labels for its {split} split: class-conditional training "
                           "and classifiers need a labelled dataset (sde_diffusion.data.datasets.NUM_CLASSES), or "
                           "folder data with data.labels ('folders' or a labels file)")
    return labels
