"""Batches of cases: overlapped I/O gives the same outputs in the same order as one step after
another, a corrupt case in the middle fails alone, the JSONL log, and bounded read-ahead."""

from __future__ import annotations

import json
import threading

import nibabel as nib
import numpy as np
import pytest

from nnslim.compiler.runtime.cases.batch import BatchOptions, Stages, run_cases
from nnslim.compiler.runtime.cases.log import LOG_FIELDS
from tests.conftest import written
from nnslim.compiler.runtime.engine import InferenceOptions, load_engine
from nnslim.compiler.runtime.cases.run import segment_files
from nnslim.errors import InputError


def _cases(folder, small_volume, corrupt="c"):
    """Five cases of different shapes (so order and content matter), one of them a truncated gzip."""
    folder.mkdir()
    scan = nib.load(small_volume)
    data = np.asarray(scan.dataobj)
    for i, name in enumerate("abcde"):
        if name == corrupt:
            (folder / f"{name}_0000.nii.gz").write_bytes(small_volume.read_bytes()[:300])
            continue
        crop = data[i : 30 + 2 * i, : 25 + i, 3:]
        nib.save(nib.Nifti1Image(crop, scan.affine, scan.header), folder / f"{name}_0000.nii.gz")
    return folder


@pytest.fixture(scope="module")
def engine(engine_dir):
    return load_engine(engine_dir, threads=1)


def test_overlapped_io_matches_one_step_after_another_and_isolates_a_corrupt_case(engine, small_volume, tmp_path):
    folder = _cases(tmp_path / "in", small_volume)
    outputs, order = {}, {}
    for workers in (0, 1, 2):
        out, seen = tmp_path / f"out{workers}", []
        results = segment_files(engine, [folder], out, InferenceOptions(progress=False), on_case=seen.append,
                                batch=BatchOptions(io_workers=workers, log_jsonl=tmp_path / f"log{workers}.jsonl"))
        order[workers] = [(r.name, r.status, r.error is None) for r in seen]
        assert [r.name for r in results] == [r.name for r in seen]
        outputs[workers] = {name: np.asarray(nib.load(out / name).dataobj) for name in written(out)}
    expected = [("a", "ok", True), ("b", "ok", True), ("c", "failed", False), ("d", "ok", True), ("e", "ok", True)]
    assert order[0] == order[1] == order[2] == expected
    assert sorted(outputs[0]) == ["a.nii.gz", "b.nii.gz", "d.nii.gz", "e.nii.gz"]  # nothing for c, no temporaries
    for name, labels in outputs[0].items():
        assert np.array_equal(labels, outputs[1][name]) and np.array_equal(labels, outputs[2][name])
    assert outputs[0]["d.nii.gz"].shape == (33, 28, 26)  # data[3:36, :28, 3:] of the 37x41x29 crop

    lines = [json.loads(line) for line in (tmp_path / "log1.jsonl").read_text().splitlines()]
    assert [(r["case"], r["status"]) for r in lines] == [(n, s) for n, s, _ in expected]
    assert all(list(r) == list(LOG_FIELDS) for r in lines)
    bad = lines[2]
    assert bad["error"].startswith("InputError") and bad["windows"] is None and bad["tiles"] == 0
    good = lines[0]
    assert good["error"] is None and good["windows"]["evaluated"] == good["windows"]["grid"] > 0
    assert good["tiles"] == good["windows"]["evaluated"] and good["seconds"] > 0
    assert good["output"] == str(tmp_path / "out1" / "a.nii.gz")


