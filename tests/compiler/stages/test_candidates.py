"""Choosing the engine by measurement: which candidates are planned, that a candidate outside its gate
(or one that cannot run) is never chosen, what `build-engine --precision auto` records, and that
`load_engine` falls back along that record when the chosen backend is missing.

Gates come from `nnslim.compiler.runtime.precision`; tests that need a failing candidate make its gate
impossible (agreement above 1) or its model file corrupt, so the failure does not depend on numerics.
"""

from __future__ import annotations

import dataclasses
import logging

import nibabel as nib
import numpy as np
import pytest

from nnslim.compiler.stages.candidates import Candidate, choose, measure, plan_candidates, ranking
from nnslim.compiler.runtime.manifest import Tolerance
from nnslim.compiler.runtime.precision import get_precision
from tests.conftest import manifest_json
from nnslim.compiler.stages.parity import ParityError
from nnslim.compiler.stages.pipeline import BuildConfig, BuildError, build_engine
from nnslim.compiler.stages.plan import plan_build
from nnslim.compiler.runtime.backends import BACKENDS
from nnslim.compiler.runtime.backends.choice import RuntimeChoice
from nnslim.compiler.runtime.engine import InferenceOptions, load_engine
from nnslim.compiler.runtime.cases.run import segment_files
from nnslim.errors import EngineError
from nnslim.files import sha256_file
from nnslim.compiler.runtime.backends.openvino_cpu import cpu_has_bf16, cpu_record
from nnslim.compiler.runtime.backends.torch_module import TorchPredictor

IMPOSSIBLE = Tolerance(max_rel_logit_error=1.0, min_argmax_agreement=1.01)  # agreement is at most 1


def unavailable(monkeypatch, name: str) -> None:
    monkeypatch.setitem(BACKENDS, name, dataclasses.replace(BACKENDS[name], available=lambda: False))


def gates(impossible: str | None = None):
    """tolerance_for: each precision's own gate, except `impossible`'s."""
    return lambda precision: IMPOSSIBLE if precision == impossible else get_precision(precision).tolerance


# --- planning ------------------------------------------------------------------------------------


def test_auto_plans_every_cpu_backend_and_precision_that_runs_here():
    candidates, skipped = plan_candidates("auto", "auto", calibrated=True)
    openvino = ["fp32", *(["bf16"] if cpu_has_bf16() else []), "int8"]
    assert candidates == [Candidate("onnxruntime", "fp32"), Candidate("onnxruntime", "int8"),
                          *[Candidate("openvino", p) for p in openvino]]
    assert "onnxruntime fp16: a GPU precision (CPUs convert it to fp32)" in skipped
    assert ("openvino bf16: not supported on this machine" in skipped) == (not cpu_has_bf16())
    assert all(c.graph in ("fp32", "int8") for c in candidates)


def test_int8_needs_calibration_tiles_and_missing_backends_are_said():
    candidates, skipped = plan_candidates("auto", "auto", calibrated=False)
    assert all(c.precision != "int8" for c in candidates)
    assert "openvino int8: needs real calibration tiles (--parity-volume or --calibration)" in skipped


def test_uninstalled_backend_is_skipped_with_the_reason(monkeypatch):
    unavailable(monkeypatch, "openvino")
    candidates, skipped = plan_candidates("auto", "fp32", calibrated=True)
    assert candidates == [Candidate("onnxruntime", "fp32")] and "openvino: not installed here" in skipped


def test_explicit_fp32_keeps_todays_onnxruntime_engine(checkpoint_path, tmp_path):
    plan = plan_build(BuildConfig(checkpoint=checkpoint_path, out_dir=tmp_path / "e", precision="fp32"))
    assert plan.candidates == (Candidate("onnxruntime", "fp32"),) and plan.graphs == ()


# --- measuring and choosing ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def measured(demo_graphs):
    """fp32 on both CPU backends and int8 on ONNX Runtime, int8's gate made impossible."""
    tiles, expected = demo_graphs.tiles[demo_graphs.evaluation], demo_graphs.expected[demo_graphs.evaluation]
    candidates = [Candidate("onnxruntime", "fp32"), Candidate("openvino", "fp32"), Candidate("onnxruntime", "int8")]
    models = {"fp32": demo_graphs.fp32, "int8": demo_graphs.int8}
    return measure(candidates, models, expected, tiles, 2, gates(impossible="int8"), "MNI tiles",
                   TorchPredictor(demo_graphs.model), repeats=2)


