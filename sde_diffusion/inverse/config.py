"""config.sampling's inverse-problem keys: the operator (`sampling.inverse`), the method (`sampling.inverse_method`),
the observation file (`sampling.observation`) and σ_y (`sampling.noise_std`); checked before any compute."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image

from ..errors import ConfigError
from .methods import METHODS, NEEDS_NOISE
from .operators import OPERATORS, LinearOperator

OBSERVATION_SUFFIXES = (".png", ".npy", ".npz")


def data_shape(config) -> Tuple[int, ...]:
    """The shape of one sample of config.data: (C, H, W) for images, (2,) for the 2-D toy data."""
    from ..data.datasets import is_image_data
    d = config.data
    return (d.num_channels, d.image_size, d.image_size) if is_image_data(config) else (2,)


def operator_from_config(config, shape: Sequence[int]) -> LinearOperator:
    """The operator sampling.inverse names, for samples of `shape`; ConfigError naming the key otherwise."""
    try:
        part, options = OPERATORS.parse(config.sampling.inverse, "sampling.inverse")
        return part.fn(tuple(shape), **options)
    except (ValueError, OSError) as err:
        raise ConfigError(f"sampling.inverse={config.sampling.inverse!r}: {err}") from None


def method_from_config(config) -> str:
    """sampling.inverse_method as a checked 'name[:option=value,...]' spec."""
    try:
        part, options = METHODS.parse(config.sampling.inverse_method, "sampling.inverse_method")
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if NEEDS_NOISE[part.name](options) and config.sampling.noise_std <= 0:
        raise ConfigError(f"sampling.inverse_method={config.sampling.inverse_method!r} divides by the noise variance: "
                          "set sampling.noise_std > 0, or use mmps, pigdm or dps (normalized step)")
    return part.spec(options)


def _read(path: Path) -> np.ndarray:
    if path.suffix.lower() == ".npy":
        return np.load(path, allow_pickle=False)
    with Image.open(path) as img:
        grey = img.mode in ("1", "L", "I", "I;16", "F")
        array = np.asarray(img.convert("L" if grey else "RGB"), dtype=np.float64) / 255.0
    return array if array.ndim == 2 else array.transpose(2, 0, 1)


def _as_sample(array: np.ndarray, shape: Tuple[int, ...]) -> Optional[torch.Tensor]:
    """array as one sample of `shape` ((H, W) for a one-channel (1, H, W)), or None if it does not fit."""
    t = torch.as_tensor(np.asarray(array, dtype=np.float64))
    if tuple(t.shape) == shape:
        return t
    if len(shape) == 3 and shape[0] == 1 and tuple(t.shape) == shape[1:]:
        return t[None]
    return None


def load_observation(path, A: LinearOperator) -> Tuple[str, torch.Tensor, Optional[torch.Tensor]]:
    """(kind, array, ground_truth) from an observation file, values in [0, 1] (pixel units): kind "data" (an image
    shaped like the data, to be measured; it is its own ground truth) or "measurement" (shaped like A's output; the
    ground truth is the .npz's `ground_truth`, if any). ValueError naming the file and the shapes that fit."""
    path = Path(path)
    if path.suffix.lower() not in OBSERVATION_SUFFIXES or not path.is_file():
        raise ValueError(f"{path} must be an existing {' / '.join(OBSERVATION_SUFFIXES)} file")
    truth = None
    if path.suffix.lower() == ".npz":
        with np.load(path, allow_pickle=False) as data:
            if "observation" not in data:
                raise ValueError(f"{path} holds {sorted(data.files)}; it needs an `observation` array")
            array = data["observation"]
            truth = data["ground_truth"] if "ground_truth" in data else None
    else:
        array = _read(path)
    if not (np.isfinite(array).all() and array.min() >= 0 and array.max() <= 1):
        raise ValueError(f"{path}: the observation must hold values in [0, 1] (pixel units)")
    out_shape = A.out_shape()
    as_data, as_measurement = _as_sample(array, A.in_shape), _as_sample(array, out_shape)
    if truth is not None:
        truth = _as_sample(truth, A.in_shape)
        if truth is None:
            raise ValueError(f"{path}: `ground_truth` must be shaped like one sample, {A.in_shape}")
    if as_measurement is not None:
        return "measurement", as_measurement.float(), None if truth is None else truth.float()
    if as_data is not None:
        return "data", as_data.float(), as_data.float()
    raise ValueError(f"{path} is shaped {tuple(array.shape)}, which is neither the measurement's {out_shape} nor "
                     f"the data's {A.in_shape}")


def check_config(config) -> None:
    """The inverse-problem keys, with the operator built on the data's shape and the observation file read."""
    s = config.sampling
    if s.inverse is None:
        if s.observation is not None:
            raise ConfigError("sampling.observation is set but sampling.inverse is not: name the measurement operator, "
                              "e.g. sampling.inverse='super_resolution:factor=2'")
        return
    if not s.noise_std >= 0:
        raise ConfigError(f"sampling.noise_std must be ≥ 0 (σ_y in the network's data scale), got {s.noise_std}")
    if s.inpaint_mask is not None or s.colorize:
        raise ConfigError("sampling.inverse and sampling.inpaint_mask / sampling.colorize are different tasks: set "
                          "one (inverse's inpaint operator takes noisy measurements)")
    if config.model.latent:
        raise ConfigError("sampling.inverse measures pixels, and this model samples latents (model.latent=True): "
                          "solve inverse problems with a pixel-space model")
    A = operator_from_config(config, data_shape(config))
    method_from_config(config)
    if s.observation is not None:
        try:
            load_observation(s.observation, A)
        except (ValueError, OSError) as err:
            raise ConfigError(f"sampling.observation: {err}") from None
