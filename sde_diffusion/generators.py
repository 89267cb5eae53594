"""Random draws of sampling behind one helper, `randn`: from one torch.Generator for the whole batch, or from one
generator per sample (`SampleGenerators`), so that a sample depends only on its own seed.

Every Gaussian draw of the samplers (sampling/terms.py `noise`), of the constraints and of the prior
(`SDE.prior_sampling`) goes through `randn`. With a plain torch.Generator (or None: torch's global stream) it is
`torch.randn(*shape, generator=...)`, bit for bit as before. With SampleGenerators row i of every draw comes from
generator i alone (EDM's per-sample generators, Karras et al. 2022): a sample is the same whatever batch, round or
process it is drawn in, up to the float round-off of batched network evaluations.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor

ENTROPY_BITS = 62  # of the integer seed a batch-wide random object (torchsde's Brownian tree) is given


class SampleGenerators:
    """One torch.Generator per sample, seeded by `seeds` (ints), all on `device` (None: the CPU).

    Pass it as `generator=` to `sampling.sample` (and `sde.prior_sampling`, `terms.noise`): row i of each draw
    comes from generator i, so sample i depends only on seeds[i]. The batch must have len(seeds) rows.
    """

    def __init__(self, seeds: Sequence[int], device=None):
        if len(seeds) == 0:
            raise ValueError("SampleGenerators needs one seed per sample, got none")
        self.seeds = [int(seed) for seed in seeds]
        self.device = torch.device("cpu" if device is None else device)
        self.generators = [torch.Generator(device=self.device).manual_seed(seed) for seed in self.seeds]

    def __len__(self) -> int:
        return len(self.generators)

    def __repr__(self) -> str:
        return f"SampleGenerators({len(self)} seeds, device={self.device})"

    def randn(self, shape: Sequence[int], device=None, dtype: Optional[torch.dtype] = None) -> Tensor:
        """z ~ N(0, I) of shape (len(self), ...): row i drawn by generator i (on self.device, then moved to
        `device` when given)."""
        shape = tuple(shape)
        if not shape or shape[0] != len(self):
            raise ValueError(f"a draw of shape {shape} from {len(self)} per-sample generators: the batch must "
                             f"have one row per generator ({len(self)})")
        rows = [torch.randn(shape[1:], generator=g, device=self.device, dtype=dtype) for g in self.generators]
        z = torch.stack(rows)
        return z if device is None else z.to(device)

    def entropy(self) -> int:
        """One integer seed drawn from every generator together (one draw each), for a random object that serves
        the whole batch at once: reproducible for the same seeds, but it depends on every sample of the batch."""
        draws = [int(torch.randint(2**ENTROPY_BITS, (1,), generator=g, device=self.device).item())
                 for g in self.generators]
        return int(np.random.SeedSequence(draws).generate_state(1, np.uint64)[0]) >> (64 - ENTROPY_BITS)


Generator = Union[torch.Generator, SampleGenerators, None]


def randn(shape: Sequence[int], generator: Generator = None, device=None,
          dtype: Optional[torch.dtype] = None) -> Tensor:
    """z ~ N(0, I) of `shape` from `generator`: a torch.Generator (None: torch's global stream) draws the whole
    batch; SampleGenerators draws row i from generator i."""
    if isinstance(generator, SampleGenerators):
        return generator.randn(shape, device, dtype)
    return torch.randn(*shape, generator=generator, device=device, dtype=dtype)


def entropy(generator: Generator) -> Optional[int]:
    """An integer seed for a batch-wide random object (torchsde's Brownian tree) from `generator`; None for None.
    A torch.Generator gives one draw; SampleGenerators one from all of its generators (`SampleGenerators.entropy`)."""
    if generator is None:
        return None
    if isinstance(generator, SampleGenerators):
        return generator.entropy()
    return int(torch.randint(2**ENTROPY_BITS, (1,), generator=generator, device=generator.device).item())
