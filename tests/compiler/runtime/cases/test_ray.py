"""`infer --ray` on a real local Ray cluster (num_cpus=2, started by the test, stopped after): 4
cases (one corrupt) with 2 actors give the local path's outputs, one reported failure and exit 4;
`--continue` then runs nothing; an actor killed (SIGKILL) in the middle of the cases loses and
corrupts nothing: every case is written once, equal to the local path's, no temporary left."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner

from nnslim.compiler.cli import cli
from nnslim.compiler.runtime.cases.ray_runner import RayRunner
from nnslim.compiler.runtime.cases.run import segment_files
from nnslim.compiler.runtime.engine import load_engine
from nnslim.compiler.runtime.segmentation import InferenceOptions
from nnslim.extras import installed
from tests.conftest import written

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not installed("ray"), reason="ray (the ray extra) is not installed")]


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def cases(mni_raw, tmp_path_factory) -> Path:
    """Four cases of the MNI T1 (crops of a few seconds each on 2 cores), d unreadable."""
    scan = nib.load(mni_raw / "imagesTr" / "mni_0000.nii.gz")
    data = np.asarray(scan.dataobj)
    folder = tmp_path_factory.mktemp("ray") / "cases"
    folder.mkdir()
    for i, name in enumerate("abc"):
        nib.save(nib.Nifti1Image(data[60 + 5 * i:130, 60:140, 50:120], scan.affine), folder / f"{name}_0000.nii.gz")
    (folder / "d_0000.nii.gz").write_bytes(b"not a volume")
    return folder


@pytest.fixture(scope="module")
def local(tiny_engine, cases, tmp_path_factory) -> dict[str, np.ndarray]:
    out = tmp_path_factory.mktemp("local") / "out"
    CliRunner().invoke(cli, ["infer", str(tiny_engine), str(cases), "-o", str(out), "--no-progress"])
    return {name: np.asarray(nib.load(out / name).dataobj) for name in written(out)}


def labels(folder: Path) -> dict[str, np.ndarray]:
    return {name: np.asarray(nib.load(folder / name).dataobj) for name in written(folder)}


def test_two_actors_give_the_local_outputs_and_isolate_the_corrupt_case(ray_cluster, tiny_engine, cases, local,
                                                                         tmp_path):
    out, log = tmp_path / "out", tmp_path / "cases.jsonl"
    args = ["infer", str(tiny_engine), str(cases), "-o", str(out), "--ray", "--ray-actors", "2", "--no-progress",
            "--log-jsonl", str(log)]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 4, result.output
    assert "d: FAILED" in result.output and "1 of 4 case(s) failed: d" in result.output
    got = labels(out)
    assert sorted(got) == sorted(local) == ["a.nii.gz", "b.nii.gz", "c.nii.gz"]
    assert all(np.array_equal(got[name], local[name]) for name in local)
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert sorted((r["case"], r["status"]) for r in records) == [("a", "ok"), ("b", "ok"), ("c", "ok"), ("d", "failed")]
    again = CliRunner().invoke(cli, [*args, "--continue"])
    assert again.exit_code == 4, again.output  # d still fails; a, b, c are skipped: nothing else ran
    statuses = [json.loads(line)["status"] for line in log.read_text().splitlines()][4:]
    assert sorted(statuses) == ["failed", "skipped", "skipped", "skipped"]
    assert labels(out).keys() == local.keys()


def _actor_pids() -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if b"_CaseActor" in cmdline or b"MapWorker" in cmdline:
                pids.append(int(entry.name))
    return pids


def test_an_actor_killed_mid_run_loses_and_corrupts_nothing(ray_cluster, tiny_engine, cases, local, tmp_path):
    out = tmp_path / "out"
    engine = load_engine(tiny_engine, threads=1)
    runner = RayRunner(engine.directory, {"threads": 1}, "cpu", actors=2)
    killed: list[int] = []

    def kill_one() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not killed:
            pids = _actor_pids()
            if pids and not any(out.glob("*.nii.gz")):
                time.sleep(1.5)  # the actors have opened the engine and are in their first cases
                pids = _actor_pids()
                if pids:
                    os.kill(pids[0], signal.SIGKILL)
                    killed.append(pids[0])
                    return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_one)
    killer.start()
    results = segment_files(engine, [cases], out, InferenceOptions(progress=False), runner=runner)
    killer.join()
    assert killed, "no actor process was found to kill"
    assert sorted((r.name, r.status) for r in results) == [("a", "ok"), ("b", "ok"), ("c", "ok"), ("d", "failed")]
    got = labels(out)
    assert got.keys() == local.keys() and all(np.array_equal(got[k], local[k]) for k in local)
    assert [p.name for p in out.iterdir() if p.name.startswith(".") and p.name != ".nnslim"] == []  # no temporary
