"""The CPU runtime runs without torch, and its numpy arrays give the numbers torch tensors give.

- Importing the runtime, loading a CPU engine and segmenting (API and `nnslim infer`) import
  neither torch nor onnx (checked in a fresh process through `sys.modules`).
- The window written once for numpy and torch (`window.arrays`) gives the same labels either way:
  the engine's own numpy predictor against the same predictor seen through torch tensors on the
  CPU (how the runtime computed before numpy, and how the GPU path computes), on the MNI volume
  and on an nnU-Net model folder (crop, axis reversal, resampling). Labels are identical, or every
  differing voxel is a tie: its two best logits within 1e-6 of the logit scale; probabilities
  within 1e-3.
"""

from __future__ import annotations

import json
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch

from nnslim.compiler.runtime.engine import load_engine
from nnslim.compiler.runtime.segmentation import InferenceOptions, prepare_volume, segment_prepared
from nnslim.compiler.runtime.volumes.volume import load_volume
from nnslim.compiler.runtime.window.config import SlidingWindowConfig
from nnslim.compiler.runtime.window.walk import sliding_window_inference
from tests.conftest import DEMO_MODEL

PROBE = """
import json, sys
import numpy as np
import nnslim
engine = nnslim.load_engine(sys.argv[1])
labels = engine.segment(np.random.default_rng(0).random((20, 24, 18), dtype=np.float32), spacing=(1.0, 1.0, 1.0))
from nnslim.compiler.cli import main
sys.argv = ["nnslim", "infer", sys.argv[1], sys.argv[2], "-o", sys.argv[3], "--no-progress", "--device", "auto"]
try:
    main()
except SystemExit as done:
    assert done.code in (None, 0), done.code
heavy = sorted({m.split(".")[0] for m in sys.modules} & {"torch", "onnx", "onnxscript", "onnx_graphsurgeon", "matplotlib"})
print(json.dumps({"heavy": heavy, "labels": list(labels.shape)}))
"""


def test_the_cpu_runtime_imports_no_torch(engine_dir, small_volume, tmp_path):
    done = subprocess.run([sys.executable, "-c", PROBE, str(engine_dir), str(small_volume), str(tmp_path / "seg.nii.gz")],
                          capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report == {"heavy": [], "labels": [20, 24, 18]}, report
    assert (tmp_path / "seg.nii.gz").is_file()


class TorchTensors:
    """The engine's predictor seen through torch tensors on the CPU: the window then runs on torch
    tensors (`window.arrays.TorchArrays`), as it does on a GPU and as the runtime did before numpy."""

    device = torch.device("cpu")

    def __init__(self, predict) -> None:
        self.predict = predict

    def __call__(self, tiles: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.predict(tiles.numpy()))


def assert_labels_equal_up_to_ties(labels: np.ndarray, reference: np.ndarray, logits: np.ndarray) -> None:
    """Equal labels, or each differing voxel's two best reference logits within 1e-6 of the logit scale."""
    differ = labels != reference
    if differ.any():
        top2 = np.sort(logits[:, differ], axis=0)[-2:]
        gap = top2[1] - top2[0]
        assert gap.max() <= 1e-6 * np.abs(logits).max(), (int(differ.sum()), float(gap.max()))


@pytest.fixture(scope="module")
def mni_engine(tmp_path_factory):
    from nnslim.compiler.stages.pipeline import BuildConfig, build_engine

    out = tmp_path_factory.mktemp("mni-engine") / "fp32"
    build_engine(BuildConfig(checkpoint=DEMO_MODEL, out_dir=out, precision="fp32", parity_tiles=1, pass_parity=False))
    return load_engine(out)


def test_numpy_and_torch_tensors_give_the_same_labels_on_the_mni_volume(mni_engine, mni_raw):
    engine = mni_engine
    prepared = prepare_volume(load_volume(mni_raw / "imagesTr" / "mni_0000.nii.gz", 1), engine.spec)
    options = InferenceOptions(progress=False, batch_size=2)
    numpy_run = segment_prepared(prepared, "mni", engine.predictor, engine.spec, options, probabilities=True)
    torch_run = segment_prepared(prepared, "mni", TorchTensors(engine.predictor), engine.spec, options,
                                 probabilities=True)
    assert numpy_run.labels.shape == (197, 233, 189) and numpy_run.report == torch_run.report
    config = SlidingWindowConfig(patch_size=engine.spec.patch_size, batch_size=2)
    logits = sliding_window_inference(prepared.image, TorchTensors(engine.predictor), 3, config).numpy()
    assert_labels_equal_up_to_ties(numpy_run.labels, torch_run.labels, logits)
    np.testing.assert_allclose(numpy_run.probabilities.astype(np.float32), torch_run.probabilities.astype(np.float32),
                               rtol=0, atol=1e-3)


def test_numpy_and_torch_tensors_give_the_same_labels_on_an_nnunet_model_folder(tmp_path):
    """Axis reversal, a crop to the nonzero box, resampling to the model's spacing and back, mirror TTA."""
    from nnslim.compiler.stages.pipeline import BuildConfig, build_engine
    from tests.compiler.stages.nnunet_folder import write_model_folder

    folder = tmp_path / "model"
    write_model_folder(folder, spacing=[2.0, 1.0, 1.0])
    build_engine(BuildConfig(checkpoint=folder, out_dir=tmp_path / "engine", precision="fp32", parity_tiles=1,
                             pass_parity=False))
    engine = load_engine(tmp_path / "engine")
    rng = np.random.default_rng(7)
    data = np.zeros((44, 38, 21), dtype=np.float32)
    data[4:40, 5:33, 2:19] = rng.normal(300, 80, (36, 28, 17))
    scan = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(data, np.diag([0.8, 0.9, 3.1, 1.0])), scan)  # another spacing: resampled
    prepared = prepare_volume(load_volume(scan, 1), engine.spec)
    assert tuple(prepared.image.shape[1:]) != prepared.cropped_shape  # the case is resampled
    options = InferenceOptions(progress=False)
    numpy_run = segment_prepared(prepared, "ct", engine.predictor, engine.spec, options, probabilities=True)
    torch_run = segment_prepared(prepared, "ct", TorchTensors(engine.predictor), engine.spec, options,
                                 probabilities=True)
    assert numpy_run.labels.shape == data.shape
    assert (numpy_run.labels == torch_run.labels).mean() >= 0.9999, (numpy_run.labels != torch_run.labels).sum()
    np.testing.assert_allclose(numpy_run.probabilities.astype(np.float32), torch_run.probabilities.astype(np.float32),
                               rtol=0, atol=1e-3)
