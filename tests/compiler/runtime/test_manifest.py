"""The manifest schema and the integrity checks: an engine runs only what its manifest vouches for."""

import copy
import json
import math
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from nnslim.errors import EngineError
from nnslim.compiler.runtime.manifest import (
    FORMAT,
    MANIFEST,
    ManifestError,
    TamperedEngineError,
    load_manifest,
    manifest_digest,
    parse_manifest,
)
from nnslim.files import sha256_file


def tiny_onnx(path, external: str | None = None) -> None:
    """y = x + w, with `w` stored inline or as external data at `external` (relative to the model)."""
    weight = numpy_helper.from_array(np.ones((1, 1, 2, 2, 2), dtype=np.float32), "w")
    if external is not None:
        weight.ClearField("raw_data")
        weight.data_location = TensorProto.EXTERNAL
        weight.external_data.add(key="location", value=external)
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 2, 2, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 2, 2, 2])], [weight])
    onnx.save(helper.make_model(graph), str(path))


def base_manifest() -> dict:
    """A format-version-1 manifest as `build-engine` writes it (the fields the runtime reads)."""
    return {
        "format": FORMAT, "format_version": 1, "backend": "onnxruntime", "runtime_model": "model.opt.onnx",
        "io": {"input": {"name": "image", "dtype": "float32", "shape": ["batch", 1, 16, 16, 16]},
               "output": {"name": "logits", "dtype": "float32", "shape": ["batch", 3, 16, 16, 16]},
               "batch": {"min": 1, "opt": 2, "max": 2}},
        "preprocessing": {"normalization": {"scheme": "zscore", "mask": "nonzero"}, "spacing": [1.0, 1.0, 1.0],
                          "mirror_axes": [0, 1, 2], "resample": True},
        "labels": ["background", "grey", "white"], "postprocessing": {"kind": "argmax"},
        "build": {"command": "nnslim build-engine small.pt --out E"},
    }


def write_engine(directory, manifest=None, files=("model.opt.onnx",)):
    """A real engine directory: ONNX files plus a manifest listing them with their hashes."""
    directory.mkdir(exist_ok=True)
    for name in files:
        tiny_onnx(directory / name)
    manifest = manifest or base_manifest()
    manifest.setdefault("files", {n: {"sha256": sha256_file(directory / n), "bytes": (directory / n).stat().st_size}
                                  for n in files})
    (directory / MANIFEST).write_text(json.dumps(manifest))
    return directory


V1_MANIFEST = Path(__file__).parent / "data" / "manifest_v1.json"  # written by the build of commit 064318f


def test_a_format_version_1_manifest_as_first_released_still_parses():
    manifest = parse_manifest(json.loads(V1_MANIFEST.read_text()), V1_MANIFEST)
    assert (manifest.format_version, manifest.backend, manifest.runtime_model) == (1, "onnxruntime", "model.opt.onnx")
    assert manifest.io.patch_size == (32, 32, 32) and manifest.io.batch == (1, 2, 2) and manifest.mirror_axes == (0, 1, 2)
    assert manifest.labels == ("background", "grey_matter", "white_matter") and manifest.spacing == (1.0, 1.0, 1.0)
    assert sorted(manifest.files) == ["model.onnx", "model.opt.onnx", "report.md"]


def test_an_engine_from_the_current_build_loads_and_verifies(engine_dir):
    manifest = load_manifest(engine_dir)
    assert manifest.format_version == 1 and manifest.runtime_model in manifest.files
    assert manifest.io.patch_size == (16, 16, 16) and manifest.io.batch == (1, 2, 2)
    assert manifest.labels == ("background", "grey_matter", "white_matter") and manifest.io.num_classes == 3
    assert json.loads((engine_dir / MANIFEST).read_text())["files"].keys() == manifest.files.keys()


def test_every_manifest_written_so_far_reads_back_unchanged_through_the_record(engine_dir):
    """The record is the one form: a manifest parsed and written again is the same JSON (old and new)."""
    for raw in (json.loads(V1_MANIFEST.read_text()), json.loads((engine_dir / MANIFEST).read_text())):
        assert parse_manifest(raw).to_dict() == raw


