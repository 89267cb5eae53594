"""diffusers-format pixel models ↔ our `ddpm` and `ncsnpp` networks, read and written without importing diffusers.

A pipeline folder (diffusers' `save_pretrained`) holds `model_index.json`, `unet/` (`config.json` and
`diffusion_pytorch_model.safetensors`) and `scheduler/` (`scheduler_config.json`); a bare `UNet2DModel` folder
holds only the unet files and gets its family's default scheduler. Two families of `UNet2DModel` map:

| diffusers                                           | ours                                                        |
|-----------------------------------------------------|-------------------------------------------------------------|
| DDPM (Ho et al.): `DownBlock2D`/`AttnDownBlock2D`,  | `ddpm` with `up_attn_per_block=True`; DDPMScheduler's linear |
| `UpBlock2D`/`AttnUpBlock2D`, positional embedding,  | β_start…β_end over N steps ↔ VP SDE β_min = N·β_start,       |
| `downsample_padding=0`                              | β_max = N·β_end, schedule 'linear_chain', discrete time (ε)  |
| NCSN++ VE (score_sde): `SkipDownBlock2D`/           | `ncsnpp`: BigGAN blocks, FIR, output_skip/input_skip (sum),  |
| `AttnSkipDownBlock2D`, `SkipUpBlock2D`/             | skip_rescale, Fourier embedding, scale_by_sigma;            |
| `AttnSkipUpBlock2D`, Fourier embedding              | ScoreSdeVeScheduler ↔ VE SDE ('score': diffusers divides    |
|                                                     | the output by σ inside, as score_sde's scale_by_sigma)       |

diffusers' `center_input_sample` (the network maps x to 2x − 1) is our `data.centered=False`; its
`attention_head_dim` (heads of that many channels; null: one head per layer) is our `model.attention_head_dim`
(0 for null), both splitting q, k, v into heads contiguous in channels. The tensor map
(`tensor_pairs`) is derived from the network's options, level by level; on loading, every diffusers tensor must
find its place and every tensor of ours must be filled, with equal shapes, or a DiffusersFormatError names it.
Older files name attention tensors query/key/value/proj_attn; they are read as to_q/to_k/to_v/to_out.0.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..checkpoints import CheckpointError
from ..config import default_config
from ..models import create_model
from ..models.ddpm import ddpm_options
from ..models.ncsnpp import UNetOptions
from ..models.score_fn import unwrap
from ..parameterization import resolved_names
from ..validation import validate_config

MODEL_INDEX = "model_index.json"
UNET_FOLDER, SCHEDULER_FOLDER = "unet", "scheduler"
UNET_CONFIG, SCHEDULER_CONFIG = "config.json", "scheduler_config.json"
WEIGHTS, PICKLED_WEIGHTS = "diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"
WRITTEN_BY_VERSION = "0.42.1"  # the diffusers version whose format save_diffusers writes (and the tests load)

DDPM_DOWN = {"DownBlock2D": False, "AttnDownBlock2D": True}  # block type → has attention
DDPM_UP = {"UpBlock2D": False, "AttnUpBlock2D": True}
NCSNPP_DOWN = {"SkipDownBlock2D": False, "AttnSkipDownBlock2D": True}
NCSNPP_UP = {"SkipUpBlock2D": False, "AttnSkipUpBlock2D": True}
DDPM_SCHEDULERS = ("DDPMScheduler", "DDIMScheduler")
VE_SCHEDULER = "ScoreSdeVeScheduler"
PIPELINES = {"ddpm": ("DDPMPipeline", "DDPMScheduler"), "ncsnpp": ("ScoreSdeVePipeline", VE_SCHEDULER)}

# UNet2DModel's constructor defaults (diffusers 0.42), for keys a config.json leaves out.
UNET_DEFAULTS: Dict[str, Any] = {
    "sample_size": None, "in_channels": 3, "out_channels": 3, "center_input_sample": False,
    "time_embedding_type": "positional", "time_embedding_dim": None, "freq_shift": 0, "flip_sin_to_cos": True,
    "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
    "mid_block_type": "UNetMidBlock2D", "up_block_types": ("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (224, 448, 672, 896), "layers_per_block": 2, "mid_block_scale_factor": 1,
    "downsample_padding": 1, "downsample_type": "conv", "upsample_type": "conv", "dropout": 0.0, "act_fn": "silu",
    "attention_head_dim": 8, "norm_num_groups": 32, "attn_norm_num_groups": None, "norm_eps": 1e-5,
    "resnet_time_scale_shift": "default", "add_attention": True, "class_embed_type": None, "num_class_embeds": None,
    "num_train_timesteps": None,
}
# What our networks fix, as UNet2DModel options: (key, value) per family; anything else is refused by name.
FIXED = {
    "ddpm": {"time_embedding_type": "positional", "flip_sin_to_cos": False, "freq_shift": 1, "downsample_padding": 0,
             "mid_block_scale_factor": 1, "norm_num_groups": 32},
    "ncsnpp": {"time_embedding_type": "fourier", "mid_block_scale_factor": math.sqrt(2.0), "norm_num_groups": None,
               "in_channels": 3, "out_channels": 3},
}
COMMON = {"mid_block_type": "UNetMidBlock2D", "downsample_type": "conv", "upsample_type": "conv",
          "attn_norm_num_groups": None, "norm_eps": 1e-6, "resnet_time_scale_shift": "default",
          "add_attention": True, "class_embed_type": None, "num_class_embeds": None}
ACTIVATIONS = ("silu", "swish")
DDPM_DEFAULT_SCHEDULER = {"_class_name": "DDPMScheduler", "num_train_timesteps": 1000, "beta_start": 0.0001,
                          "beta_end": 0.02, "beta_schedule": "linear", "prediction_type": "epsilon"}
VE_DEFAULT_SCHEDULER = {"_class_name": VE_SCHEDULER, "num_train_timesteps": 2000, "sigma_min": 0.01,
                        "sigma_max": 1348.0, "snr": 0.15}
LEGACY_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


class DiffusersFormatError(CheckpointError):
    """A diffusers folder, config key or tensor that does not map onto our networks; names it."""


# --------------------------------------------------------------------------------------------------
# Reading a folder
# --------------------------------------------------------------------------------------------------
def _read_json(path: Path, what: str) -> Dict[str, Any]:
    if not path.is_file():
        raise DiffusersFormatError(f"{path} does not exist: {what}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DiffusersFormatError(f"{path} is not valid JSON ({err})") from err


def locate(path) -> Tuple[Path, Dict[str, Any], Optional[Dict[str, Any]]]:
    """(unet folder, unet config, scheduler config or None for a bare UNet2DModel folder) of a local folder."""
    path = Path(path)
    if not path.is_dir():
        raise DiffusersFormatError(f"{path} is not a folder: give the local folder of a diffusers pipeline "
                                   f"({MODEL_INDEX}, {UNET_FOLDER}/, {SCHEDULER_FOLDER}/) or of a UNet2DModel "
                                   f"({UNET_CONFIG}, {WEIGHTS}); download it first, e.g. with "
                                   "`huggingface-cli download google/ddpm-cifar10-32 --local-dir ddpm-cifar10-32`")
    if (path / MODEL_INDEX).is_file():
        index = _read_json(path / MODEL_INDEX, "")
        unet_entry = index.get(UNET_FOLDER)
        if unet_entry is None or list(unet_entry)[-1] != "UNet2DModel":
            raise DiffusersFormatError(f"{path / MODEL_INDEX}: its '{UNET_FOLDER}' entry is {unet_entry!r}; only "
                                       "pipelines with a UNet2DModel load")
        unet_dir = path / UNET_FOLDER
        scheduler = _read_json(path / SCHEDULER_FOLDER / SCHEDULER_CONFIG, "the pipeline has no scheduler config")
        return unet_dir, _read_json(unet_dir / UNET_CONFIG, "the pipeline has no unet config"), scheduler
    config = _read_json(path / UNET_CONFIG, f"neither {MODEL_INDEX} (a pipeline) nor {UNET_CONFIG} (a UNet2DModel)")
    return path, config, None


def read_weights(unet_dir: Path) -> Dict[str, torch.Tensor]:
    """The unet's tensors (safetensors, or a weights-only torch pickle), attention names modernized."""
    if (unet_dir / WEIGHTS).is_file():
        try:
            tensors = load_file(str(unet_dir / WEIGHTS))
        except Exception as err:  # noqa: BLE001 - truncated or foreign file
            raise DiffusersFormatError(f"{unet_dir / WEIGHTS} cannot be read as safetensors ({err})") from err
    elif (unet_dir / PICKLED_WEIGHTS).is_file():
        try:
            tensors = torch.load(unet_dir / PICKLED_WEIGHTS, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001
            raise DiffusersFormatError(f"{unet_dir / PICKLED_WEIGHTS} cannot be read with weights_only=True "
                                       f"({err})") from err
    else:
        raise DiffusersFormatError(f"{unet_dir} holds neither {WEIGHTS} nor {PICKLED_WEIGHTS}")
    return {_modern_name(key): value for key, value in tensors.items()}


def _modern_name(key: str) -> str:
    parts = key.split(".")
    if len(parts) >= 3 and "attentions" in parts and parts[-2] in LEGACY_ATTENTION_NAMES:
        return ".".join(parts[:-2] + [LEGACY_ATTENTION_NAMES[parts[-2]], parts[-1]])
    return key


# --------------------------------------------------------------------------------------------------
# Configs: UNet2DModel + scheduler ↔ ours
# --------------------------------------------------------------------------------------------------
def _option(unet: Mapping[str, Any], key: str):
    return unet.get(key, UNET_DEFAULTS[key])


def _same(a, b) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return a is not None and b is not None and abs(float(a) - float(b)) <= 1e-6 * max(1.0, abs(float(b)))
    return a == b


def family_of(unet: Mapping[str, Any]) -> str:
    """'ddpm' or 'ncsnpp' from the block types; a DiffusersFormatError names a block type of neither family."""
    down, up = list(_option(unet, "down_block_types")), list(_option(unet, "up_block_types"))
    for name, (down_types, up_types) in (("ddpm", (DDPM_DOWN, DDPM_UP)), ("ncsnpp", (NCSNPP_DOWN, NCSNPP_UP))):
        if all(t in down_types for t in down) and all(t in up_types for t in up):
            return name
    raise DiffusersFormatError(f"unet config down_block_types={down}, up_block_types={up}: only the DDPM family "
                               f"({sorted(DDPM_DOWN)} / {sorted(DDPM_UP)}) and the NCSN++ family "
                               f"({sorted(NCSNPP_DOWN)} / {sorted(NCSNPP_UP)}) map onto our networks")


def _check_fixed(unet: Mapping[str, Any], family: str) -> None:
    for key, value in {**COMMON, **FIXED[family]}.items():
        if not _same(_option(unet, key), value):
            raise DiffusersFormatError(f"unet config {key}={_option(unet, key)!r}: our {family} network has "
                                       f"{value!r} only")
    act = _option(unet, "act_fn")
    if act not in ACTIVATIONS:
        raise DiffusersFormatError(f"unet config act_fn={act!r}: our networks take {list(ACTIVATIONS)}")
    unknown = sorted(k for k in unet if not k.startswith("_") and k not in UNET_DEFAULTS)
    if unknown:
        raise DiffusersFormatError(f"unet config key {unknown[0]!r} is not a UNet2DModel option this converter "
                                   "knows")


def _attention_levels(unet: Mapping[str, Any], family: str, widths: Sequence[int]) -> List[int]:
    """Indices of the levels with attention (down level i and up level L−1−i must agree), after checking that
    attention_head_dim splits each of their widths, and the middle block's, into whole heads."""
    down_types, up_types = (DDPM_DOWN, DDPM_UP) if family == "ddpm" else (NCSNPP_DOWN, NCSNPP_UP)
    down, up = list(_option(unet, "down_block_types")), list(_option(unet, "up_block_types"))
    levels = []
    for i, block in enumerate(down):
        if down_types[block] != up_types[up[len(up) - 1 - i]]:
            raise DiffusersFormatError(f"unet config down_block_types[{i}]={block!r} and up_block_types"
                                       f"[{len(up) - 1 - i}]={up[len(up) - 1 - i]!r}: our U-Nets attend at the "
                                       "same resolutions on the way down and up")
        if down_types[block]:
            levels.append(i)
    head_dim = _option(unet, "attention_head_dim")
    if head_dim is None:
        return levels
    if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim < 1:
        raise DiffusersFormatError(f"unet config attention_head_dim={head_dim!r}: give a head width in channels "
                                   "(a positive integer), or null for one head per layer")
    for i in levels + [len(widths) - 1]:  # the middle block attends too
        if widths[i] % head_dim:
            raise DiffusersFormatError(f"unet config attention_head_dim={head_dim}: diffusers' attention at "
                                       f"block_out_channels[{i}]={widths[i]} has {widths[i]} // {head_dim} heads of "
                                       f"{head_dim} channels, {widths[i] // head_dim * head_dim} in all; our heads "
                                       f"split the width exactly: choose a head width that divides {widths[i]}")
    return levels


def _check_ncsnpp_groups(widths: Sequence[int], attention: Sequence[int], layers: int) -> None:
    """diffusers' NCSN++ blocks use 32 groups in their attention (ours: min(C/4, 32)) and min(c_in + c_skip/4, 32)
    in the first norm of AttnSkipUpBlock2D's resnets (ours: min((c_in + c_skip)/4, 32)): both agree only where
    the widths are large enough, as in the released models."""
    L = len(widths)
    for i in attention:
        if min(widths[i] // 4, 32) != 32:
            raise DiffusersFormatError(f"unet config block_out_channels[{i}]={widths[i]}: diffusers normalizes "
                                       "NCSN++ attention in 32 groups, our NCSN++ in min(C/4, 32): attention needs "
                                       "a width of at least 128")
        k = L - 1 - i  # up block index
        prev = widths[min(i + 1, L - 1)]
        for j in range(layers + 1):
            c_in = prev if j == 0 else widths[i]
            c_skip = widths[max(i - 1, 0)] if j == layers else widths[i]
            if min(c_in + c_skip // 4, 32) != min((c_in + c_skip) // 4, 32):
                raise DiffusersFormatError(f"unet config block_out_channels={list(widths)}: up_blocks.{k}.resnets"
                                           f".{j} normalizes {c_in + c_skip} channels in diffusers' "
                                           f"min({c_in} + {c_skip} // 4, 32) groups, ours in min(({c_in} + {c_skip})"
                                           " // 4, 32); they differ at these widths")


def config_from_diffusers(unet: Mapping[str, Any], scheduler: Optional[Mapping[str, Any]] = None):
    """Our full config for a UNet2DModel config (and its scheduler's; None: the family's default scheduler).
    Raises DiffusersFormatError naming the first key that does not map."""
    if unet.get("_class_name", "UNet2DModel") != "UNet2DModel":
        raise DiffusersFormatError(f"unet config _class_name={unet['_class_name']!r}: only UNet2DModel loads")
    family = family_of(unet)
    _check_fixed(unet, family)
    widths = [int(w) for w in _option(unet, "block_out_channels")]
    nf = widths[0]
    if any(w % nf for w in widths):
        raise DiffusersFormatError(f"unet config block_out_channels={widths}: our widths are multiples of the first")
    if len(widths) != len(_option(unet, "down_block_types")) or len(widths) != len(_option(unet, "up_block_types")):
        raise DiffusersFormatError("unet config: block_out_channels, down_block_types and up_block_types differ in "
                                   "length")
    if _option(unet, "in_channels") != _option(unet, "out_channels"):
        raise DiffusersFormatError(f"unet config in_channels={_option(unet, 'in_channels')} and out_channels="
                                   f"{_option(unet, 'out_channels')}: our networks output what they take")
    if _option(unet, "time_embedding_dim") not in (None, 4 * nf):
        raise DiffusersFormatError(f"unet config time_embedding_dim={_option(unet, 'time_embedding_dim')}: ours is "
                                   f"4·block_out_channels[0] = {4 * nf}")
    size = _option(unet, "sample_size")
    if isinstance(size, (list, tuple)):
        if len(set(size)) != 1:
            raise DiffusersFormatError(f"unet config sample_size={size}: our networks take square images")
        size = size[0]
    if not isinstance(size, int):
        raise DiffusersFormatError(f"unet config sample_size={size!r}: give the image size")
    layers = int(_option(unet, "layers_per_block"))
    attention = _attention_levels(unet, family, widths)
    if family == "ncsnpp":
        _check_ncsnpp_groups(widths, attention, layers)

    config = default_config()
    d, m, t = config.data, config.model, config.training
    d.image_size, d.num_channels = size, int(_option(unet, "in_channels"))
    d.centered = not _option(unet, "center_input_sample")
    m.name, m.nf, m.ch_mult, m.num_res_blocks = family, nf, tuple(w // nf for w in widths), layers
    m.attn_resolutions = tuple(size // 2**i for i in attention)
    m.attention_head_dim = _option(unet, "attention_head_dim") or 0
    m.dropout, m.nonlinearity, m.conditional, m.num_classes = float(_option(unet, "dropout")), "swish", True, 0
    m.resamp_with_conv, m.init_scale, m.parameterization, m.noise_conditioning = True, 0.0, "auto", "auto"
    s = config.sampling
    if family == "ddpm":
        m.up_attn_per_block, m.scale_by_sigma, m.embedding_type = True, False, "positional"
        _vp_from_scheduler(config, scheduler if scheduler is not None else DDPM_DEFAULT_SCHEDULER)
        # the model's own sampler: DDPM's Algorithm 2 over all N levels (σ_t² = β_t), then x̂_0 at level 0
        s.method, s.steps, s.eps, s.options = "ancestral", m.num_scales - 1, 0.0, "noise_last=True"
    else:
        m.up_attn_per_block, m.scale_by_sigma, m.embedding_type = False, True, "fourier"
        m.resblock_type, m.fir, m.fir_kernel, m.skip_rescale = "biggan", True, (1, 3, 3, 1), True
        m.progressive, m.progressive_input, m.progressive_combine = "output_skip", "input_skip", "sum"
        _ve_from_scheduler(config, scheduler if scheduler is not None else VE_DEFAULT_SCHEDULER)
        # score_sde's VE sampler: reverse diffusion + Langevin (the PC sampler ScoreSdeVePipeline runs)
        s.method, s.predictor, s.corrector = "pc", "reverse_diffusion", "langevin"
    t.continuous = family == "ncsnpp"
    return config


# diffusers' prediction_type → our model.parameterization (DDPM family)
PREDICTION_TYPES = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}


def _vp_from_scheduler(config, scheduler: Mapping[str, Any]) -> None:
    name = scheduler.get("_class_name")
    if name not in DDPM_SCHEDULERS:
        raise DiffusersFormatError(f"scheduler _class_name={name!r}: a DDPM unet loads with {list(DDPM_SCHEDULERS)}")
    for key, value in (("beta_schedule", "linear"), ("trained_betas", None), ("rescale_betas_zero_snr", False)):
        if scheduler.get(key, value) != value:
            raise DiffusersFormatError(f"scheduler {key}={scheduler[key]!r}: only {value!r} maps onto our VP SDE")
    prediction = scheduler.get("prediction_type", "epsilon")
    if prediction not in PREDICTION_TYPES:
        raise DiffusersFormatError(f"scheduler prediction_type={prediction!r}: one of {list(PREDICTION_TYPES)} maps "
                                   "onto our parameterizations")
    N = int(scheduler.get("num_train_timesteps", 1000))
    m = config.model
    m.parameterization = PREDICTION_TYPES[prediction]
    config.training.sde, m.num_scales, m.beta_schedule = "vpsde", N, "linear_chain"
    m.beta_min = float(scheduler.get("beta_start", 0.0001)) * N
    m.beta_max = float(scheduler.get("beta_end", 0.02)) * N


def _ve_from_scheduler(config, scheduler: Mapping[str, Any]) -> None:
    name = scheduler.get("_class_name")
    if name != VE_SCHEDULER:
        raise DiffusersFormatError(f"scheduler _class_name={name!r}: an NCSN++ unet loads with {VE_SCHEDULER}")
    m = config.model
    config.training.sde, m.num_scales = "vesde", int(scheduler.get("num_train_timesteps", 2000))
    m.sigma_min, m.sigma_max = float(scheduler.get("sigma_min", 0.01)), float(scheduler.get("sigma_max", 1348.0))
    config.sampling.snr = float(scheduler.get("snr", config.sampling.snr))


def diffusers_configs(config) -> Tuple[Dict[str, Any], Dict[str, Any], str]:
    """(UNet2DModel config, scheduler config, pipeline class name) for a network of ours; a DiffusersFormatError
    names the config key that diffusers' blocks cannot express."""
    m, d = config.model, config.data
    family = m.name
    if family not in PIPELINES:
        raise DiffusersFormatError(f"model.name={family!r}: only 'ddpm' and 'ncsnpp' networks export to diffusers")
    o = UNetOptions.from_config(config) if family == "ncsnpp" else ddpm_options(config)
    required: Dict[str, Any] = {"model.conditional": True, "model.num_classes": 0, "model.nonlinearity": "swish"}
    if family == "ddpm":
        required.update({"model.resamp_with_conv": True, "training.sde": "vpsde"})
        if o.attn_resolutions:
            required["model.up_attn_per_block"] = True  # diffusers' AttnUpBlock2D attends after every block
    else:
        required.update({"model.resblock_type": "biggan", "model.fir": True, "model.fir_kernel": (1, 3, 3, 1),
                         "model.progressive": "output_skip", "model.progressive_input": "input_skip",
                         "model.progressive_combine": "sum", "model.skip_rescale": True,
                         "model.embedding_type": "fourier", "model.up_attn_per_block": False,
                         "model.scale_by_sigma": True, "training.sde": "vesde", "data.num_channels": 3})
    for key, value in required.items():
        section, name = key.split(".")
        have = config[section][name]
        have = tuple(have) if isinstance(have, list) else have
        if (have.lower() if isinstance(have, str) else have) != value:
            raise DiffusersFormatError(f"{key}={have!r}: diffusers' {PIPELINES[family][0]} blocks need {value!r}")
    parameterization, conditioning = resolved_names(config)
    # diffusers' DDPM pipelines give the step index i ∈ 0..N−1, which a continuous VP network's 999·t equals at
    # the grid times only for N = 1000
    allowed = ([(p, c) for p in PREDICTION_TYPES.values() for c in ("step",) + (("time",) if m.num_scales == 1000
                                                                              else ())] if family == "ddpm"
               else [("score", "sigma")])
    if (parameterization, conditioning) not in allowed:
        raise DiffusersFormatError(f"model.parameterization / noise_conditioning resolve to {parameterization!r} / "
                                   f"{conditioning!r}; diffusers' {PIPELINES[family][0]} runs "
                                   f"{' or '.join(f'{p!r} with {c!r} inputs' for p, c in allowed)}")
    if family == "ddpm" and m.beta_schedule not in ("linear", "linear_chain"):
        raise DiffusersFormatError(f"model.beta_schedule={m.beta_schedule!r}: DDPMScheduler has linear β only here")

    widths = [o.nf * c for c in o.ch_mult]
    attention = [i for i, r in enumerate(o.resolutions) if r in o.attn_resolutions]
    L = len(widths)
    kinds = (DDPM_DOWN, DDPM_UP) if family == "ddpm" else (NCSNPP_DOWN, NCSNPP_UP)
    down = [next(t for t, a in kinds[0].items() if a == (i in attention)) for i in range(L)]
    up = [next(t for t, a in kinds[1].items() if a == (L - 1 - k in attention)) for k in range(L)]
    unet = {"_class_name": "UNet2DModel", "_diffusers_version": WRITTEN_BY_VERSION, **UNET_DEFAULTS, **COMMON,
            **FIXED[family], "sample_size": d.image_size, "in_channels": d.num_channels,
            "out_channels": d.num_channels, "center_input_sample": not d.centered, "down_block_types": down,
            "up_block_types": up, "block_out_channels": widths, "layers_per_block": o.num_res_blocks,
            "dropout": o.dropout, "act_fn": "silu", "attention_head_dim": o.attention_head_dim or None}
    if family == "ncsnpp":
        _check_ncsnpp_groups(widths, attention, o.num_res_blocks)
        unet.update({"flip_sin_to_cos": True, "freq_shift": 0, "downsample_padding": 1})
        scheduler = {"_class_name": VE_SCHEDULER, "_diffusers_version": WRITTEN_BY_VERSION,
                     "num_train_timesteps": m.num_scales, "sigma_min": m.sigma_min, "sigma_max": m.sigma_max,
                     "snr": config.sampling.snr, "sampling_eps": 1e-5, "correct_steps": 1}
    else:
        N = m.num_scales
        scheduler = {"_class_name": "DDPMScheduler", "_diffusers_version": WRITTEN_BY_VERSION,
                     "num_train_timesteps": N, "beta_start": m.beta_min / N, "beta_end": m.beta_max / N,
                     "beta_schedule": "linear", "variance_type": "fixed_small",
                     "prediction_type": next(k for k, v in PREDICTION_TYPES.items() if v == parameterization),
                     "clip_sample": True}
    return unet, scheduler, PIPELINES[family][0]


# --------------------------------------------------------------------------------------------------
# Tensors
# --------------------------------------------------------------------------------------------------
Pair = Tuple[str, Tuple[str, ...]]  # our key, the diffusers keys it holds (several: concatenated along dim 0)

RESBLOCK_NAMES = (("norm_0", "norm1"), ("conv_0", "conv1"), ("temb_proj", "time_emb_proj"), ("norm_1", "norm2"),
                  ("conv_1", "conv2"), ("shortcut", "conv_shortcut"))


def tensor_pairs(o: UNetOptions) -> List[Pair]:
    """Every tensor our network for `o` may hold, with the diffusers tensors it corresponds to, level by level.
    Residual blocks list a shortcut whether or not they have one; callers keep the pairs our state_dict has."""
    ddpm = o.resblock_type == "ddpm"
    pairs: List[Pair] = []

    def affine(ours: str, theirs: str) -> None:
        pairs.extend((f"{ours}.{n}", (f"{theirs}.{n}",)) for n in ("weight", "bias"))

    def resblock(ours: str, theirs: str) -> None:
        for a, b in RESBLOCK_NAMES:
            affine(f"{ours}.{a}", f"{theirs}.{b}")

    def attn(ours: str, theirs: str) -> None:
        affine(f"{ours}.norm", f"{theirs}.group_norm")
        pairs.extend((f"{ours}.qkv.{n}", tuple(f"{theirs}.to_{x}.{n}" for x in "qkv")) for n in ("weight", "bias"))
        affine(f"{ours}.proj_out", f"{theirs}.to_out.0")

    L, nb = len(o.ch_mult), o.num_res_blocks
    attends = [r in o.attn_resolutions for r in o.resolutions]
    if o.embedding_type == "fourier":
        pairs.append(("embed.fourier.W", ("time_proj.weight",)))
    affine("temb.0", "time_embedding.linear_1")
    affine("temb.2", "time_embedding.linear_2")
    affine("conv_in", "conv_in")
    for i in range(L):
        for j in range(nb):
            resblock(f"down.{i}.blocks.{j}", f"down_blocks.{i}.resnets.{j}")
            if attends[i]:
                attn(f"down.{i}.attns.{j}", f"down_blocks.{i}.attentions.{j}")
        if i < L - 1 and ddpm:
            affine(f"down.{i}.downsample.conv", f"down_blocks.{i}.downsamplers.0.conv")
        elif i < L - 1:
            resblock(f"down.{i}.downsample", f"down_blocks.{i}.resnet_down")
            affine(f"down.{i}.pyramid.combine.conv", f"down_blocks.{i}.skip_conv")
    resblock("mid.block_0", "mid_block.resnets.0")
    attn("mid.attn", "mid_block.attentions.0")
    resblock("mid.block_1", "mid_block.resnets.1")
    for k in range(L):
        i = L - 1 - k
        for j in range(nb + 1):
            resblock(f"up.{k}.blocks.{j}", f"up_blocks.{k}.resnets.{j}")
            if attends[i] and o.up_attn_per_block:
                attn(f"up.{k}.attns.{j}", f"up_blocks.{k}.attentions.{j}")
        if attends[i] and not o.up_attn_per_block:
            attn(f"up.{k}.attn", f"up_blocks.{k}.attentions.0")
        if not ddpm:  # the output pyramid: the last level's step is UNet2DModel's own conv_norm_out / conv_out
            last = k == L - 1
            affine(f"up.{k}.pyramid.norm", "conv_norm_out" if last else f"up_blocks.{k}.skip_norm")
            affine(f"up.{k}.pyramid.conv", "conv_out" if last else f"up_blocks.{k}.skip_conv")
        if k < L - 1 and ddpm:
            affine(f"up.{k}.upsample.conv", f"up_blocks.{k}.upsamplers.0.conv")
        elif k < L - 1:
            resblock(f"up.{k}.upsample", f"up_blocks.{k}.resnet_up")
    if ddpm:
        affine("norm_out", "conv_norm_out")
        affine("conv_out", "conv_out")
    return pairs


def _options(config) -> UNetOptions:
    return ddpm_options(config) if config.model.name == "ddpm" else UNetOptions.from_config(config)


def to_ours(theirs: Mapping[str, torch.Tensor], config, ours: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """diffusers tensors → a full state_dict for our network (`ours`: its state_dict, the target shapes)."""
    result, used = {}, set()
    for key, sources in tensor_pairs(_options(config)):
        if key not in ours:
            continue
        missing = [s for s in sources if s not in theirs]
        if missing:
            raise DiffusersFormatError(f"unet tensor {missing[0]} is missing (it holds our {key})")
        value = torch.cat([theirs[s] for s in sources]) if len(sources) > 1 else theirs[sources[0]]
        if tuple(value.shape) != tuple(ours[key].shape):
            shapes = ", ".join(f"{s} {tuple(theirs[s].shape)}" for s in sources)
            raise DiffusersFormatError(f"unet tensor {shapes} does not fit our {key} {tuple(ours[key].shape)}: the "
                                       "weights do not match their config.json")
        result[key] = value.to(ours[key].dtype).clone()
        used.update(sources)
    unexpected = [name for name in theirs if name not in used]
    if unexpected:
        raise DiffusersFormatError(f"unet tensor {unexpected[0]} {tuple(theirs[unexpected[0]].shape)} has no place "
                                   "in the network built from its config.json")
    unfilled = [key for key in ours if key not in result]
    if unfilled:
        raise DiffusersFormatError(f"our tensor {unfilled[0]} receives nothing from the unet (a bug in tensor_pairs)")
    return result


def to_diffusers(ours: Mapping[str, torch.Tensor], config) -> Dict[str, torch.Tensor]:
    """Our state_dict → diffusers' tensor names (qkv split into to_q, to_k, to_v), contiguous float copies."""
    result, used = {}, set()
    for key, targets in tensor_pairs(_options(config)):
        if key not in ours:
            continue
        for name, part in zip(targets, ours[key].chunk(len(targets))):
            result[name] = part.detach().cpu().contiguous().clone()
        used.add(key)
    left = [key for key in ours if key not in used]
    if left:
        raise DiffusersFormatError(f"our tensor {left[0]} has no diffusers counterpart")
    return result


# --------------------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------------------
def load_diffusers(path) -> Tuple[nn.Module, Any]:
    """(our network in eval mode on the CPU, our full config) for a local diffusers pipeline or UNet2DModel folder.

    The config's SDE, parameterization and data keys say what the network computes, so
    `get_score_fn(sdes.sde_from_config(config), model, config.training.continuous)` is its score. Nothing is
    downloaded and diffusers is not imported."""
    unet_dir, unet_config, scheduler = locate(path)
    config = config_from_diffusers(unet_config, scheduler)
    validate_config(config)
    model = create_model(config)
    model.load_state_dict(to_ours(read_weights(unet_dir), config, model.state_dict()), strict=True)
    return model.eval(), config


def save_diffusers(model: nn.Module, config, path) -> None:
    """Write our `ddpm` / `ncsnpp` (VE) network as a diffusers pipeline folder (DDPMPipeline or ScoreSdeVePipeline:
    model_index.json, unet/, scheduler/) that `UNet2DModel.from_pretrained(path / 'unet')` and the pipeline load,
    with our network's output. `path` must not exist or be empty; it appears complete or not at all."""
    unet, scheduler, pipeline = diffusers_configs(config)
    tensors = to_diffusers(unwrap(model).state_dict(), config)
    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise DiffusersFormatError(f"{path} exists and is not an empty folder: choose a new one")
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        (staging / UNET_FOLDER).mkdir()
        (staging / SCHEDULER_FOLDER).mkdir()
        save_file(tensors, str(staging / UNET_FOLDER / WEIGHTS), metadata={"format": "pt"})
        (staging / UNET_FOLDER / UNET_CONFIG).write_text(json.dumps(unet, indent=2) + "\n")
        (staging / SCHEDULER_FOLDER / SCHEDULER_CONFIG).write_text(json.dumps(scheduler, indent=2) + "\n")
        index = {"_class_name": pipeline, "_diffusers_version": WRITTEN_BY_VERSION,
                 SCHEDULER_FOLDER: ["diffusers", scheduler["_class_name"]], UNET_FOLDER: ["diffusers", "UNet2DModel"]}
        (staging / MODEL_INDEX).write_text(json.dumps(index, indent=2) + "\n")
        if path.exists():
            path.rmdir()
        os.replace(staging, path)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
