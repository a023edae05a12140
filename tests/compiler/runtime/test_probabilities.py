"""Class probabilities (`--save-probabilities`, `Engine.segment(return_probabilities=True)`) and
`--device auto`'s choice."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from nnslim.compiler.cli import cli
from nnslim.compiler.runtime.backends.devices import pick_device
from nnslim.compiler.runtime.engine import InferenceOptions, ModelSpec, load_engine
from nnslim.errors import InputError
from nnslim.compiler.runtime.backends.torch_module import TorchPredictor
from nnslim.compiler.runtime.segmentation import prepare_volume, segment_prepared
from nnslim.compiler.runtime.volumes.volume import volume_from_array
from tests.conftest import random_model, written


def check_probabilities(probabilities: np.ndarray, labels: np.ndarray, classes: int) -> None:
    """[K, *labels.shape] float16 summing to 1, whose argmax is the labels wherever the maximum is unique."""
    assert probabilities.dtype == np.float16 and probabilities.shape == (classes, *labels.shape)
    p = probabilities.astype(np.float32)
    np.testing.assert_allclose(p.sum(axis=0), 1.0, atol=3e-3)
    differ = p.argmax(axis=0) != labels
    at_label = np.take_along_axis(p, labels[None].astype(np.int64), axis=0)[0]
    assert np.array_equal(at_label[differ], p.max(axis=0)[differ])  # only exact ties may differ
    assert differ.mean() < 0.01


def test_segment_returns_probabilities_whose_argmax_is_the_labels(engine_dir, small_volume):
    engine = load_engine(engine_dir, threads=1)
    scan = nib.load(small_volume)
    array = np.asarray(scan.dataobj)
    labels, probabilities = engine.segment(array, spacing=scan.header.get_zooms()[:3], return_probabilities=True)
    assert np.array_equal(labels, engine.segment(array, spacing=scan.header.get_zooms()[:3]))
    check_probabilities(probabilities, labels, 3)
    assert len(np.unique(labels)) > 1  # a real segmentation, not one class everywhere


def test_probabilities_go_through_crop_resampling_and_axis_order_like_the_labels():
    """An nnU-Net-style engine: reversed axes + transpose, crop to nonzero, resampling; outside the
    crop the background has probability 1, as in nnU-Net."""
    rng = np.random.default_rng(0)
    data = np.zeros((30, 26, 22), dtype=np.float32)  # (X, Y, Z), a zero border around the object
    data[4:27, 3:22, 2:19] = 50 + 30 * rng.random((23, 19, 17))
    pre = {"normalization": {"scheme": "zscore", "mask": "nonzero"}, "axis_order": "reversed",
           "transpose_forward": [1, 0, 2], "crop_to_nonzero": True, "resample": True, "spacing": [1.25, 1.6, 1.1]}
    spec = ModelSpec(in_channels=1, num_classes=3, patch_size=(16, 16, 16), max_batch=2, normalization={},
                     label_names=("background", "a", "b"), spacing=(1.25, 1.6, 1.1), mirror_axes=(),
                     input_name="image", output_name="logits", preprocessing=pre)
    predictor = TorchPredictor(random_model())
    prepared = prepare_volume(volume_from_array(data, (1.0, 1.5, 2.0), 1), spec)
    assert tuple(prepared.image.shape[1:]) != prepared.cropped_shape  # it does resample
    options = InferenceOptions(progress=False)
    plain = segment_prepared(prepared, "x", predictor, spec, options)
    both = segment_prepared(prepared, "x", predictor, spec, options, probabilities=True)
    assert plain.probabilities is None and np.array_equal(plain.labels, both.labels)
    check_probabilities(both.probabilities, both.labels, 3)
    outside = np.ones(data.shape, bool)
    outside[4:27, 3:22, 2:19] = False
    assert (both.probabilities[0][outside] == 1).all() and (both.probabilities[1:, outside] == 0).all()
    assert len(np.unique(both.labels[~outside])) > 1


def test_region_based_engines_are_refused():
    spec = ModelSpec(in_channels=1, num_classes=2, patch_size=(16, 16, 16), max_batch=1, normalization={},
                     label_names=("background", "a", "b"), spacing=None, mirror_axes=(), input_name="image",
                     output_name="logits", preprocessing={"normalization": {"scheme": "zscore", "mask": "none"}},
                     postprocessing={"kind": "regions", "class_order": [1, 2]})
    prepared = prepare_volume(volume_from_array(np.ones((8, 8, 8), np.float32), (1.0, 1.0, 1.0), 1), spec)
    with pytest.raises(InputError, match="exclusive classes"):
        segment_prepared(prepared, "x", TorchPredictor(random_model()), spec, InferenceOptions(progress=False), True)


def test_infer_writes_probabilities_previews_and_the_log(engine_dir, small_volume, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("a", "b"):
        (folder / f"{name}_0000.nii.gz").write_bytes(small_volume.read_bytes())
    out, log = tmp_path / "out", tmp_path / "cases.jsonl"
    result = CliRunner().invoke(cli, ["infer", str(engine_dir), str(folder), "-o", str(out), "--no-progress",
                                      "--save-probabilities", "--preview", "--log-jsonl", str(log)])
    assert result.exit_code == 0, result.output
    assert "onnxruntime fp32 engine on cpu" in result.output  # --device auto, no GPU here
    assert written(out) == ["a.nii.gz", "a.npz", "b.nii.gz", "b.npz", "previews"]
    assert sorted(p.name for p in (out / "previews").iterdir()) == ["a.png", "b.png", "index.html", "index.json"]
    labels = np.asarray(nib.load(out / "a.nii.gz").dataobj)
    with np.load(out / "a.npz") as saved:
        assert list(saved) == ["probabilities"]
        check_probabilities(saved["probabilities"], labels, 3)
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [(r["probabilities"], r["preview"]) for r in records] == [
        (str(out / f"{n}.npz"), str(out / "previews" / f"{n}.png")) for n in ("a", "b")]
    single = CliRunner().invoke(cli, ["infer", str(engine_dir), str(small_volume), "-o", str(tmp_path / "seg.nii.gz"),
                                      "--no-progress", "--preview", "--device", "cpu"])
    assert single.exit_code == 0, single.output
    assert (tmp_path / "seg.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_pick_device_takes_the_gpu_only_when_the_backend_can_use_it():
    cuda = {"onnxruntime-cuda"}  # ONNX Runtime's CUDA provider runs here
    assert pick_device(["onnxruntime"], True, cuda)[0] == "cuda"
    assert pick_device(["openvino", "onnxruntime"], True, cuda)[0] == "cuda"
    assert pick_device(["onnxruntime"], False, cuda) == ("cpu", "no CUDA GPU is visible")
    assert pick_device(["onnxruntime"], True, set())[0] == "cpu"
    assert pick_device(["openvino"], True, cuda)[0] == "cpu"
    assert pick_device(["tensorrt"], True, {"tensorrt"})[0] == "cuda"
    assert pick_device(["tensorrt"], True, cuda)[0] == "cpu"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: auto may rightly choose it")
def test_device_auto_resolves_to_the_cpu_here(engine_dir):
    engine = load_engine(engine_dir, threads=1, device="auto")
    assert engine.device == "cpu" and engine.runtime.backend != "onnxruntime-cuda"
