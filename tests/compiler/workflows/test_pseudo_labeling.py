"""Seed 003's pseudo labeling: eq. (1) on hand-made label maps, and the loop end to end."""

from __future__ import annotations

import json
import math

import nibabel as nib
import numpy as np
import pytest

from nnslim.training.pseudo_label_selection import select_cases, uncertainty


def test_eq1_on_hand_made_label_maps():
    y1 = np.zeros((4, 4, 4), dtype=np.uint8)
    y1[:2] = 1  # 32 foreground voxels
    y2 = y1.copy()
    y2[0, 0, :2] = 2  # 2 voxels change class; foreground still 32
    y3 = y2.copy()
    y3[3, 3, 3] = 1  # 1 voxel added; foreground 33
    # (2 / 32 + 1 / 33) / 2
    assert uncertainty([y1, y2, y3]) == pytest.approx((2 / 32 + 1 / 33) / 2, rel=1e-12)
    assert uncertainty([y1, y1, y1]) == 0.0  # perfectly stable
    empty = np.zeros_like(y1)
    assert uncertainty([empty, empty]) == 0.0  # nothing, consistently
    assert math.isinf(uncertainty([y1, empty]))  # foreground vanished: changes over zero foreground
    with pytest.raises(ValueError, match="at least two rounds"):
        uncertainty([y1])
    assert select_cases({"a": 0.05, "b": 0.1, "c": 0.2, "d": math.inf}, 0.1) == ["a"]


def _write_case(folder, name, rng, with_label=True, shape=(32, 32, 32)):
    image = rng.normal(0, 0.2, shape).astype(np.float32)
    centre = rng.integers(10, 22, size=3)
    grid = np.indices(shape)
    label = (((grid - centre[:, None, None, None]) ** 2).sum(0) <= 36).astype(np.uint8)  # a sphere, radius 6
    image[label == 1] += 2.0
    affine = np.eye(4)
    nib.save(nib.Nifti1Image(image, affine), folder / ("imagesTr" if with_label else "") / f"{name}_0000.nii.gz")
    if with_label:
        nib.save(nib.Nifti1Image(label, affine), folder / "labelsTr" / f"{name}.nii.gz")


def test_pseudo_label_round_runs_end_to_end(tmp_path):
    from click.testing import CliRunner

    from nnslim.compiler.cli import cli

    rng = np.random.default_rng(0)
    labeled = tmp_path / "Dataset900_Spheres"
    (labeled / "imagesTr").mkdir(parents=True)
    (labeled / "labelsTr").mkdir()
    for i in range(3):
        _write_case(labeled, f"lab{i}", rng)
    (labeled / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "MR"}, "labels": {"background": 0, "sphere": 1}, "file_ending": ".nii.gz",
    }))
    unlabeled = tmp_path / "imagesTs"
    unlabeled.mkdir()
    for i in range(2):
        _write_case(unlabeled, f"unl{i}", rng, with_label=False)
    out = tmp_path / "pl"
    result = CliRunner().invoke(cli, [
        "pseudo-label", str(labeled), str(unlabeled), "--out", str(out), "--teacher-preset", "tiny",
        "--student-preset", "tiny", "--rounds", "2", "--threshold", "10", "--teacher-epochs", "1",
        "--student-epochs", "1", "--iterations-per-epoch", "2", "--patch", "32", "32", "32",
    ], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    record = json.loads((out / "pseudo_label.json").read_text())
    assert set(record["uncertainty"]) == {"unl0", "unl1"}
    for round_dir in ("round_1", "round_2"):
        for case in ("unl0", "unl1"):
            assert nib.load(out / round_dir / "labels" / f"{case}.nii.gz").shape == (32, 32, 32)
    union = json.loads((out / "round_1" / "union" / "dataset.json").read_text())
    assert union["numTraining"] == 5 and union["pseudo_labeled_cases"] == ["unl0", "unl1"]
    student = json.loads((out / "student_dataset" / "dataset.json").read_text())
    assert student["pseudo_labeled_cases"] == record["selected"]
    assert (out / "student" / "checkpoint_final.pt").is_file()
