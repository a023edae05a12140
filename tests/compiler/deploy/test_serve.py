"""`nnslim serve` with a real Triton Inference Server (the nvidia-pytriton wheel's tritonserver) on
127.0.0.1 and free ports: the MNI volume over HTTP and over gRPC gives `nnslim infer`'s labels; four
concurrent clients all get them; malformed requests get error responses and the server keeps
serving; probabilities come only when asked for by name and match the in-process engine's; SIGTERM
stops it within 10 s with no process and no temporary folder left behind."""

from __future__ import annotations

import os
import re
import select
import signal
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner

from nnslim.compiler.cli import cli
from nnslim.extras import installed
from tests.conftest import demo_engine

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not installed("pytriton"), reason="nvidia-pytriton (the serve extra) is not installed"),
    pytest.mark.skipif(not installed("tritonclient"), reason="tritonclient is not installed"),
]

READY_SECONDS = 240
STOP_SECONDS = 10


def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def descendants(pid: int) -> set[int]:
    """Every live process below `pid` (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.fixture(scope="module")
def serve_engine(tmp_path_factory) -> Path:
    """The demo model at its own 96^3 patch on OpenVINO fp32: the MNI volume in seconds."""
    return demo_engine(tmp_path_factory.mktemp("serve") / "engine", 96, "--backend", "openvino", "--precision", "fp32")


@pytest.fixture(scope="module")
def mni(mni_raw) -> tuple[Path, np.ndarray, np.ndarray]:
    path = mni_raw / "imagesTr" / "mni_0000.nii.gz"
    scan = nib.load(path)
    return path, np.asarray(scan.dataobj, dtype=np.float32)[None], np.asarray(scan.header.get_zooms()[:3], np.float32)


@pytest.fixture(scope="module")
def infer_labels(serve_engine, mni, tmp_path_factory) -> np.ndarray:
    """What `nnslim infer` writes for the MNI volume."""
    out = tmp_path_factory.mktemp("infer") / "mni_seg.nii.gz"
    result = CliRunner().invoke(cli, ["infer", str(serve_engine), str(mni[0]), "-o", str(out)])
    assert result.exit_code == 0, result.output
    return np.asarray(nib.load(out).dataobj)


@pytest.fixture(scope="module")
def server(serve_engine):
    """`nnslim serve` in a subprocess, two instances; stopped (and checked) at the end."""
    http_port, grpc_port, metrics_port = free_ports(3)
    process = subprocess.Popen([sys.executable, "-m", "nnslim", "serve", str(serve_engine), "--http-port", str(http_port),
                                "--grpc-port", str(grpc_port), "--metrics-port", str(metrics_port), "--instances", "2",
                                "--threads", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        line = read_ready_line(process)
        assert line.startswith("READY"), line
        assert f"127.0.0.1:{http_port}" in line and f"127.0.0.1:{grpc_port}" in line
        yield {"http": f"127.0.0.1:{http_port}", "grpc": f"127.0.0.1:{grpc_port}", "process": process,
               "tree": descendants(process.pid)}
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def read_ready_line(process: subprocess.Popen) -> str:
    deadline = time.monotonic() + READY_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"nnslim serve exited ({process.returncode}): {process.stderr.read().decode()[-3000:]}")
        ready, _, _ = select.select([process.stdout], [], [], 1.0)
        if ready:
            return process.stdout.readline().decode().strip()
    process.kill()
    pytest.fail(f"no READY line within {READY_SECONDS} s")


def request(protocol: str, url: str, image: np.ndarray, spacing: np.ndarray, outputs=("LABELS",),
            image_type: str = "FP32", spacing_type: str = "FP32"):
    if protocol == "http":
        import tritonclient.http as client_module
    else:
        import tritonclient.grpc as client_module
    inputs = [client_module.InferInput("IMAGE", list(image.shape), image_type),
              client_module.InferInput("SPACING", list(spacing.shape), spacing_type)]
    inputs[0].set_data_from_numpy(image)
    inputs[1].set_data_from_numpy(spacing)
    client = client_module.InferenceServerClient(url)
    requested = [client_module.InferRequestedOutput(name) for name in outputs] if outputs else None
    return client.infer("nnslim", inputs, outputs=requested)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_the_mni_volume_gives_nnslim_infers_labels(server, mni, infer_labels, protocol):
    _, image, spacing = mni
    result = request(protocol, server[protocol], image, spacing)
    labels = result.as_numpy("LABELS")
    assert labels.dtype == np.uint8 and labels.shape == image.shape[1:]
    np.testing.assert_array_equal(labels, infer_labels)
    assert result.as_numpy("PROBABILITIES") is None  # not asked for, not sent


def test_the_readmes_client_example_runs_as_written(server, mni, infer_labels, tmp_path, monkeypatch):
    """The README's 10-line client, on the MNI volume, against this server (only the port changed)."""
    readme = (Path(__file__).resolve().parents[3] / "README.md").read_text()
    (example,) = [block for block in re.findall(r"```python\n(.*?)```", readme, re.S) if "tritonclient.http" in block]
    assert len([line for line in example.splitlines() if line.strip()]) == 10
    monkeypatch.chdir(tmp_path)
    Path("scan.nii.gz").symlink_to(mni[0])
    exec(example.replace("127.0.0.1:8000", server["http"]), {})
    np.testing.assert_array_equal(np.asarray(nib.load("scan_seg.nii.gz").dataobj), infer_labels)


