"""OpenVINO on the CPU: parity with PyTorch, what it refuses, its model cache, and the CPU record.

Runs the trained demo model at 32^3 tiles (`demo_graphs` in tests/conftest.py). fp32 tolerance:
max |logit error| <= 1e-3 of the largest logit and argmax agreement >= 0.9999.
"""

from __future__ import annotations


import numpy as np
import pytest
import torch

from nnslim.compiler.runtime.backends import OpenRequest, open_predictor
from nnslim.errors import EngineError
from nnslim.compiler.runtime.backends.openvino_cpu import OpenVinoPredictor, cpu_has_bf16, cpu_has_vnni, cpu_record
from nnslim.compiler.runtime.precision import get_precision

pytest.importorskip("openvino", reason="the OpenVINO backend needs the openvino package: pip install openvino")


def within(logits, expected: torch.Tensor, max_rel_error: float, min_agreement: float) -> None:
    """The predictor's numpy logits against PyTorch's."""
    assert isinstance(logits, np.ndarray)  # the CPU runtime's arrays: numpy, no torch
    logits = torch.from_numpy(logits)
    error = float((logits - expected).abs().max() / expected.abs().max())
    agreement = float((logits.argmax(1) == expected.argmax(1)).double().mean())
    assert error <= max_rel_error and agreement >= min_agreement, (error, agreement)


def test_fp32_matches_pytorch_at_any_batch_size(demo_graphs):
    predict = OpenVinoPredictor(demo_graphs.fp32)
    assert predict.inference_precision == "f32"
    first = predict(demo_graphs.tiles[:1])
    rest = predict(demo_graphs.tiles[1:4])  # another batch size on the same request
    within(first, demo_graphs.expected[:1], 1e-3, 0.9999)
    within(rest, demo_graphs.expected[1:4], 1e-3, 0.9999)
    # the request reuses its output buffer: an earlier result must not change under a later call
    within(first, demo_graphs.expected[:1], 1e-3, 0.9999)


def test_throughput_hint_and_threads_give_the_same_logits(demo_graphs):
    tiles = demo_graphs.tiles[:2]
    latency = OpenVinoPredictor(demo_graphs.fp32)(tiles)
    throughput = OpenVinoPredictor(demo_graphs.fp32, threads=1, performance_hint="THROUGHPUT")(tiles)
    np.testing.assert_allclose(throughput, latency, rtol=1e-4, atol=1e-4)


def test_bf16_needs_a_cpu_with_bf16_arithmetic(demo_graphs):
    if cpu_has_bf16():
        predict = OpenVinoPredictor(demo_graphs.fp32, precision="bf16")
        gate = get_precision("bf16")
        assert predict.inference_precision == "bf16"
        within(predict(demo_graphs.tiles), demo_graphs.expected, gate.max_rel_logit_error, gate.min_agreement)
        return
    with pytest.raises(EngineError, match=r"OpenVINO bf16 needs a CPU with bf16 arithmetic \(AVX512_BF16 or AMX\); "
                                          r"this one has \[.*\]; use precision fp32 or int8"):
        OpenVinoPredictor(demo_graphs.fp32, precision="bf16")


def test_int8_keeps_its_float_layers_in_bf16_only_where_the_cpu_has_it(demo_graphs):
    graph = demo_graphs.int8 if cpu_has_vnni() else demo_graphs.int8_uint8
    predict = OpenVinoPredictor(graph, precision="int8")
    assert predict.inference_precision == ("bf16" if cpu_has_bf16() else "f32")
    gate = get_precision("int8")
    tiles, expected = demo_graphs.tiles[demo_graphs.evaluation], demo_graphs.expected[demo_graphs.evaluation]
    within(predict(tiles), expected, gate.max_rel_logit_error, gate.min_agreement)


def test_refusals_say_what_is_wrong(demo_graphs, tmp_path):
    with pytest.raises(EngineError, match=r"has inputs \['image'\], expected 'x'"):
        OpenVinoPredictor(demo_graphs.fp32, input_name="x")
    with pytest.raises(EngineError, match=r"performance hint must be one of \('LATENCY', 'THROUGHPUT'\), got 'FAST'"):
        OpenVinoPredictor(demo_graphs.fp32, performance_hint="FAST")
    corrupt = tmp_path / "model.onnx"
    corrupt.write_bytes(demo_graphs.fp32.read_bytes()[:5000])  # a truncated copy
    with pytest.raises(EngineError, match=f"OpenVINO cannot compile {corrupt}"):
        OpenVinoPredictor(corrupt)


def test_compiled_models_are_cached_where_asked(demo_graphs, tmp_path):
    cache = tmp_path / "cache"
    first = OpenVinoPredictor(demo_graphs.fp32, cache_dir=cache)(demo_graphs.tiles[:1])
    written = sorted(p.name for p in cache.iterdir())
    assert written, "OpenVINO wrote nothing to its cache directory"
    second = OpenVinoPredictor(demo_graphs.fp32, cache_dir=cache)(demo_graphs.tiles[:1])  # compiled from the cache
    assert sorted(p.name for p in cache.iterdir()) == written
    np.testing.assert_array_equal(second, first)


def test_backend_table_caches_in_a_private_folder_one_checked_entry_per_model_and_settings(demo_graphs, tmp_path,
                                                                                           monkeypatch):
    import stat

    monkeypatch.setenv("NNSLIM_CACHE", str(tmp_path / "cache"))
    first = open_predictor("openvino", OpenRequest(demo_graphs.fp32))(demo_graphs.tiles[:1])
    folder = tmp_path / "cache" / "openvino"
    (entry,) = folder.iterdir()
    assert entry.name.endswith(".entry") and entry.read_bytes().startswith(f"nnslim-cache-entry 2 key={entry.stem} sha256=".encode())
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700 and stat.S_IMODE(entry.stat().st_mode) == 0o600
    written = entry.stat().st_mtime_ns
    again = open_predictor("openvino", OpenRequest(demo_graphs.fp32))(demo_graphs.tiles[:1])  # imported, not rewritten
    assert entry.stat().st_mtime_ns == written
    np.testing.assert_array_equal(again, first)
    open_predictor("openvino", OpenRequest(demo_graphs.fp32, threads=1))  # other settings: another entry
    assert len(list(folder.iterdir())) == 2


def test_cpu_record_agrees_with_the_kernel():
    record = cpu_record()
    with open("/proc/cpuinfo") as info:
        flags = set(next(line for line in info if line.startswith("flags")).split(":", 1)[1].split())
    assert set(record["flags"]) <= flags
    assert record["name"] and record["cores"] >= 1 and record["openvino_capabilities"]
    assert cpu_has_vnni() == bool(flags & {"avx512_vnni", "avx_vnni", "amx_int8"})
    if not flags & {"avx512_bf16", "amx_bf16"}:
        assert not cpu_has_bf16()


def test_wrong_output_name_is_an_engine_error(demo_graphs):
    with pytest.raises(EngineError, match=r"has outputs \['logits'\], expected 'x'"):
        OpenVinoPredictor(demo_graphs.fp32, output_name="x")