def test_unknown_records_are_allowed_and_extra_runtime_models_are_verified(tmp_path):
    manifest = base_manifest()
    manifest.update(backends=["onnxruntime"], selection={"picked": "fp16"}, candidates=[{"name": "fp32"}],
                    runtime_models={"fp32": "model.opt.onnx", "fp16": {"file": "model.fp16.onnx", "precision": "fp16"}})
    write_engine(tmp_path / "e", manifest, files=("model.opt.onnx", "model.fp16.onnx"))
    loaded = load_manifest(tmp_path / "e")
    assert loaded.selection.extra == {"picked": "fp16"} and loaded.extra["backends"] == ["onnxruntime"]
    assert loaded.referenced_files() == ["model.opt.onnx", "model.fp16.onnx"]


def _set(manifest: dict, key: str, value) -> dict:
    manifest = copy.deepcopy(manifest)
    *parents, last = key.split(".")
    target = manifest
    for part in parents:
        target = target[part]
    if value is KeyError:
        del target[last]
    else:
        target[last] = value
    return manifest


GARBLED = [
    ("format", "something.else", "format 'something.else'"),
    ("format_version", 99, "version 99"),
    ("format_version", True, "version True"),
    ("io", KeyError, "lacks the required key `io.input.shape`"),
    ("io.input.shape", ["batch", 1, 0, 16, 16], "io.input.shape[2:]"),
    ("io.input.shape", ["batch", 1, 16, 16, 100000], "io.input.shape[2:]"),
    ("io.input.shape", ["batch", 1, 16, 16], "[batch, channels, x, y, z]"),
    ("io.input.shape", ["batch", True, 16, 16, 16], "io.input.shape[1]"),
    ("io.output.shape", ["batch", 3, 8, 8, 8], "the input's patch"),
    ("io.output.shape", ["batch", 0, 16, 16, 16], "io.output.shape[1]"),
    ("io.batch.min", 4, "min <= opt <= max"),
    ("io.batch.max", "2", "`io.batch.max` is \"2\", expected an integer"),
    ("labels", ["background", "grey"], "3 non-empty label names"),
    ("labels", "background", "`labels` is \"background\", expected a list"),
    ("preprocessing.spacing", [1.0, 0.0, 1.0], "voxel sizes in mm"),
    ("preprocessing.spacing", [1.0, math.nan, 1.0], "voxel sizes in mm"),
    ("preprocessing.spacing", [1.0, 1e9, 1.0], "voxel sizes in mm"),
    ("preprocessing.mirror_axes", [0, 3], "mirror_axes[]"),
    ("preprocessing.mirror_axes", [1, 1], "distinct axes"),
    ("preprocessing.normalization", KeyError, "preprocessing.normalization"),
    ("postprocessing", {"kind": "regions", "class_order": [1, 2]}, "one label value per output head (3)"),
    ("postprocessing", {"kind": "regions", "class_order": [1, 2, 300]}, "class_order[]"),
    ("postprocessing", {"kind": "softmax"}, "'argmax' or 'regions'"),
    ("runtime_model", 7, "`runtime_model` is 7, expected a string"),
]


@pytest.mark.parametrize("key, value, message", GARBLED, ids=[f"{k}={v!r}"[:40] for k, v, _ in GARBLED])
def test_a_garbled_manifest_is_one_clear_error(tmp_path, key, value, message):
    write_engine(tmp_path / "e", _set(base_manifest(), key, value))
    with pytest.raises(ManifestError, match=None) as raised:
        load_manifest(tmp_path / "e")
    assert message in str(raised.value) and "rebuild it" in str(raised.value)


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", "\"engine\"", "\xff\xfe"])
def test_undecodable_manifests(tmp_path, text):
    (tmp_path / MANIFEST).write_bytes(text.encode("latin-1"))
    with pytest.raises(ManifestError, match="not valid JSON|not a JSON object"):
        load_manifest(tmp_path)


def test_parse_manifest_accepts_regions_with_label_values():
    manifest = _set(base_manifest(), "postprocessing", {"kind": "regions", "class_order": [1, 2, 3]})
    assert parse_manifest({**manifest, "files": {}}).io.num_classes == 3


def _tamper(directory, change) -> None:
    manifest = json.loads((directory / MANIFEST).read_text())
    change(manifest)
    (directory / MANIFEST).write_text(json.dumps(manifest))


