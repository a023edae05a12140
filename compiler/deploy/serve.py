"""`nnslim serve ENGINE`: a real Triton Inference Server serving the engine's whole-volume model.

The server is the `tritonserver` binary that the `nvidia-pytriton` wheel ships (CPU-capable; the
`serve` extra). For one run, a private folder `$TMPDIR/.nnslim-serve-TOKEN` (removed when the server
stops; swept by the next `serve` if this one was killed) holds:

    models/NAME/          the whole-volume model (`whole_volume`), exported from the engine
    backends/python/      Triton's Python backend, linked from the wheel: its library and module,
                          and the backend stub built for this interpreter's Python version

The stub embeds libpython and ignores PYTHON* variables, so this interpreter's import path goes in
as NNSLIM_PYTHONPATH (read by the model's `model.py`) and its libpython through LD_LIBRARY_PATH: the
model runs on the same Python, numpy and nnslim as `nnslim serve` itself.

The server listens on `host` (127.0.0.1 unless told otherwise), runs in the foreground, calls
`on_ready` once the model is READY, and stops on SIGINT or SIGTERM: Triton gets SIGTERM, up to
`STOP_SECONDS` to finish, then SIGKILL; it also gets SIGTERM if this process dies (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import collections
import ctypes
import importlib.util
import os
import re
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from nnslim.errors import NnslimError, SettingsError
from nnslim.files import marked_folder, sweep_leftovers

STOP_SECONDS = 8.0
UTILS = "triton_python_backend_utils.py"
STUB = "triton_python_backend_stub"
# Lines Triton prints on every machine without a GPU: noise, not news
_NOISE = re.compile(r"Failed to initialize NVML|DCGM unable to start|Unable to get CUDA device count|"
                    r"CUDA driver version is insufficient|Collecting CPU metrics|CudaDriverHelper has not been initialized|"
                    r"failed to allocate pinned system memory")
_GLOG = re.compile(r"^([IWEF])\d{4} ")


class ServeError(NnslimError):
    """The server could not start or stopped on its own: what was missing or what Triton said."""


@dataclass(frozen=True)
class Tritonserver:
    """Where the wheel keeps Triton: the binary, the Python backend, the stubs and the shared libraries."""

    binary: Path
    python_backend: Path
    stubs: Path
    libs: Path

    def stub(self) -> Path:
        """The Python backend stub built for this interpreter's Python version."""
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        stub = self.stubs / version / STUB
        if not stub.is_file():
            have = sorted(p.name for p in self.stubs.iterdir() if (p / STUB).is_file())
            raise ServeError(f"the nvidia-pytriton wheel has no Python backend stub for Python {version} "
                             f"(it has {', '.join(have) or 'none'}); run nnslim serve with one of those")
        return stub


