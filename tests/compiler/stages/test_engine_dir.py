"""Replacing an engine directory: only a provable engine, only its files, no litter, races end clean."""

import json
import multiprocessing
import os
import subprocess
import sys

import pytest

from nnslim.compiler.stages.engine_dir import EngineDirError, clean_stale, engine_files, replace_dir, staging_dir
from nnslim.compiler.runtime.manifest import FORMAT, MANIFEST
from nnslim.files import sha256_file


def fake_engine(directory, tag="old", extra=()):
    """An engine directory as far as replacing goes: files plus a manifest that lists them."""
    directory.mkdir(parents=True)
    (directory / "model.opt.onnx").write_text(f"model {tag}")
    (directory / "report.md").write_text(f"report {tag}")
    files = {n: {"sha256": sha256_file(directory / n), "bytes": (directory / n).stat().st_size}
             for n in ("model.opt.onnx", "report.md")}
    (directory / MANIFEST).write_text(json.dumps({"format": FORMAT, "format_version": 1, "files": files, "tag": tag}))
    for name in extra:
        (directory / name).write_text("the user's own file")
    return directory


def siblings(out):
    return sorted(p.name for p in out.parent.iterdir() if p.name != out.name)


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_an_engine_is_replaced_and_nothing_is_left_beside_it(tmp_path):
    out = fake_engine(tmp_path / "engines" / "tiny")
    with staging_dir(out) as staging:
        fake_engine(staging / "inner")  # anything; the staging folder becomes the engine
        (staging / "model.opt.onnx").write_text("new")
    assert (out / "model.opt.onnx").read_text() == "new" and not (out / MANIFEST).exists()
    assert siblings(out) == []


@pytest.mark.parametrize("extra, why", [
    ((), "it has no manifest.json"),
    (("notes.txt",), "1 file(s) its manifest does not list, e.g. notes.txt"),
])
def test_a_folder_that_is_not_provably_an_engine_is_refused(tmp_path, extra, why):
    out = tmp_path / "work"
    if extra:
        fake_engine(out, extra=extra)
    else:
        out.mkdir()
        (out / "thesis.tex").write_text("years of work")
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(EngineDirError, match="--overwrite") as raised:
        with staging_dir(out):
            pytest.fail("the build must not start")
    assert why in str(raised.value)
    assert sorted(p.name for p in out.iterdir()) == before and siblings(out) == []


def test_a_foreign_manifest_is_not_an_engine(tmp_path):
    out = tmp_path / "work"
    out.mkdir()
    (out / MANIFEST).write_text(json.dumps({"name": "my web app", "files": {}}))
    assert engine_files(out) is None
    with pytest.raises(EngineDirError, match="not an nnslim engine manifest"):
        with staging_dir(out):
            pass
    assert (out / MANIFEST).exists()


def test_overwrite_replaces_a_foreign_folder_but_never_one_holding_the_input(tmp_path):
    out = tmp_path / "work"
    out.mkdir()
    (out / "old.txt").write_text("x")
    with staging_dir(out, overwrite=True) as staging:
        (staging / "model.opt.onnx").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["model.opt.onnx"] and siblings(out) == []
    checkpoint = out / "model.pt"
    checkpoint.write_text("weights")
    for target in (out, tmp_path):
        with pytest.raises(EngineDirError, match="contains"):
            with staging_dir(target, overwrite=True, protect=(checkpoint,)):
                pass
    assert checkpoint.read_text() == "weights"


def test_a_file_or_a_symlink_as_out_is_refused(tmp_path):
    (tmp_path / "file").write_text("x")
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(EngineDirError, match="is a file"):
        with staging_dir(tmp_path / "file"):
            pass
    with pytest.raises(EngineDirError, match="symbolic link"):
        with staging_dir(tmp_path / "link", overwrite=True):
            pass


def test_a_failed_build_leaves_nothing(tmp_path):
    out = fake_engine(tmp_path / "tiny")
    with pytest.raises(RuntimeError):
        with staging_dir(out) as staging:
            (staging / "half.onnx").write_text("partial")
            raise RuntimeError("stage failed")
    assert json.loads((out / MANIFEST).read_text())["tag"] == "old" and siblings(out) == []


def test_leftovers_are_swept_by_nnslims_marker_never_by_name(tmp_path):
    """Marked folders of dead processes go; a live process's, and anything of the user's named like a
    leftover (a backup `.tiny.old-2024/`, an unmarked `.tiny.building-PID`), stay."""
    from nnslim.files import mark

    out = tmp_path / "tiny"
    gone, alive = dead_pid(), os.getppid()
    for name, pid in ((".tiny.building-1-aaaaaa", gone), (".tiny.old-1-bbbbbb", gone), (".tiny.building-2-cccccc", alive)):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "model.onnx").write_text("partial")
        mark(folder)
        record = json.loads((folder / ".nnslim-temporary").read_text())
        (folder / ".nnslim-temporary").write_text(json.dumps({**record, "pid": pid}))
    for name in (".tiny.old-2024", f".tiny.building-{gone}"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.onnx").write_text("the user's")
    removed = clean_stale(out)
    assert sorted(p.name for p in removed) == [".tiny.building-1-aaaaaa", ".tiny.old-1-bbbbbb"]
    assert {p.name for p in tmp_path.iterdir()} == {f".tiny.building-{gone}", ".tiny.building-2-cccccc",
                                                    ".tiny.old-2024"}


def _race(out, tag, barrier, results):
    from nnslim.files import staging_folder

    with staging_folder(out, "building") as staging:
        staging.rmdir()
        fake_engine(staging, tag=tag)
        barrier.wait()
        try:
            replace_dir(staging, out)
            results.put((tag, "ok"))
        except EngineDirError as exc:
            results.put((tag, str(exc)))


@pytest.mark.parametrize("start", ["absent", "engine"])
def test_two_builds_racing_on_the_rename_end_with_one_valid_engine(tmp_path, start):
    context = multiprocessing.get_context("fork")
    for round_ in range(8):
        out = tmp_path / f"round{round_}" / "tiny"
        if start == "engine":
            fake_engine(out)
        else:
            out.parent.mkdir()
        barrier, results = context.Barrier(2), context.Queue()
        workers = [context.Process(target=_race, args=(out, tag, barrier, results)) for tag in ("a", "b")]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(30)
        outcomes = dict(results.get(timeout=5) for _ in workers)
        assert all(o == "ok" or "another process wrote" in o for o in outcomes.values()), outcomes
        winner = json.loads((out / MANIFEST).read_text())["tag"]
        assert winner in outcomes and engine_files(out) is not None
        assert (out / "model.opt.onnx").read_text() == f"model {winner}"
        assert siblings(out) == [], siblings(out)


def test_a_build_killed_mid_way_is_swept_by_the_next_one(tmp_path):
    out = tmp_path / "tiny"
    script = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from nnslim.compiler.stages.engine_dir import staging_dir\n"
        "with staging_dir(Path(sys.argv[1])) as staging:\n"
        "    (staging / 'model.onnx').write_text('half')\n"
        "    print('staged', flush=True)\n"
        "    time.sleep(60)\n"
    )
    child = subprocess.Popen([sys.executable, "-c", script, str(out)], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "staged"
    child.kill()  # SIGKILL: no cleanup code runs
    child.wait()
    (leftover,) = siblings(out)
    assert leftover.startswith(f".tiny.building-{child.pid}-") and not out.exists()
    with staging_dir(out) as staging:
        (staging / "model.opt.onnx").write_text("new")
    assert siblings(out) == [] and (out / "model.opt.onnx").read_text() == "new"
