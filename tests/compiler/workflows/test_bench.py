"""The headline benchmark end to end on a small model (figures are not asserted, only their sense)."""

from __future__ import annotations

import json

from nnslim.compiler.workflows.bench import BenchConfig, run_bench
from nnslim.compiler.workflows.conv_peaks import conv_peaks


def _crop_labels(mni_raw, folder):
    """The MNI labels cropped like `small_volume` (conftest): reference labels for Dice."""
    import nibabel as nib
    import numpy as np

    labels = nib.load(mni_raw / "labelsTr" / "mni.nii.gz")
    path = folder / "crop_labels.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(labels.dataobj)[80:117, 100:141, 80:109], labels.affine), path)
    return path


def test_headline_bench_writes_a_report_with_every_row(checkpoint_path, small_volume, mni_raw, tmp_path):
    small_volume_labels = _crop_labels(mni_raw, tmp_path)
    result = run_bench(BenchConfig(checkpoint=checkpoint_path, volume=small_volume, out_dir=tmp_path / "b",
                                   batch_size=2, repeats=1, prune_sparsity=0.3, labels=small_volume_labels),
                       log=lambda m: None)
    rows = {r["name"]: r for r in result["rows"]}
    usual = result["rows"][0]
    assert usual["agreement"] == 1.0 and usual["windows"] == 4 * 5 * 3  # 37x41x29 in 16^3 tiles
    assert rows["+ re-parameterization"]["agreement"] >= 0.999  # an exact rewrite
    assert rows["+ graph passes, ONNX Runtime fp32 engine"]["windows"] == usual["windows"]
    skipping = next(r for name, r in rows.items() if name.startswith("+ window skipping (mask)"))
    assert skipping["windows"] <= usual["windows"]
    in_process = [r for r in result["rows"] if r["seconds"] is not None and not r["name"].startswith("end to end")]
    assert all(r["seconds"] > 0 and r["peak_memory_mb"] > 0 for r in in_process)
    assert rows["re-param + structured pruning 25% (side)"]["parameters"] < usual["parameters"]
    assert rows["+ graph passes, ONNX Runtime fp32 engine"]["agreement"] >= 0.999  # the chain keeps accuracy
    # every candidate of the auto build has a row of its own, and the end-to-end rows ran the CLI
    selection = result["engine"]["selection"]
    for c in selection["candidates"]:
        if (c["backend"], c["precision"]) != ("onnxruntime", "fp32") and not c["error"]:
            assert any(name.startswith(f"{c['backend']} {c['precision']} engine") for name in rows), c
    ends = [r for name, r in rows.items() if name.startswith("end to end")]
    assert len(ends) == 2 and all(r["seconds"] > 0 and r["dice_labels"] is not None for r in ends)
    assert ends[0]["agreement"] == 1.0 and ends[1]["agreement"] > 0.9
    report = (tmp_path / "b" / "report.md").read_text()
    assert "| usual: PyTorch eager, trained form, batch 1 |" in report and "GFLOP/s" in report
    assert (tmp_path / "b" / "time_per_stage.png").stat().st_size > 0
    assert json.loads((tmp_path / "b" / "bench.json").read_text())["conv_peaks_gflops"]["fp32"] > 0


def test_conv_peaks_measure_fp32_and_int8():
    peaks = conv_peaks(channels=8, size=16, repeats=2)
    assert peaks["fp32"] > 0 and peaks["int8"] > 0
