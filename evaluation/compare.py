"""Sampler comparison (`--mode compare`): parse and check `config.compare.samplers`, write the table (Markdown +
CSV) and the plot of each metric against NFE, with 95 % intervals.

Entries: "method[:option=value,...]@steps", or "@steps,steps,..." for several step counts ("auto": a distilled
student's own sampler on its grid), e.g.
"dpm_solver:order=2@5,10,20": one row per count, in increasing order. The method part is
`sde_diffusion.sampling.parse_spec`'s (a registered sampler, its own options and sample's denoise, grid, rho, width,
eps); a malformed entry, or one row listed twice, is a ConfigError naming the entry.

Intervals: for each metric m the table has m, m_lo and m_hi, the 95 % normal interval m ∓ Z95·SE, SE the standard
error over the generated samples with the reference set fixed (FID: delete-a-group jackknife, KID: closed form,
sliced W₂: bootstrap, NLL: std/√n; evaluation/metrics.py and evaluation/sample_quality.py). It covers sampling
noise only, not FID's and sliced W₂'s bias, which shrinks as 1/n: compare rows of the same sample count.

Plot: one panel per metric against NFE (log axis); a multi-count entry is a curve (line, markers, error bars), a
single-count entry a point with its error bar.
"""
from __future__ import annotations

import csv
import io
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from sde_diffusion import sampling
from sde_diffusion.checkpoints import atomic_write
from sde_diffusion.errors import ConfigError

Z95 = 1.959963984540054  # the standard normal's 97.5 % quantile: two-sided 95 % intervals
ENTRY_FORMAT = ("'method[:option=value,...]@steps' or '...@steps,steps,...', e.g. 'dpm_solver:order=2@20' or "
                "'ddim@5,10,20'")


@dataclass(frozen=True)
class SamplerEntry:
    """One row of a comparison: a sampler, its options and one step count of the entry (`entry`, its text)."""

    method: str
    steps: int
    options: Dict[str, object] = field(default_factory=dict)
    entry: str = ""

    @property
    def label(self) -> str:
        opts = ",".join(f"{k}={v}" for k, v in sorted(self.options.items()))
        return f"{self.method}:{opts}" if opts else self.method

    @property
    def slug(self) -> str:
        return f"{self.label}@{self.steps}".replace(":", "_").replace(",", "_").replace("=", "-")


def parse_entry(text: str) -> List[SamplerEntry]:
    """'method[:option=value,...]@steps[,steps,...]' → one SamplerEntry per step count, in increasing order;
    ConfigError (a ValueError) naming the entry and what is wrong."""
    head, steps = parse_step_counts(text)
    try:
        method, options = sampling.parse_spec(head)
    except ValueError as err:
        raise ConfigError(f"compare.samplers entry {text!r}: {err}") from None
    return [SamplerEntry(method, n, options, text.strip()) for n in steps]


def parse_step_counts(text: str) -> Tuple[str, List[int]]:
    """'head@5,10,20' → ('head', [5, 10, 20]): whole numbers ≥ 1, each once, sorted."""
    head, at, counts = text.strip().rpartition("@")
    if not at:
        raise ConfigError(f"compare.samplers entry {text!r} has no '@steps'; expected {ENTRY_FORMAT}")
    parts = [part.strip() for part in counts.split(",")]
    for part in parts:
        if not re.fullmatch(r"[0-9]+", part) or int(part) < 1:
            raise ConfigError(f"compare.samplers entry {text!r}: step count {part!r} is not a whole number ≥ 1; "
                              f"expected {ENTRY_FORMAT}")
    steps = [int(part) for part in parts]
    repeated = sorted({n for n in steps if steps.count(n) > 1})
    if repeated:
        raise ConfigError(f"compare.samplers entry {text!r} lists step count {repeated[0]} twice")
    return head, sorted(steps)


def parse_entries(texts: Sequence[str]) -> List[SamplerEntry]:
    """Every row of compare.samplers (parse_entry of each entry, in order); ConfigError for an empty list or a row
    (sampler, options, steps) that two entries share."""
    if not texts:
        raise ConfigError(f"compare.samplers is empty: list entries {ENTRY_FORMAT}")
    rows, seen = [], {}
    for text in texts:
        for row in parse_entry(text):
            key = (row.label, row.steps)
            if key in seen:
                raise ConfigError(f"compare.samplers: {row.label}@{row.steps} comes twice (entries {seen[key]!r} "
                                  f"and {row.entry!r}); list each row once")
            seen[key] = row.entry
            rows.append(row)
    return rows