def test_tampered_engines_are_refused(tmp_path):
    foreign = tmp_path / "foreign.onnx"
    tiny_onnx(foreign)
    record = {"sha256": sha256_file(foreign), "bytes": foreign.stat().st_size}
    cases = {
        "absolute": lambda m: m.update(runtime_model=str(foreign)),
        "dotdot": lambda m: m.update(runtime_model="../foreign.onnx"),
        "dotdot listed": lambda m: (m.update(runtime_model="../foreign.onnx"), m["files"].update({"../foreign.onnx": record})),
        "unlisted": lambda m: m["files"].pop("model.opt.onnx"),
        "no files": lambda m: m.update(files={}),
        "bad hash": lambda m: m["files"]["model.opt.onnx"].update(sha256="0" * 64),
        "bad size": lambda m: m["files"]["model.opt.onnx"].update(bytes=1),
        "unlisted runtime_models": lambda m: m.update(runtime_models={"fp16": "report.md"}),
    }
    for name, change in cases.items():
        directory = write_engine(tmp_path / name.replace(" ", "_"))
        (directory / "report.md").write_text("report")
        _tamper(directory, change)
        with pytest.raises(TamperedEngineError, match="tampered|outside|not listed|missing") as raised:
            load_manifest(directory)
        assert "rebuild it" in str(raised.value), name


def test_a_symlink_out_of_the_engine_is_refused_even_with_the_right_hash(tmp_path):
    directory = write_engine(tmp_path / "e")
    foreign = tmp_path / "foreign.onnx"
    os.replace(directory / "model.opt.onnx", foreign)
    (directory / "model.opt.onnx").symlink_to(foreign)
    with pytest.raises(TamperedEngineError, match="outside the engine directory"):
        load_manifest(directory)


def test_external_data_must_be_listed(tmp_path):
    directory = tmp_path / "e"
    directory.mkdir()
    (tmp_path / "weights.bin").write_bytes(np.ones(8, dtype=np.float32).tobytes())
    tiny_onnx(directory / "model.opt.onnx", external="../weights.bin")
    write_engine(directory, files=())  # no listed files written by the helper
    _tamper(directory, lambda m: m.update(files={"model.opt.onnx": {
        "sha256": sha256_file(directory / "model.opt.onnx"), "bytes": (directory / "model.opt.onnx").stat().st_size}}))
    with pytest.raises(TamperedEngineError, match="not a file inside the engine directory"):
        load_manifest(directory)


def test_a_missing_listed_file_and_the_manifest_digest(tmp_path):
    directory = write_engine(tmp_path / "e")
    digest = manifest_digest(directory)
    assert digest == sha256_file(directory / MANIFEST)
    (directory / "model.opt.onnx").unlink()
    with pytest.raises(EngineError, match="missing"):
        load_manifest(directory)


def test_an_openvino_ir_needs_its_weights_listed(tmp_path):
    directory = write_engine(tmp_path / "e", files=("model.opt.onnx", "model.xml"))
    (directory / "model.bin").write_bytes(b"weights nobody vouched for")
    _tamper(directory, lambda m: m.update(runtime_models={"openvino": "model.xml"}))
    with pytest.raises(TamperedEngineError, match="model.bin holds the weights of model.xml but is not listed"):
        load_manifest(directory)


def test_the_runtime_fallbacks_of_an_auto_build_must_be_listed(tmp_path):
    directory = write_engine(tmp_path / "e", files=("model.opt.onnx", "model.fp16.onnx"))
    candidates = [{"backend": "onnxruntime", "precision": "fp16", "model": "model.fp16.onnx", "passed": True},
                  {"backend": "openvino", "precision": "int8", "model": "gone.onnx", "passed": False}]
    _tamper(directory, lambda m: m.update(selection={"candidates": candidates}))
    assert load_manifest(directory).referenced_files() == ["model.opt.onnx", "model.fp16.onnx"]
    candidates[1].update(passed=True, model="/elsewhere/foreign.onnx")
    _tamper(directory, lambda m: m.update(selection={"candidates": candidates}))
    with pytest.raises(TamperedEngineError, match="foreign.onnx"):
        load_manifest(directory)
