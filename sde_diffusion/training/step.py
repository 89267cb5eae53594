"""One optimization step: loss under the configured precision, backward, gradient clipping, Adam, EMA, with a
check that the loss and the gradient are finite, and no host synchronisation.

Precision (`training.precision`): fp32; bf16 autocast; fp16 autocast with a dynamic loss scale (`LossScale`), where
an overflowing gradient is the scale's business: the update is skipped and the scale lowered, as usual. A
non-finite loss (any precision) or gradient (fp32, bf16) is a real failure. Every decision is taken on the device:
a step that must not change the weights is masked (the fused Adam kernel's `found_inf`, the EMA's weight 0), so the
host never waits for the device. `TrainStep.report()` reads the accumulated statistics back (one synchronisation,
on log and checkpoint steps only): the mean loss and gradient norm of the applied steps since the last report, the
skipped steps, and under `training.on_nonfinite='stop'` a `NonFiniteError` for the first failed step, with that
step's batch and the names of the parameters whose gradient was not finite.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch
from torch import nn

from .. import distributed
from ..errors import NonFiniteError, choice, positive
from ..training.optim import learning_rate

PRECISIONS: Dict[str, Optional[torch.dtype]] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
NONFINITE_POLICIES = ("stop", "skip")
# ‖g‖ + CLIP_EPS is the divisor of gradient clipping (as in nn.utils.clip_grad_norm_).
CLIP_EPS = 1e-6


@dataclass
class StepReport:
    """What the steps since the last report did (read back from the device by `TrainStep.report`)."""

    loss: float  # mean over the applied steps (and all ranks); nan if none was applied
    grad_norm: float  # mean gradient norm (of the averaged gradient, before clipping) over the applied steps
    lr: float  # of the last step
    steps: int  # steps taken since the last report
    skipped: int  # of which not applied (non-finite under 'skip', fp16 overflow)


class StepFailure(NonFiniteError):
    """NonFiniteError for the first failed step under 'stop', with that step's diagnostics: its number, its batch
    (on the host) and the names of the parameters whose gradient was not finite."""

    def __init__(self, message: str, step: int, batch: torch.Tensor, nonfinite_gradients: List[str]):
        super().__init__(message)
        self.step, self.batch, self.nonfinite_gradients = step, batch, nonfinite_gradients


def autocast(device: torch.device, precision: str):
    """The autocast context of a precision (a no-op for fp32)."""
    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


class LossScale:
    """fp16's dynamic loss scale, kept on the device: the loss is multiplied by `scale` before backward, gradients
    are unscaled with an overflow flag, and the scale halves after an overflow and doubles after `growth_interval`
    clean steps. Its state_dict is torch.amp.GradScaler's (checkpoints carry over)."""

    def __init__(self, device: torch.device, init_scale: float = 2.0**16, growth_factor: float = 2.0,
                 backoff_factor: float = 0.5, growth_interval: int = 2000):
        self.scale = torch.full((), init_scale, dtype=torch.float32, device=device)
        self.growth_tracker = torch.zeros((), dtype=torch.int32, device=device)
        self.growth_factor, self.backoff_factor, self.growth_interval = growth_factor, backoff_factor, growth_interval

    def unscale_(self, grads: List[torch.Tensor]) -> torch.Tensor:
        """Divide the gradients by the scale in place; returns the overflow flag (0-d float, 1.0 on inf/nan)."""
        found_inf = torch.zeros((), dtype=torch.float32, device=self.scale.device)
        if grads:
            torch._amp_foreach_non_finite_check_and_unscale_(grads, found_inf, self.scale.double().reciprocal().float())
        return found_inf

    def update(self, found_inf: torch.Tensor) -> None:
        torch._amp_update_scale_(self.scale, self.growth_tracker, found_inf, self.growth_factor, self.backoff_factor,
                                 self.growth_interval)

    def state_dict(self) -> Dict:
        return {"scale": self.scale.item(), "growth_factor": self.growth_factor, "backoff_factor": self.backoff_factor,
                "growth_interval": self.growth_interval, "_growth_tracker": int(self.growth_tracker.item())}

    def load_state_dict(self, state: Dict) -> None:
        self.scale.fill_(float(state["scale"]))
        self.growth_tracker.fill_(int(state["_growth_tracker"]))
        self.growth_factor, self.backoff_factor = float(state["growth_factor"]), float(state["backoff_factor"])
        self.growth_interval = int(state["growth_interval"])