def test_four_concurrent_clients_all_get_the_labels(server, mni, infer_labels):
    _, image, spacing = mni
    protocols = ["http", "grpc", "http", "grpc"]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda p: request(p, server[p], image, spacing).as_numpy("LABELS"), protocols))
    for labels in results:
        np.testing.assert_array_equal(labels, infer_labels)


def test_probabilities_when_named_match_the_engine(server, serve_engine, small_volume):
    from nnslim import load_engine

    scan = nib.load(small_volume)
    image = np.asarray(scan.dataobj, dtype=np.float32)[None]
    spacing = np.asarray(scan.header.get_zooms()[:3], dtype=np.float32)
    result = request("grpc", server["grpc"], image, spacing, outputs=("LABELS", "PROBABILITIES"))
    with load_engine(serve_engine) as engine:
        labels, probabilities = engine.segment(image, tuple(spacing), return_probabilities=True)
    served = result.as_numpy("PROBABILITIES")
    assert served.dtype == np.float16 and served.shape == probabilities.shape == (3, *image.shape[1:])
    np.testing.assert_array_equal(result.as_numpy("LABELS"), labels)
    np.testing.assert_allclose(served.astype(np.float32), probabilities.astype(np.float32), atol=1e-3)


BAD_REQUESTS = {
    # Triton refuses these against the model's config before nnslim sees them
    "wrong dtype": (lambda image, spacing: (image.astype(np.float64), spacing, "FP64", "FP32"), "FP64"),
    "2D image": (lambda image, spacing: (image[0, :, :, 0], spacing, "FP32", "FP32"), "IMAGE"),
    "spacing of length 2": (lambda image, spacing: (image, spacing[:2], "FP32", "FP32"), "SPACING"),
    # nnslim refuses these, with its own message
    "NaN spacing": (lambda image, spacing: (image, np.array([1, np.nan, 1], np.float32), "FP32", "FP32"), "spacing"),
    "two channels": (lambda image, spacing: (np.concatenate([image, image]), spacing, "FP32", "FP32"), "channel"),
    "NaN voxel": (lambda image, spacing: (np.where(image == image.max(), np.nan, image).astype(np.float32), spacing,
                                          "FP32", "FP32"), "NaN"),
}


@pytest.mark.parametrize("name", list(BAD_REQUESTS))
@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_a_malformed_request_gets_an_error_and_the_server_keeps_serving(server, small_volume, name, protocol):
    from tritonclient.utils import InferenceServerException

    scan = nib.load(small_volume)
    image = np.asarray(scan.dataobj, dtype=np.float32)[None]
    spacing = np.asarray(scan.header.get_zooms()[:3], dtype=np.float32)
    make, says = BAD_REQUESTS[name]
    bad_image, bad_spacing, image_type, spacing_type = make(image, spacing)
    with pytest.raises(InferenceServerException) as error:
        request(protocol, server[protocol], bad_image, bad_spacing, image_type=image_type, spacing_type=spacing_type)
    assert says.lower() in str(error.value).lower(), str(error.value)
    labels = request(protocol, server[protocol], image, spacing).as_numpy("LABELS")  # still serving
    assert labels.shape == image.shape[1:]


