"""Pictures: image grids and 2-D scatter plots, written atomically as PNG."""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Optional

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
