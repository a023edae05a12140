"""Importing nnU-Net v2 model folders: safe loading, rebuilt networks, the whole build -> infer path."""

from __future__ import annotations

import json
import re
import os

import nibabel as nib
import numpy as np
import pytest
import torch

from nnslim.compiler.stages.nnunet_import import NnUNetImportError, load_checkpoint, read_model_folder
from nnslim.compiler.runtime.engine import InferenceOptions, load_engine
from nnslim.compiler.runtime.segmentation import segment_volume
from nnslim.compiler.runtime.backends.torch_module import TorchPredictor
from nnslim.compiler.runtime.volumes.volume import load_volume
from tests.compiler.stages.nnunet_folder import reference_forward, reference_predict, write_model_folder
from tests.conftest import manifest_record


@pytest.mark.parametrize("dims,residual", [(3, False), (2, False), (3, True), (2, True)])
def test_rebuilt_network_reproduces_the_checkpoint(tmp_path, dims, residual):
    info = write_model_folder(tmp_path / "model", dims=dims, residual=residual)
    imported = read_model_folder(tmp_path / "model", folds=("0",))
    assert imported.architecture.spatial_dims == dims
    assert imported.architecture.encoder == ("residual" if residual else "plain")
    assert imported.trainer == "nnUNetTrainer" and imported.labels.head_names == ["background", "organ", "lesion"]
    network = imported.network().double()
    weights = {k: v.double() for k, v in info["weights"][0].items()}
    x = torch.randn(2, 1, *info["patch"], dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    expected = reference_forward(x, weights, info["kwargs"], residual)
    with torch.no_grad():
        got = network(x.unsqueeze(2)).squeeze(2) if dims == 2 else network(x)  # 2D: [B, C, 1, H, W] tiles
    assert got.shape == (2, 3, *info["patch"])
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


def test_folds_average_their_logits(tmp_path):
    info = write_model_folder(tmp_path / "model", folds=(0, 1, 2))
    network = read_model_folder(tmp_path / "model", folds=("0", "2")).network().double()
    x = torch.randn(1, 1, *info["patch"], dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    folds = [reference_forward(x, {k: v.double() for k, v in info["weights"][f].items()}, info["kwargs"], False)
             for f in (0, 2)]
    with torch.no_grad():
        torch.testing.assert_close(network(x), (folds[0] + folds[1]) / 2, rtol=1e-10, atol=1e-10)


def test_plain_types_only_and_no_unsafe_load(tmp_path):
    write_model_folder(tmp_path / "model")
    checkpoint = load_checkpoint(tmp_path / "model" / "fold_0" / "checkpoint_final.pth")
    assert checkpoint["init_args"]["device"] == torch.device("cpu")  # allow-listed
    assert isinstance(checkpoint["_best_ema"], np.float64)  # numpy scalars allow-listed


def test_checkpoint_with_a_planted_global_is_refused(tmp_path):
    info = write_model_folder(tmp_path / "model")
    path = tmp_path / "model" / "fold_0" / "checkpoint_final.pth"
    payload = torch.load(path, weights_only=False)  # our own file, written a line above
    payload["logging"]["callback"] = os.system  # what a malicious checkpoint would smuggle in
    torch.save(payload, path)
    with pytest.raises(NnUNetImportError, match=r"refusing to load .*posix\.system"):
        read_model_folder(tmp_path / "model")
    assert info["weights"]  # nothing was executed; the folder is untouched otherwise


def test_unknown_architecture_is_named(tmp_path):
    write_model_folder(tmp_path / "model")
    plans_path = tmp_path / "model" / "plans.json"
    plans = json.loads(plans_path.read_text())
    plans["configurations"]["3d_fullres"]["architecture"]["network_class_name"] = "my_lab.nets.SwinUNETR"
    plans_path.write_text(json.dumps(plans))
    with pytest.raises(NnUNetImportError, match="'SwinUNETR' is not supported"):
        read_model_folder(tmp_path / "model")


def test_cascade_stage_is_refused(tmp_path):
    write_model_folder(tmp_path / "model")
    path = tmp_path / "model" / "fold_0" / "checkpoint_final.pth"
    payload = torch.load(path, weights_only=False)  # our own file
    payload["init_args"]["configuration"] = "3d_cascade_fullres_dummy"
    torch.save(payload, path)
    with pytest.raises(NnUNetImportError, match="cascade stage"):
        read_model_folder(tmp_path / "model")


def test_missing_fold_lists_what_is_there(tmp_path):
    write_model_folder(tmp_path / "model", folds=(0, 1))
    with pytest.raises(NnUNetImportError, match=r"fold '3'.*folds present: \['fold_0', 'fold_1'\]"):
        read_model_folder(tmp_path / "model", folds=("0", "3"))


def test_weights_that_do_not_fit_the_plans_are_refused(tmp_path):
    write_model_folder(tmp_path / "model")
    plans_path = tmp_path / "model" / "plans.json"
    plans = json.loads(plans_path.read_text())
    plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]["features_per_stage"] = [8, 16, 32]
    plans_path.write_text(json.dumps(plans))
    with pytest.raises(NnUNetImportError, match="shapes differ"):
        read_model_folder(tmp_path / "model")


def _ct_volume(path, shape=(44, 50, 23), seed=0):
    """A CT-like volume (HU) with an air border of exact zeros, so cropping matters; spacing 1x1x2 mm,
    i.e. the plans' (2, 1, 1) in SimpleITK's reversed axis order."""
    rng = np.random.default_rng(seed)
    data = np.zeros(shape, dtype=np.float32)
    inner = rng.normal(40, 80, (shape[0] - 9, shape[1] - 7, shape[2] - 5)).astype(np.float32)
    inner[5:20, 10:30, 4:12] += 150  # an "organ"
    data[4:-5, 3:-4, 2:-3] = inner
    affine = np.diag([1.0, 1.0, 2.0, 1.0])
    nib.save(nib.Nifti1Image(data, affine), path)
    return path


def test_build_engine_and_infer_match_nnunet_predictor(tmp_path):
    from click.testing import CliRunner

    from nnslim.compiler.cli import cli

    info = write_model_folder(tmp_path / "Dataset999_Synthetic" / "nnUNetTrainer__nnUNetPlans__3d_fullres", folds=(0, 1))
    folder = tmp_path / "Dataset999_Synthetic" / "nnUNetTrainer__nnUNetPlans__3d_fullres"
    volume = _ct_volume(tmp_path / "case_0000.nii.gz")
    engine_dir = tmp_path / "engine"
    result = CliRunner().invoke(cli, ["build-engine", str(folder), "--out", str(engine_dir), "--folds", "0", "1",
                                      "--batch", "2", "--parity-volume", str(volume), "--precision", "fp32"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    manifest = json.loads((engine_dir / "manifest.json").read_text())
    assert manifest["source"]["kind"] == "nnunet-v2" and manifest["source"]["folds"] == ["0", "1"]
    assert manifest["preprocessing"]["normalization"]["channels"][0]["scheme"] == "ct"
    assert manifest["preprocessing"]["tta_default"] is True
    assert manifest["io"]["input"]["shape"][2:] == [16, 24, 24]

    out = tmp_path / "seg.nii.gz"
    result = CliRunner().invoke(cli, ["infer", str(engine_dir), str(volume), "-o", str(out), "--no-progress"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    # mirroring is on by default for an imported nnU-Net model, as in nnU-Net: 8 passes per window
    windows, calls = re.search(r"(\d+) of \d+ windows \((\d+) network calls\)", result.output).groups()
    assert int(calls) == 8 * int(windows), result.output
    ours = np.asarray(nib.load(out).dataobj)
    expected = reference_predict(np.asarray(nib.load(volume).dataobj), info, use_tta=True)
    assert ours.shape == expected.shape == (44, 50, 23)
    assert (ours[:4] == 0).all()  # outside the nonzero crop: background, like nnU-Net
    assert (expected == 1).sum() > 1000  # the random network predicts more than background
    # ONNX Runtime vs nnU-Net's predictor in PyTorch: float32 differences may flip the odd tie
    assert (ours == expected).mean() >= 0.999

    # PyTorch through the same runtime path: the sliding-window numerics themselves
    engine = load_engine(engine_dir)
    network = read_model_folder(folder, folds=("0", "1")).network()
    labels, report = segment_volume(load_volume(volume, 1), TorchPredictor(network), engine.spec,
                                    InferenceOptions(progress=False))
    assert (labels == expected).mean() >= 0.9999
    assert report.evaluated == report.grid == 12  # 2 x 3 x 2 windows over the 35x43x18 crop (padded to 16 along z)


def test_2d_model_walks_slices(tmp_path):
    info = write_model_folder(tmp_path / "model", dims=2, patch=[32, 32], spacing=[1.0, 1.0], mirror_axes=(0, 1))
    imported = read_model_folder(tmp_path / "model")
    spec = manifest_record(
        io={"input": {"name": "image", "dtype": "float32", "shape": ["batch", 1, *imported.patch_size]},
            "output": {"name": "logits", "dtype": "float32", "shape": ["batch", 3, *imported.patch_size]},
            "batch": {"min": 1, "opt": 4, "max": 4}},
        preprocessing=imported.preprocessing(), labels=list(imported.labels.head_names),
    ).spec
    assert spec.patch_size == (1, 32, 32) and spec.mirror_axes == (1, 2) and spec.tta_default
    path = _ct_volume(tmp_path / "case.nii.gz", shape=(40, 36, 12))
    labels, report = segment_volume(load_volume(path, 1), TorchPredictor(imported.network()), spec,
                                    InferenceOptions(progress=False, mirror=False))
    data = np.asarray(nib.load(path).dataobj).transpose(2, 1, 0)  # SimpleITK order (z, y, x)
    crop = data[2:-3, 3:-4, 4:-5]  # the nonzero box: 7 slices of 29 x 31
    assert report.evaluated == 7  # each slice once, in one 32 x 32 window
    # reference: every cropped, CT-normalized slice through the 2D reference network, padded to
    # the patch with the padding centred (29 -> 32: 1 before, 2 after; 31 -> 32: 0 before, 1 after)
    image = (np.clip(crop, -100.0, 250.0) - 60.0) / 45.0
    x = torch.nn.functional.pad(torch.from_numpy(image[:, None].astype(np.float32)), (0, 1, 1, 2))
    with torch.no_grad():
        logits = reference_forward(x, info["weights"][0], info["kwargs"], False)[:, :, 1:30, 0:31]
    expected = np.zeros(data.shape, dtype=np.uint8)
    expected[2:-3, 3:-4, 4:-5] = logits.argmax(1).numpy()
    assert (labels == expected.transpose(2, 1, 0)).mean() >= 0.9999
