"""Pictures people look at: a case's segmentation over its image, and an HTML index of many cases.

A figure shows three orthogonal slices of a 3D volume. The slice that fixes array axis k shows
the two other axes i < j with axis i horizontal and axis j vertical (growing upwards), and each
voxel drawn as spacing[i] x spacing[j], so a RAS-ordered NIfTI shows anterior/superior up and
nothing is squashed. The image is drawn in grey between its 0.5th and 99.5th percentiles
(robust to a few bright voxels); an overlay colours voxels by integer value, 0 left clear.
matplotlib is optional (the `plots` extra) and imported only when a figure is drawn.
"""

from __future__ import annotations

import html
import logging
from numbers import Real
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np

from nnslim.errors import InputError, NnslimError
from nnslim.files import atomic_path, write_text_atomic

logger = logging.getLogger(__name__)

# a fixed colour per label value (value v uses entry (v - 1) % len): tab10 without grey
LABEL_COLOURS = (
    (0.12, 0.47, 0.71), (1.00, 0.50, 0.05), (0.17, 0.63, 0.17), (0.84, 0.15, 0.16), (0.58, 0.40, 0.74),
    (0.55, 0.34, 0.29), (0.89, 0.47, 0.76), (0.74, 0.74, 0.13), (0.09, 0.75, 0.81),
)
LABEL_ALPHA = 0.45


def import_pyplot():
    """matplotlib's pyplot on the Agg backend, or a clear error naming the extra that installs it."""
    try:
        import matplotlib
    except ImportError as exc:
        raise NnslimError("plots need matplotlib: pip install 'nnslim[plots]'") from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def robust_window(image: np.ndarray) -> tuple[float, float]:
    """The grey-level window: the 0.5th and 99.5th percentiles (a flat image gets a unit window)."""
    finite = image[np.isfinite(image)]
    if finite.size == 0:
        return 0.0, 1.0
    low, high = (float(v) for v in np.percentile(finite, [0.5, 99.5]))
    return (low, high) if high > low else (low, low + 1.0)


def foreground_centre(mask: np.ndarray) -> tuple[int, int, int]:
    """The rounded centre of mass of `mask`'s nonzero voxels, or the volume centre when there are none."""
    points = np.argwhere(mask)
    if len(points) == 0:
        return tuple(int(s) // 2 for s in mask.shape)
    return tuple(int(round(c)) for c in points.mean(axis=0))


def label_colour(value: int, alpha: float = LABEL_ALPHA) -> tuple[float, float, float, float]:
    return (*LABEL_COLOURS[(value - 1) % len(LABEL_COLOURS)], alpha)


def orthogonal_figure(image: np.ndarray, overlay: np.ndarray, colours: dict[int, tuple[float, ...]],
                      spacing: tuple[float, ...], centre: tuple[int, ...], title: str,
                      legend: dict[str, tuple[float, ...]], caption: str = ""):
    """A matplotlib figure of three orthogonal slices through `centre` (module docstring).

    Args:
        overlay: integer volume of `image`'s shape; value v is drawn in `colours[v]` (RGBA).
        legend: name -> colour, shown under the slices.
    """
    plt = import_pyplot()
    from matplotlib.patches import Patch

    low, high = robust_window(image)
    fig, axes = plt.subplots(1, 3, figsize=(13, 5.2), layout="constrained")
    for k, ax in enumerate(axes):
        i, j = (a for a in range(3) if a != k)
        grey = np.take(image, centre[k], axis=k)
        marks = np.take(overlay, centre[k], axis=k)
        rgba = np.zeros((*marks.shape, 4))
        for value, colour in colours.items():
            rgba[marks == value] = colour
        shown = {"origin": "lower", "aspect": spacing[j] / spacing[i], "interpolation": "nearest"}
        ax.imshow(grey.T, cmap="gray", vmin=low, vmax=high, **shown)
        ax.imshow(rgba.transpose(1, 0, 2), **shown)
        ax.set_xlabel(f"array axis {i}")
        ax.set_ylabel(f"array axis {j}")
        ax.set_title(f"array axis {k} = {centre[k]}")
    if legend:
        fig.legend(handles=[Patch(color=c, label=n) for n, c in legend.items()], loc="outside lower center",
                   ncol=min(len(legend), 6), fontsize="large", frameon=False)
    fig.suptitle(title + (f"\n{caption}" if caption else ""), fontsize="large")
    return fig


def save_figure(fig, path: Path) -> Path:
    """Write `fig` as a PNG atomically and close it."""
    plt = import_pyplot()
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=100)
    finally:
        plt.close(fig)
    return Path(path)


