"""`nnslim serve` against the same engine in-process: volumes per minute and per-request overhead.

For each number of concurrent clients (1, 2 and 4), a measurement segments the same MNI volumes
(4) in-process (N threads calling `Engine.segment` on one engine) and through a running
`nnslim serve` (N client threads, one Triton client each); the two alternate within each round
(and swap order every other round), and the medians over the rounds are reported. The overhead is
the median request round trip minus the median in-process `segment` time at the same
concurrency. Every served label volume is checked against the in-process one.

    .venv/bin/python scripts/bench_serve.py [--engine DIR] [--clients 1 2 4] [--repeats 3]
        [--instances 1] [--protocol http|grpc] [--out FILE]

    e.g. .venv/bin/python scripts/bench_serve.py --engine /tmp/engine --clients 1 2 --repeats 1

The default engine is the one `build-engine` picks for the bundled model (built once into
artifacts/bench/serve/engine). Prints a table and writes artifacts/bench/serve.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from pathlib import Path

import nibabel as nib
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "artifacts" / "bench" / "serve"
MODEL = ROOT / "artifacts" / "models" / "mni-tissue-tiny.pt"
VOLUMES_PER_MEASUREMENT = 4
STARTUP_SECONDS = 300.0


def cpu_name() -> str:
    """The CPU's model name as /proc/cpuinfo gives it ("unknown" where there is none)."""
    try:
        with open("/proc/cpuinfo") as info:
            return next((ln.split(":", 1)[1].strip() for ln in info if ln.startswith("model name")), "unknown")
    except OSError:
        return "unknown"


def free_ports(count: int) -> list[int]:
    """`count` distinct free TCP ports on 127.0.0.1 (bound to port 0 together, then released)."""
    with ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]


@contextmanager
def served(engine_dir: Path, instances: int) -> Iterator[dict[str, int]]:
    """A running `nnslim serve ENGINE_DIR` on free ports, READY; stopped (SIGTERM, then SIGKILL) on exit."""
    http, grpc, metrics = free_ports(3)
    proc = subprocess.Popen([sys.executable, "-m", "nnslim", "serve", str(engine_dir), "--http-port", str(http),
                             "--grpc-port", str(grpc), "--metrics-port", str(metrics), "--instances", str(instances)],
                            stdout=subprocess.PIPE, text=True)
    ready = threading.Event()
    threading.Thread(target=lambda: any(line.startswith("READY") for line in proc.stdout) and ready.set(),
                     daemon=True).start()
    try:
        deadline = time.monotonic() + STARTUP_SECONDS
        while not ready.wait(1.0):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"nnslim serve was not READY (exit status {proc.poll()}); see its log above")
        yield {"http": http, "grpc": grpc}
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def served_segment(protocol: str, port: int, image: np.ndarray, spacing: np.ndarray) -> Callable[[], np.ndarray]:
    """A function that sends the volume to the served model and returns its labels (one client per thread)."""
    if protocol == "grpc":
        import tritonclient.grpc as client_lib
        options = {}
    else:
        import tritonclient.http as client_lib
        options = {"connection_timeout": 600.0, "network_timeout": 600.0}  # 60 s by default: too short in a queue
    local = threading.local()

    def call() -> np.ndarray:
        if not hasattr(local, "client"):
            local.client = client_lib.InferenceServerClient(f"127.0.0.1:{port}", **options)
        inputs = [client_lib.InferInput("IMAGE", list(image.shape), "FP32"),
                  client_lib.InferInput("SPACING", [3], "FP32")]
        inputs[0].set_data_from_numpy(image)
        inputs[1].set_data_from_numpy(spacing)
        result = local.client.infer("nnslim", inputs, outputs=[client_lib.InferRequestedOutput("LABELS")])
        return result.as_numpy("LABELS")

    return call


