"""The Python API (`nnslim.load_engine(...).segment(...)`) against the CLI's file-to-file path."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch

import nnslim
from nnslim.compiler.runtime.engine import InferenceOptions
from nnslim.compiler.runtime.cases.run import segment_files
from nnslim.errors import InputError


def test_segment_an_array_equals_infer_on_the_file(engine_dir, small_volume, tmp_path):
    engine = nnslim.load_engine(engine_dir)
    out = tmp_path / "seg.nii.gz"
    segment_files(engine, [small_volume], out, InferenceOptions(progress=False))
    from_file = np.asarray(nib.load(out).dataobj)
    scan = nib.load(small_volume)
    array = np.asarray(scan.dataobj)
    labels = engine.segment(array, spacing=scan.header.get_zooms()[:3])
    assert labels.dtype == np.uint8 and labels.shape == array.shape
    assert np.array_equal(labels, from_file)
    assert np.array_equal(engine.segment(torch.from_numpy(array.astype(np.float32))[None], scan.header.get_zooms()[:3]),
                          from_file)  # [C, X, Y, Z]


def test_segment_in_simpleitks_axis_order_is_nnunets_predict_single_npy_array(engine_dir, small_volume):
    """SimpleITK's array ([Z, Y, X], spacing reversed) gives the same labels, in its own order; so does
    nnU-Net's `predict_single_npy_array(image [C, Z, Y, X], {"spacing": [sz, sy, sx]})`."""
    sitk = pytest.importorskip("SimpleITK")
    engine = nnslim.load_engine(engine_dir)
    scan = nib.load(small_volume)
    expected = engine.segment(np.asarray(scan.dataobj), scan.header.get_zooms()[:3])
    image = sitk.ReadImage(str(small_volume))
    array, spacing = sitk.GetArrayFromImage(image), image.GetSpacing()[::-1]
    labels, probabilities = engine.segment(array, spacing, axis_order="sitk", return_probabilities=True)
    assert labels.shape == array.shape and np.array_equal(labels, expected.transpose(2, 1, 0))
    assert probabilities.shape == (engine.spec.num_classes, *array.shape)
    assert np.array_equal(engine.predict_single_npy_array(array[None], {"spacing": list(spacing)}), labels)
    with pytest.raises(InputError, match="writing files"):
        engine.predict_single_npy_array(array[None], {"spacing": list(spacing)}, output_file_truncated="x")
    with pytest.raises(InputError, match="not a cascade stage"):
        engine.predict_single_npy_array(array[None], {"spacing": list(spacing)},
                                        segmentation_previous_stage=np.zeros_like(array[None]))


def test_a_missing_spacing_is_an_error_unless_asked_for_by_name(engine_dir):
    engine = nnslim.load_engine(engine_dir)
    image = np.random.default_rng(0).random((20, 22, 18), dtype=np.float32)
    with pytest.raises(InputError, match="spacing='engine'"):
        engine.segment(image)
    with pytest.raises(InputError, match="axis_order must be one of"):
        engine.segment(image, "engine", axis_order="ras")
    assert np.array_equal(engine.segment(image, "engine"), engine.segment(image, engine.spec.spacing or (1, 1, 1)))


def test_segment_refuses_bad_arrays_with_clear_errors(engine_dir):
    engine = nnslim.load_engine(engine_dir)
    with pytest.raises(InputError, match="expects"):
        engine.segment(np.zeros((2, 8, 8, 8), np.float32), "engine")  # two channels for a one-channel model
    with pytest.raises(InputError, match="spacing"):
        engine.segment(np.zeros((8, 8, 8), np.float32), spacing=(1.0, 0.0, 1.0))
    with pytest.raises(InputError):
        engine.segment(np.full((8, 8, 8), np.nan, np.float32), "engine")


def test_import_nnslim_stays_light():
    import subprocess
    import sys

    code = "import sys, nnslim; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"