def test_a_candidate_outside_its_gate_is_never_chosen(measured):
    results, reference_seconds = measured
    int8 = results[2]
    assert int8.parity is not None and int8.error is None and not int8.passed
    assert results[0].passed and results[1].passed
    assert reference_seconds > 0 and all(len(r.seconds) == 2 for r in results)
    int8.seconds = [0.0, 0.0]  # even as the fastest by far
    chosen = choose(results)
    assert chosen.passed and chosen.candidate.precision == "fp32"
    assert chosen.median_seconds == min(r.median_seconds for r in results if r.passed)
    assert ranking(results)[-1] is int8  # failing candidates come last: never a fallback
    record = int8.record(reference_seconds).to_dict()
    assert record["passed"] is False and record["tolerance"]["min_argmax_agreement"] == 1.01


def test_a_candidate_that_cannot_run_is_recorded_not_chosen(demo_graphs, tmp_path, caplog):
    corrupt = tmp_path / "model.int8.onnx"
    corrupt.write_bytes(demo_graphs.int8.read_bytes()[:4000])  # truncated
    tiles, expected = demo_graphs.tiles[:2], demo_graphs.expected[:2]
    candidates = [Candidate("openvino", "int8"), Candidate("onnxruntime", "fp32")]
    with caplog.at_level(logging.WARNING, logger="nnslim.compiler.stages.candidates"):
        results, _ = measure(candidates, {"fp32": demo_graphs.fp32, "int8": corrupt}, expected, tiles, 2, gates(),
                             "MNI tiles", TorchPredictor(demo_graphs.model), repeats=1)
    broken = results[0]
    assert broken.error.startswith("EngineError: OpenVINO cannot compile") and broken.parity is None
    assert not broken.passed and broken.seconds == []
    assert "candidate openvino int8 failed" in caplog.text
    assert choose(results).candidate == Candidate("onnxruntime", "fp32")


def test_no_passing_candidate_is_an_error_naming_each(demo_graphs, tmp_path):
    corrupt = tmp_path / "model.int8.onnx"
    corrupt.write_bytes(b"not a model")
    results, _ = measure([Candidate("onnxruntime", "fp32"), Candidate("openvino", "int8")],
                         {"fp32": demo_graphs.fp32, "int8": corrupt}, demo_graphs.expected[:2], demo_graphs.tiles[:2],
                         2, gates(impossible="fp32"), "MNI tiles", TorchPredictor(demo_graphs.model), repeats=0)
    with pytest.raises(ParityError, match=r"no candidate is within its parity gate; engine not written:\n"
                                          r"  onnxruntime fp32: argmax agreement 1\.00000 \(needs >= 1\.01\).*\n"
                                          r"  openvino int8: EngineError: OpenVINO cannot compile"):
        choose(results)


def test_untimed_candidates_choose_the_first_passing(demo_graphs):
    results, reference_seconds = measure(
        [Candidate("openvino", "fp32"), Candidate("onnxruntime", "fp32")], {"fp32": demo_graphs.fp32},
        demo_graphs.expected[:2], demo_graphs.tiles[:2], 2, gates(), "MNI tiles", TorchPredictor(demo_graphs.model),
        repeats=0)
    assert reference_seconds is None and all(r.seconds == [] for r in results)
    assert choose(results).candidate == Candidate("openvino", "fp32")


# --- build-engine --precision auto ---------------------------------------------------------------


@pytest.fixture(scope="module")
def synthetic_volume(tmp_path_factory):
    """A 40^3 NIfTI: two nested blobs of different intensity in noise (enough structure for real tiles)."""
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, 40)] * 3, indexing="ij"))
    radius = np.sqrt((grid**2).sum(0))
    data = np.where(radius < 0.8, 300.0, 0.0) + np.where(radius < 0.4, 500.0, 0.0)
    data += np.random.default_rng(0).normal(0, 20, data.shape) * (radius < 0.8)
    path = tmp_path_factory.mktemp("synthetic") / "blob_0000.nii.gz"
    nib.save(nib.Nifti1Image(data.astype(np.float32), np.eye(4)), path)
    return path


@pytest.fixture(scope="module")
def auto_engine(checkpoint_path, synthetic_volume, tmp_path_factory):
    out = tmp_path_factory.mktemp("auto") / "engine"
    build_engine(BuildConfig(checkpoint=checkpoint_path, out_dir=out, patch_size=(32, 32, 32), precision="auto",
                             parity_volume=synthetic_volume, parity_tiles=2, calibration_tiles=2))
    return out, manifest_json(out)


