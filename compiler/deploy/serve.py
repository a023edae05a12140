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
import secrets
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
from nnslim.compiler.runtime.safety import MEMORY_BUDGET_ENV
from nnslim.files import marked_folder, pid_alive, sweep_leftovers

STOP_SECONDS = 8.0
UTILS = "triton_python_backend_utils.py"
STUB = "triton_python_backend_stub"
# Lines Triton prints on every machine without a GPU: noise, not news
_NOISE = re.compile(r"Failed to initialize NVML|DCGM unable to start|Unable to get CUDA device count|"
                    r"CUDA driver version is insufficient|Collecting CPU metrics|CudaDriverHelper has not been initialized|"
                    r"failed to allocate pinned system memory")
_GLOG = re.compile(r"^([IWEF])\d{4} ")
# The model's process died: a request it could not survive (Triton's stub fails before nnslim's code
# runs for some shapes); Triton keeps answering "not healthy" for it, so serve stops instead
_FATAL = re.compile(r"terminate called|what\(\)|Stub process .* is not healthy|Segmentation fault|Aborted")
SHM = Path("/dev/shm")


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
    memory_budget_mb: float | None = None  # per instance; None: the memory available now over the instances

    def instance_threads(self) -> int:
        if self.threads is not None:
            return self.threads
        return 0 if self.instances == 1 else max(1, (os.cpu_count() or 1) // self.instances)

    def urls(self) -> dict[str, str]:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        return {"http": f"http://{host}:{self.http_port}", "grpc": f"{host}:{self.grpc_port}",
                "metrics": f"http://{host}:{self.metrics_port}/metrics"}


def check_name_and_host(settings: ServeSettings) -> None:
    """Refuse a model name Triton could not serve under and a host that is not an IPv4 address here."""
    from nnslim.compiler.deploy.triton import valid_model_name

    name = settings.name
    if not valid_model_name(name):
        raise SettingsError(f"--name {name!r}: use letters, digits, '_', '.' or '-' (not empty, '.' or '..')")
    try:
        socket.getaddrinfo(settings.host, None, socket.AF_INET)
    except (socket.gaierror, UnicodeError) as exc:
        raise SettingsError(f"--host {settings.host!r} is not an IPv4 address or name of this machine ({exc}); use "
                            "127.0.0.1 (this machine only), 0.0.0.0 (every interface) or one of its addresses") from None


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


def environment(triton: Tritonserver, settings: ServeSettings) -> dict[str, str]:
    """Triton's environment: this interpreter's libpython first (for the stub), then the wheel's
    libraries; each instance's memory budget (`safety.machine_memory_bytes`)."""
    env = dict(os.environ)
    budget = settings.memory_budget_mb or _available_mb() / settings.instances
    if budget:
        env[MEMORY_BUDGET_ENV] = f"{budget:.0f}"
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


def command(settings: ServeSettings, triton: Tritonserver, models: Path, backends: Path, shm_prefix: str) -> list[str]:
    return [str(triton.binary), f"--model-repository={models}", f"--backend-directory={backends}",
            "--model-control-mode=none", "--disable-auto-complete-config", "--strict-readiness=true", "--exit-timeout-secs=3",
            f"--http-address={settings.host}", f"--http-port={settings.http_port}",
            f"--grpc-address={settings.host}", f"--grpc-port={settings.grpc_port}",
            f"--metrics-address={settings.host}", f"--metrics-port={settings.metrics_port}",
            # no pinned host memory without a GPU (Triton warns at every start when it cannot have it)
            *(["--pinned-memory-pool-byte-size=0"] if settings.cpu_only else []),
            # tensors cross to the stub through shared memory (/dev/shm): Triton's 1 MB to start, grown
            # 32 MB at a time (a volume in one or two steps, not thirty)
            "--backend-config=python,shm-growth-byte-size=33554432",
            # this run's regions, by name: removed when it stops, however the model's processes ended
            f"--backend-config=python,shm-region-prefix-name={shm_prefix}"]


def serve(settings: ServeSettings, on_ready: Callable[[ServeSettings], None],
          echo: Callable[[str], None] = lambda line: sys.stderr.write(line + "\n")) -> int:
    """Run Triton with the engine's whole-volume model until SIGINT/SIGTERM (returns 0) or until
    Triton stops on its own (ServeError with the end of its log)."""
    if settings.instances < 1:
        raise SettingsError(f"--instances must be at least 1, got {settings.instances}")
    check_name_and_host(settings)
    triton = find_tritonserver()
    triton.stub()
    check_ports(settings)
    settings = replace(settings, cpu_only=_runs_on_cpu(settings.engine_dir))
    stop = threading.Event()
    main = threading.current_thread() is threading.main_thread()  # only there can Python take signals
    previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGINT, signal.SIGTERM)} if main else {}
    shm_prefix = f"nnslim_serve_{os.getpid()}_{secrets.token_hex(4)}_"
    try:
        temp = Path(tempfile.gettempdir())
        sweep_leftovers(temp, [p.name for p in temp.glob(".nnslim-serve-*")])  # of servers killed with -9
        _sweep_shm()
        with marked_folder(temp, ".nnslim-serve") as folder:
            models, backends = prepare(settings, triton, folder)
            process = subprocess.Popen(command(settings, triton, models, backends, shm_prefix),
                                       env=environment(triton, settings), stdout=subprocess.PIPE,
                                       stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                                       preexec_fn=_stop_with_parent)
            log = _Log(settings.log, echo, stop)
            reader = threading.Thread(target=log.relay, args=(process,), daemon=True)
            reader.start()
            try:
                return _run(settings, process, stop, log, on_ready, lambda: reader.join(timeout=2))
            finally:
                _stop(process)
                reader.join(timeout=2)
                for region in SHM.glob(f"{shm_prefix}*"):
                    region.unlink(missing_ok=True)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _run(settings: ServeSettings, process: subprocess.Popen, stop: threading.Event, log: _Log,
         on_ready: Callable[[ServeSettings], None], drain: Callable[[], None]) -> int:
    ready_url = f"{settings.urls()['http']}/v2/models/{settings.name}/ready"
    deadline = time.monotonic() + settings.startup_seconds

    def failed(what: str) -> ServeError:
        drain()  # the last lines Triton printed, read before they are shown
        return ServeError(f"{what}; Triton's last lines:\n{log.last_lines()}")

    while not stop.is_set():
        if process.poll() is not None:
            raise failed(f"tritonserver stopped while loading the model (exit code {process.returncode})")
        if _ready(ready_url):
            break
        if time.monotonic() > deadline:
            raise failed(f"the model was not READY within {settings.startup_seconds:g} s")
        stop.wait(0.2)
    else:
        return 0
    on_ready(settings)
    while not stop.wait(0.5):
        if process.poll() is not None:
            raise failed(f"tritonserver stopped on its own (exit code {process.returncode})")
        if log.broken.is_set():
            raise failed("the model's process died on a request (Triton would answer every later request with "
                         "'not healthy'); nnslim serve stops so that a supervisor can start it again")
    if process.poll() is not None:  # it died just before the stop was asked for
        raise failed(f"tritonserver stopped on its own (exit code {process.returncode})")
    return 0


