"""The one bridge from a network to a score function."""
from __future__ import annotations

from typing import Callable, Optional, Union

import torch
from torch import nn

from ..sdes import SDE, batch_time

Labels = Union[int, torch.Tensor]


def unwrap(model: nn.Module) -> nn.Module:
    """The network inside DistributedDataParallel and torch.compile wrappers."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):  # torch.compile's OptimizedModule
            model = model._orig_mod
        else:
            return model


def batch_labels(labels: Labels, x: torch.Tensor) -> torch.Tensor:
    """Class labels as a (batch,) long tensor on x's device: an int or 0-d tensor is broadcast to the batch."""
    labels = torch.as_tensor(labels, dtype=torch.long, device=x.device)
    if labels.ndim == 0:
        return labels.expand(x.shape[0])
    if labels.shape != (x.shape[0],):
        raise ValueError(f"labels of shape {tuple(labels.shape)} do not match a batch of {x.shape[0]}: give one "
                         "label per sample, or one int for all")
    return labels


def get_score_fn(sde: SDE, model: nn.Module, continuous: bool = True,
                 labels: Optional[Labels] = None) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Return score_fn(x, t) ≈ ∇ₓ log p_t(x) (or ∇ₓ log p_t(x | y) with labels) for a network
    `model(x, noise_condition[, y])`.

    The SDE decides what the network sees (`sde.noise_condition`: 999·t for VP/sub-VP, σ(t) for VE; discrete
    step labels when continuous=False) and how its output becomes a score (`sde.score_from_network`: −ε/σ for
    VP/sub-VP, output/σ for VE; a network with `divides_by_sigma` set has done the latter itself). `t` may be a
    float or a (batch,) tensor. The model's train/eval mode is left as it is: call `model.eval()` for sampling.

    labels: class labels of a class-conditional network (model.num_classes > 0), a (batch,) tensor or one int for
    every sample; the null label `model.num_classes` asks for the unconditional score. None: the network is called
    without labels, which for a class-conditional network also means the null label.
    """
    if not continuous and not sde.has_discrete_chain:
        raise ValueError(f"{type(sde).__name__} has no discrete chain: use continuous=True "
                         "(training.continuous=True)")
    if labels is not None and not getattr(unwrap(model), "num_classes", 0):
        raise ValueError(f"labels given for {type(model).__name__} without a label embedding: build it with "
                         "model.num_classes > 0")

    # A network built with scale_by_sigma (NCSN++, VE only) already divides its output by σ, which is what
    # VESDE.score_from_network would do: its output is the score (score_sde's convention).
    output_is_score = getattr(unwrap(model), "divides_by_sigma", False)

    def score_fn(x: torch.Tensor, t) -> torch.Tensor:
        t = batch_time(t, x)
        cond = sde.noise_condition(t, continuous)
        output = model(x, cond) if labels is None else model(x, cond, batch_labels(labels, x))
        output = output.to(x.dtype)  # float32 again after autocast
        return output if output_is_score else sde.score_from_network(output, t, continuous)

    return score_fn
