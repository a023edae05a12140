"""Hostile and careless inputs through the real `nnslim` CLI: one table, one set of properties.

Every row is a command a user could type, set up in a fresh folder beside a copy of one small
engine (built once per session from the bundled mni-tissue-tiny model). For every row:
- the exit code and a substring of the one-line message are as expected;
- nothing prints a traceback, and an error is one line `error: ...`;
- a refused command leaves the folder exactly as it was (no input modified, nothing written
  beside its target); an accepted one adds only its outputs.
Most rows run in-process through click's runner (same error boundary, seconds for all); a few
run in real `nnslim` subprocesses (marked slow) to check what a shell sees.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner

from nnslim.compiler.cli import cli
from tests.conftest import written

REPO = Path(__file__).resolve().parents[1]
TINY_MODEL = REPO / "artifacts" / "models" / "mni-tissue-tiny.pt"
NNSLIM = Path(sys.executable).parent / "nnslim"


# ---- synthetic inputs ---------------------------------------------------------------------------

def raw_nifti(path: Path, data: np.ndarray, zooms=(1.0, 1.0, 1.0)) -> Path:
    """A NIfTI file written byte by byte, so its header says exactly `zooms` (nibabel would 'fix' 0)."""
    header = nib.Nifti1Header()
    header.set_data_dtype(data.dtype)
    header.set_data_shape(data.shape)
    header["pixdim"][1:1 + len(zooms)] = zooms
    header["vox_offset"] = 352
    payload = header.binaryblock + b"\0" * 4 + np.asfortranarray(data).tobytes(order="F")
    path.write_bytes(gzip.compress(payload) if path.name.endswith(".gz") else payload)
    return path


def labels(path: Path, shape=(8, 8, 8)) -> Path:
    return raw_nifti(path, (np.arange(np.prod(shape)) % 3).reshape(shape).astype(np.uint8))


def scan(path: Path, shape=(20, 20, 20), zooms=(1.0, 1.0, 1.0), value: float | None = None) -> Path:
    data = np.random.default_rng(0).normal(100, 20, shape).astype(np.float32)
    if value is not None:
        data.flat[7] = value
    return raw_nifti(path, data, zooms)


def edit_manifest(engine: Path, change: Callable[[dict], object]) -> None:
    manifest = json.loads((engine / "manifest.json").read_text())
    change(manifest)
    (engine / "manifest.json").write_text(json.dumps(manifest))


def record(engine: Path, name: str) -> dict:
    path = engine / name
    return {"sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "bytes": path.stat().st_size}


class Evil:
    """A pickle that creates a file when unpickled: must never run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


# ---- the table ------------------------------------------------------------------------------------

@dataclass
class Case:
    id: str
    setup: Callable[[Path, Path], list]  # (folder, engine copy) -> argv
    exit_code: int
    message: str
    outputs: tuple[str, ...] = field(default=())  # files an accepted command adds (relative)


def _in_place_symlink(root, engine):
    (root / "seg.nii.gz").symlink_to(scan(root / "scan.nii.gz"))
    return ["infer", engine, root / "scan.nii.gz", "-o", root / "seg.nii.gz"]


def _in_place_hardlink(root, engine):
    os.link(scan(root / "scan.nii.gz"), root / "seg.nii.gz")
    return ["infer", engine, root / "scan.nii.gz", "-o", root / "seg.nii.gz"]


def _cases_folder(root, names=("a", "b", "c")):
    (root / "cases").mkdir()
    for name in names:
        scan(root / "cases" / f"{name}.nii.gz")
    return root / "cases"


def _existing_outputs(root, engine):
    folder = _cases_folder(root)
    (root / "out").mkdir()
    (root / "out" / "a.nii.gz").write_bytes(b"yesterday's result")
    return ["infer", engine, folder, "-o", root / "out"]


def _foreign_model(root, engine, name):
    shutil.copy(engine / "model.opt.onnx", root / "foreign.onnx")
    edit_manifest(engine, lambda m: m.update(runtime_model=name))
    return ["infer", engine, scan(root / "scan.nii.gz"), "-o", root / "seg.nii.gz"]


