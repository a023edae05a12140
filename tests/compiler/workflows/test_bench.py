"""The headline benchmark end to end on a small model (figures are not asserted, only their sense)."""

from __future__ import annotations

import json

from nnslim.compiler.workflows.bench import BenchConfig, conv_peak_gflops, run_bench


def test_headline_bench_writes_a_report_with_every_row(checkpoint_path, small_volume, tmp_path):
    result = run_bench(BenchConfig(checkpoint=checkpoint_path, volume=small_volume, out_dir=tmp_path / "b",
                                   batch_size=2, repeats=1, prune_sparsity=0.3), log=lambda m: None)
    rows = {r["name"]: r for r in result["rows"]}
    usual = result["rows"][0]
    assert usual["agreement"] == 1.0 and usual["windows"] == 4 * 5 * 3  # 37x41x29 in 16^3 tiles
    assert rows["+ re-parameterization"]["agreement"] >= 0.999  # an exact rewrite
    assert rows["+ graph passes, ONNX Runtime engine"]["windows"] == usual["windows"]
    skipping = rows["+ window skipping (mask)"]
    assert skipping["windows"] <= usual["windows"]
    assert all(r["seconds"] > 0 and r["peak_memory_mb"] > 0 for r in result["rows"] if r["seconds"] is not None)
    assert rows["re-param + structured pruning 25% (side)"]["parameters"] < usual["parameters"]
    assert rows["+ graph passes, ONNX Runtime engine"]["agreement"] >= 0.999  # the chain keeps accuracy
    report = (tmp_path / "b" / "report.md").read_text()
    assert "| usual: PyTorch eager, trained form, batch 1 |" in report and "GFLOP/s" in report
    assert (tmp_path / "b" / "time_per_stage.png").stat().st_size > 0
    assert json.loads((tmp_path / "b" / "bench.json").read_text())["conv_peak_gflops"] > 0


def test_conv_peak_is_a_positive_throughput():
    assert conv_peak_gflops(channels=8, size=16, repeats=2) > 0
