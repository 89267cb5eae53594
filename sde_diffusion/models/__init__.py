"""Score networks (`ncsnpp`, `ddpm`, `dit`, `edm2`, `mlp`). `create_model(config)` builds one by `config.model.name`;
`get_score_fn` turns it into a score."""
from .registry import MODELS, check_config, create_model, is_convolutional, register_model, takes_vectors
from .score_fn import get_score_fn
from . import ddpm, dit, edm2, mlp, ncsnpp  # noqa: F401  (registers the built-in networks)

__all__ = ["MODELS", "check_config", "create_model", "is_convolutional", "register_model", "takes_vectors",
           "get_score_fn"]
