"""Array jobs and provenance: `--part-id auto` under each scheduler's variables; per-part files that
never collide and `nnslim report` merging them (every case listed once); run and case records
without directory paths; `--continue` segmenting again a case whose .npz was deleted or whose
record names another engine, saying why, and keeping an output nnslim has no record of."""

from __future__ import annotations

import json
import logging

import pytest
from click.testing import CliRunner

from nnslim.compiler.cli import cli
from nnslim.compiler.runtime.cases.batch import BatchOptions
from nnslim.compiler.runtime.cases.parts import resolve_part
from nnslim.compiler.runtime.cases.provenance import RECORDS
from nnslim.compiler.runtime.cases.run import segment_files
from nnslim.compiler.runtime.engine import load_engine
from nnslim.compiler.runtime.manifest.verify import manifest_digest
from nnslim.compiler.runtime.segmentation import InferenceOptions
from nnslim.errors import SettingsError
from tests.compiler.runtime.cases.test_batch import _cases
from tests.conftest import written


@pytest.mark.parametrize("env, expected", [
    ({"SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_COUNT": "4"}, (2, 4)),
    ({"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_STEP": "2",
      "SLURM_ARRAY_TASK_COUNT": "3"}, (2, 3)),  # --array=1-5:2 -> tasks 1, 3, 5
    ({"RANK": "1", "WORLD_SIZE": "2"}, (1, 2)),
    ({"SLURM_ARRAY_TASK_ID": "0", "SLURM_ARRAY_TASK_COUNT": "2", "RANK": "7", "WORLD_SIZE": "8"}, (0, 2)),  # SLURM first
])
def test_auto_parts_come_from_the_scheduler(env, expected):
    assert resolve_part("auto", "auto", env) == expected


def test_a_kubernetes_indexed_job_gives_the_index_and_needs_the_count():
    env = {"JOB_COMPLETION_INDEX": "3"}
    assert resolve_part("auto", 5, env) == (3, 5)
    with pytest.raises(SettingsError, match="--num-parts N"):
        resolve_part("auto", "auto", env)
    with pytest.raises(SettingsError, match="0..2"):
        resolve_part("auto", 3, env)


@pytest.mark.parametrize("env, says", [
    ({}, "SLURM_ARRAY_TASK_ID"),
    ({"RANK": "one"}, "not a whole number"),
    ({"SLURM_ARRAY_TASK_ID": "4", "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_STEP": "2"}, "not on the array"),
])
def test_without_usable_variables_the_error_names_them(env, says):
    with pytest.raises(SettingsError, match=says):
        resolve_part("auto", "auto", env)
    assert resolve_part(1, 3, env) == (1, 3)  # numbers never read the environment


def test_two_parts_under_slurm_then_report_lists_every_case_once(engine_dir, small_volume, tmp_path, monkeypatch):
    folder, out = _cases(tmp_path / "in", small_volume, corrupt=None), tmp_path / "out"
    for task in ("0", "1"):
        monkeypatch.setenv("SLURM_ARRAY_TASK_ID", task)
        monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "2")
        result = CliRunner().invoke(cli, ["infer", str(engine_dir), str(folder), "-o", str(out), "--part-id", "auto",
                                          "--num-parts", "auto", "--preview", "--no-progress",
                                          "--log-jsonl", str(tmp_path / f"log-{task}.jsonl")])
        assert result.exit_code == 0, result.output
    assert written(out) == [f"{c}.nii.gz" for c in "abcde"] + ["previews"]
    runs = [json.loads((out / f"run-part{k}.json").read_text()) for k in (0, 1)]
    assert [r["part"] for r in runs] == [[0, 2], [1, 2]] and [r["cases"]["ok"] for r in runs] == [3, 2]
    digest = manifest_digest(engine_dir)
    assert {r["engine_sha256"] for r in runs} == {digest} and runs[0]["engine"] == engine_dir.name
    for text in [*(p.read_text() for p in out.glob("run-part*.json")), *(p.read_text() for p in (out / RECORDS).iterdir())]:
        assert str(tmp_path) not in text  # names only: the records ship with the outputs
    lines = [json.loads(line) for k in "01" for line in (tmp_path / f"log-{k}.jsonl").read_text().splitlines()]
    assert {(tuple(r["part"]), r["engine_sha256"], r["status"]) for r in lines} == {((0, 2), digest, "ok"),
                                                                                  ((1, 2), digest, "ok")}
    assert all(r["started"] and r["finished"] and r["nnslim_version"] and r["device"] == "cpu" for r in lines)
    previews = out / "previews"
    assert not (previews / "index.html").exists()  # each part wrote its own, neither the whole
    assert sorted(p.name for p in previews.glob("index-part*")) == ["index-part0.html", "index-part0.json",
                                                                     "index-part1.html", "index-part1.json"]
    merged = CliRunner().invoke(cli, ["report", str(out)])
    assert merged.exit_code == 0, merged.output
    entries = json.loads((previews / "index.json").read_text())
    assert [e["case"] for e in entries] == list("abcde")
    html = (previews / "index.html").read_text()
    assert all(html.count(f"<td>{c}</td>") == 1 for c in "abcde")
    summary = json.loads((out / "nnslim-summary.json").read_text())
    assert summary["cases"]["written"] == 5 and summary["parts"] == [[0, 2], [1, 2]]
    assert summary["engines_sha256"] == [digest]


def test_continue_segments_again_what_is_missing_or_another_engines(engine_dir, small_volume, tmp_path, caplog):
    folder, out = _cases(tmp_path / "in", small_volume, corrupt=None), tmp_path / "out"
    engine = load_engine(engine_dir, threads=1)
    batch = BatchOptions(save_probabilities=True)
    segment_files(engine, [folder], out, InferenceOptions(progress=False), batch=batch)
    (out / "b.npz").unlink()
    record = out / RECORDS / "d.nii.gz.json"
    fields = json.loads(record.read_text())
    record.write_text(json.dumps({**fields, "engine": "liver-v1", "engine_sha256": "ab" * 32}))
    (out / RECORDS / "e.nii.gz.json").unlink()
    (out / "e.nii.gz").write_bytes(b"the user's own file, no record: never replaced under --continue")
    with caplog.at_level(logging.WARNING):
        done = segment_files(engine, [folder], out, InferenceOptions(progress=False), existing="continue", batch=batch)
    assert [r.name for r in done] == ["b", "d"]
    said = "\n".join(r.getMessage() for r in caplog.records)
    assert "b: segmenting it again (--continue): its probabilities file is missing" in said
    assert "d: segmenting it again (--continue): it was written by another engine ('liver-v1'" in said
    assert "1 existing output(s) have no nnslim record" in said and "e.nii.gz" in said
    assert (out / "e.nii.gz").read_bytes().startswith(b"the user's own file")
    assert (out / "b.npz").is_file() and json.loads(record.read_text())["engine_sha256"] == manifest_digest(engine_dir)
    assert segment_files(engine, [folder], out, InferenceOptions(progress=False), existing="continue", batch=batch) == []
    # asking for previews now: every case of nnslim's lacks one, so those run again; e is still kept
    again = segment_files(engine, [folder], out, InferenceOptions(progress=False), existing="continue",
                          batch=BatchOptions(save_probabilities=True, preview=True))
    assert [r.name for r in again] == list("abcd")


def test_a_run_whose_every_case_fails_leaves_no_record(engine_dir, small_volume, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a_0000.nii.gz").write_bytes(b"not a volume")
    result = CliRunner().invoke(cli, ["infer", str(engine_dir), str(folder), "-o", str(tmp_path / "out")])
    assert result.exit_code == 4
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
