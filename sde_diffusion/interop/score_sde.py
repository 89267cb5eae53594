"""Load score_sde_pytorch checkpoints into our networks (`ncsnpp`, `ddpm`), or convert them to our format.

A reference checkpoint (`utils.save_checkpoint` of yang-song/score_sde_pytorch, also the released ones) is
`{'model': DataParallel state_dict ('module.' prefix), 'ema': {'decay', 'num_updates', 'shadow_params'},
'optimizer': Adam state, 'step'}`. The reference network is a flat `all_modules` list whose entries are
numbered in the order its constructor created them, and its EMA `shadow_params` follow the order of its
trainable parameters. `reference_layout(config)` re-enumerates that creation order for a config and pairs
each reference tensor with the tensor of our named modules that holds it; the loader then checks that
every tensor is accounted for, with the expected shape, and names the first one that is not.

    python -m sde_diffusion.interop checkpoint_26.pth --config configs/ve_cifar.py --out converted.pth

(interop/__main__.py) writes our checkpoint format (`model`, `ema`, `step`: what `checkpoints.load_model_weights`,
evaluation and sampling read). The reference optimizer state is not carried over.

The reference's quirks, reproduced:
- Its NCSN++ keeps the parameter-free resampling of the output pyramid ('output_skip') and of the input pyramid
  ('input_skip') outside `all_modules`: they take no index there, while the 'residual' pyramids' resampling convs
  do.
- With model.scale_by_sigma its network divides by `sigmas[label.long()]` under the positional embedding and by
  the label itself under the Fourier one. With continuous VE labels σ(t), the positional case divides by the SMLD
  level at ⌊σ(t)⌋ (σ_max for σ(t) < 1), not by σ(t): such checkpoints load with the 'score_table'
  parameterization (`reference_parameterization`), which reproduces that score.
- The Fourier projection W is a parameter without gradient: in the model state_dict, absent from the EMA.
- Every residual block holds a time-embedding Dense_0 even with model.conditional=False, and NCSN++ builds the
  Fourier projection then too; those tensors are checked and unused.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

import numpy as np
import torch
from torch import nn

from ..checkpoints import CheckpointError, save_checkpoint
from ..config import default_config
from ..models import create_model
from ..models.ddpm import ddpm_options
from ..models.ncsnpp import UNetOptions

PREFIX = "module."  # torch.nn.DataParallel
SIGMAS = "sigmas"  # the reference's float64 buffer of SMLD noise levels, exp(linspace(log σ_max, log σ_min, N))
SIGMAS_RTOL = 1e-6

# The reference saves Adam's lr as a numpy scalar: safe (weights-only) unpickling must allow exactly these.
_numpy_core = getattr(np, "_core", None) or np.core
NUMPY_SAFE_GLOBALS = [_numpy_core.multiarray.scalar, np.dtype, type(np.dtype(np.float64))]


class ReferenceCheckpointError(CheckpointError):
    """A score_sde_pytorch checkpoint does not fit the network built from the config; names the tensor."""


@dataclass(frozen=True)
class TensorMap:
    """Where one reference tensor goes.

    ref: its name without the 'module.' prefix (e.g. 'all_modules.4.Conv_0.weight').
    ours: the key of our state_dict that receives it, or None if our network has no use for it (`unused`
      says why, `shape` gives its expected shape).
    rows: (start, stop) rows of `ours` that it fills (q, k and v share one fused projection), None: all rows.
    nin: a reference NIN weight W of shape (in, out), applied as x·W; ours is Wᵀ, (out, in) or (out, in, 1, 1).
    trainable: False for tensors the reference EMA skips (the fixed Fourier projection).
    """

    ref: str
    ours: Optional[str]
    rows: Optional[Tuple[int, int]] = None
    nin: bool = False
    trainable: bool = True
    unused: str = ""
    shape: Optional[Tuple[int, ...]] = None


class _Layout:
    """Accumulates TensorMaps module by module, numbering modules like the reference's `all_modules`."""

    def __init__(self, conditional: bool, temb_dim: int):
        self.maps: List[TensorMap] = []
        self.index = 0
        self.conditional, self.temb_dim = conditional, temb_dim

    def _add(self, ref: str, ours: Optional[str], **kw) -> None:
        self.maps.append(TensorMap(f"all_modules.{self.index}.{ref}" if ref else f"all_modules.{self.index}",
                                   ours, **kw))

    def _affine(self, ref: str, ours: str, **kw) -> None:
        """weight and bias of a Conv2d, Linear or GroupNorm."""
        for name in ("weight", "bias"):
            self._add(f"{ref}.{name}" if ref else name, f"{ours}.{name}", **kw)

    def _nin(self, ref: str, ours: str, rows: Optional[Tuple[int, int]] = None) -> None:
        self._add(f"{ref}.W", f"{ours}.weight", rows=rows, nin=True)
        self._add(f"{ref}.b", f"{ours}.bias", rows=rows)

    def _next(self) -> None:
        self.index += 1

    # --- one method per reference module class ------------------------------------------------------
    def plain(self, ours: str) -> None:
        """nn.Linear, nn.Conv2d or nn.GroupNorm stored directly in all_modules."""
        self._affine("", ours)
        self._next()

    def fourier(self, ours: str, size: int) -> None:
        if self.conditional:
            self._add("W", f"{ours}.fourier.W", trainable=False)
        else:
            self._add("W", None, trainable=False, shape=(size,),
                      unused="the reference computes the Fourier embedding even with model.conditional=False")
        self._next()

    def resblock(self, ours: str, kind: str, in_ch: int, out_ch: int, resample: bool = False) -> None:
        """ResnetBlockDDPM / ResnetBlockDDPMpp (kind 'ddpm': NIN shortcut) or ResnetBlockBigGANpp ('biggan')."""
        def dense():
            if self.conditional:
                self._affine("Dense_0", f"{ours}.temb_proj")
            else:
                why = "the reference gives every residual block a Dense_0, used only if model.conditional=True"
                self._add("Dense_0.weight", None, shape=(out_ch, self.temb_dim), unused=why)
                self._add("Dense_0.bias", None, shape=(out_ch,), unused=why)

        self._affine("GroupNorm_0", f"{ours}.norm_0")
        self._affine("Conv_0", f"{ours}.conv_0")
        dense()
        self._affine("GroupNorm_1", f"{ours}.norm_1")
        self._affine("Conv_1", f"{ours}.conv_1")
        if kind == "biggan" and (in_ch != out_ch or resample):
            self._affine("Conv_2", f"{ours}.shortcut")
        elif kind == "ddpm" and in_ch != out_ch:
            self._nin("NIN_0", f"{ours}.shortcut")
        self._next()

    def attn(self, ours: str, channels: int) -> None:
        """AttnBlock / AttnBlockpp: q, k, v (NIN_0..2) fill the thirds of our fused qkv projection."""
        self._affine("GroupNorm_0", f"{ours}.norm")
        for i in range(3):
            self._nin(f"NIN_{i}", f"{ours}.qkv", rows=(i * channels, (i + 1) * channels))
        self._nin("NIN_3", f"{ours}.proj_out")
        self._next()

    def resample(self, ours: str, with_conv: bool, fir: bool) -> None:
        """Upsample / Downsample: a conv named Conv2d_0 (FIR) or Conv_0, or no parameters at all."""
        if with_conv:
            self._affine("Conv2d_0" if fir else "Conv_0", f"{ours}.conv")
        self._next()

    def combine(self, ours: str) -> None:
        self._affine("Conv_0", f"{ours}.conv")
        self._next()


def _unet_layout(o: UNetOptions, ddpm_model: bool) -> List[TensorMap]:
    """The reference NCSN++ (or, with ddpm_model, DDPM) constructor's module order, paired with our paths."""
    nf, levels, temb_dim = o.nf, len(o.ch_mult), 4 * o.nf
    kind = o.resblock_type
    L = _Layout(o.conditional, temb_dim)
    if o.embedding_type == "fourier" and not ddpm_model:
        L.fourier("embed", nf)
    if o.conditional:
        L.plain("temb.0")
        L.plain("temb.2")
    L.plain("conv_in")

    ch, skips = nf, [nf]
    for i, mult in enumerate(o.ch_mult):
        for j in range(o.num_res_blocks):
            L.resblock(f"down.{i}.blocks.{j}", kind, ch, nf * mult)
            ch = nf * mult
            if o.resolutions[i] in o.attn_resolutions:
                L.attn(f"down.{i}.attns.{j}", ch)
            skips.append(ch)
        if i == levels - 1:
            continue
        if o.resblock_type == "ddpm":
            L.resample(f"down.{i}.downsample", o.resamp_with_conv, o.fir)
        else:
            L.resblock(f"down.{i}.downsample", kind, ch, ch, resample=True)
        if o.progressive_input == "input_skip":  # its parameter-free downsampling is not in all_modules
            L.combine(f"down.{i}.pyramid.combine")
            ch *= 2 if o.progressive_combine == "cat" else 1
        elif o.progressive_input == "residual":
            L.resample(f"down.{i}.pyramid.downsample", with_conv=True, fir=o.fir)
        skips.append(ch)

    L.resblock("mid.block_0", kind, ch, ch)
    L.attn("mid.attn", ch)
    L.resblock("mid.block_1", kind, ch, ch)

    for k, i in enumerate(reversed(range(levels))):
        out_ch = nf * o.ch_mult[i]
        for j in range(o.num_res_blocks + 1):
            L.resblock(f"up.{k}.blocks.{j}", kind, ch + skips.pop(), out_ch)
            ch = out_ch
        if o.resolutions[i] in o.attn_resolutions:
            L.attn(f"up.{k}.attn", ch)
        if o.progressive != "none":
            if k > 0 and o.progressive == "residual":  # the pyramid so far, upsampled by a conv to this width
                L.resample(f"up.{k}.pyramid.upsample", with_conv=True, fir=o.fir)
            if k == 0 or o.progressive == "output_skip":
                L.plain(f"up.{k}.pyramid.norm")
                L.plain(f"up.{k}.pyramid.conv")
        if i != 0:
            if o.resblock_type == "ddpm":
                L.resample(f"up.{k}.upsample", o.resamp_with_conv, o.fir)
            else:
                L.resblock(f"up.{k}.upsample", kind, ch, ch, resample=True)
    assert not skips, "every skip connection is consumed"
    if o.progressive != "output_skip":
        L.plain("norm_out")
        L.plain("conv_out")
    return L.maps


