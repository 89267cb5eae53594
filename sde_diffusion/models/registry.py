"""Name → network class registry behind `create_model(config)`."""
from __future__ import annotations

from typing import Callable, Dict

from torch import nn

MODELS: Dict[str, Callable] = {}


def register_model(name: str):
    """Class decorator: make a network buildable as `config.model.name = name`. Its constructor takes the config."""
    def decorate(cls):
        if name in MODELS:
            raise ValueError(f"a model named {name!r} is already registered ({MODELS[name].__name__})")
        MODELS[name] = cls
        return cls
    return decorate


def create_model(config) -> nn.Module:
    """Build the network named by `config.model.name` (its weights are freshly initialized)."""
    name = config.model.name
    if name not in MODELS:
        raise ValueError(f"config.model.name={name!r} is not a registered model; available: {sorted(MODELS)}")
    return MODELS[name](config)
