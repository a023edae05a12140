"""Choose the engine by measurement: every (backend, precision) candidate is run on the parity tiles,
checked against PyTorch fp32 with its precision's gate, and timed; the fastest that passes wins.

Timing: one warm-up call per candidate, then `repeats` rounds in which every candidate runs the
same batch once (interleaved, so a slow moment of a shared machine hits all of them alike); the
median of each is recorded, with PyTorch eager's in the same rounds as the reference ("x eager").
A candidate outside its gate is recorded with the reason and never chosen.
"""

from __future__ import annotations

import logging
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from nnslim.compiler.runtime.backends import BACKENDS, OpenRequest, get_backend, open_predictor
from nnslim.compiler.runtime.manifest import CandidateRecord, Tolerance
from nnslim.compiler.runtime.precision import AUTO, PRECISIONS, get_precision
from nnslim.compiler.runtime.window.config import Predictor
from nnslim.compiler.stages.parity import ParityError, ParityReport, compare, run_batched

logger = logging.getLogger(__name__)

@dataclass(frozen=True)
class Candidate:
    backend: str
    precision: str

    @property
    def graph(self) -> str:
        return get_precision(self.precision).graph

    @property
    def label(self) -> str:
        return f"{self.backend} {self.precision}"


@dataclass
class CandidateResult:
    candidate: Candidate
    model: str  # file name in the engine directory
    parity: ParityReport | None = None
    tolerance: Tolerance | None = None
    seconds: list[float] = field(default_factory=list)
    error: str | None = None  # why it could not run

    @property
    def passed(self) -> bool:
        return self.error is None and self.parity is not None and self.parity.within(self.tolerance)

    @property
    def median_seconds(self) -> float | None:
        return statistics.median(self.seconds) if self.seconds else None

    def record(self, reference_seconds: float | None = None) -> CandidateRecord:
        """The manifest's record of this candidate (`selection.candidates`)."""
        median = self.median_seconds
        return CandidateRecord(
            backend=self.candidate.backend, precision=self.candidate.precision, model=self.model, passed=self.passed,
            error=self.error, seconds_per_batch=median,
            speedup_vs_torch=reference_seconds / median if reference_seconds and median else None,
            parity=self.parity.record() if self.parity else None, tolerance=self.tolerance)


def plan_candidates(backend: str, precision: str, calibrated: bool) -> tuple[list[Candidate], list[str]]:
    """The CPU candidates to measure, and why others were left out.

    `backend` is a CPU backend name or "auto" (every available CPU backend); `precision` a name or
    "auto" (every precision the backend runs here whose record allows it on CPUs: not fp16, which
    CPUs run by converting to fp32). A precision whose graph is calibrated (int8) needs real
    calibration tiles (`calibrated`).
    """
    backends = [b for b in BACKENDS.values() if b.device == "cpu"] if backend == AUTO else [get_backend(backend)]
    precisions = list(PRECISIONS) if precision == AUTO else [get_precision(precision).name]
    chosen, skipped = [], []
    for entry in backends:
        if not entry.available():
            skipped.append(f"{entry.name}: not installed here")
            continue
        for name in precisions:
            record = PRECISIONS[name]
            if name not in entry.precisions():
                if precision != AUTO or record.cpu_auto:
                    skipped.append(f"{entry.name} {name}: not supported on this machine")
                continue
            if precision == AUTO and not record.cpu_auto:
                skipped.append(f"{entry.name} {name}: a GPU precision (CPUs convert it to fp32)")
                continue
            if record.calibrated and not calibrated:
                skipped.append(f"{entry.name} {name}: needs real calibration tiles (--parity-volume or --calibration)")
                continue
            chosen.append(Candidate(entry.name, name))
    return chosen, skipped


def measure(candidates: list[Candidate], models: dict[str, Path], expected: torch.Tensor, tiles: torch.Tensor,
            batch_size: int, tolerance_for: Callable[[str], Tolerance], source: str, reference: Predictor,
            repeats: int = 3, threads: int = 0) -> tuple[list[CandidateResult], float | None]:
    """Parity and timing of each candidate; returns the results and PyTorch's median seconds per batch.

    Args:
        models: graph kind ("fp32", "int8", ...) -> model file.
        expected: PyTorch fp32 logits of `tiles` (the reference every candidate is compared with).
        tolerance_for: precision name -> its gate.
        reference: the PyTorch predictor, timed in the same rounds.
        repeats: timed rounds (0: parity only, for a single candidate there is nothing to choose).
    """
    results, predictors = [], {}
    for candidate in candidates:
        model = models[candidate.graph]
        result = CandidateResult(candidate, model.name, tolerance=tolerance_for(candidate.precision))
        try:
            predict = open_predictor(candidate.backend, OpenRequest(model, precision=candidate.precision, threads=threads))
            logits = run_batched(predict, tiles, batch_size)
            result.parity = compare(expected, logits, source)
            predictors[candidate] = predict
        except Exception as exc:  # a backend that fails to open or run is a rejected candidate, not a crash
            result.error = f"{type(exc).__name__}: {exc}"
            logger.warning("candidate %s failed: %s", candidate.label, result.error)
        results.append(result)
    reference_seconds = _time_interleaved(results, predictors, reference, tiles[:batch_size].numpy(), repeats)
    return results, reference_seconds


def _time_interleaved(results: list[CandidateResult], predictors: dict[Candidate, Predictor], reference: Predictor,
                      batch: torch.Tensor, repeats: int) -> float | None:
    if repeats < 1:
        return None
    runnable = [r for r in results if r.candidate in predictors]
    for result in runnable:  # warm-up
        predictors[result.candidate](batch)
    reference(batch)
    reference_seconds = []
    for _ in range(repeats):
        for result in runnable:
            started = time.perf_counter()
            predictors[result.candidate](batch)
            result.seconds.append(time.perf_counter() - started)
        started = time.perf_counter()
        reference(batch)
        reference_seconds.append(time.perf_counter() - started)
    return statistics.median(reference_seconds)


def choose(results: list[CandidateResult]) -> CandidateResult:
    """The fastest candidate inside its gate (the first passing one when none was timed)."""
    passing = [r for r in results if r.passed]
    if not passing:
        lines = [f"{r.candidate.label}: " + (r.error or _miss(r)) for r in results]
        raise ParityError("no candidate is within its parity gate; engine not written:\n  " + "\n  ".join(lines))
    timed = [r for r in passing if r.seconds]
    return min(timed, key=lambda r: r.median_seconds) if timed else passing[0]


def _miss(result: CandidateResult) -> str:
    parity, tolerance = result.parity, result.tolerance
    return (f"argmax agreement {parity.argmax_agreement:.5f} (needs >= {tolerance.min_argmax_agreement}), "
            f"max rel logit error {parity.max_rel_logit_error:.2e} (allowed {tolerance.max_rel_logit_error:.2e})")


def ranking(results: list[CandidateResult]) -> list[CandidateResult]:
    """Passing candidates fastest first, then the failing ones (the runtime's fallback order)."""
    return sorted(results, key=lambda r: (not r.passed, r.median_seconds if r.median_seconds is not None else float("inf")))
