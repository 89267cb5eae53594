"""Count what makes the host wait for the device: reading a tensor's value into Python (`.item()`, `float(t)`,
`bool(t)`, `int(t)`), data-dependent shapes (`nonzero`, boolean-mask indexing) and device-to-host copies.

    with HostSyncCounter() as syncs:
        step_fn(x, step, score_fn)
    assert syncs.count == 0, syncs.events

On a CPU-only machine nothing truly waits, but the same calls are made, so counting them on CPU tells what a GPU
would wait for (a host copy from CPU to CPU is not counted).
"""
from __future__ import annotations

import traceback
from typing import List, Tuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# ATen operators whose result the host must read: scalars into Python, data-dependent output shapes.
SYNC_OPS = frozenset({"_local_scalar_dense", "item", "nonzero", "nonzero_static", "is_nonzero", "masked_select",
                      "unique", "_unique2", "unique_consecutive", "equal"})
COPY_OPS = frozenset({"_to_copy", "copy_", "to"})
# Indexing operators whose boolean-mask form has a data-dependent shape (a nonzero inside).
MASK_INDEX_OPS = frozenset({"index", "_index_put_impl_", "index_put", "index_put_"})


def _is_host(value) -> bool:
    return isinstance(value, torch.Tensor) and value.device.type == "cpu"


class HostSyncCounter(TorchDispatchMode):
    """A dispatch mode that records every synchronising operator run inside it: `events` lists (operator, where),
    `where` the innermost frame of this package (or of the caller) that issued it; `count` is their number."""

    def __init__(self, stack: bool = True):
        super().__init__()
        self.events: List[Tuple[str, str]] = []
        self.stack = stack

    @property
    def count(self) -> int:
        return len(self.events)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name.split("::")[-1]
        out = func(*args, **kwargs)
        if (name in SYNC_OPS or (name in COPY_OPS and self._device_to_host(args, kwargs, out))
                or (name in MASK_INDEX_OPS and self._masked(args))):
            self.events.append((name, self._where() if self.stack else ""))
        return out

    @staticmethod
    def _device_to_host(args, kwargs, out) -> bool:
        sources = [a for a in args if isinstance(a, torch.Tensor)]
        source = sources[-1] if sources else None  # copy_(dst, src): the source is last; _to_copy(src)
        return source is not None and not _is_host(source) and _is_host(out)

    @staticmethod
    def _masked(args) -> bool:
        indices = args[1] if len(args) > 1 and isinstance(args[1], (list, tuple)) else ()
        return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices)

    @staticmethod
    def _where() -> str:
        frames = [f for f in traceback.extract_stack()[:-3] if "torch/" not in f.filename]
        ours = [f for f in frames if "sde_diffusion" in f.filename] or frames
        frame = ours[-1]
        return f"{frame.filename.split('/')[-1]}:{frame.lineno}"