def reference_layout(config) -> List[TensorMap]:
    """Every tensor of the score_sde_pytorch network for `config` (except the `sigmas` buffer), in the order of
    its state_dict and parameters(), each paired with the tensor of our network that receives it."""
    name = config.model.name
    if config.model.up_attn_per_block:
        raise ReferenceCheckpointError("score_sde_pytorch's networks attend once per up level: load them with "
                                       "model.up_attn_per_block=False")
    if config.model.attention_head_dim:
        raise ReferenceCheckpointError("score_sde_pytorch's attention has one head as wide as the layer: load it "
                                       "with model.attention_head_dim=0")
    if name == "ncsnpp":
        return _unet_layout(UNetOptions.from_config(config), ddpm_model=False)
    if name == "ddpm":
        if not config.model.conditional:
            raise ReferenceCheckpointError("score_sde_pytorch's ddpm always conditions on the noise level (it ignores "
                                           "model.conditional=False): load it with model.conditional=True")
        return _unet_layout(ddpm_options(config), ddpm_model=True)
    raise ReferenceCheckpointError(f"model.name={name!r}: only score_sde_pytorch's 'ncsnpp' and 'ddpm' networks "
                                   "can be loaded")


def has_level_table_quirk(config) -> bool:
    """Whether the reference network for `config` divides its continuous VE label σ(t) by the SMLD level table
    at ⌊σ(t)⌋ (NCSN++ with the positional embedding, model.scale_by_sigma, continuous VE training)."""
    m = config.model
    return (m.name == "ncsnpp" and m.scale_by_sigma and m.embedding_type.lower() == "positional"
            and config.training.continuous and config.training.sde.lower() == "vesde")