def test_auto_build_records_every_candidate_and_the_choice(auto_engine):
    out, manifest = auto_engine
    selection = manifest["selection"]
    planned, _ = plan_candidates("auto", "auto", calibrated=True)
    candidates = selection["candidates"]
    assert sorted((c["backend"], c["precision"]) for c in candidates) == sorted((c.backend, c.precision) for c in planned)
    chosen = candidates[0]  # recorded best first: the fastest that passed
    assert chosen["passed"] and chosen["seconds_per_batch"] == min(c["seconds_per_batch"] for c in candidates
                                                                   if c["passed"])
    assert {k: manifest[k] for k in ("backend", "precision", "runtime_model")} == \
        {"backend": chosen["backend"], "precision": chosen["precision"], "runtime_model": chosen["model"]}
    assert (selection["backend"], selection["precision"]) == (chosen["backend"], chosen["precision"])
    assert all(c["passed"] for c in candidates[:sum(c["passed"] for c in candidates)])  # passing ones first
    for candidate in candidates:
        assert manifest["files"][candidate["model"]]["sha256"] == sha256_file(out / candidate["model"])
        assert candidate["parity"] is not None or candidate["error"]
    assert selection["models"] == {"fp32": "model.opt.onnx", "int8": "model.int8.onnx"}
    assert selection["machine"]["name"] == cpu_record()["name"]
    assert selection["requested"] == {"backend": "auto", "precision": "auto"}
    quantize = next(s for s in manifest["stages"] if s["name"] == "int8")  # the int8 graph: its producer's stage
    assert quantize["recipes"] and quantize["recipes"][0]["agreement"] == max(r["agreement"] for r in quantize["recipes"])
    assert manifest["parity"]["argmax_agreement"] == chosen["parity"]["argmax_agreement"]


def test_infer_falls_back_along_the_recorded_candidates(auto_engine, synthetic_volume, tmp_path, monkeypatch, caplog):
    out, manifest = auto_engine
    candidates = manifest["selection"]["candidates"]
    chosen = RuntimeChoice(manifest["backend"], manifest["precision"], manifest["runtime_model"])
    assert load_engine(out).runtime == chosen
    fallback = next(RuntimeChoice(c["backend"], c["precision"], c["model"]) for c in candidates
                    if c["passed"] and c["backend"] != chosen.backend)
    unavailable(monkeypatch, chosen.backend)
    with caplog.at_level(logging.WARNING, logger="nnslim.compiler.runtime.engine"):
        engine = load_engine(out)
    assert engine.runtime == fallback
    assert f"falling back to {fallback.label} ({chosen.label}: backend not available here" in caplog.text
    results = segment_files(engine, [synthetic_volume], tmp_path / "seg.nii.gz", InferenceOptions(progress=False))
    assert nib.load(results[0].output).shape == (40, 40, 40)


def test_auto_engine_overrides(auto_engine):
    out, manifest = auto_engine
    # what failed its gate at build time is not offered (fp32 could still run unchecked on another ONNX backend)
    failing = [c for c in manifest["selection"]["candidates"] if not c["passed"] and c["precision"] != "fp32"]
    for candidate in failing:
        with pytest.raises(EngineError, match=f"not built for {candidate['backend']} {candidate['precision']}"):
            load_engine(out, backend=candidate["backend"], precision=candidate["precision"])
    engine = load_engine(out, backend="onnxruntime", precision="fp32")
    assert engine.runtime == RuntimeChoice("onnxruntime", "fp32", "model.opt.onnx")


# --- regressions of bugs found while writing these tests ------------------------------------------


def test_explicit_int8_with_auto_backend_considers_openvino(checkpoint_path, synthetic_volume, tmp_path):
    plan = plan_build(BuildConfig(checkpoint=checkpoint_path, out_dir=tmp_path / "e", precision="int8",
                                  parity_volume=synthetic_volume))
    assert Candidate("openvino", "int8") in plan.candidates


def test_explicit_bf16_with_auto_backend_means_openvino(checkpoint_path, tmp_path):
    config = BuildConfig(checkpoint=checkpoint_path, out_dir=tmp_path / "e", precision="bf16")
    if cpu_has_bf16():
        assert plan_build(config).candidates == (Candidate("openvino", "bf16"),)
    else:
        with pytest.raises(BuildError, match="openvino bf16: not supported on this machine"):
            plan_build(config)


def test_a_tolerance_without_a_precision_is_refused(checkpoint_path, tmp_path):
    strict = Tolerance(max_rel_logit_error=0.0, min_argmax_agreement=1.0)
    with pytest.raises(BuildError, match="tolerance"):
        plan_build(BuildConfig(checkpoint=checkpoint_path, out_dir=tmp_path / "e", tolerance=strict))
