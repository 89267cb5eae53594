"""Inpainting and colorization: constraints that the sampling framework applies to every sampler's state
(`sampling.sample(..., constraint=c)`; the calling convention is in sde_diffusion/sampling/core.py).

Known coordinates y (mask = 1) are fixed; the sampler draws the others. After every update that brought the state x
to time t, a constraint sets the known coordinates to a fresh draw from the forward marginal,

    x_known ← α(t)·y + σ(t)·z,  z ~ N(0, I)        (`sde.marginal_prob`: the SDE says what α and σ are)

which is score_sde's "replacement" (Song et al. 2021, app. I.2; its code noises y to the time the update started
from, here it is the time the state has reached). Replacement only approximates the posterior
p(x_unknown | y): the unknown coordinates are moved by the score of the joint p_t at known coordinates that are
an independent re-noising of y, so they never learn more about y than one noisy look at a time gives.

method="repaint" adds RePaint-style resampling (Lugmayr et al. 2022): after the replacement at time t, `resample`
times, jump back to the time t_prev the update came from with the forward kernel, x' = α_{t_prev|t}·x +
σ_{t_prev|t}·z, come back to t and replace again. Each round is a Markov-chain move at level t that lets the
unknown coordinates adapt to the known ones; more rounds bring the result closer to the exact conditional
(measured on Gaussian oracles in BENCHMARKS.md), at one score call per round. The way back (`reflect_back`)
reflects the state through the exact conditional mean, x ← 2·E[x_t | x'] − x, with E[x_t | x'] = (x' +
σ_{t_prev|t}²·∇log p_{t_prev}(x'))/α_{t_prev|t} (Tweedie for the transition kernel). Where p(x_t | x') is symmetric
about its mean (exactly for Gaussian data, to leading order over a short jump for any data), x and its reflection
have the same law given x', so a round leaves p_t invariant whatever the data's spread. RePaint's ancestral way
back draws isotropic noise of a fixed size instead (the DDPM posterior's, or β), which shrinks or inflates the
distribution a little every round; the rounds pile that error up (measured: BENCHMARKS.md). The jump is one update
long, so it works with every sampler (the ODE's adaptive steps included).

The returned sample is noise-free: `finish` runs after the sampler's final denoising step and sets the known
coordinates to y exactly. score_sde's inpainter instead returns x_mean = (1 − m)·x + m·α(eps)·y, computed from the
already-replaced state: its unknown pixels keep the last step's noise (no denoising of them) and its known
pixels are α(eps)·y, not y. Here the unknown coordinates get Tweedie's denoising E[x_0 | x_eps] at the last
constrained state (which saw the known coordinates) and the known ones come out bit-exactly as given.

Colorization is inpainting in a decoupled colour space: an orthonormal 3×3 basis whose first vector is
(1, 1, 1)/√3, so the first decoupled channel is √3·grey and the other two carry colour. The constraint decouples,
replaces the first channel, couples back; the forward noise is isotropic, so noising in either space is the same.
Convention: grey = mean of the three channels, in the model's data scale (an affine rescaling such as [0, 1] →
[−1, 1] commutes with the mean).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image

from .errors import ConfigError, choice, positive
from .sampling.terms import like as _like
from .sampling.terms import noise as _noise
from .sdes import SDE, ScoreFn

METHODS = ("replacement", "repaint")
# RePaint's resampling rounds per update (Lugmayr et al. use r = 10 with jumps of 10 steps; ours are one update long).
DEFAULT_RESAMPLE = 5

# Rows: an orthonormal colour basis whose first vector is (1, 1, 1)/√3 (grey), then two colour-difference vectors.
COLOR_BASIS = torch.tensor([[1 / math.sqrt(3), 1 / math.sqrt(3), 1 / math.sqrt(3)],
                            [1 / math.sqrt(2), -1 / math.sqrt(2), 0.0],
                            [1 / math.sqrt(6), 1 / math.sqrt(6), -2 / math.sqrt(6)]], dtype=torch.float64)
GREY_SCALE = math.sqrt(3)  # first decoupled channel = GREY_SCALE · mean of RGB


def to_grey(x: torch.Tensor) -> torch.Tensor:
    """(batch, 3, ...) colour → (batch, 1, ...) grey, the mean of the channels (the convention of `colorization`)."""
    return x.mean(dim=1, keepdim=True)


def decouple(x: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """Channel coordinates in an orthonormal basis (rows of `basis`): c_i = Σ_j basis_ij·x_j along dim 1."""
    return torch.einsum("ij,bj...->bi...", basis.to(x), x)


def couple(c: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """The inverse of `decouple` (the basis is orthonormal): x_j = Σ_i basis_ij·c_i."""
    return torch.einsum("ij,bi...->bj...", basis.to(c), c)


class Inpainting:
    """Keeps the coordinates where mask = 1 at y (forward-noised to the sampler's time), optionally in an orthonormal
    channel basis (colorization). A constraint for `sampling.sample` (see the module docstring).

    x_known: (b, ...) with b = 1 (one image for the whole batch) or b = the sample batch; mask: broadcastable to
    x_known, values 0/1; basis: None or an orthonormal (C, C) matrix acting on dim 1, in which x_known and mask
    are given. method: "replacement" | "repaint"; resample: RePaint's rounds per update.
    """

    def __init__(self, sde: SDE, x_known: torch.Tensor, mask: torch.Tensor, *, method: str = "replacement",
                 resample: int = DEFAULT_RESAMPLE, basis: Optional[torch.Tensor] = None):
        if method not in METHODS:
            raise ValueError(f"unknown conditioning method {method!r}; available: {list(METHODS)}")
        if method == "repaint" and resample < 1:
            raise ValueError(f"repaint needs resample ≥ 1 rounds per update, got {resample}")
        x_known, mask = torch.as_tensor(x_known), torch.as_tensor(mask)
        try:
            mask = torch.broadcast_to(mask, x_known.shape)
        except RuntimeError as err:
            raise ValueError(f"mask of shape {tuple(mask.shape)} does not broadcast to the known data's shape "
                             f"{tuple(x_known.shape)}") from err
        if not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError("mask must hold only 0 (unknown) and 1 (known)")
        if basis is not None and (basis.shape != (x_known.shape[1],) * 2
                                  or not torch.allclose(basis @ basis.T, torch.eye(len(basis), dtype=basis.dtype))):
            raise ValueError(f"basis must be an orthonormal {x_known.shape[1]}×{x_known.shape[1]} matrix")
        self.sde, self.method, self.resample, self.basis = sde, method, int(resample), basis
        self.x_known, self.mask = x_known, mask.bool()

    @property
    def moves_free_coordinates(self) -> bool:
        """RePaint's rounds move the unknown coordinates too (multistep samplers restart their history)."""
        return self.method == "repaint"

    # --- pieces -----------------------------------------------------------------------------------------------
    def _known_like(self, x: torch.Tensor):
        """(y, mask) on x's device and dtype, expanded to x's shape (the same in the basis, which is square); a clear
        error when shapes disagree."""
        if x.shape[1:] != self.x_known.shape[1:] or self.x_known.shape[0] not in (1, x.shape[0]):
            raise ValueError(f"the sampler's state has shape {tuple(x.shape)} but the known data has shape "
                             f"{tuple(self.x_known.shape)}: give one known item (batch 1) or one per sample, with "
                             "the same per-item shape")
        y = self.x_known.to(device=x.device, dtype=x.dtype).expand_as(x)
        return y, self.mask.to(device=x.device).expand(x.shape)

    def _in_basis(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.basis is None else decouple(x, self.basis)

    def _out_of_basis(self, c: torch.Tensor) -> torch.Tensor:
        return c if self.basis is None else couple(c, self.basis)

    def replace(self, x: torch.Tensor, t: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
        """Known coordinates ← a draw of x_t | x_0 = y:  α(t)·y + σ(t)·z."""
        y, mask = self._known_like(x)
        c = self._in_basis(x)
        mean, std = self.sde.marginal_prob(y, t.to(c.dtype))
        noisy = mean + std.reshape(-1, *[1] * (c.ndim - 1)) * _noise(c, generator)
        return self._out_of_basis(torch.where(mask, noisy, c))

    def jump_back(self, x: torch.Tensor, t: torch.Tensor, t_prev: torch.Tensor,
                  generator: Optional[torch.Generator]) -> torch.Tensor:
        """A draw of the forward kernel from t to the later time t_prev: α_{t_prev|t}·x + σ_{t_prev|t}·z."""
        a, s = self.sde.transition(t_prev, t)
        return _like(a, x) * x + _like(s, x) * _noise(x, generator)

    def reflect_back(self, score_fn: ScoreFn, x: torch.Tensor, x_jumped: torch.Tensor, t: torch.Tensor,
                     t_prev: torch.Tensor) -> torch.Tensor:
        """x at time t reflected through E[x_t | x_{t_prev} = x_jumped]:  2·(x' + σ_{t_prev|t}²·s(x', t_prev)) /
        α_{t_prev|t} − x  (one score call)."""
        a, s = self.sde.transition(t_prev, t)
        mean = (x_jumped + _like(s**2, x) * score_fn(x_jumped, t_prev.to(x.dtype))) / _like(a, x)
        return 2 * mean - x

    # --- the constraint ---------------------------------------------------------------------------------------
    def __call__(self, x: torch.Tensor, t: torch.Tensor, t_prev: Optional[torch.Tensor], score_fn: ScoreFn,
                 generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """x at time t, just moved there from t_prev (None: the prior draw; = t: a corrector) → constrained x."""
        x = self.replace(x, t, generator)
        if self.method == "repaint" and t_prev is not None and t_prev > t:
            for _ in range(self.resample):
                x = self.reflect_back(score_fn, x, self.jump_back(x, t, t_prev, generator), t, t_prev)
                x = self.replace(x, t, generator)
        return x

    def finish(self, x: torch.Tensor) -> torch.Tensor:
        """The returned sample: known coordinates set to y exactly (in the basis, when there is one)."""
        y, mask = self._known_like(x)
        return self._out_of_basis(torch.where(mask, y, self._in_basis(x)))


def inpainting(sde: SDE, x_known: torch.Tensor, mask: torch.Tensor, method: str = "replacement",
               resample: int = DEFAULT_RESAMPLE) -> Inpainting:
    """Constraint that fills the coordinates where mask = 0 given x_known where mask = 1 (shapes: see `Inpainting`).

    method: "replacement" (score_sde) or "repaint" (replacement plus `resample` RePaint rounds per update).
    """
    return Inpainting(sde, x_known, mask, method=method, resample=resample)


def colorization(sde: SDE, grey: torch.Tensor, method: str = "replacement",
                 resample: int = DEFAULT_RESAMPLE) -> Inpainting:
    """Constraint that colours grey images: grey (b, 1, ...) is the mean of the RGB channels (`to_grey`), b = 1 or
    the sample batch; the sampler's state is (batch, 3, ...). The output's channel mean equals grey (to rounding)."""
    grey = torch.as_tensor(grey)
    if grey.ndim < 2 or grey.shape[1] != 1:
        raise ValueError(f"grey must have shape (batch, 1, ...) (the mean of the RGB channels), got "
                         f"{tuple(grey.shape)}")
    known = torch.cat([GREY_SCALE * grey, torch.zeros_like(grey), torch.zeros_like(grey)], dim=1)
    mask = torch.zeros((1, 3) + (1,) * (grey.ndim - 2), dtype=torch.bool)
    mask[:, 0] = True
    basis = COLOR_BASIS.to(dtype=grey.dtype if grey.is_floating_point() else torch.float64)
    return Inpainting(sde, known, mask, method=method, resample=resample, basis=basis)


# --------------------------------------------------------------------------------------------------
# Masks and images from files (--mode sample)
# --------------------------------------------------------------------------------------------------
MASK_THRESHOLD = 0.5  # PNG masks: a pixel is known when its grey level (in [0, 1]) is at least this (white = known)
FILE_SUFFIXES = (".png", ".npy")


def _read_array(path, kind: str) -> np.ndarray:
    path = Path(path)
    if path.suffix.lower() not in FILE_SUFFIXES:
        raise ValueError(f"{kind} {path} must be a {' or '.join(FILE_SUFFIXES)} file")
    if not path.is_file():
        raise ValueError(f"{kind} {path} does not exist")
    if path.suffix.lower() == ".npy":
        return np.load(path, allow_pickle=False)
    with Image.open(path) as img:
        grey = img.mode in ("1", "L", "I", "I;16", "F") or kind == "mask"
        array = np.asarray(img.convert("L" if grey else "RGB"), dtype=np.float64) / 255.0
    return array if array.ndim == 2 else array.transpose(2, 0, 1)  # (H, W) or (C, H, W)


def _fit_to(array: np.ndarray, shape: Sequence[int], kind: str, path) -> torch.Tensor:
    """(H, W) or (1, H, W) or (C, H, W) → (1, C, H, W) for data of shape (C, H, W), or a clear error."""
    t = torch.as_tensor(np.asarray(array, dtype=np.float64))
    if t.ndim == 2:
        t = t[None]
    if t.ndim != 3 or t.shape[1:] != tuple(shape[1:]) or t.shape[0] not in (1, shape[0]):
        raise ValueError(f"{kind} {path} has shape {tuple(array.shape)}, which does not fit the data's (C, H, W) = "
                         f"{tuple(shape)}: give (H, W), (1, H, W) or (C, H, W)")
    return t.expand(*shape)[None].clone()


def load_mask(path, shape: Sequence[int]) -> torch.Tensor:
    """A mask for data of shape (C, H, W) as a (1, C, H, W) bool tensor, True = known. PNG: white (grey level ≥
    MASK_THRESHOLD) is known; .npy: 0/1 or bool values. (H, W) masks apply to every channel."""
    array = _read_array(path, "mask")
    if Path(path).suffix.lower() == ".npy" and not np.isin(array, (0, 1)).all():
        raise ValueError(f"mask {path} must hold only 0 (unknown) and 1 (known)")
    return _fit_to(array, shape, "mask", path) >= MASK_THRESHOLD


def load_image(path, shape: Sequence[int]) -> torch.Tensor:
    """An image for data of shape (C, H, W) as (1, C, H, W) floats in [0, 1] (PNG levels / 255, or a .npy array
    already in [0, 1]); a grey PNG fills every channel."""
    array = _read_array(path, "image")
    if not (np.isfinite(array).all() and array.min() >= 0.0 and array.max() <= 1.0):
        raise ValueError(f"image {path} must hold values in [0, 1]")
    return _fit_to(array, shape, "image", path).float()


def conditional_task(config) -> bool:
    """Whether config.sampling asks --mode sample to inpaint or colourize."""
    return config.sampling.inpaint_mask is not None or config.sampling.colorize


def check_config(config) -> None:
    """The sampling.* keys of inpainting and colorization (the mask and image files are read to check them).
    Raises ConfigError naming the key."""
    s, d = config.sampling, config.data
    choice("sampling.conditioning_method", s.conditioning_method, METHODS)
    positive("sampling.resample", s.resample)
    if not conditional_task(config):
        if s.inpaint_image is not None:
            raise ConfigError("sampling.inpaint_image is set but there is nothing to condition on: set "
                              "sampling.inpaint_mask (inpainting) or sampling.colorize=True")
        return
    if s.inpaint_mask is not None and s.colorize:
        raise ConfigError("sampling.inpaint_mask and sampling.colorize=True are two different tasks: set one")
    if s.colorize and d.num_channels != 3:
        raise ConfigError(f"sampling.colorize=True needs 3-channel (RGB) data, but data.num_channels="
                          f"{d.num_channels}: colorize a model trained on colour images, or set "
                          f"sampling.colorize=False (inpainting with sampling.inpaint_mask works on any data)")
    shape = (d.num_channels, d.image_size, d.image_size)
    for key, load in (("inpaint_mask", load_mask), ("inpaint_image", load_image)):
        if s[key] is not None:
            try:
                load(s[key], shape)
            except (ValueError, OSError) as err:
                raise ConfigError(f"sampling.{key}: {err}") from err