def _check_case(image: np.ndarray, labels: np.ndarray, spacing: tuple[float, ...]) -> None:
    if image.ndim != 3 or image.shape != labels.shape:
        raise InputError(f"a preview needs a 3D image and a label map of the same shape, got image "
                         f"{image.shape} and labels {labels.shape}; pass one channel of the image")
    if len(spacing) != 3 or not all(isinstance(s, Real) and s > 0 for s in spacing):
        raise InputError(f"voxel spacing must be three positive sizes, got {spacing}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise InputError(f"labels must be an integer label map, got dtype {labels.dtype}")


def write_case_preview(image: np.ndarray, labels: np.ndarray, spacing: tuple[float, float, float], path: Path,
                       title: str, label_names: list[str]) -> Path:
    """One PNG: three slices through the labelled foreground's centre, labels over the image in grey.

    Args:
        image, labels: same 3D shape, the array axes of the input file; label 0 is background.
        spacing: voxel sizes along the three array axes.
        label_names: label_names[v] names value v (values without a name are called "label v").
    """
    image, labels = np.asarray(image), np.asarray(labels)
    _check_case(image, labels, spacing)
    values = sorted(set(range(1, len(label_names))) | {int(v) for v in np.unique(labels) if v > 0})
    names = {v: label_names[v] if v < len(label_names) else f"label {v}" for v in values}
    colours = {v: label_colour(v) for v in values}
    legend = {names[v]: label_colour(v, 0.8) for v in values}
    fig = orthogonal_figure(image.astype(np.float32, copy=False), labels, colours, tuple(float(s) for s in spacing),
                            foreground_centre(labels > 0), title, legend)
    return save_figure(fig, path)


def write_preview_index(folder: Path, entries: list[dict[str, Any]], name: str = "index.html") -> Path:
    """`folder/NAME`: one row per case (keys "case", "png" relative to `folder`, "status", "seconds")."""
    rows = []
    for entry in entries:
        if "case" not in entry:
            raise InputError(f"a preview index entry needs a 'case' name, got keys {sorted(entry)}")
        seconds = entry.get("seconds")
        png = entry.get("png")
        if png is not None and Path(png).is_absolute():
            raise InputError(f"preview png paths must be relative to {folder}, got {png}")
        picture = f'<img src="{html.escape(quote(str(png)))}" alt="{html.escape(str(entry["case"]))}">' if png else ""
        rows.append(f"<tr><td>{html.escape(str(entry['case']))}</td><td>{html.escape(str(entry.get('status', '')))}</td>"
                    f"<td>{'-' if seconds is None else f'{float(seconds):.1f}'}</td><td>{picture}</td></tr>")
    page = "\n".join([
        "<!DOCTYPE html>", '<html><head><meta charset="utf-8"><title>nnslim previews</title>',
        "<style>body{font-family:sans-serif} td{padding:4px 8px;vertical-align:top} img{max-width:100%}</style>",
        "</head><body>", f"<h1>nnslim previews ({len(entries)} cases)</h1>",
        "<table><tr><th>case</th><th>status</th><th>seconds</th><th>preview</th></tr>", *rows,
        "</table></body></html>", "",
    ])
    path = Path(folder) / name
    write_text_atomic(path, page)
    return path