def find_tritonserver() -> Tritonserver:
    """The `tritonserver` of the installed `nvidia-pytriton` wheel (found without importing it)."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise ServeError("nnslim serve needs Triton Inference Server's tritonserver, which the nvidia-pytriton wheel "
                         "ships: pip install 'nnslim[serve]' (with numpy 2 installed, keep it: pip install --no-deps "
                         "nvidia-pytriton==0.7.0 'tritonclient[http,grpc]')")
    package = Path(next(iter(spec.submodule_search_locations)))
    root = package / "tritonserver"
    found = Tritonserver(root / "bin" / "tritonserver", root / "backends" / "python",
                         root / "python_backend_stubs", package.parent / "nvidia_pytriton.libs")
    for path in (found.binary, found.python_backend / "libtriton_python.so", found.python_backend / UTILS):
        if not path.is_file():
            raise ServeError(f"the nvidia-pytriton wheel at {package} lacks {path.relative_to(package)}; "
                             "reinstall it: pip install --force-reinstall --no-deps nvidia-pytriton==0.7.0")
    return found


@dataclass(frozen=True)
class ServeSettings:
    """What `nnslim serve` was asked for (ports 0 are refused: Triton needs them fixed in advance)."""

    engine_dir: Path
    name: str = "nnslim"
    host: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    instances: int = 1
    threads: int | None = None  # per instance; None: the cores shared out among the instances
    startup_seconds: float = 300.0
    log: str = "warnings"  # "warnings" (Triton's warnings and errors), "all", "quiet"
    cpu_only: bool = True  # the engine runs on the CPU (set from its manifest by `serve`)

    def instance_threads(self) -> int:
        if self.threads is not None:
            return self.threads
        return 0 if self.instances == 1 else max(1, (os.cpu_count() or 1) // self.instances)

    def urls(self) -> dict[str, str]:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        return {"http": f"http://{host}:{self.http_port}", "grpc": f"{host}:{self.grpc_port}",
                "metrics": f"http://{host}:{self.metrics_port}/metrics"}


def check_ports(settings: ServeSettings) -> None:
    """Refuse ports that are the same or already taken, naming the option, before Triton starts."""
    ports = {"--http-port": settings.http_port, "--grpc-port": settings.grpc_port,
             "--metrics-port": settings.metrics_port}
    if len(set(ports.values())) < len(ports):
        raise SettingsError(f"the ports must differ, got {', '.join(f'{k} {v}' for k, v in ports.items())}")
    for option, port in ports.items():
        if not 1 <= port <= 65535:
            raise SettingsError(f"{option} is {port}; use a port from 1 to 65535")
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as Triton binds: a listener still blocks
            try:
                probe.bind((settings.host, port))
            except OSError as exc:
                raise SettingsError(f"{option} {port} on {settings.host} is not free ({exc.strerror}); "
                                    f"choose another {option}") from None


def prepare(settings: ServeSettings, triton: Tritonserver, folder: Path) -> tuple[Path, Path]:
    """The model repository and backend folder of one run, in `folder` (see the module docstring)."""
    from nnslim.compiler.deploy.triton import export_triton

    models, backend = folder / "models", folder / "backends" / "python"
    models.mkdir()
    export_triton(settings.engine_dir, models, settings.name, settings.instances, whole_volume=True,
                  threads=settings.instance_threads())
    backend.mkdir(parents=True)
    for name in ("libtriton_python.so", UTILS):
        (backend / name).symlink_to(triton.python_backend / name)
    (backend / STUB).symlink_to(triton.stub())  # a link: its RUNPATH still finds the wheel's libraries
    return models, backend.parent


def environment(triton: Tritonserver) -> dict[str, str]:
    """Triton's environment: this interpreter's libpython first (for the stub), then the wheel's libraries."""
    env = dict(os.environ)
    # the model's import path: this interpreter's (the stub ignores PYTHONPATH; model.py reads this)
    env["NNSLIM_PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p and Path(p).is_dir())
    libdirs = []
    libdir, soname = sysconfig.get_config_var("LIBDIR"), sysconfig.get_config_var("INSTSONAME")
    if libdir and soname and (Path(libdir) / soname).is_file():
        libdirs.append(libdir)
    libdirs.append(str(triton.libs))
    if env.get("LD_LIBRARY_PATH"):
        libdirs.append(env["LD_LIBRARY_PATH"])
    env["LD_LIBRARY_PATH"] = os.pathsep.join(libdirs)
    return env


def command(settings: ServeSettings, triton: Tritonserver, models: Path, backends: Path) -> list[str]:
    return [str(triton.binary), f"--model-repository={models}", f"--backend-directory={backends}",
            "--model-control-mode=none", "--disable-auto-complete-config", "--strict-readiness=true", "--exit-timeout-secs=3",
            f"--http-address={settings.host}", f"--http-port={settings.http_port}",
            f"--grpc-address={settings.host}", f"--grpc-port={settings.grpc_port}",
            f"--metrics-address={settings.host}", f"--metrics-port={settings.metrics_port}",
            # no pinned host memory without a GPU (Triton warns at every start when it cannot have it)
            *(["--pinned-memory-pool-byte-size=0"] if settings.cpu_only else []),
            # tensors cross to the stub through shared memory (/dev/shm): Triton's 1 MB to start, grown
            # 32 MB at a time (a volume in one or two steps, not thirty)
            "--backend-config=python,shm-growth-byte-size=33554432"]


def serve(settings: ServeSettings, on_ready: Callable[[ServeSettings], None],
          echo: Callable[[str], None] = lambda line: sys.stderr.write(line + "\n")) -> int:
    """Run Triton with the engine's whole-volume model until SIGINT/SIGTERM (returns 0) or until
    Triton stops on its own (ServeError with the end of its log)."""
    if settings.instances < 1:
        raise SettingsError(f"--instances must be at least 1, got {settings.instances}")
    triton = find_tritonserver()
    triton.stub()
    check_ports(settings)
    settings = replace(settings, cpu_only=_runs_on_cpu(settings.engine_dir))
    stop = threading.Event()
    main = threading.current_thread() is threading.main_thread()  # only there can Python take signals
    previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGINT, signal.SIGTERM)} if main else {}
    try:
        temp = Path(tempfile.gettempdir())
        sweep_leftovers(temp, [p.name for p in temp.glob(".nnslim-serve-*")])  # of servers killed with -9
        with marked_folder(temp, ".nnslim-serve") as folder:
            models, backends = prepare(settings, triton, folder)
            process = subprocess.Popen(command(settings, triton, models, backends), env=environment(triton),
                                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                       start_new_session=True, preexec_fn=_stop_with_parent)
            tail: collections.deque[str] = collections.deque(maxlen=40)
            reader = threading.Thread(target=_relay, args=(process, tail, settings.log, echo, stop), daemon=True)
            reader.start()
            try:
                return _run(settings, process, stop, tail, on_ready)
            finally:
                _stop(process)
                reader.join(timeout=2)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _run(settings: ServeSettings, process: subprocess.Popen, stop: threading.Event, tail: collections.deque,
         on_ready: Callable[[ServeSettings], None]) -> int:
    ready_url = f"{settings.urls()['http']}/v2/models/{settings.name}/ready"
    deadline = time.monotonic() + settings.startup_seconds
    while not stop.is_set():
        if process.poll() is not None:
            raise ServeError(f"tritonserver stopped while loading the model (exit code {process.returncode}); "
                             f"its last lines:\n{_last_lines(tail)}")
        if _ready(ready_url):
            break
        if time.monotonic() > deadline:
            raise ServeError(f"the model was not READY within {settings.startup_seconds:g} s; Triton's last "
                             f"lines:\n{_last_lines(tail)}")
        stop.wait(0.2)
    else:
        return 0
    on_ready(settings)
    while not stop.wait(0.5):
        if process.poll() is not None:
            raise ServeError(f"tritonserver stopped on its own (exit code {process.returncode}); its last lines:\n"
                             f"{_last_lines(tail)}")
    return 0