class TrainStep:
    """step(x, step_number, score_fn) runs one step without reading anything back; `report()` reads the
    accumulated statistics (and raises the first failure under 'stop'). `model` is the bare module (EMA and
    clipping act on it), `score_fn` runs the (possibly DDP-wrapped, compiled) network; the optimizer must be a
    fused Adam/AdamW (`training.optim.make_optimizer`), whose kernel skips a masked update."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, ema, loss_fn: Callable, optim_config,
                 *, precision: str, device: torch.device, on_nonfinite: str = "stop", noise=None,
                 world: distributed.World = distributed.World(), compile_backend: Optional[str] = None):
        if not optimizer.defaults.get("fused"):
            raise ValueError("TrainStep masks skipped updates through the fused Adam kernel: build the optimizer "
                             "with training.optim.make_optimizer (fused=True)")
        self.model, self.optimizer, self.ema, self.loss_fn = model, optimizer, ema, loss_fn
        self.optim_config, self.precision, self.device = optim_config, precision, device
        self.on_nonfinite, self.noise, self.world = on_nonfinite, noise, world
        self.scaler = LossScale(device) if precision == "fp16" else None
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.names = [name for name, p in model.named_parameters() if p.requires_grad]
        self._reset()
        zero = torch.zeros((), dtype=torch.float32, device=device)
        self.first_bad = torch.full((), -1, dtype=torch.int64, device=device)  # step number of the first failure
        self.bad_loss, self.bad_norm = zero.clone(), zero.clone()
        self.bad_batch: Optional[torch.Tensor] = None
        self.bad_params = torch.zeros(len(self.params), dtype=torch.bool, device=device)
        self.lr = 0.0
        self.fullgraph = False
        if compile_backend:
            self._compile(compile_backend)

    def _compile(self, backend: str) -> None:
        """torch.compile the step's three device parts: the loss (network and formula; its backward through
        AOTAutograd), the checks with gradient clipping, and the loss-scale and EMA updates. Each is one graph
        (fullgraph) when the loss draws its noise apart (`losses.Objective.draw`: a torch.Generator cannot be traced) on a
        single process (DDP splits the graph at its gradient buckets). Between the parts stay the backward call and
        the fused Adam kernel, already one kernel for all parameters (dynamo leaves a fused optimizer eager)."""
        self.fullgraph = hasattr(self.loss_fn, "draw") and not self.world.distributed
        self._loss = torch.compile(self._loss, backend=backend, fullgraph=self.fullgraph)
        self._check_and_clip = torch.compile(self._check_and_clip, backend=backend, fullgraph=True)
        self._after_step = torch.compile(self._after_step, backend=backend, fullgraph=True)

    def _reset(self) -> None:
        zero = torch.zeros((), dtype=torch.float32, device=self.device)
        self.loss_sum, self.norm_sum, self.applied, self.skipped = zero.clone(), zero.clone(), zero.clone(), zero.clone()
        self.steps = 0

    def __call__(self, x: torch.Tensor, step: int, score_fn) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        noise = self.loss_fn.draw(x, self.noise, self.world.shard) if hasattr(self.loss_fn, "draw") else None
        loss = self._loss(score_fn, x, noise)
        loss_mean = distributed.mean(loss.detach().float(), self.world)
        (loss * self.scaler.scale if self.scaler else loss).backward()
        self.lr = learning_rate(step, self.optim_config)
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr
        grads = [p.grad for p in self.params if p.grad is not None]
        applied, failed, overflow, norms, grad_norm = self._check_and_clip(grads, loss_mean)
        self.optimizer.found_inf, self.optimizer.grad_scale = (~applied).float(), None
        self.optimizer.step()
        self.ema.count_on(self.device)
        self._after_step(applied, failed, overflow)
        self._account(step, x, loss_mean, grad_norm, norms, applied, failed, len(grads) == len(self.params))

    def _loss(self, score_fn, x: torch.Tensor, noise) -> torch.Tensor:
        with autocast(self.device, self.precision):
            if noise is None:  # a plain loss function draws its own noise
                return self.loss_fn(score_fn, x, generator=self.noise, shard=self.world.shard)
            return self.loss_fn(score_fn, x, noise=noise)

    def _check_and_clip(self, grads: List[torch.Tensor], loss_mean: torch.Tensor):
        """Unscale (fp16), test and clip the gradients; returns (applied, failed, overflow, per-tensor norms, ‖g‖):
        failed = a non-finite loss, or gradient outside fp16; applied = neither failed nor an fp16 overflow."""
        loss_ok = torch.isfinite(loss_mean)
        overflow = self.scaler.unscale_(grads) if self.scaler else None
        norms, grad_norm = self._clip(grads)
        failed = ~loss_ok if self.scaler else ~(loss_ok & torch.isfinite(grad_norm))
        applied = ~failed if overflow is None else ~failed & (overflow == 0)
        return applied, failed, overflow, norms, grad_norm

    def _after_step(self, applied: torch.Tensor, failed: torch.Tensor, overflow: Optional[torch.Tensor]) -> None:
        if self.scaler:
            self.scaler.update(torch.maximum(overflow, failed.float()))
        self.ema.update(self.params, mask=applied)

    def _clip(self, grads: List[torch.Tensor]):
        """Per-tensor norms, the total norm ‖g‖ (0-d) and the gradients scaled in place by
        min(1, optim.grad_clip / (‖g‖ + CLIP_EPS)) (no clipping when grad_clip < 0)."""
        if not grads:
            zero = torch.zeros((), device=self.device)
            return [], zero
        norms = torch.stack(torch._foreach_norm(grads)).float()
        total = torch.linalg.vector_norm(norms)
        if self.optim_config.grad_clip >= 0:
            torch._foreach_mul_(grads, torch.clamp(self.optim_config.grad_clip / (total + CLIP_EPS), max=1.0))
        return norms, total

    def _account(self, step: int, x, loss_mean, grad_norm, norms, applied, failed, every_param: bool) -> None:
        self.steps += 1
        weight = applied.float()
        self.loss_sum += torch.where(applied, loss_mean, 0.0)
        self.norm_sum += torch.where(applied, grad_norm, 0.0)
        self.applied += weight
        self.skipped += 1.0 - weight
        if self.on_nonfinite != "stop":
            return
        first = failed & (self.first_bad < 0)
        self.first_bad = torch.where(first, step, self.first_bad)
        self.bad_loss = torch.where(first, loss_mean, self.bad_loss)
        self.bad_norm = torch.where(first, grad_norm, self.bad_norm)
        if self.bad_batch is None or self.bad_batch.shape != x.shape:
            self.bad_batch = torch.zeros_like(x)
        self.bad_batch = torch.where(first, x.detach(), self.bad_batch)
        if every_param and len(norms):
            self.bad_params = torch.where(first, ~torch.isfinite(norms), self.bad_params)

    def report(self) -> StepReport:
        """The statistics since the last report (one host synchronisation); resets them. Raises `StepFailure` for
        the first failed step under on_nonfinite='stop'."""
        loss_sum, norm_sum, applied, skipped, first_bad, bad_loss, bad_norm = torch.stack(
            [self.loss_sum, self.norm_sum, self.applied, self.skipped, self.first_bad.float(), self.bad_loss,
             self.bad_norm]).tolist()
        if first_bad >= 0:
            what, value = ("loss", bad_loss) if not bad_loss == bad_loss or abs(bad_loss) == float("inf") \
                else ("gradient norm", bad_norm)
            names = [name for name, bad in zip(self.names, self.bad_params.tolist()) if bad]
            raise StepFailure(f"step {int(first_bad)}: the {what} is {value}", int(first_bad), self.bad_batch.cpu(),
                              names)
        report = StepReport(loss_sum / applied if applied else float("nan"),
                            norm_sum / applied if applied else float("nan"), self.lr, self.steps, int(skipped))
        self._reset()
        return report


def check_config(config) -> None:
    """The keys of the step: training.precision, on_nonfinite, compile_backend (when compiling), optim.lr and the
    learning-rate schedule (optim.check_config). Raises ConfigError naming the key."""
    t = config.training
    choice("training.precision", t.precision, PRECISIONS)
    choice("training.on_nonfinite", t.on_nonfinite, NONFINITE_POLICIES)
    positive("optim.lr", config.optim.lr)
    from .optim import check_config as check_schedule
    check_schedule(config)
    if t.compile:
        import torch._dynamo  # its backend list, only when compiling
        choice("training.compile_backend", t.compile_backend, torch._dynamo.list_backends(exclude_tags=()))
