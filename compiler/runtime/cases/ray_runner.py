"""`nnslim infer ... --ray [ADDRESS]`: a folder's cases on a Ray cluster, with Ray Data.

The cases (after `plan`: --continue, --overwrite and the part are decided before anything runs)
become a dataset of case indices, one block each; `map_batches` sends them to a pool of actors,
each of which opens the engine once (`load_engine` on the engine directory, verified again where
it runs) and reads, segments and writes one case per call with the driver's own stages
(`stages.CaseStages.for_predictor`), so outputs, records and errors are those of the local path. By
default there is one actor per node, holding that many CPUs and using them all (threads); with
`--ray-actors N` the cluster's CPUs are shared out among N actors. An engine that runs on a GPU
asks for one GPU per actor instead.

A case's own error (an unreadable scan) is its result, as locally. An actor that dies in the middle
of a case (a killed worker, a lost node) is restarted by Ray and the case retried, up to `RETRIES`
times; a case that kills its worker every time (out of memory, a crash in the runtime) fails alone,
with that said. Writes are atomic, so an interrupted attempt leaves no half-written output (a
marked temporary at most, swept by the next write into that folder). Results are reported in case
order, as locally. Each actor plans its cases within the memory of its node (not a share of it).

ADDRESS: none or "local": a Ray instance started on this machine for the run and stopped after;
"auto": the cluster of $RAY_ADDRESS (or the one `ray start` left on this machine); anything else is
passed to `ray.init(address=...)` ("ray://head:10001", "head:6379"). The workers must reach the
engine directory, the inputs and the output folder at the same paths (a shared file system).
"""

from __future__ import annotations

import logging
import os
import pickle
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from nnslim.compiler.runtime.cases.plan import CasePlan
from nnslim.compiler.runtime.cases.stages import CaseResult, CaseStages
from nnslim.errors import EngineError, SettingsError
from nnslim.extras import missing_extra

logger = logging.getLogger(__name__)

RETRIES = 2  # a case whose actor dies (a killed worker, a lost node) is tried again this many times


@dataclass(frozen=True)
class RayRunner:
    """Runs a folder's cases on Ray (module docstring); a `run.Runner`."""

    engine_dir: Path
    load_options: dict[str, Any]  # load_engine's options, as the driver opened the engine
    device: str  # the driver engine's device: "cuda" asks each actor for a GPU
    address: str | None = None
    actors: int = 0  # 0: one per node of the cluster

    def __call__(self, plans: list[CasePlan], cases: CaseStages, report: Callable[[CaseResult, float], None],
                 folder: bool) -> list[CaseResult]:
        ray = _import_ray()
        if self.actors < 0:
            raise SettingsError(f"--ray-actors must be 1 or more (or 0: one per node), got {self.actors}")
        if not plans:  # --continue on a finished folder: no cluster to start or reach
            return []
        started_here = not ray.is_initialized()
        if started_here:
            _init(ray, self.address)
        try:
            return self._run(ray, plans, cases, report)
        finally:
            if started_here:
                ray.shutdown()

    def _run(self, ray: Any, plans: list[CasePlan], cases: CaseStages,
             report: Callable[[CaseResult, float], None]) -> list[CaseResult]:
        logging.getLogger("ray.data").setLevel(logging.ERROR)  # not a line per dataset, nor for what follows
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False  # nnslim's own bar and lines report the cases
        context.max_errored_blocks = len(plans)  # a case whose worker keeps dying fails alone (below)
        nodes = [n for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get("CPU", 0) > 0]
        actors = self.actors or max(1, len(nodes))
        cpus = int(ray.cluster_resources().get("CPU", os.cpu_count() or 1))
        per_actor = max(1, cpus // actors)  # an actor per node by default, with all its cores
        options = {**self.load_options, "threads": self.load_options.get("threads") or per_actor}
        resources = {"num_gpus": 1} if self.device == "cuda" else {"num_cpus": per_actor}
        # each row carries its case, so the actors' constructor gets only the engine and the settings
        rows = [{"case": i, "plan": pickle.dumps(plan)} for i, plan in enumerate(plans)]
        dataset = ray.data.from_items(rows, override_num_blocks=len(plans))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # max_task_retries is a remote argument Ray Data still takes this way
            done = dataset.map_batches(_CaseActor, fn_constructor_args=(str(self.engine_dir), options, cases),
                                       batch_size=1, compute=ray.data.ActorPoolStrategy(size=actors),
                                       max_task_retries=RETRIES, **resources)
        results: dict[int, tuple[CaseResult, float]] = {}
        reported = 0
        for row in done.iter_rows():  # as cases finish; reported in case order, as locally
            index, result, seconds = pickle.loads(row["result"])
            results.setdefault(index, (result, seconds))  # a retried case that had finished: once
            while reported in results:
                report(*results[reported])
                reported += 1
        for index in range(reported, len(plans)):  # a case whose worker died on every try, and those after it
            if index not in results:
                died = EngineError(f"the Ray worker segmenting it died {RETRIES + 1} times (killed, out of memory, "
                                   "or a crash in the runtime); nothing of it was written")
                results[index] = (cases.failed(plans[index], died), 0.0)
            report(*results[index])
        return [results[i][0] for i in range(len(plans))]


class _CaseActor:
    """One engine, opened once; one case per call, with the driver's stages. Ray Data restarts an
    actor that dies (max_restarts -1, its default) and the case is retried `RETRIES` times."""

    def __init__(self, engine_dir: str, options: dict[str, Any], cases: CaseStages) -> None:
        from nnslim.compiler.runtime.engine import load_engine

        self.engine = load_engine(engine_dir, **options)
        self.cases = cases.for_predictor(self.engine.predictor)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from nnslim.compiler.runtime.cases.run import ISOLATED

        out = []
        for index, blob in zip(batch["case"], batch["plan"]):
            plan, start = pickle.loads(blob), time.perf_counter()
            try:
                result = self.cases.write(plan, self.cases.compute(plan, self.cases.read(plan)))
            except ISOLATED as exc:
                result = self.cases.failed(plan, exc)
            out.append(pickle.dumps((int(index), result, time.perf_counter() - start)))
        return {"result": np.array(out, dtype=object)}


def _import_ray() -> Any:
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as exc:
        raise missing_extra("ray", "infer --ray") from exc
    return ray


def _init(ray: Any, address: str | None) -> None:
    """Connect to, or start, the cluster (module docstring: ADDRESS)."""
    quiet = {"log_to_driver": False, "logging_level": logging.ERROR, "configure_logging": True}
    if address in (None, "", "local"):
        ray.init(include_dashboard=False, num_cpus=os.cpu_count(), **quiet)
    elif address == "auto":
        ray.init(address=os.environ.get("RAY_ADDRESS") or "auto", **quiet)
    else:
        ray.init(address=address, **quiet)
    logger.info("ray: %s", ray.cluster_resources())
