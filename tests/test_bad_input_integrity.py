"""What runs is what was verified: the compiled-model cache, hash-then-open, leftovers and SIGTERM.

Hostile-input rows of issue 30's integrity and data-loss classes, through the real CLI (in-process
and, where a signal or a hang matters, in real `nnslim` processes) and the Python API:
- a compiled-model cache planted by another user, in a folder anyone can write, damaged, or
  replaced by a FIFO never changes a label (it is skipped or rebuilt, with a warning); a cache that
  cannot be created (read-only HOME) costs a compile, not the run;
- a model file swapped between the sha256 check and the open cannot run (the runtime gets the bytes
  that were hashed);
- a user's hidden files that look like nnslim's temporaries survive an infer and a build into their
  folder; a build stopped by SIGTERM leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner

from nnslim.compiler.cli import cli
from tests.test_bad_input import NNSLIM, TINY_MODEL, scan, snapshot

OTHER_UID = 12345  # "another user" (the tests run as root, which may chown)


def infer(engine: Path, image: Path, out: Path, *extra: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, ["infer", str(engine), str(image), "-o", str(out), "--backend", "openvino",
                                      *extra])
    return result.exit_code, result.output


def labels_of(path: Path) -> np.ndarray:
    return np.asarray(nib.load(path).dataobj)


def constant_class_blob(engine: Path) -> bytes:
    """A compiled OpenVINO model with the engine's input and output names that labels every voxel
    class 1: what a planted cache entry would make an engine run."""
    import openvino as ov
    from onnx import TensorProto, helper

    manifest = json.loads((engine / "manifest.json").read_text())
    channels = manifest["io"]["output"]["shape"][1]
    zero, one = (helper.make_tensor(n, TensorProto.FLOAT, [], [v]) for n, v in (("zero", 0.0), ("one", 1.0)))
    nodes = [helper.make_node("Mul", ["image", "zero"], ["z"]), helper.make_node("Add", ["z", "one"], ["o"]),
             helper.make_node("Concat", ["z", "o", *["z"] * (channels - 2)], ["logits"], axis=1)]
    graph = helper.make_graph(nodes, "planted", [helper.make_tensor_value_info("image", TensorProto.FLOAT,
                                                                               ["b", 1, "x", "y", "z"])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)], [zero, one])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    core = ov.Core()
    compiled = core.compile_model(core.read_model(model.SerializeToString()), "CPU")
    import io

    stream = io.BytesIO()
    compiled.export_model(stream)
    return stream.getvalue()


def plant(entry: Path, payload: bytes, key: str | None = None) -> None:
    """Replace a cache entry with a self-consistent one (the right header and sha256 for `payload`),
    written for `key` (default: the entry's own, as nnslim would write it)."""
    import hashlib

    key = key or entry.name.removesuffix(".entry")
    entry.write_bytes(f"nnslim-cache-entry 2 key={key} sha256={hashlib.sha256(payload).hexdigest()}\n".encode()
                      + payload)


@pytest.fixture
def cached(tiny_engine, tmp_path, monkeypatch):
    """An engine copy, a scan, its reference labels, and the OpenVINO cache entry that run wrote."""
    import shutil

    engine = tmp_path / "engine"
    shutil.copytree(tiny_engine, engine)
    monkeypatch.setenv("NNSLIM_CACHE", str(tmp_path / "cache"))
    image = scan(tmp_path / "s.nii.gz", shape=(24, 24, 24))
    code, output = infer(engine, image, tmp_path / "ref.nii.gz")
    assert code == 0, output
    (entry,) = (tmp_path / "cache" / "openvino").iterdir()
    return engine, image, labels_of(tmp_path / "ref.nii.gz"), entry


def test_a_planted_entry_of_this_user_in_a_private_cache_would_run_the_control(cached, tmp_path):
    """The control for the rows below: the planted blob does change the labels when it is trusted
    (this user could do anything anyway; the rows below are the cases where someone else planted it)."""
    engine, image, reference, entry = cached
    plant(entry, constant_class_blob(engine))
    code, output = infer(engine, image, tmp_path / "seg.nii.gz")
    assert code == 0, output
    assert np.all(labels_of(tmp_path / "seg.nii.gz") == 1) and not np.all(reference == 1)


@pytest.mark.parametrize("attack, warning", [
    ("folder writable by anyone", "is writable by other users (mode 0777)"),
    ("folder of another user", f"belongs to another user (uid {OTHER_UID})"),
    ("entry of another user", "not a regular file of this user"),
    ("flipped byte", "does not match the sha256"),
    ("one flipped bit", "does not match the sha256"),
    ("another key's entry linked here", "not the entry written for this key"),
    ("entry is a symlink", "symbolic link"),
    ("entry is a folder", "not a regular file"),
])
def test_a_planted_or_damaged_cache_never_changes_a_label(cached, tmp_path, attack, warning, caplog):
    engine, image, reference, entry = cached
    blob = constant_class_blob(engine)
    if attack == "folder writable by anyone":
        plant(entry, blob)
        os.chmod(entry.parent, 0o777)
    elif attack == "folder of another user":
        plant(entry, blob)
        os.chown(entry.parent, OTHER_UID, OTHER_UID)
    elif attack == "entry of another user":
        plant(entry, blob)
        os.chown(entry, OTHER_UID, OTHER_UID)
    elif attack in ("flipped byte", "one flipped bit"):
        data = bytearray(entry.read_bytes())
        data[len(data) // 2] ^= 0xFF if attack == "flipped byte" else 0x01
        entry.write_bytes(bytes(data))
    elif attack == "another key's entry linked here":  # another engine's compiled model, intact, under our key
        other = entry.with_name("0" * 64 + ".entry")
        plant(other, blob)
        entry.unlink()
        os.link(other, entry)
    elif attack == "entry is a symlink":
        plant(tmp_path / "elsewhere.entry", blob)
        entry.unlink()
        entry.symlink_to(tmp_path / "elsewhere.entry")
    else:
        entry.unlink()
        entry.mkdir()
    with caplog.at_level("WARNING"):
        code, output = infer(engine, image, tmp_path / "seg.nii.gz")
    assert code == 0, output
    np.testing.assert_array_equal(labels_of(tmp_path / "seg.nii.gz"), reference)
    assert warning in caplog.text


def test_a_fifo_in_place_of_a_cache_entry_does_not_hang_infer(cached, tmp_path):
    engine, image, reference, entry = cached
    entry.unlink()
    os.mkfifo(entry)
    done = subprocess.run([str(NNSLIM), "infer", str(engine), str(image), "-o", str(tmp_path / "seg.nii.gz"),
                           "--backend", "openvino"], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "NNSLIM_CACHE": str(tmp_path / "cache")})
    assert done.returncode == 0, done.stderr
    assert "not a regular file" in done.stderr
    np.testing.assert_array_equal(labels_of(tmp_path / "seg.nii.gz"), reference)


def test_a_cache_that_cannot_be_created_costs_a_compile_not_the_run(tiny_engine, tmp_path, monkeypatch, caplog):
    """A read-only or unusable HOME: one warning naming the cache and NNSLIM_CACHE, then the same labels."""
    home = tmp_path / "home-is-a-file"
    home.write_text("")
    monkeypatch.delenv("NNSLIM_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(home))
    image = scan(tmp_path / "s.nii.gz")
    with caplog.at_level("WARNING"):
        code, output = infer(tiny_engine, image, tmp_path / "seg.nii.gz")
    assert code == 0, output
    assert "not using the openvino cache: cannot create" in caplog.text and "NNSLIM_CACHE" in caplog.text
    assert labels_of(tmp_path / "seg.nii.gz").shape == (20, 20, 20)


@pytest.mark.parametrize("backend", ["openvino", "onnxruntime"])
def test_a_model_swapped_after_its_check_cannot_run(tiny_engine, tmp_path, monkeypatch, backend):
    """Hash, then open: the file is replaced right after `load_manifest` verified it (the window a
    racing attacker has); the runtime must refuse, not open the path again and run the foreign model."""
    import shutil

    import nnslim.compiler.runtime.engine as engine_module
    from nnslim.compiler.runtime.manifest import TamperedEngineError

    engine = tmp_path / "engine"
    shutil.copytree(tiny_engine, engine)
    model = engine / json.loads((engine / "manifest.json").read_text())["runtime_model"]
    foreign = model.read_bytes()[:-64] + b"\0" * 64
    verified = engine_module.load_manifest

    def verify_then_swap(*args, **kwargs):
        manifest = verified(*args, **kwargs)
        model.write_bytes(foreign)
        return manifest

    monkeypatch.setattr(engine_module, "load_manifest", verify_then_swap)
    with pytest.raises(TamperedEngineError, match="does not match the sha256"):
        engine_module.load_engine(engine, backend=backend)


def test_infer_keeps_a_users_hidden_files_that_look_like_temporaries(tiny_engine, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    user = [".brain.nii.gz.20240101.resample.nii.gz", ".seg.nii.gz.4194301.abcdefgh.nii.gz", ".seg.nii.gz.nnslim-x"]
    for name in user:
        (out / name).write_bytes(b"the user's")
    code, output = infer(tiny_engine, scan(tmp_path / "s.nii.gz"), out / "seg.nii.gz")
    assert code == 0, output
    assert sorted(p.name for p in out.iterdir()) == sorted([*user, "seg.nii.gz"])


def test_a_build_keeps_a_users_backup_that_looks_like_a_leftover(tiny_engine, tmp_path):
    backup = tmp_path / ".eng.old-2024"
    backup.mkdir()
    (backup / "model.onnx").write_bytes(b"the user's backup")
    (tmp_path / ".eng.building-1").mkdir()
    before = snapshot(tmp_path)
    result = CliRunner().invoke(cli, ["build-engine", str(TINY_MODEL), "--out", str(tmp_path / "eng"), "--patch", "32",
                                      "32", "32", "--parity-tiles", "1", "--precision", "fp32"])
    assert result.exit_code == 0, result.output
    after = snapshot(tmp_path)
    assert {k: v for k, v in after.items() if not k.startswith("eng")} == before


def test_a_build_stopped_by_sigterm_leaves_nothing_behind(tmp_path):
    """SIGTERM is handled like an exception: the staging folder goes, exit 143, one line on stderr."""
    child = subprocess.Popen([str(NNSLIM), "build-engine", str(TINY_MODEL), "--out", str(tmp_path / "eng"), "--patch",
                              "32", "32", "32", "--parity-tiles", "1", "--precision", "fp32"],
                             stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not any(p.name.startswith(".eng.building-") for p in tmp_path.iterdir()):
        assert child.poll() is None and time.monotonic() < deadline, "the build ended before it began staging"
        time.sleep(0.05)
    child.send_signal(signal.SIGTERM)
    _, stderr = child.communicate(timeout=60)
    assert child.returncode == 128 + signal.SIGTERM, stderr
    assert "stopped by SIGTERM" in stderr and "Traceback" not in stderr
    assert list(tmp_path.iterdir()) == []


def test_a_writer_killed_mid_write_is_swept_by_the_next_infer(tiny_engine, tmp_path):
    """SIGKILL cannot be handled: the next run into the folder removes the temporary by its marker."""
    out = tmp_path / "out"
    out.mkdir()
    code = (f"import os, signal\nfrom nnslim.files import atomic_path\n"
            f"with atomic_path({str(out / 'seg.nii.gz')!r}) as tmp:\n"
            f"    tmp.write_bytes(b'half')\n    os.kill(os.getpid(), signal.SIGKILL)\n")
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == -9
    assert len(list(out.iterdir())) == 1
    status, output = infer(tiny_engine, scan(tmp_path / "s.nii.gz"), out / "seg.nii.gz")
    assert status == 0, output
    assert [p.name for p in out.iterdir()] == ["seg.nii.gz"]


def test_load_engine_with_an_unusable_cache_still_opens(tiny_engine, monkeypatch, tmp_path):
    """The API counterpart of the cache rows: load_engine with an unusable cache opens the engine."""
    from nnslim.compiler.runtime.engine import load_engine

    monkeypatch.setenv("NNSLIM_CACHE", str(tmp_path / "a-file"))
    (tmp_path / "a-file").write_text("")
    engine = load_engine(tiny_engine, backend="openvino")
    assert engine.segment(np.ones((20, 20, 20), np.float32), "engine").shape == (20, 20, 20)
