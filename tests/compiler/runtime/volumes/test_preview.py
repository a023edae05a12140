"""Case previews and their HTML index: real PNGs (checked by their header and pixels), escaped names."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("matplotlib")

from nnslim.errors import InputError  # noqa: E402
from nnslim.compiler.runtime.volumes.preview import (  # noqa: E402
    foreground_centre,
    robust_window,
    write_case_preview,
    write_preview_index,
)

NAMES = ["background", "grey matter", "white matter"]


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk, after checking the signature."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def phantom() -> tuple[np.ndarray, np.ndarray]:
    """A bright ball (label 2) inside a dimmer shell (label 1), off-centre, in a 40 x 30 x 20 volume."""
    grid = np.stack(np.meshgrid(*(np.arange(s) for s in (40, 30, 20)), indexing="ij"))
    radius = np.sqrt(((grid - np.array([25, 12, 8])[:, None, None, None]) ** 2).sum(axis=0))
    labels = np.where(radius < 4, 2, np.where(radius < 7, 1, 0)).astype(np.uint8)
    image = labels * 100.0 + np.random.default_rng(0).normal(0, 5, labels.shape)
    return image.astype(np.float32), labels


def test_case_preview_is_a_png_of_figure_size(tmp_path):
    image, labels = phantom()
    path = write_case_preview(image, labels, (1.0, 1.0, 3.0), tmp_path / "sub" / "case.png", "case", NAMES)
    assert path == tmp_path / "sub" / "case.png"
    width, height = png_size(path)
    assert 900 <= width <= 2000 and 350 <= height <= 900
    assert [p.name for p in path.parent.iterdir()] == ["case.png"]  # no temporary file left


def test_slices_go_through_the_foreground_centre_and_window_is_robust():
    _, labels = phantom()
    assert foreground_centre(labels > 0) == (25, 12, 8)
    assert foreground_centre(np.zeros((5, 6, 7), bool)) == (2, 3, 3)
    values = np.zeros(1000)
    values[0] = 1e6  # one hot voxel must not set the window
    assert robust_window(values) == (0.0, 1.0)
    assert robust_window(np.arange(1001.0)) == pytest.approx((5.0, 995.0))


def test_preview_refuses_mismatched_shapes_and_bad_spacing(tmp_path):
    image, labels = phantom()
    with pytest.raises(InputError, match=r"same shape.*\(40, 30, 20\).*\(40, 30, 19\)"):
        write_case_preview(image, labels[..., :19], (1.0, 1.0, 1.0), tmp_path / "x.png", "x", NAMES)
    with pytest.raises(InputError, match="three positive sizes"):
        write_case_preview(image, labels, (1.0, 0.0, 1.0), tmp_path / "x.png", "x", NAMES)
    assert not list(tmp_path.iterdir())


def test_index_references_each_png_and_escapes_names(tmp_path):
    image, labels = phantom()
    names = ["case_a", "<b>&x"]
    for i, name in enumerate(names):
        write_case_preview(image, labels, (1.0, 1.0, 1.0), tmp_path / f"case{i}.png", name, NAMES)
    entries = [{"case": n, "png": f"case{i}.png", "status": "ok", "seconds": 1.25} for i, n in enumerate(names)]
    entries.append({"case": "failed_case", "status": "error: unreadable", "seconds": None})
    page = write_preview_index(tmp_path, entries).read_text()
    assert page.count("<img ") == 2
    assert 'src="case0.png"' in page and 'src="case1.png"' in page
    assert "&lt;b&gt;&amp;x" in page and "<b>&x" not in page
    assert "failed_case" in page and "error: unreadable" in page and "1.2" in page
    with pytest.raises(InputError, match="relative"):
        write_preview_index(tmp_path, [{"case": "a", "png": str(tmp_path / "case0.png")}])
