"""Hostile input on the infer side (issue 30): flags that contradict or do nothing, failed cases under
--overwrite, odd volumes (complex voxels, a scaled or sheared direction), case names that forge lines,
--threads, --engine-sha256, a partial last line in --log-jsonl and symlink loops in an input folder.

The rows run through the same in-process runner and properties as `tests/test_bad_input.py`; the
classes whose outcome is more than one refusal (a folder where some cases run) have tests of their
own below, and each class has a Python API counterpart.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from nnslim.compiler.cli import cli
from tests.conftest import written
from nnslim.errors import InputError, SettingsError
from tests.test_bad_input import Case, raw_nifti, run_in_process, scan

FORGED = "b: done, 1 of 1 windows (1 network calls)"  # a line a file name could forge (no "/")


def _folder(root: Path, names=("a", "b", "c")) -> Path:
    (root / "cases").mkdir()
    for name in names:
        scan(root / "cases" / f"{name}.nii.gz")
    return root / "cases"


def _infer(root: Path, engine: Path, *extra) -> list:
    return ["infer", engine, scan(root / "s.nii.gz"), "-o", root / "seg.nii.gz", *extra]


def _infer_folder(*extra, names=("a", "b", "c")):
    return lambda root, engine: ["infer", engine, _folder(root, names), "-o", root / "out", *extra]


def _complex_nifti(root: Path) -> Path:
    data = np.random.default_rng(0).normal(100, 20, (20, 20, 20)) * (1 + 1j)
    return raw_nifti(root / "complex.nii.gz", data.astype(np.complex64))


def _sitk_image(path: Path, direction) -> Path:
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(np.random.default_rng(0).normal(100, 20, (20, 20, 20)).astype(np.float32))
    image.SetDirection(direction)
    sitk.WriteImage(image, str(path))
    return path


def _checkpoint(root: Path) -> Path:
    path = root / "model.pt"
    path.write_bytes(b"never read: the options are refused first")
    return path


def _loop(path: Path) -> Path:
    path.symlink_to(path.name)
    return path


def _symlink_loop_folder(root: Path) -> Path:
    (root / "cases").mkdir()
    _loop(root / "cases" / "loop.nii.gz")
    return root / "cases"


def _newline_folder(root: Path) -> Path:
    (root / "cases").mkdir()
    scan(root / "cases" / f"x\n{FORGED}.nii.gz")
    return root / "cases"


CASES = [
    # contradictory or idle flags: usage errors naming both
    Case("--overwrite with --continue", _infer_folder("--overwrite", "--continue"), 2, "--overwrite and --continue"),
    Case("part with no case", _infer_folder("--num-parts", "10", "--part-id", "7"), 2, "holds 3 case(s), so part 7 of 10"),
    Case("--part-id outside --num-parts", _infer_folder("--num-parts", "2", "--part-id", "2"), 2,
         "--part-id must be in 0..1"),
    Case("one case with --continue", lambda r, e: _infer(r, e, "--continue"), 2, "--continue"),
    Case("one case with --num-parts", lambda r, e: _infer(r, e, "--num-parts", "2", "--part-id", "1"), 2,
         "--num-parts 2 --part-id 1 split a folder"),
    Case("one case with --io-workers", lambda r, e: _infer(r, e, "--io-workers", "4"), 2, "--io-workers 4"),
    Case("--roi-threshold without --skip roi", lambda r, e: _infer(r, e, "--roi-threshold", "5"), 2,
         "--roi-threshold 5 does nothing without --skip roi"),
    Case("--ort-tensorrt without --device cuda", lambda r, e: _infer(r, e, "--ort-tensorrt"), 2,
         "--ort-tensorrt does nothing without --device cuda"),
    Case("--torch-checkpoint with --backend", lambda r, e: _infer(r, e, "--torch-checkpoint", _checkpoint(r),
         "--backend", "onnxruntime"), 2, "--backend onnxruntime does nothing with --torch-checkpoint"),
    # numbers the runtime cannot take
    Case("--threads 100000", lambda r, e: _infer(r, e, "--threads", "100000"), 2, "got 100000"),
    Case("--engine-sha256 not hex", lambda r, e: _infer(r, e, "--engine-sha256", "abc123"), 2,
         "64 hexadecimal characters"),
    # odd volumes
    Case("complex NIfTI", lambda r, e: ["infer", e, _complex_nifti(r), "-o", r / "seg.nii.gz"], 1,
         "holds complex voxels (complex64)"),
    Case("scaled .mha direction", lambda r, e: ["infer", e, _sitk_image(r / "s.mha", (2, 0, 0, 0, 1, 0, 0, 0, 1)),
         "-o", r / "seg.mha"], 1, "direction matrix [[2, 0, 0], [0, 1, 0], [0, 0, 1]], which is not orthonormal"),
    Case("sheared .nrrd direction", lambda r, e: ["infer", e, _sitk_image(r / "s.nrrd", (1, 0.3, 0, 0, 1, 0, 0, 0, 1)),
         "-o", r / "seg.nrrd"], 1, "not orthonormal"),
    # names and links in folders
    Case("newline in a case name", lambda r, e: ["infer", e, _newline_folder(r), "-o", r / "out"], 4,
         "'x\\nb: done, 1 of 1 windows"),
    Case("newline in a single input name", lambda r, e: ["infer", e, scan(r / "a\nb.nii.gz"), "-o",
         r / "seg.nii.gz"], 1, "'a\\nb.nii.gz' holds control characters"),
    Case("symlink loop in a folder", lambda r, e: ["infer", e, _symlink_loop_folder(r), "-o", r / "out"], 4,
         "loops back on itself"),
    Case("--log-jsonl a symlink loop", lambda r, e: _infer(r, e, "--log-jsonl", _loop(r / "log.jsonl")), 1,
         "log.jsonl is a symbolic link that loops back on itself"),
    # accepted
    Case("ok: a part of a folder", _infer_folder("--num-parts", "2", "--part-id", "1"), 0, "b.nii.gz",
         outputs=("out/b.nii.gz", "out/run-part1.json", "out/.nnslim/b.nii.gz.json")),
    Case("ok: --threads 1 --engine-sha256 in capitals", lambda r, e: _infer(
        r, e, "--threads", "1", "--engine-sha256", _digest(e).upper()), 0, "seg.nii.gz", outputs=("seg.nii.gz",)),
]


def _digest(engine: Path) -> str:
    import hashlib

    return hashlib.sha256((engine / "manifest.json").read_bytes()).hexdigest()


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_input_in_process(case, tiny_engine, tmp_path, monkeypatch):
    output = run_in_process(case, tiny_engine, tmp_path, monkeypatch)
    assert not any(line.startswith(FORGED) for line in output.splitlines()), output  # no forged line


# ---- a case that fails under --overwrite ----------------------------------------------------------

def _folder_with_a_failing_case(root: Path) -> tuple[Path, Path]:
    """Cases a (fine) and b (NaN voxels: fails when read), and out/ with both outputs of an earlier run."""
    folder = _folder(root, ("a",))
    scan(folder / "b.nii.gz", value=np.nan)
    (root / "out").mkdir()
    for name in ("a", "b"):
        (root / "out" / f"{name}.nii.gz").write_bytes(b"an earlier engine's labels")
    return folder, root / "out"


def test_failed_case_under_overwrite_loses_its_earlier_output(tiny_engine, tmp_path):
    folder, out = _folder_with_a_failing_case(tmp_path)
    runner = CliRunner()
    done = runner.invoke(cli, ["infer", str(tiny_engine), str(folder), "-o", str(out), "--overwrite"])
    assert done.exit_code == 4, done.output
    assert "b: FAILED" in done.output and "its earlier output (b.nii.gz) was removed" in done.output, done.output
    assert written(out) == ["a.nii.gz"]
    assert (out / "a.nii.gz").read_bytes() != b"an earlier engine's labels"
    again = runner.invoke(cli, ["infer", str(tiny_engine), str(folder), "-o", str(out), "--continue"])
    assert again.exit_code == 4 and "b: FAILED" in again.output, again.output  # not skipped as done


def test_failed_case_under_overwrite_api(tiny_engine, tmp_path, caplog):
    from nnslim.compiler.runtime.cases.run import segment_files
    from nnslim.compiler.runtime.engine import InferenceOptions, load_engine

    folder, out = _folder_with_a_failing_case(tmp_path)
    engine = load_engine(tiny_engine, threads=1)
    with caplog.at_level("WARNING"):
        results = segment_files(engine, [folder], out, InferenceOptions(progress=False), existing="overwrite")
    failed = [r for r in results if r.error]
    assert [r.name for r in failed] == ["b"] and "NaN" in failed[0].error and "was removed" in failed[0].error
    assert "removed if its case fails" in caplog.text and not (out / "b.nii.gz").exists()


def test_failed_write_leaves_no_half_case(tiny_engine, tmp_path):
    """Probabilities are written before the label map: a label map that cannot be written takes them along."""
    from nnslim.compiler.runtime.cases.batch import BatchOptions
    from nnslim.compiler.runtime.cases.run import segment_files
    from nnslim.compiler.runtime.engine import InferenceOptions, load_engine

    folder = _folder(tmp_path, ("a",))
    out = tmp_path / "out"
    (out / "a.nii.gz").mkdir(parents=True)  # a folder where the label map goes: its rename fails
    engine = load_engine(tiny_engine, threads=1)
    (result,) = segment_files(engine, [folder], out, InferenceOptions(progress=False), existing="overwrite",
                              batch=BatchOptions(save_probabilities=True, io_workers=0))
    assert result.error and not (out / "a.npz").exists()


# ---- the API side of each refusal -----------------------------------------------------------------

@pytest.fixture(scope="module")
def engine(tiny_engine):
    from nnslim.compiler.runtime.engine import load_engine

    return load_engine(tiny_engine, threads=1)


@pytest.mark.parametrize("kwargs, message", [
    ({"part": (7, 10)}, "holds 3 case(s), so part 7 of 10 has none"),
    ({"part": (2, 2)}, "--part-id must be in 0..1"),
])
def test_api_folder_parts(engine, tmp_path, kwargs, message):
    from nnslim.compiler.runtime.cases.plan import OptionConflict

    with pytest.raises(OptionConflict, match=re.escape(message)) as raised:
        engine.segment_files([_folder(tmp_path)], tmp_path / "out", **kwargs)
    assert isinstance(raised.value, SettingsError)


@pytest.mark.parametrize("kwargs, message", [
    ({"existing": "continue"}, "--continue skips the cases of a folder"),
    ({"part": (1, 2)}, "split a folder of cases, but the input is one case"),
])
def test_api_one_case_refuses_folder_options(engine, tmp_path, kwargs, message):
    from nnslim.compiler.runtime.cases.plan import OptionConflict

    with pytest.raises(OptionConflict, match=message):
        engine.segment_files([scan(tmp_path / "s.nii.gz")], tmp_path / "seg.nii.gz", **kwargs)
    assert not (tmp_path / "seg.nii.gz").exists()


def test_api_complex_and_structured_voxels(engine):
    image = np.random.default_rng(0).normal(100, 20, (20, 20, 20))
    with pytest.raises(InputError, match="holds complex voxels"):
        engine.segment(image * (1 + 1j), "engine")
    with pytest.raises(InputError, match="non-numeric"):
        engine.segment(image.astype(object), "engine")
    assert engine.segment(image, "engine").shape == (20, 20, 20)


def test_api_direction_matrix(tmp_path):
    from nnslim.compiler.runtime.volumes.volume import load_volume

    with pytest.raises(InputError, match=r"\[\[2, 0, 0\], \[0, 1, 0\], \[0, 0, 1\]\], which is not orthonormal"):
        load_volume(_sitk_image(tmp_path / "s.mha", (2, 0, 0, 0, 1, 0, 0, 0, 1)), 1)
    rotated = (0, -1, 0, 1, 0, 0, 0, 0, 1)  # a rotation, written with 6 digits: accepted
    assert load_volume(_sitk_image(tmp_path / "r.nrrd", rotated), 1).data.shape == (1, 20, 20, 20)


def test_api_unprintable_names_fail_as_their_own_case(engine, tmp_path):
    folder = _folder(tmp_path, ("a",))
    scan(folder / "x\x1b[2Kb.nii.gz")
    (folder / "loop.nii.gz").symlink_to("loop.nii.gz")
    (folder / "gone.nii.gz").symlink_to("nowhere.nii.gz")
    results = {r.name: r for r in engine.segment_files([folder], tmp_path / "out", options=_quiet())}
    assert set(results) == {"a", "x\\x1b[2Kb", "loop", "gone"}
    assert results["a"].error is None
    assert "holds control characters" in results["x\\x1b[2Kb"].error
    assert "loops back on itself" in results["loop"].error
    assert "nowhere.nii.gz, which does not exist" in results["gone"].error
    assert written(tmp_path / "out") == ["a.nii.gz"]


def test_api_threads_and_sha256_checks():
    """The checks behind --threads and --engine-sha256 (`safety`), for `load_engine` to share."""
    from nnslim.compiler.runtime.safety import check_sha256, check_threads, max_threads

    assert check_threads(0) == 0 and check_threads(max_threads()) == max_threads()
    for bad in (-1, max_threads() + 1, 100000):
        with pytest.raises(SettingsError, match=f"got {bad}"):
            check_threads(bad)
    assert check_sha256(" " + "AB" * 32 + "\n") == "ab" * 32
    for bad in ("", "abc", "g" * 64, "a" * 65, "a" * 1000):
        with pytest.raises(SettingsError, match="64 hexadecimal characters"):
            check_sha256(bad)


# ---- --log-jsonl after an interrupted run ---------------------------------------------------------

@pytest.mark.parametrize("earlier", [
    '{"case": "z", "status": "ok"}\n{"case": "y", "sta',  # killed while writing its second record
    '{"case": "z", "sta',  # killed while writing its first
])
def test_log_after_a_partial_last_line(tiny_engine, tmp_path, earlier):
    log = tmp_path / "cases.jsonl"
    log.write_text(earlier)
    done = CliRunner().invoke(cli, ["infer", str(tiny_engine), str(_folder(tmp_path, ("a", "b"))), "-o",
                                    str(tmp_path / "out"), "--log-jsonl", str(log)])
    assert done.exit_code == 0, done.output
    lines = log.read_text().splitlines()
    assert log.read_text().startswith(earlier + "\n")  # the fragment is kept, on its own line
    fragment = earlier.splitlines()[-1]
    records = [json.loads(line) for line in lines if line != fragment]
    assert [r["case"] for r in records][-2:] == ["a", "b"]


def test_log_api_partial_last_line(tmp_path):
    from nnslim.compiler.runtime.cases.log import CaseLog

    path = tmp_path / "cases.jsonl"
    path.write_text('{"case": "z", "status": "ok"}\n{"case": "y"')
    log = CaseLog(path, [], [])
    log.write({"case": "a", "status": "ok"})
    log.close()
    assert json.loads(path.read_text().splitlines()[-1])["case"] == "a"
    with pytest.raises(InputError, match="loops back on itself"):
        CaseLog(_loop(tmp_path / "loop.jsonl"), [], [])


def _quiet():
    from nnslim.compiler.runtime.engine import InferenceOptions

    return InferenceOptions(progress=False)


def test_printable_escapes_what_forges_lines():
    from nnslim.compiler.runtime.safety import printable, unprintable

    assert printable("a\nb\r\x1b[31m\u202ec") == "a\\nb\\r\\x1b[31m\\u202ec"
    assert not unprintable("Müller_ñ 01 (copy)") and printable("Müller") == "Müller"
    assert os.fsdecode(b"\xff") == "\udcff" and unprintable("\udcff")  # undecodable bytes in a file name
