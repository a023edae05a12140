"""The TensorRT form of an engine, as a build on a GPU would leave it (no GPU needed to export it)."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest

PLAN_BYTES = b"not a real TensorRT plan: the export copies bytes, Triton's TensorRT reads them"


@pytest.fixture(scope="module")
def plan_engine(engine_dir, tmp_path_factory):
    """The same engine in TensorRT form, as a build on a GPU would leave it: `engine.plan` listed with
    its sha256, backend tensorrt, precision fp16, and the TensorRT record (no GPU needed to export it)."""
    out = tmp_path_factory.mktemp("triton-plan") / "small_plan"
    shutil.copytree(engine_dir, out)
    (out / "engine.plan").write_bytes(PLAN_BYTES)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest.update(backend="tensorrt", precision="fp16", runtime_model="engine.plan",
                    tensorrt={"version": "10.16.1.11", "gpu": "NVIDIA A10", "compute_capability": [8, 6]})
    manifest["files"]["engine.plan"] = {"sha256": hashlib.sha256(PLAN_BYTES).hexdigest(), "bytes": len(PLAN_BYTES)}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return out