def _unlisted_model(root, engine):
    shutil.copy(engine / "model.opt.onnx", engine / "other.onnx")
    edit_manifest(engine, lambda m: m.update(runtime_model="other.onnx"))
    return ["infer", engine, scan(root / "scan.nii.gz"), "-o", root / "seg.nii.gz"]


def _symlinked_model(root, engine):
    os.replace(engine / "model.opt.onnx", root / "elsewhere.onnx")
    (engine / "model.opt.onnx").symlink_to(root / "elsewhere.onnx")
    return ["infer", engine, scan(root / "scan.nii.gz"), "-o", root / "seg.nii.gz"]


def _flipped_byte(root, engine):
    data = bytearray((engine / "model.opt.onnx").read_bytes())
    data[-10] ^= 0xFF
    (engine / "model.opt.onnx").write_bytes(bytes(data))
    return ["infer", engine, scan(root / "scan.nii.gz"), "-o", root / "seg.nii.gz"]


def _manifest_edit(change):
    def setup(root, engine):
        edit_manifest(engine, change)
        return ["infer", engine, scan(root / "scan.nii.gz"), "-o", root / "seg.nii.gz"]
    return setup


def _manifest_text(text):
    def setup(root, engine):
        (engine / "manifest.json").write_text(text)
        return ["infer", engine, scan(root / "scan.nii.gz"), "-o", root / "seg.nii.gz"]
    return setup


def _infer_on(make):
    return lambda root, engine: ["infer", engine, make(root), "-o", root / "seg.nii.gz"]


def _build_into(prepare):
    def setup(root, engine):
        out = prepare(root)
        return ["build-engine", TINY_MODEL, "--out", out, "--patch", "32", "32", "32", "--parity-tiles", "1",
                "--precision", "fp32"]
    return setup


def _user_folder(root):
    (root / "work").mkdir()
    (root / "work" / "thesis.tex").write_text("years of work")
    (root / "work" / "manifest.json").write_text('{"name": "my web app"}')
    return root / "work"


def _engine_plus_user_file(root):
    shutil.copytree(root / "engine", root / "old")
    (root / "old" / "notes.txt").write_text("mine")
    return root / "old"


def _out_holds_checkpoint(root):
    (root / "proj").mkdir()
    return root / "proj"


def _evil_checkpoint(root, engine):
    import torch

    torch.save({"format": "nnslim.checkpoint", "payload": Evil(root / "pwned")}, root / "evil.pt")
    return ["build-engine", root / "evil.pt", "--out", root / "e2"]