def test_continue_logs_skipped_cases_and_the_log_refuses_inputs_and_outputs(engine, small_volume, tmp_path):
    folder = _cases(tmp_path / "in", small_volume, corrupt=None)
    out, log = tmp_path / "out", tmp_path / "cases.jsonl"
    out.mkdir()
    nib.save(nib.load(folder / "b_0000.nii.gz"), out / "b.nii.gz")  # b was done by an earlier run (no record)
    done = segment_files(engine, [folder], out, InferenceOptions(progress=False), existing="continue",
                         part=(0, 2), batch=BatchOptions(log_jsonl=log))  # part 0: a, c, e
    assert [r.name for r in done] == ["a", "c", "e"]
    segment_files(engine, [folder], out, InferenceOptions(progress=False), existing="continue", part=(1, 2),
                  batch=BatchOptions(log_jsonl=log))  # part 1: b (skipped), d; appended to the same log
    segment_files(engine, [folder], out, InferenceOptions(progress=False), existing="continue",
                  batch=BatchOptions(log_jsonl=log))  # every case is there
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [(r["case"], r["status"]) for r in records] == [("a", "ok"), ("c", "ok"), ("e", "ok"), ("b", "skipped"),
                                                          ("d", "ok")] + [(c, "skipped") for c in "abcde"]
    assert records[3]["output"] == str(out / "b.nii.gz") and records[3]["windows"] is None
    assert {tuple(r["part"]) for r in records} == {(0, 2), (1, 2), (0, 1)}

    for clash in (folder / "a_0000.nii.gz", out / "a.nii.gz"):
        before = clash.read_bytes()
        with pytest.raises(InputError, match="an input or output of this run"):
            segment_files(engine, [folder], out, InferenceOptions(progress=False), existing="overwrite",
                          batch=BatchOptions(log_jsonl=clash))
        assert clash.read_bytes() == before
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "a.npz").write_bytes(b"someone's array")  # no a.nii.gz: not an output nnslim left
    with pytest.raises(InputError, match="probability or preview file"):
        segment_files(engine, [folder], mine, InferenceOptions(progress=False),
                      batch=BatchOptions(save_probabilities=True))
    assert sorted(p.name for p in mine.iterdir()) == ["a.npz"] and (mine / "a.npz").read_bytes() == b"someone's array"
    foreign = tmp_path / "notes.txt"
    foreign.write_text("my notes\n")
    with pytest.raises(InputError, match="not an nnslim case log"):
        segment_files(engine, [folder], out, InferenceOptions(progress=False), existing="continue",
                      batch=BatchOptions(log_jsonl=foreign))
    assert foreign.read_text() == "my notes\n"


def test_run_cases_isolates_each_stage_keeps_order_and_reads_at_most_one_case_ahead():
    """Pure-Python stages: case 2's read, 4's compute and 6's write fail; everything else goes through.
    At any moment at most the computing case, one read-ahead and `io_workers` writes are alive."""
    lock, alive, peak = threading.Lock(), set(), []

    def read(case):
        with lock:
            alive.add(case)
            peak.append(len(alive))
        if case == 2:
            raise InputError("unreadable")
        return case * 10

    def compute(case, value):
        if case == 4:
            raise InputError("cannot segment")
        return value + 1

    def write(case, value):
        with lock:
            alive.discard(case)
        if case == 6:
            raise OSError("disk full")
        return (case, value)

    def failed(case, exc):
        with lock:
            alive.discard(case)
        return (case, type(exc).__name__)

    expected = [(0, 1), (1, 11), (2, "InputError"), (3, 31), (4, "InputError"), (5, 51), (6, "OSError"), (7, 71)]
    for workers in (0, 1, 3):
        seen, peak[:] = [], []
        results = run_cases(list(range(8)), Stages(read, compute, write, failed), workers,
                            lambda result, seconds, seen=seen: seen.append(result), (InputError, OSError))
        assert results == seen == expected
        assert max(peak) <= (1 if workers == 0 else 2 + workers)

    def broken(case, value):  # not an isolated error: a bug stops the run
        raise ZeroDivisionError("bug")

    with pytest.raises(ZeroDivisionError):
        run_cases([0, 1, 2], Stages(read, broken, write, failed), 1, lambda r, s: None, (InputError,))
