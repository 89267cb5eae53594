"""Sampler comparison: parse `config.compare.samplers` entries, write the table (Markdown + CSV) and the plot of
each metric against NFE."""
from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Sequence

from sde_diffusion import sampling
from sde_diffusion.checkpoints import atomic_write


@dataclass(frozen=True)
class SamplerEntry:
    """One row of a comparison: `method[:option=value,...]@steps`, e.g. `dpm_solver:order=2@20`."""

    method: str
    steps: int
    options: Dict[str, object] = field(default_factory=dict)

    @property
    def label(self) -> str:
        opts = ",".join(f"{k}={v}" for k, v in sorted(self.options.items()))
        return f"{self.method}:{opts}" if opts else self.method

    @property
    def slug(self) -> str:
        return f"{self.label}@{self.steps}".replace(":", "_").replace(",", "_").replace("=", "-")


def parse_entry(text: str) -> SamplerEntry:
    """'method[:option=value,...]@steps' → SamplerEntry (sde_diffusion.sampling.parse_entry: the method must be
    registered and the options its own or sample's denoise/grid/rho/eps); a ValueError names what is wrong."""
    try:
        method, options, steps = sampling.parse_entry(text)
    except ValueError as err:
        raise ValueError(f"compare.samplers entry {text!r}: {err}") from None
    return SamplerEntry(method, steps, options)


def write_table(rows: List[Dict], columns: Sequence[str], folder: Path, stem: str = "compare") -> None:
    """rows → folder/<stem>.md and folder/<stem>.csv (both written atomically)."""
    def fmt(v):
        return "" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(fmt(row.get(c)) for c in columns) + " |" for row in rows]
    atomic_write(folder / f"{stem}.md", lambda p: Path(p).write_text("\n".join(lines) + "\n"))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(folder / f"{stem}.csv", lambda p: Path(p).write_text(buffer.getvalue()))


def plot_metrics(rows: List[Dict], metrics: Sequence[str], path: Path, title: str = "") -> None:
    """One panel per metric: metric versus NFE (log axis), one line per sampler."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 4), dpi=100, squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for label in dict.fromkeys(row["sampler"] for row in rows):
            points = sorted((row["nfe"], row[metric]) for row in rows
                            if row["sampler"] == label and row.get(metric) is not None)
            if points:
                ax.plot(*zip(*points), marker="o", label=label)
        ax.set_xscale("log")
        ax.set_xlabel("NFE (score evaluations)")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, format="png"))
    plt.close(fig)
