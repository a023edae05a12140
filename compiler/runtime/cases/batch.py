"""Many cases in a row: reading, computing and writing overlapped, one case's failure its own.

Each case runs three stages: `read` (header checks, voxels, preprocessing), `compute` (the network
over the sliding window) and `write` (label map, probabilities, preview). With `io_workers >= 1`
(nnU-Net's `-npp`/`-nps` idea, in threads: ONNX Runtime and OpenVINO release the GIL while they
compute) the next case is read in a background thread while the network runs the current one, and
finished cases are written by up to `io_workers` background threads:

    main thread:   compute k-1 | compute k   | compute k+1
    reader:        read k      | read k+1    | read k+2
    writers:                   | write k-1   | write k

Memory stays bounded: one case read ahead, at most `io_workers` cases waiting to be written.
Results are reported (`on_result`) in case order as soon as a case and every case before it are
done: from the writer thread that finished it (one report at a time, under a lock), or from the
calling thread (a case that failed before its write; everything when `io_workers` is 0).
A stage that raises one of `isolated` errors fails only its case (`failed(case, exc)` makes the
result); anything else (a bug, Ctrl-C) stops the run after the running writes finish, which are
atomic.
"""

from __future__ import annotations

import functools
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Generic, Sequence, TypeVar

from nnslim.errors import InputError

Case = TypeVar("Case")
Result = TypeVar("Result")


PROBABILITIES_FORMATS = ("nnslim", "nnunet")  # BatchOptions.probabilities_format


@dataclass(frozen=True)
class BatchOptions:
    """What a run writes beside the label maps, and how it overlaps I/O with compute.

    Attributes:
        io_workers: 0 runs read, compute and write one after the other; N >= 1 reads one case
            ahead in a thread and writes with N threads (module docstring).
        save_probabilities: also write `CASE.npz` (`nnslim.compiler.runtime.probabilities`).
        probabilities_format: "nnslim" (float16 `[K, X, Y, Z]`) or "nnunet" (nnU-Net's float32 `.npz`
            and `.pkl`, which its ensembling and post-processing read: `nnunet.files`).
        label_steps: nnU-Net post-processing applied to each label map before it is written
            (`nnunet.postprocessing.read_steps`; the probabilities are left as they are, as nnU-Net does).
        preview: also write a PNG per case (folder: `OUTPUT/previews/CASE.png` and `index.html`).
        log_jsonl: append one JSON line per case here (`log.CaseLog`).
        previous_stage: a cascade stage's input: the folder of its previous stage's segmentations,
            one per case under the case's output name (`stages.read_previous_stage`).
    """

    io_workers: int = 1
    save_probabilities: bool = False
    probabilities_format: str = "nnslim"
    label_steps: tuple[dict, ...] = ()
    preview: bool = False
    log_jsonl: Path | None = None
    previous_stage: Path | None = None


@dataclass(frozen=True)
class Stages(Generic[Case, Result]):
    """A case's three stages; each returns what the next takes, `write` returns the result."""

    read: Callable[[Case], Any]
    compute: Callable[[Case, Any], Any]
    write: Callable[[Case, Any], Result]
    failed: Callable[[Case, BaseException], Result]  # the result of a case whose stage raised