def _runs_on_cpu(engine_dir: Path) -> bool:
    from nnslim.compiler.deploy.triton import instance_kind
    from nnslim.compiler.runtime.manifest import load_manifest

    return instance_kind(load_manifest(engine_dir)) == "KIND_CPU"


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL to the server's whole session (its Python stubs too) after STOP_SECONDS."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(STOP_SECONDS)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(process.pid, signal.SIGKILL)  # anything of its session still there (stubs that hung)
    except (ProcessLookupError, PermissionError):
        pass
    process.wait()


def _relay(process: subprocess.Popen, tail: collections.deque, log: str, echo: Callable[[str], None],
           stopping: threading.Event) -> None:
    """Keep Triton's last lines; pass on its warnings and errors (or everything, or nothing). Once
    asked to stop, Triton's complaint that a model outlived its exit timeout is expected (the stub
    is killed; it writes nothing): not passed on."""
    assert process.stdout is not None
    for raw in process.stdout:
        line = raw.decode("utf-8", errors="replace").rstrip()
        if not line or _NOISE.search(line) or (stopping.is_set() and "Exit timeout expired" in line):
            continue
        tail.append(line)
        glog = _GLOG.match(line)
        if log == "all" or (log == "warnings" and (glog is None and line.startswith("error") or
                                                   glog is not None and glog.group(1) in "WEF")):
            echo(f"[tritonserver] {line}")


def _last_lines(tail: collections.deque) -> str:
    return "\n".join(f"  {line}" for line in list(tail)[-20:]) or "  (nothing)"


def _stop_with_parent() -> None:
    """In the child before exec: SIGTERM when the process that started it dies (Linux)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass
