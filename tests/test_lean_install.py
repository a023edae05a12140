"""`pip install nnslim` with no extras is the CPU runtime: in a fresh virtual environment with no
torch it segments with an engine the full install built, and the labels are the full install's.

The wheel is installed by pip from the package index, with its declared dependencies only (numpy,
scipy, nibabel, click, tqdm, OpenVINO; OpenVINO pinned to the version the full install has, so the
two run the same kernels), which also checks that the dependencies resolve without torch.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest


def _run(*args, **kwargs) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, env=env, **kwargs)


@pytest.fixture(scope="module")
def lean_venv(built_wheel, tmp_path_factory) -> Path:
    import openvino

    venv = tmp_path_factory.mktemp("lean") / "venv"
    _run(sys.executable, "-m", "venv", venv, check=True)
    done = _run(venv / "bin" / "python", "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                built_wheel, f"openvino=={openvino.__version__.split('-')[0]}")
    assert done.returncode == 0, done.stderr[-3000:]
    return venv


@pytest.mark.slow
def test_the_runtime_install_has_no_torch_and_segments_like_the_full_install(lean_venv, checkpoint_path,
                                                                              small_volume, tmp_path):
    from nnslim.compiler.stages.pipeline import BuildConfig, build_engine

    engine = tmp_path / "engine"  # built by the full install, run by both
    build_engine(BuildConfig(checkpoint=checkpoint_path, out_dir=engine, backend="openvino", precision="fp32",
                             parity_volume=small_volume, parity_tiles=2))
    python = lean_venv / "bin" / "python"
    assert _run(python, "-c", "import torch").returncode != 0  # nothing pulled torch in
    full, lean = tmp_path / "full.nii.gz", tmp_path / "lean.nii.gz"
    ran = _run(sys.executable, "-m", "nnslim", "infer", engine, small_volume, "-o", full, "--no-progress", cwd=tmp_path)
    assert ran.returncode == 0, ran.stderr
    ran = _run(lean_venv / "bin" / "nnslim", "infer", engine, small_volume, "-o", lean, "--no-progress", cwd=tmp_path)
    assert ran.returncode == 0, ran.stderr
    assert "openvino fp32 engine on cpu" in ran.stdout
    np.testing.assert_array_equal(np.asarray(nib.load(lean).dataobj), np.asarray(nib.load(full).dataobj))
    # what the runtime install cannot do is one error naming the extra, not a traceback
    refused = _run(lean_venv / "bin" / "nnslim", "build-engine", checkpoint_path, "--out", tmp_path / "e2", cwd=tmp_path)
    assert refused.returncode == 1 and "pip install 'nnslim[build]'" in refused.stderr, refused.stderr
    assert "Traceback" not in refused.stderr
    sizes = _run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", check=True).stdout.strip()
    assert not (Path(sizes) / "torch").exists() and not (Path(sizes) / "onnx").exists()
