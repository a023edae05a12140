"""Atomic writers: a writer that fails half-way leaves no file beside the target and the old
target as it was; a writer that succeeds leaves only the target."""

from __future__ import annotations

import json
import os
import pickle
import stat

import nibabel as nib
import numpy as np
import pytest
import torch

from nnslim.files import atomic_path, write_bytes_atomic, write_json_atomic


class Interrupted(Exception):
    pass


def test_a_writer_failing_half_way_leaves_the_old_target_and_nothing_beside_it(tmp_path):
    target = tmp_path / "out" / "result.json"
    write_json_atomic(target, {"version": 1})
    before = target.read_bytes()
    seen = []
    with pytest.raises(Interrupted):
        with atomic_path(target) as tmp:
            seen.append(tmp)
            with open(tmp, "wb") as f:
                f.write(b'{"version": 2, "half')  # half the new content, then the writer dies
            raise Interrupted
    assert seen[0].name == "result.json" and seen[0].parent.parent == target.parent
    assert seen[0].parent.name.startswith(".result.json.nnslim-")
    assert target.read_bytes() == before
    assert sorted(p.name for p in target.parent.iterdir()) == ["result.json"]


def test_a_failed_first_write_leaves_no_file_at_all(tmp_path):
    target = tmp_path / "new.bin"
    with pytest.raises(KeyboardInterrupt):  # Ctrl-C too: BaseException, not only Exception
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"partial")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_success_replaces_the_target_with_default_permissions(tmp_path):
    target = tmp_path / "plan.bin"
    write_bytes_atomic(target, b"old")
    write_bytes_atomic(target, b"new")
    assert target.read_bytes() == b"new"
    assert list(tmp_path.iterdir()) == [target]
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask  # not mkstemp's 0600


def test_path_writers_get_a_temporary_with_the_targets_suffixes(tmp_path):
    """nibabel picks the format from the name: the temporary must end in .nii.gz too."""
    target = tmp_path / "seg.nii.gz"
    with atomic_path(target) as tmp:
        assert tmp.name.endswith(".nii.gz")
        nib.save(nib.Nifti1Image(np.arange(24, dtype=np.uint8).reshape(2, 3, 4), np.eye(4)), tmp)
    assert target.read_bytes()[:2] == b"\x1f\x8b"  # gzip
    np.testing.assert_array_equal(np.asarray(nib.load(target).dataobj), np.arange(24).reshape(2, 3, 4))


def test_checkpoint_save_failing_mid_write_keeps_the_old_checkpoint(tmp_path):
    from nnslim.training.checkpoint import read_checkpoint, save_checkpoint
    from tests.conftest import metadata, random_model

    path = tmp_path / "model.pt"
    save_checkpoint(path, random_model(), metadata())
    before = path.read_bytes()
    # torch.save opens its file, then fails on an object it cannot pickle
    with pytest.raises((AttributeError, TypeError, RuntimeError, pickle.PicklingError)):
        save_checkpoint(path, random_model(seed=1), metadata(), extra={"optimizer": {"state": lambda: 0}})
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]
    key, weight = next(iter(random_model().state_dict().items()))
    assert torch.equal(read_checkpoint(path)["state_dict"][key], weight)


def test_json_writer_round_trips(tmp_path):
    path = write_json_atomic(tmp_path / "a" / "b.json", {"x": [1, 2]})
    assert json.loads(path.read_text()) == {"x": [1, 2]}


# ---- leftovers of killed runs: swept by nnslim's marker, never by name ---------------------------------

def killed_writer(folder, target_name: str) -> None:
    """A real process that opens an atomic write of `folder/target_name` and dies by SIGKILL mid-write."""
    import subprocess
    import sys

    code = (f"import os, signal\nfrom nnslim.files import atomic_path\n"
            f"with atomic_path({str(folder / target_name)!r}) as tmp:\n"
            f"    tmp.write_bytes(b'half')\n    os.kill(os.getpid(), signal.SIGKILL)\n")
    done = subprocess.run([sys.executable, "-c", code], timeout=60)
    assert done.returncode == -9


def test_the_sweep_removes_akilled_writers_temporary_and_nothing_of_the_users(tmp_path):
    from nnslim.files import sweep_leftovers

    killed_writer(tmp_path, "seg.nii.gz")
    (leftover,) = [p for p in tmp_path.iterdir()]
    assert leftover.name.startswith(".seg.nii.gz.nnslim-")
    user = {  # hidden things of the user's that look like old-style temporaries, or even copy the marker's name
        ".brain.nii.gz.20240101.resample.nii.gz": b"user", ".seg.nii.gz.12345.abcdefgh.nii.gz": b"user",
        ".eng.old-2024/model.onnx": b"backup", ".x.nnslim-abc/.nnslim-temporary": b'{"pid": 99999999, "token": "zzz"}',
    }
    for name, data in user.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(data)
    removed = sweep_leftovers(tmp_path)
    assert removed == [leftover] and not leftover.exists()
    assert all((tmp_path / name).read_bytes() == data for name, data in user.items())


def test_a_marked_folder_of_a_live_process_or_another_user_is_kept(tmp_path):
    from nnslim.files import marked_folder, sweep_leftovers

    with marked_folder(tmp_path, ".work") as folder:
        (folder / "part").write_bytes(b"x")
        assert sweep_leftovers(tmp_path) == []  # this process is alive
        marker = folder / ".nnslim-temporary"
        os.chown(marker, 12345, 12345)  # a marker this user did not write (the tests run as root)
        record = json.loads(marker.read_text())
        marker.write_text(json.dumps({**record, "pid": 999999999}))
        assert sweep_leftovers(tmp_path) == [] and (folder / "part").exists()
    assert list(tmp_path.iterdir()) == []


def test_a_moved_aside_engine_is_swept_file_by_file(tmp_path):
    """`.NAME.old-PID-TOKEN` keeps anything its marker does not list."""
    from nnslim.files import mark, sweep_leftovers

    aside = tmp_path / ".eng.old-1-abcdef"
    (aside / "sub").mkdir(parents=True)
    (aside / "model.onnx").write_bytes(b"m")
    (aside / "sub" / "x").write_bytes(b"x")
    (aside / "notes.txt").write_bytes(b"the user's")
    mark(aside, ["model.onnx", "sub/x"])
    record = json.loads((aside / ".nnslim-temporary").read_text())
    (aside / ".nnslim-temporary").write_text(json.dumps({**record, "pid": 999999999}))
    sweep_leftovers(tmp_path)
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == [
        ".eng.old-1-abcdef", ".eng.old-1-abcdef/notes.txt"]
