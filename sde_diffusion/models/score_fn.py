"""The one bridge from a network to a score function."""
from __future__ import annotations

from typing import Callable, Optional, Union

import torch
from torch import nn

from ..parameterization import Parameterization, as_parameterization, resolve
from ..sdes import SDE

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


def is_conditional(model: nn.Module) -> bool:
    """Whether the network takes a condition: class labels (num_classes > 0) or captions (a text encoder)."""
    model = unwrap(model)
    return getattr(model, "num_classes", 0) > 0 or getattr(model, "text", None) is not None


def null_condition(model: nn.Module, n: int, device) -> torch.Tensor:
    """The unconditional input of a conditional network for n samples: the null label (n,), or the empty
    caption's token ids (n, L)."""
    model = unwrap(model)
    if getattr(model, "text", None) is not None:
        return model.text.null_tokens(n, device)
    return torch.full((n,), model.num_classes, dtype=torch.long, device=device)


def batch_labels(labels: Labels, x: torch.Tensor) -> torch.Tensor:
    """Class labels as a (batch,) long tensor on x's device (an int or 0-d tensor is broadcast to the batch), or
    caption token ids (batch, L) (one row (1, L) is broadcast)."""
    labels = torch.as_tensor(labels, dtype=torch.long, device=x.device)
    if labels.ndim == 0:
        return labels.expand(x.shape[0])
    if labels.ndim == 2:
        if labels.shape[0] == 1:
            return labels.expand(x.shape[0], -1)
        if labels.shape[0] != x.shape[0]:
            raise ValueError(f"token ids of shape {tuple(labels.shape)} do not match a batch of {x.shape[0]}: give "
                             "one caption per sample, or one for all")
        return labels
    if labels.shape != (x.shape[0],):
        raise ValueError(f"labels of shape {tuple(labels.shape)} do not match a batch of {x.shape[0]}: give one "
                         "label per sample, or one int for all")
    return labels


def get_score_fn(sde: SDE, model: nn.Module, continuous: bool = True, labels: Optional[Labels] = None,
                 parameterization: Union[None, str, Parameterization] = None
                 ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Return score_fn(x, t) ≈ ∇ₓ log p_t(x) (or ∇ₓ log p_t(x | y) with labels) for a network
    `model(input, noise_condition[, y])`.

    The parameterization (sde_diffusion.parameterization; a name, an instance, or None: the network's own
    `score_convention` from create_model's config, else score_sde's convention of this SDE: ε and 999·t for
    VP/sub-VP, σ·score and σ(t) for VE, EDM's preconditioning for EDM) decides what
    the network sees and how its output becomes a score; continuous=False: a discrete-time network on the SDE's
    DDPM/SMLD chain. `t` may be a float or a (batch,) tensor. The model's train/eval mode is left as it is: call
    `model.eval()` for sampling.

    labels: class labels of a class-conditional network (model.num_classes > 0), a (batch,) tensor or one int for
    every sample; the null label `model.num_classes` asks for the unconditional score. For a text-conditioned
    network: caption token ids (batch, L) or (1, L). None: the network is called without labels, which for a
    conditional network means the null label or the empty caption.

    A network with a `log_variance(noise condition) -> (batch,)` method (EDM2's learned uncertainty) gives the
    score function an attribute `log_variance(t) -> (batch,)` (float32), t a (batch,) tensor of times.
    """
    convention = getattr(unwrap(model), "score_convention", None)
    if parameterization is None and convention is not None:
        param = resolve(sde, continuous, *convention)
    else:
        param = as_parameterization(sde, continuous, parameterization)
    if labels is not None and not is_conditional(model):
        raise ValueError(f"labels given for {type(model).__name__} without a label embedding or text encoder: build "
                         "it with model.num_classes > 0 or model.text.encoder")
    if labels is None:
        score_fn = param.score_fn(model)
    else:
        score_fn = param.score_fn(lambda inputs, cond: model(inputs, cond, batch_labels(labels, inputs)))
    network = unwrap(model)
    if hasattr(network, "log_variance"):  # EDM2's learned uncertainty u, for the objective's w·L/exp(u) + u
        score_fn.log_variance = lambda t: network.log_variance(param.condition(t)).float()
    return score_fn