def test_sigterm_stops_it_within_10_s_and_leaves_nothing(server, serve_engine):
    process, tree = server["process"], server["tree"] | descendants(server["process"].pid)
    assert tree, "nnslim serve started no tritonserver"
    temp = Path(tempfile.gettempdir())
    folders = {p for p in temp.glob(".nnslim-serve-*") if any(str(p) in _cmdline(pid) for pid in tree)}
    start = time.monotonic()
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=STOP_SECONDS + 5)
    took = time.monotonic() - start
    assert took <= STOP_SECONDS, f"stopped after {took:.1f} s"
    assert process.returncode == 0, process.stderr.read().decode()[-2000:]
    time.sleep(0.5)  # let init reap what was reparented
    assert not [pid for pid in tree if alive(pid)], "processes left behind"
    assert folders and not any(f.exists() for f in folders)


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def test_a_taken_port_is_refused_before_triton_starts_naming_the_option(serve_engine):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = CliRunner().invoke(cli, ["serve", str(serve_engine), "--http-port", str(port)])
    assert result.exit_code == 1, result.output  # the machine's state, not the command line: exit 1
    assert "--http-port" in result.output and str(port) in result.output and "not free" in result.output


def test_without_the_serve_extra_the_error_says_what_to_install(serve_engine, monkeypatch):
    import importlib.util

    from nnslim.compiler.deploy import serve as serve_module

    real = importlib.util.find_spec
    monkeypatch.setattr(serve_module.importlib.util, "find_spec",
                        lambda name, *a: None if name == "pytriton" else real(name, *a))
    result = CliRunner().invoke(cli, ["serve", str(serve_engine)])
    assert result.exit_code == 1, result.output
    assert "nnslim[serve]" in result.output and "nvidia-pytriton" in result.output
    assert os.environ.get("NNSLIM_PYTHONPATH") is None  # nothing set in this process


def test_a_request_that_kills_the_models_process_stops_serve_with_its_reason(tiny_engine):
    """A declared shape whose byte size wraps to 0 passes Triton's checks and kills the Python backend's
    stub before nnslim's code runs (Triton 2.51); Triton would then answer every request "not healthy"
    while reporting READY, so serve stops, non-zero, saying why, and leaves nothing behind."""
    import json as json_module
    import urllib.request

    http_port, grpc_port, metrics_port = free_ports(3)
    process = subprocess.Popen([sys.executable, "-m", "nnslim", "serve", str(tiny_engine), "--http-port", str(http_port),
                                "--grpc-port", str(grpc_port), "--metrics-port", str(metrics_port)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert read_ready_line(process).startswith("READY")
        tree = descendants(process.pid)
        body = json_module.dumps({"inputs": [
            {"name": "IMAGE", "shape": [1, 2**32, 2**32, 1], "datatype": "FP32", "data": []},
            {"name": "SPACING", "shape": [3], "datatype": "FP32", "data": [1, 1, 1]}]}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{http_port}/v2/models/nnslim/infer", body,
                                         {"Content-Type": "application/json"})
        try:
            urllib.request.urlopen(request, timeout=30).read()
        except OSError:
            pass  # the error response (or the dropped connection) is Triton's
        process.wait(timeout=30)
        err = process.stderr.read().decode()
        assert process.returncode == 1, err
        assert "the model's process died on a request" in err and "terminate called" in err, err
        time.sleep(0.5)
        assert not [pid for pid in tree if alive(pid)]
        assert not list(Path("/dev/shm").glob(f"nnslim_serve_{process.pid}_*"))
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


@pytest.mark.parametrize("args, says", [
    (["--name", ""], "--name ''"),
    (["--host", "no-such-host.invalid"], "--host 'no-such-host.invalid'"),
])
def test_a_bad_name_or_host_is_refused_before_triton_starts(serve_engine, args, says):
    result = CliRunner().invoke(cli, ["serve", str(serve_engine), *args])
    assert result.exit_code == 1 and says in result.output, result.output
