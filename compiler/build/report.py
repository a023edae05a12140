"""Markdown reports: one table format for the headline benchmark and for build-engine's report.md.

A `PerfRow` is one way of running a model on a volume; `perf_table` renders rows side by side
with their ratios to the first row. Columns without a measurement print "-" (never a guess).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


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


def import_pyplot():
    """matplotlib's pyplot on the Agg backend, or a clear error naming the extra that installs it."""
    try:
        import matplotlib
    except ImportError as exc:
        from nnslim.compiler.runtime.errors import NnslimError

        raise NnslimError("plots need matplotlib: pip install 'nnslim[plots]'") from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
