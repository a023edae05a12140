"""The parity disagreement figure: the mask `compare` keeps, put back in the volume, and the built
engine's `parity_disagreement.png` (listed in the manifest, linked from report.md)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from nnslim.compiler.stages.parity import TileLayout, compare, disagreement_view
from tests.conftest import manifest_json
from nnslim.compiler.runtime.engine import load_engine
from nnslim.files import sha256_file
from tests.compiler.runtime.volumes.test_preview import png_size


def test_compare_keeps_the_disagreement_mask_out_of_the_record():
    reference = torch.zeros(2, 3, 4, 4, 4)
    reference[:, 1] = 1.0  # class 1 everywhere
    candidate = reference.clone()
    candidate[1, 2, 0, 1, 2] = 5.0  # one voxel of tile 1 flips to class 2
    report = compare(reference, candidate, "test")
    assert report.disagreement.shape == (2, 4, 4, 4) and report.disagreement.sum() == 1
    assert report.disagreement[1, 0, 1, 2]
    assert report.argmax_agreement == 1 - 1 / 128
    record = report.to_dict()
    assert "disagreement" not in record and json.dumps(record)


def test_disagreement_is_put_back_where_each_tile_was_cut():
    image = np.arange(8 * 6 * 6, dtype=np.float32).reshape(8, 6, 6)  # padded volume
    region = (slice(1, 7), slice(0, 6), slice(0, 6))  # one voxel of padding either end of axis 0
    layout = TileLayout(image, region, ((0, 0, 0), (2, 2, 2)), (1.0, 2.0, 3.0))
    differs = np.zeros((2, 4, 4, 4), bool)
    differs[0, 3, 3, 3] = True  # (3, 3, 3): also inside tile 1, where it agrees: still marked
    differs[1, 3, 0, 1] = True  # (5, 2, 3)
    shown, marks, spacing, _ = disagreement_view(layout, torch.zeros(2, 1, 4, 4, 4), differs)
    assert shown.shape == marks.shape == (6, 6, 6) and spacing == (1.0, 2.0, 3.0)
    np.testing.assert_array_equal(shown, image[1:7])
    assert sorted(map(tuple, np.argwhere(marks == 2))) == [(2, 3, 3), (4, 2, 3)]  # minus the padding
    assert (marks > 0).sum() == 3 * 4 * 4 + 4 * 4 * 4 - 2 * 2 * 2  # the two boxes inside the region, overlap once
    assert marks[5, 0, 0] == 0  # outside both tiles: not compared


def test_synthetic_tiles_show_the_worst_tile():
    tiles = torch.arange(2 * 1 * 2 * 2 * 2, dtype=torch.float32).reshape(2, 1, 2, 2, 2)
    differs = np.zeros((2, 2, 2, 2), bool)
    differs[1, 0, 0, 0] = differs[1, 1, 1, 1] = differs[0, 0, 1, 0] = True
    shown, marks, spacing, what = disagreement_view(None, tiles, differs)
    np.testing.assert_array_equal(shown, tiles[1, 0].numpy())
    assert (marks == 2).sum() == 2 and (marks == 1).sum() == 6 and "tile 1" in what


def test_engine_has_a_listed_disagreement_png_linked_from_the_report(engine_dir):
    pytest.importorskip("matplotlib")
    manifest = manifest_json(engine_dir)
    png = engine_dir / "parity_disagreement.png"
    assert manifest["parity"]["figure"] == png.name
    assert manifest["files"][png.name]["sha256"] == sha256_file(png)
    width, height = png_size(png)
    assert 900 <= width <= 2000 and 350 <= height <= 900
    assert f"]({png.name})" in (engine_dir / "report.md").read_text()
    load_engine(engine_dir)  # the integrity check accepts the engine with its figure
