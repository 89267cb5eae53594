"""Exponential moving average of network weights, used for sampling and evaluation."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Dict, Iterable, Iterator, List, Optional

import torch
from torch import nn


class ExponentialMovingAverage:
    """shadow ← decay·shadow + (1 − decay)·param for every trainable parameter, after each optimizer step.

    With `use_num_updates` the decay is min(decay, (1 + n)/(10 + n)) after n updates, so early averages are not
    dominated by the random initialization. `store`/`copy_to`/`restore` swap the averaged weights in and out.
    """

    def __init__(self, parameters: Iterable[nn.Parameter], decay: float, use_num_updates: bool = True):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay (model.ema_rate) must be in [0, 1], got {decay}")
        self.decay = decay
        self.num_updates = 0 if use_num_updates else None
        self.shadow_params: List[torch.Tensor] = [p.detach().clone() for p in parameters if p.requires_grad]
        self.collected_params: List[torch.Tensor] = []

    @staticmethod
    def _trainable(parameters):
        return [p for p in parameters if p.requires_grad]

    @torch.no_grad()
    def update(self, parameters: Iterable[nn.Parameter], mask: Optional[torch.Tensor] = None) -> None:
        """One EMA step towards `parameters`; with `mask` (a 0-d bool tensor) only where it is True, decided on the
        device (no host synchronisation: the update count then lives on the device too)."""
        if mask is None:
            decay = self.decay
            if self.num_updates is not None:
                self.num_updates = int(self.num_updates) + 1
                decay = min(decay, (1 + self.num_updates) / (10 + self.num_updates))
            torch._foreach_lerp_(self.shadow_params, self._trainable(parameters), 1.0 - decay)  # one fused kernel
            return
        weight = mask.to(self.shadow_params[0].dtype)
        decay = torch.full((), self.decay, dtype=weight.dtype, device=weight.device)
        if self.num_updates is not None:
            self.count_on(weight.device)
            self.num_updates = self.num_updates + mask.to(torch.int64)
            n = self.num_updates.to(weight.dtype)
            decay = torch.minimum(decay, (1 + n) / (10 + n))
        torch._foreach_lerp_(self.shadow_params, self._trainable(parameters), [weight * (1 - decay)] * len(
            self.shadow_params))

    def count_on(self, device: torch.device) -> None:
        """Keep the update count as a 0-d tensor on `device` (as masked updates do; a compiled step calls this
        before its first update, so that the count's type never changes inside the graph)."""
        if self.num_updates is not None and not isinstance(self.num_updates, torch.Tensor):
            self.num_updates = torch.tensor(self.num_updates, dtype=torch.int64, device=device)

    @torch.no_grad()
    def copy_to(self, parameters: Iterable[nn.Parameter]) -> None:
        for s, p in zip(self.shadow_params, self._trainable(parameters)):
            p.copy_(s)

    def store(self, parameters: Iterable[nn.Parameter]) -> None:
        self.collected_params = [p.detach().clone() for p in parameters]

    @torch.no_grad()
    def restore(self, parameters: Iterable[nn.Parameter]) -> None:
        for c, p in zip(self.collected_params, parameters):
            p.copy_(c)
        self.collected_params = []

    @contextmanager
    def average_parameters(self, model: nn.Module) -> Iterator[None]:
        """Within the block the model holds the EMA weights; its own weights come back afterwards."""
        self.store(model.parameters())
        self.copy_to(model.parameters())
        try:
            yield
        finally:
            self.restore(model.parameters())

    def state_dict(self) -> Dict:
        updates = self.num_updates
        return {"decay": self.decay, "num_updates": None if updates is None else int(updates),
                "shadow_params": self.shadow_params}

    def load_state_dict(self, state: Dict) -> None:
        if len(state["shadow_params"]) != len(self.shadow_params):
            raise ValueError(f"EMA state has {len(state['shadow_params'])} tensors but the model has "
                             f"{len(self.shadow_params)} trainable parameters: was it saved for another config?")
        self.decay, self.num_updates = state["decay"], state["num_updates"]
        for s, saved in zip(self.shadow_params, state["shadow_params"]):
            if s.shape != saved.shape:
                raise ValueError(f"EMA tensor shape {tuple(saved.shape)} does not match parameter {tuple(s.shape)}")
            s.copy_(saved)
