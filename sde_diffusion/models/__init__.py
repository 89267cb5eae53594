"""Score networks (`ncsnpp`, `ddpm`, `dit`, `mlp`). `create_model(config)` builds one by `config.model.name`;
`get_score_fn` turns it into a score."""
from .registry import MODELS, create_model, register_model
from .score_fn import get_score_fn
from . import ddpm, dit, mlp, ncsnpp  # noqa: F401  (registers the built-in networks)

__all__ = ["MODELS", "create_model", "register_model", "get_score_fn"]