def timed_round(call: Callable[[], np.ndarray], clients: int) -> tuple[float, list[float], list[np.ndarray]]:
    """(wall seconds, seconds of each call, labels of each call) for the volumes from `clients` threads."""
    def one(_: int) -> tuple[float, np.ndarray]:
        start = time.perf_counter()
        labels = call()
        return time.perf_counter() - start, labels

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(one, range(VOLUMES_PER_MEASUREMENT)))
    return time.perf_counter() - start, [s for s, _ in results], [labels for _, labels in results]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engine", type=Path, default=OUT / "engine")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--instances", type=int, default=1, help="nnslim serve --instances")
    parser.add_argument("--protocol", choices=("http", "grpc"), default="http")
    parser.add_argument("--out", type=Path, default=ROOT / "artifacts" / "bench" / "serve.json")
    args = parser.parse_args()
    from nnslim.compiler.runtime.engine import load_engine
    from nnslim.training.data import write_mni_tissue_raw

    OUT.mkdir(parents=True, exist_ok=True)
    data = write_mni_tissue_raw(OUT / "mni") if not (OUT / "mni" / "imagesTr").is_dir() else OUT / "mni"
    scan = nib.load(data / "imagesTr" / "mni_0000.nii.gz")
    image = np.asarray(scan.dataobj, dtype=np.float32)[None]  # [C, X, Y, Z], as a client sends it
    spacing = np.asarray(scan.header.get_zooms()[:3], dtype=np.float32)
    if not (args.engine / "manifest.json").is_file():
        subprocess.run([sys.executable, "-m", "nnslim", "build-engine", str(MODEL), "--out", str(args.engine)],
                       check=True)
    engine = load_engine(args.engine)

    def in_process() -> np.ndarray:
        return engine.segment(image, tuple(float(s) for s in spacing))

    reference = in_process()  # also the warm-up
    modes = ("in-process", "served")
    wall: dict[str, dict[int, list[float]]] = {m: {n: [] for n in args.clients} for m in modes}
    calls: dict[str, dict[int, list[float]]] = {m: {n: [] for n in args.clients} for m in modes}
    served_volumes = 0
    with engine, served(args.engine, args.instances) as ports:
        run = {"in-process": in_process, "served": served_segment(args.protocol, ports[args.protocol], image, spacing)}
        run["served"]()  # warm-up: the first request to each model instance
        for round_ in range(args.repeats):
            for clients in args.clients:
                for mode in modes if round_ % 2 == 0 else modes[::-1]:
                    seconds, each, labels = timed_round(run[mode], clients)
                    wall[mode][clients].append(seconds)
                    calls[mode][clients].extend(each)
                    agreement = min(float(np.mean(x == reference)) for x in labels)
                    if agreement < 1.0:
                        raise SystemExit(f"{mode}, {clients} client(s): labels differ from in-process ones "
                                         f"(voxel agreement {agreement:.6f})")
                    served_volumes += len(labels) if mode == "served" else 0
                    print(f"[{round_ + 1}/{args.repeats}] {mode}, {clients} client(s): {seconds:.2f} s",
                          file=sys.stderr)
    rows = []
    for clients in args.clients:
        per_min = {m: VOLUMES_PER_MEASUREMENT * 60 / statistics.median(wall[m][clients]) for m in modes}
        trip, segment = statistics.median(calls["served"][clients]), statistics.median(calls["in-process"][clients])
        rows.append({"clients": clients, "in_process_volumes_per_minute": per_min["in-process"],
                     "served_volumes_per_minute": per_min["served"],
                     "served_vs_in_process": per_min["served"] / per_min["in-process"],
                     "round_trip_seconds": trip, "segment_seconds": segment, "overhead_seconds": trip - segment})
    print(f"\n{'clients':>7}{'in-process vol/min':>20}{'served vol/min':>16}{'served/in-process':>19}"
          f"{'round trip s':>14}{'segment s':>11}{'overhead s':>12}")
    for row in rows:
        print(f"{row['clients']:>7}{row['in_process_volumes_per_minute']:>20.2f}{row['served_volumes_per_minute']:>16.2f}"
              f"{row['served_vs_in_process']:>18.2f}x{row['round_trip_seconds']:>14.2f}{row['segment_seconds']:>11.2f}"
              f"{row['overhead_seconds']:>12.2f}")
    print(f"labels: all {served_volumes} served volumes equal the in-process labels ({args.protocol}, "
          f"--instances {args.instances}, {engine.runtime.label})")
    record = {"cpu": {"name": cpu_name(), "cores": os.cpu_count()}, "machine": platform.machine(),
              "engine": str(args.engine), "backend": engine.runtime.backend, "precision": engine.runtime.precision,
              "protocol": args.protocol, "instances": args.instances, "volume_shape": list(image.shape),
              "volumes_per_measurement": VOLUMES_PER_MEASUREMENT, "repeats": args.repeats, "labels_equal": True,
              "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