def reference_parameterization(config) -> str:
    """The model.parameterization that gives the reference's score for a network of `config`: 'score_table' for
    the level-table quirk (has_level_table_quirk), else config.model.parameterization."""
    if has_level_table_quirk(config) and config.model.parameterization in ("auto", "score"):
        return "score_table"
    return config.model.parameterization


def reference_network_output(model: nn.Module, config, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """What the reference network returns for inputs x (B, C, H, W) and its labels (B,), computed with our
    `model`: ours divided, under model.scale_by_sigma, by the labels (Fourier embedding) or by
    `sigmas[labels.long()]` (positional embedding), as the reference's forward does; float32."""
    output = model(x, labels)
    if not config.model.scale_by_sigma:
        return output
    if config.model.embedding_type.lower() == "fourier" and config.model.name == "ncsnpp":
        divisor = labels
    else:
        divisor = reference_sigmas(config).to(labels.device)[labels.long()]
    return (output.double() / divisor.double()[:, None, None, None]).to(output.dtype)


def reference_sigmas(config) -> torch.Tensor:
    """The reference's `sigmas` buffer for a config: exp(linspace(log σ_max, log σ_min, num_scales)), float64."""
    m = config.model
    return torch.from_numpy(np.exp(np.linspace(np.log(m.sigma_max), np.log(m.sigma_min), m.num_scales)))


# --------------------------------------------------------------------------------------------------
# Conversion
# --------------------------------------------------------------------------------------------------
def _expected_ref_shape(entry: TensorMap, ours: Mapping[str, torch.Tensor]) -> Tuple[int, ...]:
    if entry.ours is None:
        return tuple(entry.shape)
    shape = list(ours[entry.ours].shape)
    if entry.rows is not None:
        shape[0] = entry.rows[1] - entry.rows[0]
    if entry.nin:
        return (shape[1], shape[0])  # W is (in, out); trailing 1×1 kernel dims are ours only
    return tuple(shape)


def _to_ours(entry: TensorMap, tensor: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The reference tensor in our layout: NIN weights transposed and given our trailing kernel dims."""
    if entry.nin:
        tensor = tensor.t().reshape(tensor.shape[1], tensor.shape[0], *target.shape[2:])
    return tensor


def convert_weights(ref: Mapping[str, torch.Tensor], config, ours: Mapping[str, torch.Tensor],
                    what: str = "model") -> Dict[str, torch.Tensor]:
    """Reference tensors (names without 'module.', `sigmas` included or not) → a full state_dict for our network.

    `ours` is our network's state_dict (its shapes and dtypes are the targets). Raises ReferenceCheckpointError
    naming the first reference tensor, in checkpoint order, that is unexpected or has the wrong shape, then
    the first one that is missing, then any of our tensors left unfilled.
    """
    layout = reference_layout(config)
    by_name = {entry.ref: entry for entry in layout}
    hint = "the checkpoint was written for a different config (compare model.nf, ch_mult, num_res_blocks, " \
           "attn_resolutions, resblock_type, progressive*, embedding_type, conditional and data.num_channels)"
    for name, tensor in ref.items():
        if name == SIGMAS:
            continue
        if name not in by_name:
            raise ReferenceCheckpointError(f"{what} tensor {PREFIX}{name} {tuple(tensor.shape)} has no place in the "
                                           f"network built from this config: {hint}")
        expected = _expected_ref_shape(by_name[name], ours)
        if tuple(tensor.shape) != expected:
            target = f" (for our {by_name[name].ours})" if by_name[name].ours else ""
            raise ReferenceCheckpointError(f"{what} tensor {PREFIX}{name} has shape {tuple(tensor.shape)}, but the "
                                           f"network built from this config expects {expected}{target}: {hint}")
    for entry in layout:
        if entry.ref not in ref:
            raise ReferenceCheckpointError(f"{what} tensor {PREFIX}{entry.ref} is missing from the checkpoint: {hint}")

    result = {key: torch.full_like(value, float("nan")) if value.is_floating_point() else value.clone()
              for key, value in ours.items()}
    filled = {key: torch.zeros(value.shape[0] if value.ndim else 1, dtype=torch.bool) for key, value in ours.items()}
    for entry in layout:
        if entry.ours is None:
            continue
        target = result[entry.ours]
        start, stop = entry.rows or (0, target.shape[0] if target.ndim else 1)
        value = _to_ours(entry, ref[entry.ref], target).to(target.dtype)
        if target.ndim:
            target[start:stop] = value
        else:
            target.copy_(value)
        filled[entry.ours][start:stop] = True
    unfilled = [key for key, rows in filled.items() if not rows.all()]
    if unfilled:
        raise ReferenceCheckpointError(f"our tensor {unfilled[0]} receives nothing from the reference layout "
                                       "(a bug in reference_layout for this config)")
    return result


def read_reference_checkpoint(path) -> Dict[str, Any]:
    """torch.load(weights_only=True) of a score_sde_pytorch checkpoint, allowing only its numpy lr scalar."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        with torch.serialization.safe_globals(NUMPY_SAFE_GLOBALS):
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - truncated zip, foreign pickle globals
        raise CheckpointError(f"{path} cannot be read as a score_sde_pytorch checkpoint with weights_only=True "
                              f"({type(err).__name__}: {err})") from err
    for key in ("model", "ema"):
        if key not in state:
            raise CheckpointError(f"{path} has no '{key}' entry (keys: {sorted(state)}): it is not a "
                                  "score_sde_pytorch checkpoint")
    return state


def _strip_prefix(state_dict: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    return {k[len(PREFIX):] if k.startswith(PREFIX) else k: v for k, v in state_dict.items()}


def _check_sigmas(ref: Mapping[str, torch.Tensor], config) -> None:
    if SIGMAS not in ref:
        return
    expected = reference_sigmas(config)
    saved = ref[SIGMAS]
    if saved.shape != expected.shape or not torch.allclose(saved.double(), expected, rtol=SIGMAS_RTOL, atol=0.0):
        raise ReferenceCheckpointError(f"{PREFIX}{SIGMAS} (the SMLD noise levels, {tuple(saved.shape)}) differs from "
                                       "exp(linspace(log σ_max, log σ_min, N)) of this config: set model.sigma_min, "
                                       "model.sigma_max and model.num_scales to the checkpoint's values")


def ema_weights(state: Mapping[str, Any], config) -> Dict[str, torch.Tensor]:
    """The reference EMA as named reference tensors: shadow_params[i] is the i-th trainable tensor of the
    layout; non-trainable ones (the Fourier W) keep the model's value, as the reference's copy_to does."""
    model = _strip_prefix(state["model"])
    shadow = list(state["ema"]["shadow_params"])
    trainable = [entry for entry in reference_layout(config) if entry.trainable]
    if len(shadow) != len(trainable):
        raise ReferenceCheckpointError(f"the EMA holds {len(shadow)} tensors but the network built from this config "
                                       f"has {len(trainable)} trainable ones: the checkpoint was written for a "
                                       "different config")
    ema = dict(model)
    for i, (entry, tensor) in enumerate(zip(trainable, shadow)):
        if entry.ref in model and tuple(model[entry.ref].shape) != tuple(tensor.shape):
            raise ReferenceCheckpointError(f"ema shadow_params[{i}] (for {PREFIX}{entry.ref}) has shape "
                                           f"{tuple(tensor.shape)}, the model tensor {tuple(model[entry.ref].shape)}")
        ema[entry.ref] = tensor
    return ema


def convert_checkpoint(state: Mapping[str, Any], config, model: Optional[nn.Module] = None
                       ) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
    """(our model state_dict, our EMA state_dict) from a loaded reference checkpoint."""
    if config.training.sde.lower() == "vesde" and not config.model.scale_by_sigma:
        raise ReferenceCheckpointError("score_sde_pytorch's VE networks trained without model.scale_by_sigma output "
                                       "the score itself, while sde_diffusion's output σ·score (get_score_fn divides "
                                       "by σ): such a checkpoint would get a different score function here")
    if config.model.num_classes:
        raise ReferenceCheckpointError("score_sde_pytorch's networks are unconditional (no label embedding): load "
                                       "its checkpoints with model.num_classes=0")
    model = model if model is not None else create_model(config)
    ours = model.state_dict()
    ref_model = _strip_prefix(state["model"])
    _check_sigmas(ref_model, config)
    weights = convert_weights(ref_model, config, ours, "model")
    ema = convert_weights(ema_weights(state, config), config, ours, "ema")
    return weights, ema


def load_score_sde_pytorch(path, config, use_ema: bool = True) -> nn.Module:
    """Our network for `config` (model.name 'ncsnpp' or 'ddpm') holding the weights of a score_sde_pytorch
    checkpoint: the EMA weights (use_ema=True, what the paper samples with) or the raw ones. Returned in
    eval mode, on the CPU. Any missing, unexpected or mis-shaped tensor raises ReferenceCheckpointError
    naming it. `get_score_fn(sde, model, continuous)` then gives the reference's score, quirks included
    (the network's `score_convention` is `reference_parameterization(config)`)."""
    state = read_reference_checkpoint(path)
    model = create_model(config)
    try:
        weights, ema = convert_checkpoint(state, config, model)
    except ReferenceCheckpointError as err:
        raise ReferenceCheckpointError(f"{path}: {err}") from err
    model.load_state_dict(ema if use_ema else weights, strict=True)
    m = config.model
    model.score_convention = (reference_parameterization(config), m.noise_conditioning, m.sigma_data)
    return model.eval()


def to_our_checkpoint(state: Mapping[str, Any], config) -> Dict[str, Any]:
    """Our checkpoint format (`model`, `ema`, `step`) for a loaded reference checkpoint."""
    model = create_model(config)
    weights, ema = convert_checkpoint(state, config, model)
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    ref_ema = state["ema"]
    return {"model": weights,
            "ema": {"decay": float(ref_ema.get("decay", config.model.ema_rate)),
                    "num_updates": ref_ema.get("num_updates"),
                    "shadow_params": [ema[name] for name in trainable]},
            "step": int(state.get("step", 0)),
            "converted_from": "score_sde_pytorch"}


def config_from_score_sde(flat: Mapping[str, Any], base=None) -> Tuple[Any, List[str]]:
    """Our config holding a score_sde_pytorch config given as flattened 'section.key' → value.

    Starts from `base` (default: default_config()); copies every key our schema has (lists become tuples,
    the dataset name is lower-cased) and sets model.parameterization to `reference_parameterization`. Returns
    (config, the keys that were skipped because we have no such key).
    """
    config = base if base is not None else default_config()
    skipped = []
    for key, value in flat.items():
        section, _, name = key.partition(".")
        if not name or section not in config or name not in config[section]:
            skipped.append(key)
            continue
        if isinstance(value, list):
            value = tuple(value)
        if key == "data.dataset":
            value = str(value).lower()
        current = config[section][name]
        if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        config[section][name] = value
    config.model.parameterization = reference_parameterization(config)
    return config, skipped
