"""Hostile and careless build inputs (issue 30, the build's part): the hostile-input table's rows for
`build-engine`, and the same classes through the Python API (`build_engine`).

- privacy: nothing the build ships (engine directory, report.md, a Triton export) names the folders
  of the scans or checkpoint it was built from;
- data loss: `--out` may contain no input of the build, even with --overwrite;
- the build never writes an engine its own runtime refuses, and says which setting is wrong;
- absurd sizes (--patch, --batch, --parity-tiles) are refused before anything is allocated.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from nnslim.training.checkpoint import save_checkpoint
from tests.conftest import metadata, random_model
from tests.test_bad_input import Case, NNSLIM, TINY_MODEL, run_in_process, scan, snapshot

PATIENT = "Doe_John_1957-03-02_MRN4471123"  # a folder named like a patient identifier
FAST = ["--patch", "32", "32", "32", "--parity-tiles", "1", "--precision", "fp32"]


def _checkpoint(path: Path, **changes) -> Path:
    """The small random U-Net (patch 16) with `changes` to its metadata."""
    return save_checkpoint(path, random_model(), {**metadata(), **changes})


def _work(root: Path) -> Path:
    (root / "work").mkdir()
    return root / "work"


def _build_over_work(*options: str, make=lambda work: []):
    """`build-engine --out work --overwrite ...`, where `make(work)` puts inputs inside `work`."""
    def setup(root, engine):
        work = _work(root)
        return ["build-engine", TINY_MODEL, "--out", work, "--overwrite", *FAST, *options, *make(work)]
    return setup


def _build_small(checkpoint_changes: dict, *options: str):
    def setup(root, engine):
        return ["build-engine", _checkpoint(root / "m.pt", **checkpoint_changes), "--out", root / "e",
                "--parity-tiles", "1", "--precision", "fp32", "--no-pass-parity", *options]
    return setup


CASES = [
    # data loss: every input of a build is protected under --overwrite
    Case("build --overwrite, --out holds the parity volume",
         _build_over_work(make=lambda w: ["--parity-volume", scan(w / "scan.nii.gz")]), 1, "contains"),
    Case("build --overwrite, --out holds a calibration volume",
         _build_over_work("--precision", "int8", make=lambda w: ["--calibration", scan(w / "cal.nii.gz")]), 1,
         "contains"),
    Case("build --overwrite, --out holds the timing cache",
         _build_over_work(make=lambda w: ["--timing-cache", (w / "trt.cache").write_bytes(b"t") and w / "trt.cache"]),
         1, "contains"),
    Case("build --overwrite, --out holds the plan cache",
         _build_over_work(make=lambda w: ["--engine-cache", (w / "cache").mkdir() or w / "cache"]), 1, "contains"),
    # the build writes no engine its runtime refuses
    Case("build label_names 'x'", _build_small({"label_names": "x"}), 1, "label_names is 'x'"),
    Case("build --batch 100000", _build_small({}, "--batch", "100000"), 2, "--batch"),
    Case("build mirror axis 5 (read back)", _build_small({"mirror_axes": [5]}), 1,
         "the engine was not written: nnslim's runtime would refuse it"),
    # absurd sizes: refused before anything is allocated
    Case("build --patch 2048", lambda r, e: ["build-engine", TINY_MODEL, "--out", r / "e", "--patch", "2048", "2048",
                                             "2048"], 2, "--patch"),
    Case("build --parity-tiles 1000000", lambda r, e: ["build-engine", TINY_MODEL, "--out", r / "e", *FAST[:4],
                                                       "--parity-tiles", "1000000"], 1, "would need about"),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_build_input_in_process(case, tiny_engine, tmp_path, monkeypatch):
    run_in_process(case, tiny_engine, tmp_path, monkeypatch)


# ---- privacy ---------------------------------------------------------------------------------------

def _leaks(folder: Path, secrets: list[str]) -> list[str]:
    """'file: secret' for every file under `folder` whose raw bytes (or name) contain a secret."""
    found = []
    for path in sorted(folder.rglob("*")):
        data = path.read_bytes() if path.is_file() else b""
        found += [f"{path}: {s}" for s in secrets if s.encode() in data or s in str(path.relative_to(folder))]
    return found


def _patient_inputs(root: Path) -> tuple[Path, Path, Path]:
    patient = root / PATIENT
    patient.mkdir()
    return _checkpoint(patient / "model.pt"), scan(patient / "scan.nii.gz", (40, 40, 40)), scan(
        patient / "cal.nii.gz", (40, 40, 40))


def test_nothing_shipped_names_the_patient_folder(tmp_path):
    """A real `nnslim` process (its argv is recorded too): checkpoint, parity and int8 calibration scans in
    a folder named like a patient; neither that name nor the test's temporary folders appear in any
    byte of the engine, its report, or its Triton export."""
    checkpoint, volume, calibration = _patient_inputs(tmp_path)
    engine, repository = tmp_path / "engines" / "brain", tmp_path / "triton"
    run = [str(NNSLIM), "build-engine", str(checkpoint), "--out", str(engine), "--parity-volume", str(volume),
           "--calibration", str(calibration), "--parity-tiles", "1", "--calibration-tiles", "1",
           "--precision", "int8", "--backend", "onnxruntime", "--no-pass-parity"]
    for argv in (run, [str(NNSLIM), "export-triton", str(engine), str(repository)]):
        done = subprocess.run(argv, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr
    secrets = [PATIENT, tmp_path.name, tmp_path.parent.name, str(tmp_path)]
    assert (engine / "report.md").is_file() and (repository / "brain" / "nnslim_manifest.json").is_file()
    assert _leaks(engine, secrets) == [] and _leaks(repository, secrets) == []
    text = (engine / "manifest.json").read_text()
    assert '"checkpoint": "model.pt"' in text and "crops of scan.nii.gz" in text and "cal.nii.gz" in text


def test_api_build_records_names_not_folders(tmp_path):
    from nnslim.compiler.stages.engine_manifest import shipped_argv
    from nnslim.compiler.stages.pipeline import BuildConfig, build_engine

    checkpoint, volume, _ = _patient_inputs(tmp_path)
    out = tmp_path / "engine"
    result = build_engine(BuildConfig(checkpoint=checkpoint, out_dir=out, parity_volume=volume, parity_tiles=1,
                                      precision="fp32", pass_parity=False))
    assert _leaks(out, [PATIENT, tmp_path.name]) == []
    assert result.manifest.source["checkpoint"] == "model.pt"
    assert result.manifest.build["command"].startswith("nnslim build-engine model.pt --out engine ")
    assert shipped_argv(["/usr/bin/nnslim", f"/x/{PATIENT}/m.pt", f"--out=/x/{PATIENT}/e", "--batch", "2"]) == [
        "nnslim", "m.pt", "--out=e", "--batch", "2"]


# ---- the same classes through the Python API -------------------------------------------------------

def _config(checkpoint: Path, out: Path, **fields):
    from nnslim.compiler.stages.pipeline import BuildConfig

    return BuildConfig(**{"checkpoint": checkpoint, "out_dir": out, "parity_tiles": 1, "precision": "fp32",
                          "pass_parity": False, **fields})


@pytest.mark.parametrize("field", ["parity_volume", "calibration", "timing_cache", "engine_cache"])
def test_api_overwrite_keeps_every_input(field, tmp_path):
    from nnslim.compiler.stages.engine_dir import EngineDirError
    from nnslim.compiler.stages.pipeline import build_engine

    checkpoint, work = _checkpoint(tmp_path / "m.pt"), _work(tmp_path)
    inside = {"parity_volume": lambda: scan(work / "scan.nii.gz"), "calibration": lambda: (scan(work / "c.nii.gz"),),
              "timing_cache": lambda: (work / "trt.cache").write_bytes(b"t") and work / "trt.cache",
              "engine_cache": lambda: (work / "cache").mkdir() or work / "cache"}[field]()
    before = snapshot(tmp_path)
    with pytest.raises(EngineDirError, match="contains"):
        build_engine(_config(checkpoint, work, overwrite=True, **{field: inside}))
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("changes, fields, message", [
    ({"label_names": "x"}, {}, "label_names is 'x', but its network has 3 classes"),
    ({"label_names": ["a", "", "c"]}, {}, "3 non-empty names"),
    ({}, {"batch_size": 100_000}, r"--batch must be in \[1, 4096\]"),
    ({"mirror_axes": [5]}, {}, r"the engine was not written: .*mirror_axes"),
    ({}, {"patch_size": (2048, 2048, 2048)}, r"patch must be three sizes in \[1, 1024\]"),
])
def test_api_build_refuses_what_its_runtime_would(changes, fields, message, tmp_path):
    from nnslim.compiler.stages.pipeline import BuildError, build_engine

    with pytest.raises(BuildError, match=message) as caught:
        build_engine(_config(_checkpoint(tmp_path / "m.pt", **changes), tmp_path / "e", **fields))
    assert "rebuild it" not in str(caught.value) and ".e.building" not in str(caught.value)
    assert sorted(os.listdir(tmp_path)) == ["m.pt"]  # no engine, no staging folder left


def test_api_absurd_tile_count_refused_before_allocation(tmp_path):
    from nnslim.compiler.stages.pipeline import build_engine
    from nnslim.errors import InputError

    with pytest.raises(InputError, match="1000000 parity tile.*would need about"):
        build_engine(_config(_checkpoint(tmp_path / "m.pt"), tmp_path / "e", parity_tiles=1_000_000))
    assert sorted(os.listdir(tmp_path)) == ["m.pt"]
