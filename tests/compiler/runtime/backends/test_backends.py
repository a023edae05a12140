"""The backends table: every backend's predictor against PyTorch, and how an engine picks its runtime.

Predictors run the trained demo model at 32^3 tiles (`demo_graphs` in tests/conftest.py) on real
MNI tiles, in every precision each backend runs on this machine. Tolerances per precision:

- fp32: max |logit error| <= 1e-3 of the largest logit and argmax agreement >= 0.9999: the same
  arithmetic in another order (the build's gate, 1e-2 / 0.999, leaves room for 160^3 tiles).
- fp16, bf16: their gates in `nnslim.compiler.runtime.precision` (5e-2 / 0.995 and 1e-1 / 0.995).
- int8: the Q/DQ graph calibrated on 4 tiles and scored on 4 others, inside the int8 gate
  (agreement >= 0.99, logit error <= 0.3). OpenVINO on a CPU without VNNI runs the unsigned-
  activation recipe, as the build chooses there (see `nnslim.compiler.stages.quantize`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from pathlib import Path

import pytest
import torch

from nnslim.cache import cache_root
from nnslim.compiler.runtime.backends import BACKENDS, OpenRequest, open_predictor, runs
from nnslim.compiler.runtime.backends.choice import RuntimeChoice, resolve_runtime, runtime_choices
from nnslim.compiler.runtime.engine import load_engine
from nnslim.errors import EngineError, InputError
from nnslim.compiler.runtime.backends.openvino_cpu import OpenVinoPredictor, cpu_has_bf16, cpu_has_vnni
from nnslim.compiler.runtime.precision import PRECISIONS, get_precision
from nnslim.compiler.runtime.backends.onnx_runtime import OnnxRuntimePredictor
from nnslim.compiler.runtime.manifest import EngineManifest, parse_manifest
from nnslim.compiler.stages.parity import run_batched
from tests.conftest import manifest_record

OLD_MANIFEST = Path(__file__).parents[1] / "data" / "manifest_v1.json"  # as engines were written before `selection`
FP32_TOLERANCE = (1e-3, 0.9999)  # max rel logit error, min argmax agreement


def tolerance(precision: str) -> tuple[float, float]:
    if precision == "fp32":
        return FP32_TOLERANCE
    gate = get_precision(precision)
    return gate.max_rel_logit_error, gate.min_agreement


def graph_for(demo_graphs, backend: str, precision: str) -> Path:
    """The model file a backend runs for a precision (bf16 is a hint on the fp32 graph)."""
    if precision == "int8" and backend == "openvino" and not cpu_has_vnni():
        return demo_graphs.int8_uint8
    return getattr(demo_graphs, get_precision(precision).graph)


def unavailable(monkeypatch, name: str) -> None:
    """Make backend `name` look uninstalled, through the table every caller reads."""
    monkeypatch.setitem(BACKENDS, name, dataclasses.replace(BACKENDS[name], available=lambda: False))


@pytest.mark.parametrize("precision", list(PRECISIONS))
@pytest.mark.parametrize("backend", list(BACKENDS))
def test_predictor_matches_pytorch(backend, precision, demo_graphs):
    if not BACKENDS[backend].available():
        pytest.skip(f"backend {backend} is not available on this machine")
    if backend == "openvino" and precision == "bf16" and not cpu_has_bf16():
        pytest.skip("this CPU has no bf16 arithmetic (AVX512_BF16 or AMX); test_bf16_is_offered_only_where_the_cpu_"
                    "has_it checks the refusal")
    if precision not in BACKENDS[backend].precisions():
        pytest.skip(f"{backend} does not run {precision} on this machine (it runs {BACKENDS[backend].precisions()})")
    if BACKENDS[backend].model == "plan":
        pytest.skip("TensorRT plans are built and checked in tests/compiler/stages/test_tensorrt_builder.py")
    # int8 is scored on tiles its calibration did not see
    tiles = demo_graphs.tiles[demo_graphs.evaluation] if precision == "int8" else demo_graphs.tiles
    expected = demo_graphs.expected[demo_graphs.evaluation] if precision == "int8" else demo_graphs.expected
    predict = open_predictor(backend, OpenRequest(graph_for(demo_graphs, backend, precision), precision=precision))
    logits = run_batched(predict, tiles, 2)
    assert logits.shape == expected.shape
    error = float((logits - expected).abs().max() / expected.abs().max())
    agreement = float((logits.argmax(1) == expected.argmax(1)).double().mean())
    max_error, min_agreement = tolerance(precision)
    assert error <= max_error, f"{backend} {precision}: max rel logit error {error:.3g} > {max_error}"
    assert agreement >= min_agreement, f"{backend} {precision}: argmax agreement {agreement:.5f} < {min_agreement}"


def test_signed_int8_graph_passes_the_gate_on_onnxruntime(demo_graphs):
    """The TensorRT-ready graph (signed, zero point 0) is inside the int8 gate on every CPU."""
    predict = open_predictor("onnxruntime", OpenRequest(demo_graphs.int8, precision="int8"))
    tiles, expected = demo_graphs.tiles[demo_graphs.evaluation], demo_graphs.expected[demo_graphs.evaluation]
    agreement = float((torch.from_numpy(predict(tiles.numpy())).argmax(1) == expected.argmax(1)).double().mean())
    assert agreement >= get_precision("int8").min_agreement


def test_bf16_is_offered_only_where_the_cpu_has_it(demo_graphs):
    assert runs("openvino", "bf16") == cpu_has_bf16()
    assert not runs("onnxruntime", "bf16")  # bf16 is a runtime hint only OpenVINO takes
    if cpu_has_bf16():
        pytest.skip("this CPU has bf16 arithmetic; bf16 parity is checked in test_predictor_matches_pytorch")
    with pytest.raises(EngineError, match=r"'openvino' does not run bf16 on this machine \(it runs fp32, int8\)"):
        open_predictor("openvino", OpenRequest(demo_graphs.fp32, precision="bf16"))


def test_open_predictor_refuses_unknown_and_missing_backends(monkeypatch, demo_graphs):
    with pytest.raises(InputError, match="unknown backend 'tflite'; choose one of onnxruntime, "):
        open_predictor("tflite", OpenRequest(demo_graphs.fp32))
    unavailable(monkeypatch, "openvino")
    with pytest.raises(EngineError, match="backend 'openvino' is not available on this machine"):
        open_predictor("openvino", OpenRequest(demo_graphs.fp32))


# --- choosing how to run an engine (resolve_runtime) -------------------------------------------------


def selection_manifest(*candidates: tuple[str, str, str, bool]) -> EngineManifest:
    """A manifest whose build chose the first candidate; each is (backend, precision, model, passed)."""
    backend, precision, model, _ = candidates[0]
    return manifest_record(backend=backend, precision=precision, runtime_model=model,
                           selection={"candidates": [{"backend": b, "precision": p, "model": m, "passed": ok}
                                                     for b, p, m, ok in candidates]})


AUTO_BUILD = selection_manifest(
    ("openvino", "fp32", "model.opt.onnx", True),
    ("openvino", "int8", "model.int8.onnx", False),  # missed its gate: never run
    ("onnxruntime", "fp32", "model.opt.onnx", True),
    ("onnxruntime", "int8", "model.int8.onnx", True),
)


def test_runtime_choices_are_the_passing_candidates_in_build_order():
    assert [c.label for c in runtime_choices(AUTO_BUILD)] == ["openvino fp32", "onnxruntime fp32", "onnxruntime int8"]


def test_old_manifest_without_selection_runs_its_one_backend():
    manifest = json.loads(OLD_MANIFEST.read_text())
    assert "selection" not in manifest
    assert resolve_runtime(parse_manifest(manifest)) == (RuntimeChoice("onnxruntime", "fp32", "model.opt.onnx"), None)
    del manifest["precision"]  # engines older still: fp32 was the only CPU precision
    assert resolve_runtime(parse_manifest(manifest))[0].precision == "fp32"


def test_resolve_runtime_falls_back_to_the_next_passing_choice(monkeypatch):
    assert resolve_runtime(AUTO_BUILD) == (RuntimeChoice("openvino", "fp32", "model.opt.onnx"), None)
    unavailable(monkeypatch, "openvino")
    choice, note = resolve_runtime(AUTO_BUILD)
    assert choice == RuntimeChoice("onnxruntime", "fp32", "model.opt.onnx")
    assert note == "falling back to onnxruntime fp32 (openvino fp32: backend not available here)"


def test_resolve_runtime_overrides():
    assert resolve_runtime(AUTO_BUILD, backend="onnxruntime")[0].label == "onnxruntime fp32"
    assert resolve_runtime(AUTO_BUILD, precision="int8") == (RuntimeChoice("onnxruntime", "int8", "model.int8.onnx"),
                                                            None)
    with pytest.raises(EngineError, match="not built for openvino int8; it offers openvino fp32, onnxruntime fp32, "
                                          "onnxruntime int8; rebuild with --backend/--precision"):
        resolve_runtime(AUTO_BUILD, backend="openvino", precision="int8")  # failed its gate at build time
    with pytest.raises(EngineError, match="not built for any backend bf16"):
        resolve_runtime(AUTO_BUILD, precision="bf16")


def test_fp32_graph_on_another_onnx_backend_is_allowed_but_unchecked():
    only_ort = selection_manifest(("onnxruntime", "fp32", "model.opt.onnx", True))
    choice, note = resolve_runtime(only_ort, backend="openvino")
    assert choice == RuntimeChoice("openvino", "fp32", "model.opt.onnx", checked=False)
    assert note == "running openvino fp32, which the build did not check against PyTorch"
    with pytest.raises(EngineError, match="not built for openvino int8"):  # int8 needs the build's Q/DQ graph
        resolve_runtime(only_ort, backend="openvino", precision="int8")


def test_no_runnable_choice_is_a_clear_error(monkeypatch):
    unavailable(monkeypatch, "openvino")
    unavailable(monkeypatch, "onnxruntime")
    with pytest.raises(EngineError, match="no recorded way of running this engine works here: openvino fp32: backend "
                                          "not available here; onnxruntime fp32: backend not available here"):
        resolve_runtime(AUTO_BUILD)


# --- load_engine on a real engine directory ----------------------------------------------------------


def two_backend_engine(engine_dir: Path, tmp_path: Path) -> Path:
    """A copy of the fp32 engine whose selection says: OpenVINO fp32 won, ONNX Runtime int8 missed its gate,
    ONNX Runtime fp32 passed too.

    Both run the engine's own `model.opt.onnx`, so only the manifest changes and every file keeps its
    recorded hash (the runtime verifies them).
    """
    copy = tmp_path / "engine"
    shutil.copytree(engine_dir, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    model = manifest["runtime_model"]
    manifest.update(backend="openvino", precision="fp32")
    manifest["selection"]["candidates"] = [
        {"backend": "openvino", "precision": "fp32", "model": model, "passed": True},
        # missed its gate at build time (its file was never kept): never a fallback
        {"backend": "onnxruntime", "precision": "int8", "model": "model.int8.onnx", "passed": False},
        {"backend": "onnxruntime", "precision": "fp32", "model": model, "passed": True},
    ]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    return copy


def test_load_engine_runs_the_recorded_choice(engine_dir, tmp_path, caplog):
    engine_dir = two_backend_engine(engine_dir, tmp_path)
    with caplog.at_level(logging.WARNING):
        engine = load_engine(engine_dir)
    assert engine.runtime == RuntimeChoice("openvino", "fp32", "model.opt.onnx")
    assert isinstance(engine.predictor, OpenVinoPredictor)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_load_engine_falls_back_when_the_chosen_backend_is_missing(engine_dir, tmp_path, monkeypatch, caplog):
    engine_dir = two_backend_engine(engine_dir, tmp_path)
    unavailable(monkeypatch, "openvino")
    with caplog.at_level(logging.WARNING, logger="nnslim.compiler.runtime.engine"):
        engine = load_engine(engine_dir)
    assert engine.runtime == RuntimeChoice("onnxruntime", "fp32", "model.opt.onnx")
    assert isinstance(engine.predictor, OnnxRuntimePredictor)
    assert any("falling back to onnxruntime fp32 (openvino fp32: backend not available here)" in r.getMessage()
               for r in caplog.records if r.levelno == logging.WARNING)
    tile = torch.randn(1, *engine.manifest.io.input.shape[1:])
    assert engine.predictor(tile).shape[1] == len(engine.manifest.labels)


def test_load_engine_overrides_and_refuses_what_was_not_built(engine_dir, tmp_path):
    engine_dir = two_backend_engine(engine_dir, tmp_path)
    engine = load_engine(engine_dir, backend="onnxruntime")
    assert engine.runtime.label == "onnxruntime fp32" and isinstance(engine.predictor, OnnxRuntimePredictor)
    with pytest.raises(EngineError, match="was not built for any backend int8; it offers openvino fp32, "
                                          "onnxruntime fp32; rebuild with --backend/--precision"):
        load_engine(engine_dir, precision="int8")
    with pytest.raises(InputError, match="unknown backend 'tflite'; choose one of onnxruntime, "):
        load_engine(engine_dir, backend="tflite")


def test_engine_without_selection_still_loads(engine_dir, tmp_path, caplog):
    """The manifest format that landed before selection existed: `backend` + `runtime_model` only."""
    copy = tmp_path / "engine"
    shutil.copytree(engine_dir, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    for key in ("selection", "precision"):
        manifest.pop(key, None)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with caplog.at_level(logging.WARNING):
        engine = load_engine(copy)
    assert engine.runtime == RuntimeChoice("onnxruntime", "fp32", manifest["runtime_model"])
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_cache_root_follows_nnslim_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("NNSLIM_CACHE", str(tmp_path))
    assert cache_root() == tmp_path


# --- regressions of bugs found while writing these tests ------------------------------------------

TENSORRT_BUILD = manifest_record(  # what a TensorRT build records: the plan, and the graph it checked on the CPU
    backend="tensorrt", precision="fp32", runtime_model="engine.plan",
    selection={"candidates": [{"backend": "onnxruntime", "precision": "fp32", "model": "model.opt.onnx",
                               "passed": True}]},
)


def test_tensorrt_engine_on_the_cuda_device_runs_its_plan(monkeypatch):
    monkeypatch.setitem(BACKENDS, "tensorrt", dataclasses.replace(BACKENDS["tensorrt"], available=lambda: True))
    assert resolve_runtime(TENSORRT_BUILD, device="cuda") == (RuntimeChoice("tensorrt", "fp32", "engine.plan"), None)


def test_engine_naming_an_unknown_backend_falls_back_to_a_known_one():
    newer = selection_manifest(("tflite", "fp32", "model.tflite", True), ("onnxruntime", "fp32", "model.opt.onnx", True))
    choice, note = resolve_runtime(newer)
    assert choice == RuntimeChoice("onnxruntime", "fp32", "model.opt.onnx")
    assert "tflite" in note
    with pytest.raises(EngineError, match="tflite"):  # nothing known to fall back to: an engine error, not input
        resolve_runtime(selection_manifest(("tflite", "fp32", "model.tflite", True)))


def test_an_onnx_runtime_engine_runs_its_fp32_graph_on_openvino_where_onnx_runtime_is_not_installed(monkeypatch):
    """The CPU runtime installs OpenVINO alone (`pip install nnslim`): an engine built for ONNX Runtime
    fp32 still runs, on the same graph, said to be unchecked; int8 (another graph's numerics) does not."""
    unavailable(monkeypatch, "onnxruntime")
    only_ort = selection_manifest(("onnxruntime", "fp32", "model.opt.onnx", True))
    choice, note = resolve_runtime(only_ort)
    assert choice == RuntimeChoice("openvino", "fp32", "model.opt.onnx", checked=False)
    assert note.startswith("running the engine's fp32 graph on openvino, which the build did not check")
    assert "onnxruntime fp32: backend not available here" in note
    with pytest.raises(EngineError, match="no recorded way"):
        resolve_runtime(selection_manifest(("onnxruntime", "int8", "model.int8.onnx", True)))
