"""Markdown reports: one table format for the headline benchmark and for build-engine's report.md.

A `PerfRow` is one way of running a model on a volume; `perf_table` renders rows side by side
with their ratios to the first row. Columns without a measurement print "-" (never a guess).
`write_disagreement_figure` draws where the engine and PyTorch disagree on the parity tiles.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from nnslim.errors import NnslimError
from nnslim.compiler.runtime.volumes.preview import foreground_centre, import_pyplot, orthogonal_figure, save_figure

logger = logging.getLogger(__name__)

__all__ = ["PerfRow", "import_pyplot", "markdown_table", "perf_table", "write_disagreement_figure"]


@dataclass
class PerfRow:
    name: str
    seconds: float | None = None  # per volume, median
    parameters: int | None = None
    macs: float | None = None  # conv MACs for the whole volume (all windows evaluated)
    model_bytes: int | None = None
    model_bytes_compressed: int | None = None
    peak_memory_mb: float | None = None
    agreement: float | None = None  # argmax agreement with the first row
    dice: float | None = None  # mean Dice against the first row's labels
    dice_labels: float | None = None  # mean Dice against reference labels (inside a mask), when given
    windows: int | None = None
    precision: str = "fp32"  # whose measured peak "of peak" refers to
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def gflops(self) -> float | None:
        if self.seconds and self.macs:
            return 2 * self.macs / self.seconds / 1e9
        return None

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "gflops": self.gflops()}


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def markdown_table(headers: list[str], rows: list[list[str]]) -> list[str]:
    return [
        "| " + " | ".join(headers) + " |",
        "|" + "|".join("---" for _ in headers) + "|",
        *("| " + " | ".join(r) + " |" for r in rows),
    ]


def perf_table(rows: list[PerfRow], peak_gflops: float | dict[str, float] | None = None) -> list[str]:
    """Rows side by side; speed-up against the first row; achieved throughput against the peak of
    the row's precision (`peak_gflops`: one figure, or one per precision name)."""
    base = rows[0].seconds if rows else None
    labels = any(r.dice_labels is not None for r in rows)
    headers = ["way", "s / volume", "speed-up", "params", "GMACs", "GFLOP/s", "of peak", "model MB (zlib)",
               "process peak RSS MB", "windows", "agreement", "Dice vs first", *(["Dice vs labels"] if labels else [])]
    body = []
    for r in rows:
        gflops = r.gflops()
        peak = peak_gflops.get(r.precision) if isinstance(peak_gflops, dict) else peak_gflops
        body.append([
            r.name + (f" ({r.note})" if r.note else ""),
            _fmt(r.seconds, ".2f"),
            "-" if not (base and r.seconds) else f"{base / r.seconds:.2f}x",
            "-" if r.parameters is None else f"{r.parameters / 1e6:.3f}M",
            "-" if r.macs is None else f"{r.macs / 1e9:.1f}",
            _fmt(gflops, ".1f"),
            "-" if not (gflops and peak) else f"{gflops / peak:.0%}",
            "-" if r.model_bytes is None else f"{r.model_bytes / 2**20:.2f} ({r.model_bytes_compressed / 2**20:.2f})",
            _fmt(r.peak_memory_mb, ".0f"),
            _fmt(r.windows, "d"),
            _fmt(r.agreement, ".5f"),
            _fmt(r.dice, ".4f"),
            *([_fmt(r.dice_labels, ".4f")] if labels else []),
        ])
    return markdown_table(headers, body)


def write_disagreement_figure(path: Path, image: np.ndarray, marks: np.ndarray, spacing: tuple[float, ...],
                              shown: str, differing: int, compared: int, title: str) -> Path | None:
    """The parity figure: slices through the most disagreeing voxels, those in red over the image in grey.

    Args:
        marks: 0 not compared, 1 engine and PyTorch agree, 2 their argmaxes differ (`parity.disagreement_view`).
        shown: what the image is (the parity volume, or a synthetic tile).
        differing, compared: the counts over all parity tiles (the report's agreement).
    Returns the path, or None when matplotlib is missing (the build does not need the `plots` extra).
    """
    try:
        import_pyplot()
    except NnslimError as exc:
        logger.warning("no parity figure: %s", exc)
        return None
    differs = marks == 2
    # per axis: the slice with the most differing voxels (the compared region's centre when none differ)
    centre = tuple(int(differs.sum(axis=tuple(a for a in range(3) if a != k)).argmax()) for k in range(3)) \
        if differs.any() else foreground_centre(marks > 0)
    if differing:
        caption = f"{differing:,} of {compared:,} compared voxels differ ({differing / compared:.4%}); {shown}"
    else:
        caption = f"engine and PyTorch agree on all {compared:,} compared voxels; {shown}"
    colours = {1: (0.3, 0.6, 1.0, 0.12), 2: (1.0, 0.0, 0.0, 1.0)}
    legend = {"compared (parity tiles)": (0.3, 0.6, 1.0, 0.4), "argmax differs": (1.0, 0.0, 0.0, 1.0)}
    fig = orthogonal_figure(image, marks, colours, spacing, centre, title, legend, caption)
    return save_figure(fig, path)
