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
    assert np.array_equal(engine.segment(torch.from_numpy(array.astype(np.float32))[None]), from_file)  # [C, X, Y, Z]


def test_segment_refuses_bad_arrays_with_clear_errors(engine_dir):
    engine = nnslim.load_engine(engine_dir)
    with pytest.raises(InputError, match="expects"):
        engine.segment(np.zeros((2, 8, 8, 8), np.float32))  # two channels for a one-channel model
    with pytest.raises(InputError, match="spacing"):
        engine.segment(np.zeros((8, 8, 8), np.float32), spacing=(1.0, 0.0, 1.0))
    with pytest.raises(InputError):
        engine.segment(np.full((8, 8, 8), np.nan, np.float32))


def test_import_nnslim_stays_light():
    import subprocess
    import sys

    code = "import sys, nnslim; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"