TAMPERED = "tampered with or damaged"
CASES = [
    # data loss
    Case("infer -o is the input", _infer_on(lambda r: scan(r / "seg.nii.gz")) , 1, "would overwrite the scan"),
    Case("infer -o symlink to input", _in_place_symlink, 1, "is the input"),
    Case("infer -o hard link to input", _in_place_hardlink, 1, "is the input"),
    Case("infer folder -o same folder", lambda r, e: ["infer", e, _cases_folder(r), "-o", r / "cases"], 1,
         "is the input folder"),
    Case("infer folder, outputs exist", _existing_outputs, 1, "1 of 3 outputs already exist"),
    Case("infer -o is a directory", lambda r, e: ["infer", e, scan(r / "s.nii.gz"), "-o", r], 1, "is a folder"),
    Case("build --out user folder", _build_into(_user_folder), 1, "--overwrite"),
    Case("build --out engine + user file", _build_into(_engine_plus_user_file), 1, "not an nnslim engine"),
    Case("build --out is a file", _build_into(lambda r: scan(r / "x.nii.gz")), 2, "is a file"),
    Case("build --out holds the checkpoint",
         lambda r, e: ["build-engine", shutil.copy(TINY_MODEL, _out_holds_checkpoint(r) / "m.pt"), "--out", r / "proj"],
         1, "contains"),
    Case("evaluate --json is the reference", lambda r, e: ["evaluate", labels(r / "seg.nii.gz"),
         labels(r / "gt.nii.gz"), "--json", r / "gt.nii.gz"], 1, "is the reference of this command"),
    Case("evaluate --json links to the mask", lambda r, e: ["evaluate", labels(r / "seg.nii.gz"),
         labels(r / "gt.nii.gz"), "--mask", labels(r / "m.nii.gz"), "--json",
         (r / "j.json").symlink_to(r / "m.nii.gz") or r / "j.json"], 1, "is the mask of this command"),
    # integrity
    Case("runtime_model absolute", lambda r, e: _foreign_model(r, e, str(r / "foreign.onnx")), 1, TAMPERED),
    Case("runtime_model ../", lambda r, e: _foreign_model(r, e, "../foreign.onnx"), 1, TAMPERED),
    Case("runtime_model unlisted", _unlisted_model, 1, "not listed"),
    Case("files {}", _manifest_edit(lambda m: m.update(files={})), 1, "lists no files"),
    Case("model byte flipped", _flipped_byte, 1, "does not match the sha256"),
    Case("model symlinked outside", _symlinked_model, 1, "outside the engine directory"),
    Case("files entry ../", _manifest_edit(lambda m: m["files"].update({"../x": m["files"]["report.md"]})), 1, TAMPERED),
    Case("inspect tampered", lambda r, e: ["inspect", e] if _flipped_byte(r, e) else [], 1, "tampered"),
    # garbled manifests
    Case("manifest not JSON", _manifest_text("{garbled"), 1, "not valid JSON"),
    Case("manifest a list", _manifest_text("[]"), 1, "not a JSON object"),
    Case("manifest format v99", _manifest_edit(lambda m: m.update(format_version=99)), 1, "version 99"),
    Case("manifest without io", _manifest_edit(lambda m: m.pop("io")), 1, "lacks the required key"),
    Case("manifest patch 0", _manifest_edit(lambda m: m["io"]["input"].update(shape=["batch", 1, 0, 32, 32])), 1,
         "io.input.shape"),
    Case("manifest batch -1", _manifest_edit(lambda m: m["io"]["batch"].update(max=-1)), 1, "io.batch.max"),
    Case("manifest spacing 0", _manifest_edit(lambda m: m["preprocessing"].update(spacing=[0, 1, 1])), 1,
         "preprocessing.spacing"),
    Case("manifest mirror axis 5", _manifest_edit(lambda m: m["preprocessing"].update(mirror_axes=[5])), 1,
         "mirror_axes"),
    Case("manifest labels vs classes", _manifest_edit(lambda m: m.update(labels=["background"])), 1,
         "3 non-empty label names"),
    Case("manifest class_order outside", _manifest_edit(lambda m: m.update(
        postprocessing={"kind": "regions", "class_order": [1, 2, 999]})), 1, "class_order"),
    Case("engine without manifest", lambda r, e: ["infer", e, scan(r / "s.nii.gz"), "-o", r / "seg.nii.gz"]
         if (e / "manifest.json").unlink() is None else [], 1, "has no manifest.json"),
    # input volumes
    Case("NaN voxels", _infer_on(lambda r: scan(r / "s.nii.gz", value=np.nan)), 1, "NaN or infinite"),
    Case("intensity 3e38", _infer_on(lambda r: scan(r / "s.nii.gz", value=3e38)), 1, "overflows"),
    Case("voxel size 0", _infer_on(lambda r: scan(r / "s.nii.gz", zooms=(1, 0, 1))), 1, "voxel size"),
    Case("voxel size NaN", _infer_on(lambda r: scan(r / "s.nii.gz", zooms=(1, np.nan, 1))), 1, "voxel size"),
    Case("voxel size 1e30", _infer_on(lambda r: scan(r / "s.nii.gz", zooms=(1, 1e30, 1))), 1, "voxel size"),
    Case("voxel size 1e-5", _infer_on(lambda r: scan(r / "s.nii.gz", zooms=(1e-5, 1, 1))), 1, "resamples to 0"),
    Case("voxel size 900 mm", _infer_on(lambda r: scan(r / "s.nii.gz", zooms=(900, 900, 900))), 1,
         "would need about"),
    Case("gzip-bomb header", _infer_on(lambda r: _bomb(r)), 1, "would need about"),
    Case("truncated file", _infer_on(lambda r: _truncated(r)), 1, "cannot read"),
    Case("not a NIfTI", _infer_on(lambda r: _text_file(r)), 1, "cannot read"),
    Case("2D image", _infer_on(lambda r: scan(r / "s.nii.gz", shape=(20, 20), zooms=(1, 1))), 1, "2 dimensions"),
    Case("two channels for one", _infer_on(lambda r: raw_nifti(r / "s.nii.gz", np.ones((8, 8, 8, 2), np.float32))),
         1, "gives 2 channel"),
    Case("empty folder", lambda r, e: ["infer", e, (r / "empty").mkdir() or r / "empty", "-o", r / "out"], 1,
         "no volumes in"),
    Case("missing input", lambda r, e: ["infer", e, r / "nope.nii.gz", "-o", r / "seg.nii.gz"], 2, "does not exist"),
    Case("malicious pickle checkpoint", _evil_checkpoint, 1, "checkpoint"),
    # accepted
    Case("ok: one scan", _infer_on(lambda r: scan(r / "s.nii.gz")), 0, "seg.nii.gz", outputs=("seg.nii.gz",)),
    Case("ok: folder", lambda r, e: ["infer", e, _cases_folder(r, ("a", "b")), "-o", r / "out"], 0, "b.nii.gz",
         outputs=("out/a.nii.gz", "out/b.nii.gz", "out/run.json", "out/.nnslim/a.nii.gz.json",
                  "out/.nnslim/b.nii.gz.json")),
    Case("ok: unknown manifest records", _manifest_edit(lambda m: m.update(
        backends=["onnxruntime"], selection={"precision": "fp32"}, candidates=[])), 0, "seg.nii.gz",
        outputs=("seg.nii.gz",)),
    Case("ok: inspect", lambda r, e: ["inspect", e], 0, "model.opt.onnx"),
    Case("ok: evaluate --json", lambda r, e: ["evaluate", labels(r / "seg.nii.gz"), labels(r / "gt.nii.gz"),
         "--json", r / "dice.json"], 0, "voxel agreement", outputs=("dice.json",)),
]


