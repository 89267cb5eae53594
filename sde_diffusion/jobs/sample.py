"""--mode sample: samples from the newest numbered checkpoint (EMA weights), class-conditional and guided as
config.sampling says, or inpainted / colourized test images (sampling.inpaint_mask, sampling.colorize).

Writes into workdir/<eval_folder>: <checkpoint>_<method>_nfe<N>[_labels…][_w…][_guide…][_interval…][_cls…].png
and .npz, or <checkpoint>_<inpaint|colorize>_<conditioning method>_<method>_nfe<N>.png (input | sample |
original) and .npz.
Each .npz holds `samples` (float, [0, 1] images or data-space vectors) and, for images, `images`: the same as
uint8 (N, H, W, C). With eval.ema_sigma_rel > 0 the weights are that post-hoc EMA: the name ends in
_sigma_rel<σ> and the .npz holds `post_hoc_ema`, the reconstruction's provenance as JSON.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional, Tuple

import numpy as np
import torch

from .. import controllable, parameterization, sampling
from ..checkpoints import save_npz
from ..data.datasets import dataset_classes
from ..guidance import PER_CLASS, guide_set, sample_label_rows
from ..errors import ConfigError
from ..models import get_score_fn
from ..sampling.settings import resolved_method
from ..models.text_conditioning import text_conditioned
from ..text import caption_words
from ..validation import validate_config
from ..visualize import checkerboard_where_unknown, save_image_grid, save_strip
from . import builder
from .inverse_problem import sample_inverse
from .generation import draw_samples, make_conditioning, sample_generators, save_samples_picture

log = logging.getLogger("sde_diffusion")
PROMPT_NAME_CHARS = 40  # of the prompt's words in sample file names

def run(config, workdir, eval_folder: str = "samples") -> None:
    """Draw eval.num_samples with config.sampling from the newest numbered checkpoint: PNG grid and .npz.

    With sampling.class_labels (e.g. (3, 5) or ("per_class",)) the samples are split evenly over those labels and
    the grid has one row per label; guidance follows sampling.guidance_scale and sampling.classifier_scale.
    """
    validate_config(config)
    builder.check_post_hoc_ema(config, workdir)
    builder.require_one_process("sample")
    workdir = Path(workdir)
    device = builder.resolve_device(config.device)
    builder.seed_everything(config.seed)
    sde, dataset, model = builder.build(config, device, workdir=workdir)
    _, path = builder.newest_checkpoint(workdir)
    rows = sample_label_rows(config, dataset_classes(config, dataset))
    num, label_sequence = config.eval.num_samples, None
    if rows:  # each label's samples side by side, one grid row per label
        per_row = max(1, num // len(rows))
        num, label_sequence = per_row * len(rows), torch.tensor(rows).repeat_interleave(per_row)
    post_hoc_ema = builder.load_weights(path, model, dataset, config).get("ema_reconstruction")
    prompt = prompt_tokens(config, model)
    if prompt is not None and rows:
        raise ConfigError("sampling.prompt and sampling.class_labels both choose what to draw: give one")
    conditioning = make_conditioning(config, sde, model, dataset, workdir, device, label_sequence=label_sequence,
                                     prompt_tokens=prompt)
    if config.sampling.inverse is not None:
        sample_inverse(config, sde, dataset, conditioning, device, path, builder.prepare_workdir(workdir / eval_folder))
        return
    if controllable.conditional_task(config):
        sample_conditional(config, sde, model, dataset, device, path, builder.prepare_workdir(workdir / eval_folder))
        return
    samples, nfe = draw_samples(config, sde, model, dataset, num, device, config.seed, conditioning)
    out = builder.prepare_workdir(workdir / eval_folder)
    stem = f"{path.stem}_{resolved_method(config)}_nfe{nfe}" + conditioning_suffix(config, rows)
    arrays = {"samples": samples.numpy()}
    if post_hoc_ema:  # eval.ema_sigma_rel: which reconstruction drew them
        stem += builder.weights_suffix(config)
        arrays["post_hoc_ema"] = np.array(json.dumps(post_hoc_ema))
    if dataset.is_image:
        arrays["images"] = uint8_images(samples)
    if label_sequence is not None:
        arrays["labels"] = label_sequence.numpy()
    elif conditioning.labelled and prompt is None:
        conditions = conditioning.labels(0, num).numpy()
        arrays["tokens" if conditions.ndim == 2 else "labels"] = conditions  # captions' token ids, or labels
    if prompt is not None:
        arrays["prompt"] = np.array(config.sampling.prompt)
    save_npz(out / f"{stem}.npz", **arrays)
    title = f"{path.name}, {resolved_method(config)}, NFE {nfe}"
    if rows and dataset.is_image:
        save_image_grid(samples, out / f"{stem}.png", nrow=num // len(rows))
    else:
        save_samples_picture(samples[:config.sampling.num_grid_samples], dataset, out / f"{stem}.png", title=title)
    log.info("wrote %s.png and .npz (%d samples, NFE %d%s)", out / stem, len(samples), nfe,
             f", rows = labels {list(rows)}" if rows else f", prompt {config.sampling.prompt!r}" if prompt is not None
             else "")


def prompt_tokens(config, model) -> Optional[torch.Tensor]:
    """The token ids (1, L) of sampling.prompt for a text-conditioned network, or None without a prompt."""
    if config.sampling.prompt is None:
        return None
    return model.text.tokenize([config.sampling.prompt])


def uint8_images(samples: torch.Tensor) -> np.ndarray:
    """[0, 1] images (N, C, H, W) → uint8 (N, H, W, C), rounded and clipped: what other tools read."""
    return (samples.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def conditioning_suffix(config, rows) -> str:
    """File-name part for conditional sampling: which labels and which guidance ('' when unconditional)."""
    s = config.sampling
    parts = []
    if rows:
        parts.append("per_class" if tuple(s.class_labels) == (PER_CLASS,) else
                     "labels" + "-".join(str(y) for y in rows))
    if s.prompt is not None:
        parts.append("prompt-" + "-".join(caption_words(s.prompt))[:PROMPT_NAME_CHARS])
    if config.model.num_classes > 0 or text_conditioned(config) or guide_set(config):
        parts.append(f"w{s.guidance_scale:g}")
    if guide_set(config):  # autoguidance: its guide's checkpoint (and workdir's name, when another run's)
        parts.append("guide" + (f"-{Path(s.guide_workdir).name}-" if s.guide_workdir else "")
                     + ("newest" if s.guide_checkpoint is None else str(s.guide_checkpoint)))
    if s.guidance_interval is not None:
        parts.append("interval{:g}-{:g}".format(*s.guidance_interval))
    if s.classifier_scale > 0:
        parts.append(f"cls{s.classifier_scale:g}")
    return "".join(f"_{p}" for p in parts)


# --------------------------------------------------------------------------------------------------
def conditioning_inputs(config, dataset) -> Tuple[torch.Tensor, torch.Tensor]:
    """(originals, mask): images in [0, 1] whose known part is kept, (n, C, H, W), and the known-pixel mask
    (1, C, H, W), all True for colorization (where the known part is the grey level)."""
    s = config.sampling
    if s.inpaint_image is not None:
        originals = controllable.load_image(s.inpaint_image, dataset.shape).expand(config.eval.num_samples,
                                                                                   *dataset.shape)
    else:
        originals = dataset.to_float(dataset.test[:config.eval.num_samples])
        if len(originals) < config.eval.num_samples:
            log.info("eval.num_samples=%d but the test split has %d images: using those",
                     config.eval.num_samples, len(originals))
    if s.colorize:
        return originals, torch.ones((1, *dataset.shape), dtype=torch.bool)
    return originals, controllable.load_mask(s.inpaint_mask, dataset.shape)


def conditioning_constraint(config, sde, dataset, originals: torch.Tensor, mask: torch.Tensor):
    """The constraint for model-space images `originals` (in [0, 1]): colorization of their grey level, or
    inpainting of their pixels where mask is True."""
    s, x = config.sampling, dataset.to_model(originals)
    if s.colorize:
        return controllable.colorization(sde, controllable.to_grey(x), method=s.conditioning_method,
                                         resample=s.resample)
    return controllable.inpainting(sde, x, mask, method=s.conditioning_method, resample=s.resample)


def conditioning_picture_inputs(config, originals: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """What the sampler was given, viewable in [0, 1]: the grey images, or the known pixels with a checkerboard
    where pixels are unknown."""
    if config.sampling.colorize:
        return controllable.to_grey(originals).expand_as(originals)
    return checkerboard_where_unknown(originals, mask)


def sample_conditional(config, sde, model, dataset, device, path: Path, out: Path) -> None:
    """Inpaint or colourize (config.sampling.inpaint_mask / colorize) in rounds of eval.batch_size, sample i seeded
    by (config.seed, i); writes a PNG whose rows show input, sample and original side by side, and an .npz with all
    three (and the inpainting mask)."""
    s = config.sampling
    model.eval()
    score_fn = get_score_fn(sde, model, continuous=config.training.continuous,
                            parameterization=parameterization.from_config(config, sde))
    settings = builder.sampler_settings(config, sde)
    originals, mask = conditioning_inputs(config, dataset)
    first = originals[:config.eval.batch_size]
    settings = sampling.resolve_auto(settings, score_fn, sde, tuple(first.shape), device=device)  # one grid for all
    chunks, nfe = [], 0
    for start in range(0, len(originals), config.eval.batch_size):
        batch = originals[start:start + config.eval.batch_size].to(device)
        constraint = conditioning_constraint(config, sde, dataset, batch, mask.to(device))
        generator = sample_generators((config.seed,), start, len(batch), device)
        x, nfe = sampling.sample(score_fn, sde, tuple(batch.shape), generator=generator, device=device,
                                 progress=True, constraint=constraint, **settings)
        chunks.append(dataset.from_model(x).cpu())
    samples = torch.cat(chunks)
    inputs = conditioning_picture_inputs(config, originals, mask)
    task = "colorize" if s.colorize else "inpaint"
    stem = f"{path.stem}_{task}_{s.conditioning_method}_{resolved_method(config)}_nfe{nfe}"
    arrays = dict(samples=samples.numpy(), images=uint8_images(samples), inputs=inputs.numpy(),
                  originals=originals.numpy())
    save_npz(out / f"{stem}.npz", **arrays, **({} if s.colorize else {"mask": mask.numpy()}))
    rows = s.num_grid_samples
    save_strip([inputs[:rows], samples[:rows].clamp(0, 1), originals[:rows]], out / f"{stem}.png")
    log.info("wrote %s.png (input | sample | original) and .npz (%d samples, NFE %d)", out / stem, len(samples), nfe)
