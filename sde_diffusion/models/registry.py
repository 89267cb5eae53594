"""Name → network class registry behind `create_model(config)`, and the check of config.model.

A network class may declare `check_config(config)` (raise ValueError naming the key when it cannot be built),
`vector_data = True` (it takes vectors (batch, d), not images) and `convolutional = False` (channels_last does
not apply to it)."""
from __future__ import annotations

from typing import Callable, Dict

from torch import nn

from ..errors import ConfigError, choice
from ..parameterization import EDM_SIGMA_DATA

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
    """Build the network named by `config.model.name` (its weights are freshly initialized). The network keeps
    config.model's parameterization, noise_conditioning and sigma_data as `score_convention`, the default of
    `get_score_fn`."""
    name = config.model.name
    if name not in MODELS:
        raise ValueError(f"config.model.name={name!r} is not a registered model; available: {sorted(MODELS)}")
    model = MODELS[name](config)
    m = config.model
    # what get_score_fn uses when not told otherwise (sde_diffusion.parameterization.resolve's arguments)
    model.score_convention = (m.get("parameterization", "auto"), m.get("noise_conditioning", "auto"),
                              m.get("sigma_data", EDM_SIGMA_DATA))
    return model


def takes_vectors(name: str) -> bool:
    """Whether the registered network `name` takes vector data (batch, d) rather than images."""
    return getattr(MODELS[name], "vector_data", False)


def is_convolutional(name: str) -> bool:
    """Whether the registered network `name` is convolutional (channels_last applies to it)."""
    return getattr(MODELS[name], "convolutional", True)


def check_config(config) -> None:
    """config.model.name, then the network's own rules (its `check_config`). Raises ConfigError naming the key."""
    choice("model.name", config.model.name, MODELS)
    check_model = getattr(MODELS[config.model.name], "check_config", None)
    if check_model is not None:
        try:
            check_model(config)
        except ValueError as err:
            raise ConfigError(str(err)) from err