def _bomb(root: Path) -> Path:
    """A header that claims 4096^3 voxels over a few bytes of data."""
    header = nib.Nifti1Header()
    header.set_data_dtype(np.uint8)
    header.set_data_shape((4096, 4096, 4096))
    header["vox_offset"] = 352
    path = root / "bomb.nii.gz"
    path.write_bytes(gzip.compress(header.binaryblock + b"\0" * 68))
    return path


def _truncated(root: Path) -> Path:
    path = scan(root / "t.nii.gz")
    path.write_bytes(path.read_bytes()[:400])
    return path


def _text_file(root: Path) -> Path:
    path = root / "notes.nii.gz"
    path.write_text("this is not an image")
    return path


def snapshot(root: Path) -> dict[str, str]:
    """Every entry under `root`: file hashes, link targets (a changed or added entry shows up)."""
    entries = {}
    for path in sorted(root.rglob("*")):
        key = path.relative_to(root).as_posix()
        if path.is_symlink():
            entries[key] = f"-> {os.readlink(path)}"
        elif path.is_file():
            entries[key] = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            entries[key] = "dir"
    return entries


def prepare(case: Case, root: Path, engine: Path) -> list[str]:
    shutil.copytree(engine, root / "engine")
    argv = [str(a) for a in case.setup(root, root / "engine")]
    return argv


