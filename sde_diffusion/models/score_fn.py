"""The one bridge from a network to a score function."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..sdes import SDE, batch_time


def unwrap(model: nn.Module) -> nn.Module:
    """The network inside DistributedDataParallel and torch.compile wrappers."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):  # torch.compile's OptimizedModule
            model = model._orig_mod
        else:
            return model


def get_score_fn(sde: SDE, model: nn.Module, continuous: bool = True) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Return score_fn(x, t) ≈ ∇ₓ log p_t(x) for a network `model(x, noise_condition)`.

    The SDE decides what the network sees (`sde.noise_condition`: 999·t for VP/sub-VP, σ(t) for VE; discrete
    step labels when continuous=False) and how its output becomes a score (`sde.score_from_network`: −ε/σ for
    VP/sub-VP, output/σ for VE; a network with `divides_by_sigma` set has done the latter itself). `t` may be a
    float or a (batch,) tensor. The model's train/eval mode is left as it is: call `model.eval()` for sampling.
    """
    if not continuous and not sde.has_discrete_chain:
        raise ValueError(f"{type(sde).__name__} has no discrete chain: use continuous=True "
                         "(training.continuous=True)")

    # A network built with scale_by_sigma (NCSN++, VE only) already divides its output by σ, which is what
    # VESDE.score_from_network would do: its output is the score (score_sde's convention).
    output_is_score = getattr(unwrap(model), "divides_by_sigma", False)

    def score_fn(x: torch.Tensor, t) -> torch.Tensor:
        t = batch_time(t, x)
        output = model(x, sde.noise_condition(t, continuous)).to(x.dtype)  # float32 again after autocast
        return output if output_is_score else sde.score_from_network(output, t, continuous)

    return score_fn