def student_entries(config) -> List[SamplerEntry]:
    """The rows of compare.samplers, where 'auto' (a distilled student's config) is the student's own sampler on
    its grid (sampling.settings.expand_auto_entry)."""
    try:
        texts = [sampling.expand_auto_entry(config, text) for text in config.compare.samplers]
    except ValueError as err:
        raise ConfigError(f"compare.samplers: {err}") from None
    return parse_entries(texts)


def check_config(config) -> None:
    """The compare section: every entry of compare.samplers (and compare.teacher_samplers, which need
    distill.teacher_workdir) parses, compare.resamples is 0 or ≥ 2; ConfigError."""
    student_entries(config)
    if config.compare.teacher_samplers:
        parse_entries(config.compare.teacher_samplers)
        if config.distill.teacher_workdir is None:
            raise ConfigError("compare.teacher_samplers run on the teacher of distill.teacher_workdir, which is not "
                              "set: name the teacher's workdir, or set compare.teacher_samplers = ()")
    resamples = config.compare.resamples
    if isinstance(resamples, bool) or not isinstance(resamples, int) or resamples == 1 or resamples < 0:
        raise ConfigError(f"compare.resamples must be 0 (no intervals) or a whole number ≥ 2, got {resamples!r}")


def metric_cells(report: Dict, metric: str) -> Dict[str, Optional[float]]:
    """{metric, metric_lo, metric_hi}: the report's estimate and its 95 % interval, estimate ∓ Z95 × the report's
    `<metric>_se` (lo and hi None without a finite standard error)."""
    value, se = report.get(metric), report.get(f"{metric}_se")
    if value is None or se is None or not math.isfinite(se):
        return {metric: value, f"{metric}_lo": None, f"{metric}_hi": None}
    return {metric: value, f"{metric}_lo": value - Z95 * se, f"{metric}_hi": value + Z95 * se}


def metric_columns(metrics: Sequence[str]) -> List[str]:
    """The table's columns of the metrics: m, m_lo, m_hi each."""
    return [column for m in metrics for column in (m, f"{m}_lo", f"{m}_hi")]


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


@dataclass(frozen=True)
class Series:
    """What the plot draws for one entry and metric: its rows' NFE and values (in increasing NFE), the interval
    bounds (None when a row has none), and whether it is a curve (a multi-count entry) or a point."""

    label: str
    nfe: Tuple[int, ...]
    values: Tuple[float, ...]
    lo: Optional[Tuple[float, ...]]
    hi: Optional[Tuple[float, ...]]
    curve: bool


def plot_series(rows: List[Dict], metric: str) -> List[Series]:
    """One Series per entry (rows grouped by row["entry"], in order) with a value of `metric`."""
    series = []
    for entry in dict.fromkeys(row["entry"] for row in rows):
        group = [row for row in rows if row["entry"] == entry]
        scored = sorted((row for row in group if row.get(metric) is not None), key=lambda row: row["nfe"])
        if not scored:
            continue
        bounds = [(row.get(f"{metric}_lo"), row.get(f"{metric}_hi")) for row in scored]
        known = all(lo is not None and hi is not None for lo, hi in bounds)
        series.append(Series(entry, tuple(row["nfe"] for row in scored), tuple(row[metric] for row in scored),
                             tuple(lo for lo, _ in bounds) if known else None,
                             tuple(hi for _, hi in bounds) if known else None, len(group) > 1))
    return series


def metric_panels(metrics: Sequence[str], path: Path, title: str, draw: Callable) -> None:
    """A PNG with one panel per metric: draw(ax, metric) plots it; each panel gets the metric's label (95 %
    intervals), a grid and a legend. Written atomically."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 4), dpi=100, squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        draw(ax, metric)
        ax.set_ylabel(f"{metric} (95 % interval)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, format="png"))
    plt.close(fig)


def plot_metrics(rows: List[Dict], metrics: Sequence[str], path: Path, title: str = "") -> None:
    """One panel per metric: metric versus NFE (log axis), a curve per multi-count entry and a point per
    single-count one, each with its 95 % error bars (plot_series)."""
    def draw(ax, metric: str) -> None:
        for s in plot_series(rows, metric):
            errors = None if s.lo is None else [[v - lo for v, lo in zip(s.values, s.lo)],
                                                [hi - v for v, hi in zip(s.values, s.hi)]]
            ax.errorbar(s.nfe, s.values, yerr=errors, marker="o", linestyle="-" if s.curve else "none", capsize=3,
                        label=s.label)
        ax.set_xscale("log")
        ax.set_xlabel("NFE (score evaluations)")

    metric_panels(metrics, path, title, draw)