def check(case: Case, before: dict, after: dict, exit_code: int, output: str) -> None:
    assert exit_code == case.exit_code, output
    assert "Traceback" not in output and "internal error" not in output, output
    assert case.message in output, output
    if exit_code == 1:
        lines = [line for line in output.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: "), output
    if exit_code:
        assert after == before, {k: after.get(k) for k in set(after) ^ set(before)}
    else:
        added = set(after) - set(before)
        assert {k for k in added if not k.endswith("/") and after[k] != "dir"} == set(case.outputs), added
        assert all(after[k] == v for k, v in before.items()), "an input changed"


def run_in_process(case: Case, engine: Path, tmp_path: Path, monkeypatch) -> str:
    """One row through the real CLI in this process (click's runner, the same error boundary), in a
    fresh folder beside a copy of `engine`, checked by `check`; returns what it printed. Every
    hostile-input file runs its rows through this."""
    root = tmp_path / "case"
    root.mkdir()
    argv = prepare(case, root, engine)
    monkeypatch.chdir(root)
    before = snapshot(root)
    result = CliRunner().invoke(cli, argv)
    check(case, before, snapshot(root), result.exit_code, result.output)
    assert not (root / "pwned").exists()
    return result.output


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_input_in_process(case, tiny_engine, tmp_path, monkeypatch):
    run_in_process(case, tiny_engine, tmp_path, monkeypatch)


SUBPROCESS_CASES = ["infer -o is the input", "runtime_model absolute", "gzip-bomb header", "build --out user folder",
                    "ok: one scan"]


@pytest.mark.slow
@pytest.mark.parametrize("case", [c for c in CASES if c.id in SUBPROCESS_CASES], ids=SUBPROCESS_CASES)
def test_hostile_input_in_a_real_process(case, tiny_engine, tmp_path):
    root = tmp_path / "case"
    root.mkdir()
    argv = prepare(case, root, tiny_engine)
    before = snapshot(root)
    done = subprocess.run([str(NNSLIM), *argv], cwd=root, capture_output=True, text=True, timeout=300)
    output = done.stdout if done.returncode == 0 else done.stderr
    check(case, before, snapshot(root), done.returncode, output)


def test_folder_mode_existing_outputs_overwrite_or_continue(tiny_engine, tmp_path, caplog):
    from nnslim.compiler.runtime.engine import InferenceOptions, load_engine
    from nnslim.compiler.runtime.cases.run import segment_files

    folder = _cases_folder(tmp_path, ("a", "b"))
    out = tmp_path / "out"
    out.mkdir()
    (out / "a.nii.gz").write_bytes(b"old")
    engine = load_engine(tiny_engine, threads=1)
    options = InferenceOptions(progress=False)
    done = segment_files(engine, [folder], out, options, existing="continue")
    assert [r.output.name for r in done] == ["b.nii.gz"] and (out / "a.nii.gz").read_bytes() == b"old"
    with caplog.at_level("WARNING"):
        done = segment_files(engine, [folder], out, options, existing="overwrite")
    assert len(done) == 2 and nib.load(out / "a.nii.gz").shape == (20, 20, 20)
    assert "replacing the existing output" in caplog.text and "a.nii.gz" in caplog.text
    assert written(out) == ["a.nii.gz", "b.nii.gz"]


@pytest.mark.slow
def test_rebuilding_over_an_engine_replaces_it_and_sweeps_dead_leftovers(tiny_engine, tmp_path):
    """A build killed by SIGKILL leaves its marked staging folder; the next build removes it, and keeps
    a user's folder named like one (`.engine.building-PID` of a dead process, but no marker)."""
    out = tmp_path / "engine"
    shutil.copytree(tiny_engine, out)
    script = ("import os, signal, sys\nfrom nnslim.files import staging_folder\n"
              "with staging_folder(sys.argv[1], 'building') as staging:\n"
              "    (staging / 'model.onnx').write_bytes(b'half')\n    os.kill(os.getpid(), signal.SIGKILL)\n")
    killed = subprocess.run([sys.executable, "-c", script, str(out)], timeout=60)
    assert killed.returncode == -9 and len(list(tmp_path.iterdir())) == 2
    users = tmp_path / ".engine.building-4194301"
    users.mkdir()
    (users / "notes.txt").write_bytes(b"the user's")
    done = subprocess.run([str(NNSLIM), "build-engine", str(TINY_MODEL), "--out", str(out), "--patch", "32", "32", "32",
                           "--parity-tiles", "1", "--precision", "fp32"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == [users.name, "engine"]
    assert json.loads((out / "manifest.json").read_text())["created"] >= json.loads(
        (tiny_engine / "manifest.json").read_text())["created"]
