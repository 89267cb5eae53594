"""Pictures: image grids and 2-D scatter plots, written atomically as PNG."""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image


def _atomic_save(save, path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    save(tmp)
    os.replace(tmp, path)


def image_grid(images: torch.Tensor, nrow: Optional[int] = None, padding: int = 1, pad_value: float = 0.5) -> np.ndarray:
    """(N, C, H, W) floats in [0, 1] → (rows·(H+p)+p, nrow·(W+p)+p, C) uint8 grid."""
    images = images.detach().float().clamp(0, 1).cpu()
    n, c, h, w = images.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / nrow)
    grid = torch.full((c, rows * (h + padding) + padding, nrow * (w + padding) + padding), pad_value)
    for k in range(n):
        r, col = divmod(k, nrow)
        top, left = padding + r * (h + padding), padding + col * (w + padding)
        grid[:, top:top + h, left:left + w] = images[k]
    return (grid.permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)


def save_image_grid(images: torch.Tensor, path, nrow: Optional[int] = None, min_size: int = 512) -> None:
    """Save (N, C, H, W) images in [0, 1] as a PNG grid, enlarged (nearest neighbour) to at least `min_size` px."""
    grid = image_grid(images, nrow)
    img = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
    scale = max(1, math.ceil(min_size / max(img.size)))
    img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    _atomic_save(lambda p: img.save(p, format="PNG"), path)


def save_scatter(points: torch.Tensor, path, reference: Optional[torch.Tensor] = None, title: str = "") -> None:
    """Scatter plot of (N, 2) points, optionally over reference points, as a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 5), dpi=100)
    if reference is not None:
        ref = reference.detach().cpu().numpy()
        ax.scatter(ref[:, 0], ref[:, 1], s=2, alpha=0.3, c="tab:gray", label="data")
    pts = points.detach().cpu().numpy()
    ax.scatter(pts[:, 0], pts[:, 1], s=2, alpha=0.5, c="tab:blue", label="samples")
    ax.set_aspect("equal")
    ax.legend(loc="upper right", markerscale=4)
    ax.set_title(title)
    fig.tight_layout()
    _atomic_save(lambda p: fig.savefig(p, format="png"), path)
    plt.close(fig)


def save_strip(columns: Sequence[torch.Tensor], path, min_size: int = 512) -> None:
    """Save a picture whose column j shows the images columns[j] (n, C, H, W) in [0, 1], one row per image."""
    n = len(columns[0])
    interleaved = torch.stack(list(columns), dim=1).reshape(n * len(columns), *columns[0].shape[1:])
    save_image_grid(interleaved, path, nrow=len(columns), min_size=min_size)


def unit_scale(sde, x: torch.Tensor, t: float) -> torch.Tensor:
    """x_t divided by √(α(t)² + σ(t)²), the marginal's scale for unit-variance data, so that VE states far from the
    data (σ up to σ_max) stay viewable next to VP ones."""
    t = torch.tensor(float(t), dtype=torch.float64)
    return x / float(torch.sqrt(sde.alpha(t) ** 2 + sde.sigma(t) ** 2))


def forward_noising_strip(sde, x0: torch.Tensor, times: Sequence[float], generator=None) -> List[torch.Tensor]:
    """x_t = α(t)x_0 + σ(t)z for each t (one shared z per image), rescaled by `unit_scale`: a list, one (n, ...)
    batch per time, in model space."""
    z = torch.randn(x0.shape, generator=generator, dtype=x0.dtype)
    columns = []
    for t in times:
        mean, std = sde.marginal_prob(x0, float(t))
        columns.append(unit_scale(sde, mean + std.reshape(-1, *[1] * (x0.ndim - 1)) * z, t))
    return columns


class TrajectoryRecorder:
    """A sampler callback that records every state and its denoised estimate x̂₀ (keep the batch small);
    `pick(count)` returns `count` of them, evenly spaced over the steps and including the last, as (t, x, x̂₀)."""

    def __init__(self):
        self.states: List[Tuple[float, torch.Tensor, torch.Tensor]] = []

    def __call__(self, i: int, t, x: torch.Tensor, x0: torch.Tensor) -> None:
        self.states.append((float(t), x.detach().cpu().clone(), x0.detach().cpu().clone()))

    def pick(self, count: int = 8) -> List[Tuple[float, torch.Tensor, torch.Tensor]]:
        n = len(self.states)
        indices = sorted({round(j * (n - 1) / max(count - 1, 1)) for j in range(min(count, n))})
        return [self.states[j] for j in indices]


MASKED_LEVELS = (0.35, 0.65)  # grey levels of the checkerboard that marks unknown pixels


def checkerboard_where_unknown(images: torch.Tensor, known: torch.Tensor) -> torch.Tensor:
    """images (n, C, H, W) in [0, 1] where `known` (broadcastable boolean) is True, a checkerboard of
    MASKED_LEVELS elsewhere: what an inpainting sampler was given, viewable."""
    rows, cols = torch.meshgrid(torch.arange(images.shape[-2]), torch.arange(images.shape[-1]), indexing="ij")
    dark, light = MASKED_LEVELS
    checker = torch.where((rows + cols) % 2 == 0, dark, light).to(images)
    return torch.where(known, images, checker.expand_as(images))