def _runs_on_cpu(engine_dir: Path) -> bool:
    from nnslim.compiler.deploy.triton import instance_kind
    from nnslim.compiler.runtime.manifest import load_manifest

    return instance_kind(load_manifest(engine_dir, verify=False)) == "KIND_CPU"  # the export verifies it next


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


class _Log:
    """Triton's output: the last lines kept (and the fatal ones apart, so they are never crowded
    out), its warnings and errors passed on (or everything, or nothing); `broken` once the model's
    process died."""

    def __init__(self, level: str, echo: Callable[[str], None], stopping: threading.Event) -> None:
        self.level, self.echo, self.stopping = level, echo, stopping
        self.tail: collections.deque[str] = collections.deque(maxlen=40)
        self.fatal: collections.deque[str] = collections.deque(maxlen=10)
        self.broken = threading.Event()

    def relay(self, process: subprocess.Popen) -> None:
        for raw in process.stdout or ():  # Popen(stdout=PIPE): always there
            line = raw.decode("utf-8", errors="replace").rstrip()
            # once asked to stop, Triton's complaint that a model outlived its exit timeout is expected
            # (the stub is killed; it writes nothing)
            if not line or _NOISE.search(line) or (self.stopping.is_set() and "Exit timeout expired" in line):
                continue
            self.tail.append(line)
            glog = _GLOG.match(line)
            fatal = _FATAL.search(line) is not None
            if fatal:
                self.fatal.append(line)
                if not self.stopping.is_set():
                    self.broken.set()
            shown = glog is not None and glog.group(1) in "WEF" or line.startswith("error") or fatal
            if self.level == "all" or (self.level == "warnings" and shown):
                self.echo(f"[tritonserver] {line}")

    def last_lines(self) -> str:
        recent = list(self.tail)[-20:]
        lines = [*(f for f in self.fatal if f not in recent), *recent]
        return "\n".join(f"  {line}" for line in lines) or "  (nothing)"


def _available_mb() -> float:
    """MemAvailable (Linux), else 0 (no budget beyond the machine's memory)."""
    try:
        with open("/proc/meminfo") as info:
            for line in info:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0.0


def _sweep_shm() -> None:
    """Shared-memory regions of servers whose `nnslim serve` is gone (killed with -9)."""
    for region in SHM.glob("nnslim_serve_*_*_*"):
        pid = region.name.split("_")[2]
        if pid.isdigit() and not pid_alive(int(pid)):
            region.unlink(missing_ok=True)


def _stop_with_parent() -> None:
    """In the child before exec: SIGTERM when the process that started it dies (Linux)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass
