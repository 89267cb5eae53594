"""One optimization step: loss under the configured precision, backward, gradient clipping, Adam, EMA, with a
check that the loss and the gradient are finite.

Precision (`training.precision`): fp32; bf16 autocast; fp16 autocast with a dynamic loss scale (GradScaler), where
an overflowing gradient is the scaler's business: the step is skipped and the scale lowered, as usual. A
non-finite loss (any precision) or gradient (fp32, bf16) is a real failure: `training.on_nonfinite='stop'` raises
`NonFiniteError` naming the step (the caller saves diagnostics and keeps the last good checkpoint), 'skip' leaves
the weights, optimizer and EMA untouched and counts the step.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch
from torch import nn

from . import distributed
from .errors import ConfigError, NonFiniteError, choice, positive
from .losses import clip_grad_norm, learning_rate

PRECISIONS: Dict[str, Optional[torch.dtype]] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
NONFINITE_POLICIES = ("stop", "skip")


@dataclass
class StepResult:
    loss: float  # mean over all ranks
    grad_norm: float  # of the averaged gradient, before clipping
    lr: float
    applied: bool  # False: the weights were not updated
    reason: str = ""  # why not: "loss is nan", "fp16 overflow", ...


def autocast(device: torch.device, precision: str):
    """The autocast context of a precision (a no-op for fp32)."""
    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def nonfinite_parameters(model: nn.Module) -> List[str]:
    """Names of the parameters whose gradient holds a NaN or an infinity."""
    return [name for name, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]


class TrainStep:
    """step(x, step_number, score_fn) → StepResult; `model` is the bare module (EMA and clipping act on it),
    `score_fn` runs the (possibly DDP-wrapped, compiled) network."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, ema, loss_fn: Callable, optim_config,
                 *, precision: str, device: torch.device, on_nonfinite: str = "stop", noise=None,
                 world: distributed.World = distributed.World()):
        self.model, self.optimizer, self.ema, self.loss_fn = model, optimizer, ema, loss_fn
        self.optim_config, self.precision, self.device = optim_config, precision, device
        self.on_nonfinite, self.noise, self.world = on_nonfinite, noise, world
        self.scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None

    def _fail(self, step: int, what: str, value: float) -> StepResult:
        if self.on_nonfinite == "stop":
            raise NonFiniteError(f"step {step}: the {what} is {value}")
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(value if what == "loss" else float("nan"), value if what != "loss" else float("nan"),
                          self.optimizer.param_groups[0]["lr"], applied=False, reason=f"{what} is {value}")

    def __call__(self, x: torch.Tensor, step: int, score_fn) -> StepResult:
        self.optimizer.zero_grad(set_to_none=True)
        with autocast(self.device, self.precision):
            loss = self.loss_fn(score_fn, x, generator=self.noise, shard=self.world.shard)
        loss_value = float(distributed.mean(loss.detach().float(), self.world))
        if not math.isfinite(loss_value):
            return self._fail(step, "loss", loss_value)
        (self.scaler.scale(loss) if self.scaler else loss).backward()
        lr = learning_rate(step, self.optim_config)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        clip = self.optim_config.grad_clip if self.optim_config.grad_clip >= 0 else float("inf")
        grad_norm = float(clip_grad_norm(self.model.parameters(), clip))
        finite = math.isfinite(grad_norm)
        if not finite and self.scaler is None:
            return self._fail(step, "gradient norm", grad_norm)
        if self.scaler:
            self.scaler.step(self.optimizer)  # skips the update itself when the gradient overflowed
            self.scaler.update()
        else:
            self.optimizer.step()
        if finite:
            self.ema.update(self.model.parameters())
        return StepResult(loss_value, grad_norm, lr, applied=finite, reason="" if finite else "fp16 overflow")


def check_config(config) -> None:
    """The keys of the step: training.precision, on_nonfinite, compile_backend (when compiling) and optim.lr.
    Raises ConfigError naming the key."""
    t = config.training
    choice("training.precision", t.precision, PRECISIONS)
    choice("training.on_nonfinite", t.on_nonfinite, NONFINITE_POLICIES)
    positive("optim.lr", config.optim.lr)
    if t.compile:
        import torch._dynamo  # its backend list, only when compiling
        choice("training.compile_backend", t.compile_backend, torch._dynamo.list_backends(exclude_tags=()))
