"""Pruning: threshold semantics, counting, 2:4 pattern, structured exactness, the sweep."""

import json

import numpy as np
import pytest
import torch
from torch import nn

from nnslim.compiler.stages.export import ExportSettings, export_onnx
from nnslim.compiler.stages.prune import (
    apply_masks,
    check_two_four,
    global_sparsity,
    layer_sparsity,
    magnitude_masks,
    prunable_weights,
    threshold_for_sparsity,
    two_four_masks,
)
from nnslim.compiler.stages.structured import StructuredPruningError, apply_structured, structured_keep, widths
from nnslim.training.blocks import ConvNormAct
from tests.conftest import random_model, small_config


def _two_convs(a, b):
    model = nn.Sequential(nn.Conv3d(1, 1, 1, bias=False), nn.Conv3d(1, 1, 1, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor(a, dtype=torch.float32).view(1, 1, 1, 1, 1))
        model[1].weight.copy_(torch.tensor(b, dtype=torch.float32).view(1, 1, 1, 1, 1))
    return model


def test_threshold_drops_strictly_smaller_magnitudes():
    model = nn.Sequential(nn.Conv3d(1, 6, 1, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([-0.5, 0.1, -0.2, 0.2, 0.05, 0.3]).view(6, 1, 1, 1, 1))
    masks = magnitude_masks(model, threshold=0.2)
    apply_masks(model, masks)
    assert model[0].weight.flatten().tolist() == pytest.approx([-0.5, 0.0, -0.2, 0.2, 0.0, 0.3])
    assert global_sparsity(model) == pytest.approx(2 / 6)


def test_sparsity_drops_exactly_the_smallest_and_sets_tau():
    model = nn.Sequential(nn.Conv3d(1, 4, 1, bias=False), nn.ConvTranspose3d(4, 2, 1, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([0.9, -0.1, 0.4, 0.05]).view(4, 1, 1, 1, 1))
        model[1].weight.copy_(torch.tensor([0.3, -0.7, 0.2, 0.6, -0.01, 0.8, 0.5, 0.35]).view(4, 2, 1, 1, 1))
    # 12 magnitudes; dropping the 6 smallest (0.01 .. 0.35) keeps 0.4 and up
    assert threshold_for_sparsity(model, 0.5) == pytest.approx(0.4)  # the smallest magnitude kept
    apply_masks(model, magnitude_masks(model, sparsity=0.5))
    assert global_sparsity(model) == pytest.approx(0.5)
    kept = torch.cat([w.detach().flatten() for w in prunable_weights(model).values()])
    assert sorted(kept[kept != 0].abs().tolist()) == pytest.approx([0.4, 0.5, 0.6, 0.7, 0.8, 0.9])


def test_shared_weights_count_once():
    model = _two_convs(0.1, 0.5)
    model[1].weight = model[0].weight  # tied: one storage
    assert list(prunable_weights(model)) == ["0"]
    assert sum(r.parameters for r in layer_sparsity(model)) == 1


def test_global_versus_per_layer_counting():
    model = _two_convs(0.1, 0.5)
    apply_masks(model, magnitude_masks(model, sparsity=0.5))
    rows = {r.name: r.sparsity for r in layer_sparsity(model)}
    assert rows == {"0": 1.0, "1": 0.0} and global_sparsity(model) == 0.5


def test_zeros_survive_export(tmp_path):
    import onnx
    from onnx import numpy_helper

    model = random_model()
    apply_masks(model, magnitude_masks(model, sparsity=0.6))
    zeros_in_model = sum(int((w == 0).sum()) for w in prunable_weights(model).values())
    export_onnx(model, tmp_path / "m.onnx", ExportSettings((16, 16, 16), 1))
    written = onnx.load(str(tmp_path / "m.onnx"))  # the file on disk, not the returned proto
    conv_weights = [numpy_helper.to_array(i) for i in written.graph.initializer if len(i.dims) == 5]
    assert sum(int((w == 0).sum()) for w in conv_weights) == zeros_in_model
    assert zeros_in_model / sum(w.size for w in conv_weights) == pytest.approx(0.6, abs=1e-3)


def test_two_four_pattern_holds():
    model = random_model(small_config(features_per_stage=(8, 16, 32)))
    masks = two_four_masks(model)
    apply_masks(model, masks)
    check_two_four(model, masks)
    first = model.get_submodule("encoder.stages.1.0.convs.0.conv").weight  # 8 input channels
    groups = first.movedim(1, -1).reshape(*first.shape[:1], *first.shape[2:], 2, 4)
    assert ((groups == 0).sum(-1) == 2).all()
    assert "encoder.stages.0.0.convs.0.conv" not in masks  # 1 input channel: left dense
    with torch.no_grad():
        first[0, :4, 0, 0, 0] = 1.0  # break one group
    with pytest.raises(ValueError, match="fewer than 2 zeros"):
        check_two_four(model, masks)


def _zero_channels(model):
    """Zero floor(size/4) channels of every group entirely (filter, bias, norm parameters)."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, ConvNormAct):
                n = module.conv.out_channels
                for c in range(0, n, 4)[: n // 4]:
                    for t in (module.conv.weight, module.conv.bias, module.norm.weight, module.norm.bias):
                        t[c] = 0
        for up in model.decoder.transpconvs:
            for c in range(1, up.out_channels, 4)[: up.out_channels // 4]:
                up.weight[:, c] = 0
                up.bias[c] = 0


def test_structured_pruning_of_all_zero_channels_is_exact():
    model = random_model(small_config(features_per_stage=(8, 16, 32), convs_per_decoder_stage=(2, 2)))
    _zero_channels(model)
    x = torch.randn(2, 1, 16, 16, 16)
    with torch.no_grad():
        expected = model(x)
        pruned = apply_structured(model, structured_keep(model, 0.25))
        got = pruned(x)
    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()
    assert widths(pruned)["encoder.stages.2.0.convs.1"] == 24 and widths(pruned)["decoder.transpconvs.1"] == 6
    assert widths(model)["encoder.stages.2.0.convs.1"] == 32  # the original is untouched


def test_structured_pruning_keeps_the_network_runnable_and_exportable(tmp_path):
    import onnxruntime as ort

    model = random_model()
    pruned = apply_structured(model, structured_keep(model, 0.5))
    x = torch.randn(1, 1, 16, 16, 16)
    path = tmp_path / "p.onnx"
    export_onnx(pruned, path, ExportSettings((16, 16, 16), 1))
    (out,) = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"image": x.numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(out, pruned(x).numpy(), atol=1e-4, rtol=1e-4)
    convs = [m for m in pruned.modules() if isinstance(m, nn.Conv3d)]
    assert convs[0].out_channels == 2  # 4 -> 2: physically smaller


def test_structured_pruning_refuses_faster_fusion():
    from nnslim.training.unet import UNet

    model = UNet(small_config(features_per_stage=(8, 16, 32), blocks=("conv", "faster_fusion", "conv")))
    with pytest.raises(StructuredPruningError, match="FasterFusion"):
        structured_keep(model, 0.25)


def test_prune_sweep_levels_hit_their_sparsity_with_nested_masks_and_write_the_plot(
        checkpoint_path, small_volume, mni_raw, tmp_path):
    """Each level prunes exactly round(s * N) of the N conv weights, with thresholds that grow with
    the sparsity (one global magnitude order: each level's mask contains the sparser ones); the
    best level is the sparsest whose proxy Dice clears the floor. (Proxy Dice itself need not be
    monotone in the sparsity, so it is not asserted to be.)"""
    import nibabel as nib

    from nnslim.compiler.workflows.prune_sweep import SweepConfig, run_sweep
    from nnslim.training.checkpoint import load_model

    labels = np.asarray(nib.load(mni_raw / "labelsTr" / "mni.nii.gz").dataobj)[80:117, 100:141, 80:109]
    label_path = tmp_path / "labels.nii.gz"
    nib.save(nib.Nifti1Image(labels, np.eye(4)), label_path)
    requested = (0.6, 0.0, 0.9, 0.3)  # unsorted: the rows must follow the request, level by level
    result = run_sweep(SweepConfig(checkpoint=checkpoint_path, volume=small_volume, labels=label_path,
                                   out_dir=tmp_path / "sweep", sparsities=requested, progress=False,
                                   step_fraction=1.0, batch_size=4, min_proxy_dice=0.9))
    n = sum(w.numel() for w in prunable_weights(load_model(checkpoint_path)[0]).values())
    levels = result["levels"]
    assert [r["sparsity"] for r in levels] == pytest.approx([round(s * n) / n for s in requested], abs=1e-12)
    by_sparsity = sorted(levels, key=lambda r: r["sparsity"])
    thresholds = [r["threshold"] for r in by_sparsity]
    assert thresholds == sorted(thresholds) and len(set(thresholds)) == len(thresholds)
    assert by_sparsity[0]["proxy_mean_dice"] == 1.0 and by_sparsity[-1]["proxy_mean_dice"] < 1.0
    assert all(0.0 <= r["true_mean_dice"] <= 1.0 for r in levels)
    passing = [r["sparsity"] for r in levels if r["proxy_mean_dice"] >= 0.9]
    assert result["largest_sparsity_at_min_proxy_dice"] == max(passing)
    assert len(result["layers_at_best_level"]) == 11  # 8 unit convs + 2 transposed + the head in use
    png = (tmp_path / "sweep" / "sweep.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert json.loads((tmp_path / "sweep" / "sweep.json").read_text())["levels"] == levels
