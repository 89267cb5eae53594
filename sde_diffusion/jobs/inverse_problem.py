"""--mode sample with sampling.inverse: posterior samples of x given a linear measurement y = A·x + σ_y·z.

The observations are the test images measured (one per sample, noise seeded by config.seed), or the file
sampling.observation: an image shaped like the data (measured, and its own ground truth) or like the measurement
(used as it is; ground truth from an .npz's `ground_truth`), one y shared by every sample. Writes into
workdir/<eval_folder>/<checkpoint>_inverse_<operator>_<method>_<sampler>_nfe<N>:
  .png   observation | sample | ground truth, one row per sample (images)
  .npz   samples, images (uint8), observation (A's output, pixel units), preview (the observation drawn at the
         data's size), ground_truth, residual (‖A·x − y‖ per sample, network scale), psnr (dB, per sample)
  .json  the operator, method, σ_y, NFE, mean residual beside σ_y·√m (the size of the noise in y), PSNR
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Optional, Tuple

import numpy as np
import torch

from .. import sampling
from ..checkpoints import save_npz, write_json
from ..inverse import LinearObservation, posterior_score
from ..inverse.config import load_observation, method_from_config, operator_from_config
from ..inverse.operators import LinearOperator, Mask
from ..sampling.settings import resolved_method
from ..visualize import checkerboard_where_unknown, save_strip
from . import builder
from .generation import sample_generators

log = logging.getLogger("sde_diffusion")
OBSERVATION_SEED_KEY = 2**31 - 2  # seeds the measurement noise apart from every sample's generator


def affine(dataset) -> Tuple[float, float]:
    """(a, b) with dataset.to_model(x) = a·x + b (pixel units → network scale)."""
    zero, one = (float(dataset.to_model(torch.tensor(v))) for v in (0.0, 1.0))
    return one - zero, zero


def psnr(samples: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """Per-sample PSNR (dB) of samples against truth, both in [0, 1] (samples clipped): −10·log10(MSE)."""
    mse = (samples.clamp(0, 1) - truth).pow(2).flatten(1).mean(1)
    return -10 * torch.log10(mse.clamp_min(1e-12))


def preview(A: LinearOperator, y_pixels: torch.Tensor) -> torch.Tensor:
    """The observation drawn at the data's size: Aᵀy / Aᵀ(A·1) (the low-resolution image upsampled, the kept
    pixels), a checkerboard where nothing is measured."""
    ones = torch.ones(1, *A.in_shape)
    weight = A.adjoint(A(ones))
    image = A.adjoint(y_pixels) / weight.clamp_min(1e-12)
    seen = (weight > 1e-12).expand_as(image)
    return checkerboard_where_unknown(image.clamp(0, 1), seen) if isinstance(A, Mask) else image.clamp(0, 1)


def observations(config, dataset, A: LinearOperator, num: int) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(y in network scale (n_obs, *out_shape), ground truth in pixel units (n_obs, *shape) or None)."""
    s = config.sampling
    a, b = affine(dataset)
    if s.observation is not None:
        kind, array, truth = load_observation(s.observation, A)
        if kind == "measurement":
            return a * array[None] + A(torch.full((1, *A.in_shape), b)), None if truth is None else truth[None]
        truth = array[None]
    else:
        truth = dataset.to_float(dataset.test[:num]) if dataset.is_image else dataset.test[:num].float()
        if len(truth) < num:
            log.info("eval.num_samples=%d but the test split has %d: those are measured, in turn", num, len(truth))
    generator = torch.Generator().manual_seed(builder.round_seed(config.seed, OBSERVATION_SEED_KEY))
    y = A(dataset.to_model(truth))
    return y + s.noise_std * torch.randn(y.shape, generator=generator), truth


def sample_inverse(config, sde, dataset, conditioning, device, path: Path, out: Path) -> None:
    """Draw eval.num_samples posterior samples (sample i given observation i mod the number of observations) in
    rounds of eval.batch_size; write the files of the module docstring."""
    s, num = config.sampling, config.eval.num_samples
    A = operator_from_config(config, dataset.shape)
    method = method_from_config(config)
    y_all, truth = observations(config, dataset, A, num)
    which = torch.arange(num) % len(y_all)
    settings = builder.sampler_settings(config, sde)
    first = min(num, config.eval.batch_size)  # an "auto" grid is measured once, on the prior's score
    settings = sampling.resolve_auto(settings, conditioning.score_fn(0, first, device), sde, (first, *dataset.shape),
                                     device=device)
    chunks, residuals, nfe = [], [], 0
    for start in range(0, num, config.eval.batch_size):
        n = min(config.eval.batch_size, num - start)
        y = y_all[which[start:start + n]].to(device)
        obs = LinearObservation(A, y, s.noise_std)
        score_fn = posterior_score(conditioning.score_fn(start, n, device), sde, obs, method)
        generator = sample_generators((config.seed,), start, n, device)
        x, nfe = sampling.sample(score_fn, sde, (n, *dataset.shape), generator=generator, device=device,
                                 progress=True, **settings)
        residuals.append(obs.residual_norm(x).cpu())
        chunks.append(dataset.from_model(x).cpu())
    samples, residual = torch.cat(chunks), torch.cat(residuals)
    a, b = affine(dataset)
    y_pixels = (y_all - A(torch.full((1, *A.in_shape), b))) / a
    name = s.inverse.partition(":")[0]
    stem = f"{path.stem}_inverse_{name}_{method.partition(':')[0]}_{resolved_method(config)}_nfe{nfe}"
    arrays = dict(samples=samples.numpy(), observation=y_pixels.numpy(), residual=residual.numpy())
    report = dict(checkpoint=path.name, operator=s.inverse, method=method, sampler=resolved_method(config), nfe=nfe,
                  noise_std=s.noise_std, num_samples=num, num_observations=len(y_all),
                  residual_mean=float(residual.mean()),
                  residual_expected=s.noise_std * math.sqrt(math.prod(A.out_shape())))
    if truth is not None:
        values = psnr(samples, truth[which]) if dataset.is_image else None
        arrays["ground_truth"] = truth.numpy()
        if values is not None:
            arrays["psnr"] = values.numpy()
            report.update(psnr_mean=float(values.mean()), psnr_median=float(values.median()))
    if dataset.is_image:
        shown = preview(A, y_pixels)
        arrays.update(preview=shown.numpy(), images=(samples.clamp(0, 1) * 255).round().to(torch.uint8)
                      .permute(0, 2, 3, 1).numpy())
        rows = min(num, s.num_grid_samples)
        columns = [shown[which[:rows]], samples[:rows].clamp(0, 1)]
        if truth is not None:
            columns.append(truth[which[:rows]])
        save_strip(columns, out / f"{stem}.png")
    save_npz(out / f"{stem}.npz", **arrays)
    write_json(out / f"{stem}.json", report)
    log.info("wrote %s.png, .npz and .json (%d samples, NFE %d, residual %.4g (σ_y·√m = %.4g)%s)", out / stem, num,
             nfe, report["residual_mean"], report["residual_expected"],
             f", PSNR {report['psnr_mean']:.2f} dB" if "psnr_mean" in report else "")