class _Timed:
    """Runs a stage and adds its duration to the case's seconds (stages may run in other threads)."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def __call__(self, stage: Callable, *args: Any) -> Any:
        started = time.perf_counter()
        try:
            return stage(*args)
        finally:
            self.seconds += time.perf_counter() - started


def run_cases(cases: Sequence[Case], stages: Stages[Case, Result], io_workers: int,
              on_result: Callable[[Result, float], None], isolated: tuple[type[BaseException], ...]) -> list[Result]:
    """Run every case through `stages`, overlapped when `io_workers >= 1` (module docstring).

    `on_result(result, seconds)` gets each case's result in case order with the sum of its own
    stages' durations (read + compute + write), whichever thread ran them; with overlap the run's
    wall time is less than the sum over cases.
    """
    if io_workers < 0:
        raise InputError(f"io_workers must be 0 or more, got {io_workers}")
    results: list[Result] = []

    def report(result: Result, timer: _Timed) -> None:
        results.append(result)
        on_result(result, timer.seconds)

    if io_workers == 0 or len(cases) < 2:
        for case in cases:
            timer = _Timed()
            computed = _compute(case, _attempt(isolated, timer, stages.read, case), stages, timer, isolated)
            if not isinstance(computed, _Failure):
                computed = _attempt(isolated, timer, stages.write, case, computed)
            report(stages.failed(case, computed.error) if isinstance(computed, _Failure) else computed, timer)
        return results
    with ThreadPoolExecutor(1, thread_name_prefix="nnslim-read") as reader, \
            ThreadPoolExecutor(io_workers, thread_name_prefix="nnslim-write") as writers:
        try:
            _overlapped(cases, stages, reader, writers, io_workers, report, isolated)
        except BaseException:
            reader.shutdown(wait=True, cancel_futures=True)  # a write under way finishes (atomic); queued ones do not start
            writers.shutdown(wait=True, cancel_futures=True)
            raise
    return results


def _overlapped(cases: Sequence[Case], stages: Stages, reader: ThreadPoolExecutor, writers: ThreadPoolExecutor,
                io_workers: int, report: Callable, isolated: tuple[type[BaseException], ...]) -> None:
    timers = [_Timed() for _ in cases]
    ordered = _InOrder(report)

    def read(k: int) -> Any:
        return _attempt(isolated, timers[k], stages.read, cases[k])

    def written(k: int, future: Future) -> None:  # in the writer thread, as soon as case k is written
        try:
            result = future.result()
        except isolated as exc:
            result = stages.failed(cases[k], exc)
        except BaseException:  # noqa: BLE001 - not isolated: the main thread raises it (`_wait`)
            return
        ordered(k, result, timers[k])

    reading = reader.submit(read, 0)
    writing: deque[Future] = deque()  # the writes under way, oldest first
    for k, case in enumerate(cases):
        loaded = reading.result()
        if k + 1 < len(cases):  # read ahead while the network runs case k
            reading = reader.submit(read, k + 1)
        computed = _compute(case, loaded, stages, timers[k], isolated)
        while len(writing) >= io_workers:  # bounded: the oldest write finishes before another queues
            _wait(writing.popleft(), isolated)
        ordered.check()
        if isinstance(computed, _Failure):
            ordered(k, stages.failed(case, computed.error), timers[k])
        else:
            writing.append(writers.submit(timers[k], stages.write, case, computed))
            writing[-1].add_done_callback(functools.partial(written, k))
        del loaded, computed  # the write holds what it needs; nothing else keeps this case alive
    while writing:
        _wait(writing.popleft(), isolated)
    ordered.check()


def _wait(future: Future, isolated: tuple) -> None:
    """Wait for a write; an isolated error was reported by its callback, anything else is raised here."""
    try:
        future.result()
    except isolated:
        pass


class _InOrder:
    """Reports results in case order as soon as every earlier case is reported, from whichever
    thread completes the sequence (one at a time); an error raised while reporting is kept for
    the main thread (`check`)."""

    def __init__(self, report: Callable[[Any, _Timed], None]) -> None:
        self.report, self.lock = report, threading.Lock()
        self.done: dict[int, tuple[Any, _Timed]] = {}
        self.next, self.error = 0, None

    def __call__(self, k: int, result: Any, timer: _Timed) -> None:
        with self.lock:
            self.done[k] = (result, timer)
            while self.error is None and self.next in self.done:
                try:
                    self.report(*self.done.pop(self.next))
                except BaseException as exc:  # noqa: BLE001 - re-raised in the main thread
                    self.error = exc
                self.next += 1

    def check(self) -> None:
        if self.error is not None:
            raise self.error


class _Failure:
    """A stage's isolated error, carried to where the case is reported."""

    def __init__(self, error: BaseException) -> None:
        self.error = error


def _attempt(isolated: tuple, stage: Callable, *args: Any) -> Any:
    """`stage(*args)`, or the `_Failure` of an isolated error it raised."""
    try:
        return stage(*args)
    except isolated as exc:
        return _Failure(exc)


def _compute(case: Any, loaded: Any, stages: Stages, timer: _Timed, isolated: tuple) -> Any:
    """The computed case, or the `_Failure` of its read or its computation."""
    if isinstance(loaded, _Failure):
        return loaded
    return _attempt(isolated, timer, stages.compute, case, loaded)
