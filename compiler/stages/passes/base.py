"""Pass infrastructure: a pass rewrites an onnx-graphsurgeon graph in place and says what changed.

The manager runs one explicit, ordered tuple of passes. After each pass it can run the graph in
ONNX Runtime on fixed probe inputs and compare with the graph it started from (max absolute
logit error, argmax agreement); an exact pass that moves the logits, or an approximate one
(fp16) that drops the argmax agreement below its floor, stops the build with an error that
names the pass and the passes before it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from typing import ClassVar, Protocol, Sequence

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from nnslim.errors import NnslimError

logger = logging.getLogger(__name__)


class PassError(NnslimError):
    """A graph pass failed or broke numerical parity."""


@dataclass(frozen=True)
class PassResult:
    """What a pass did: how many rewrites, and a short description."""

    changed: int
    description: str = ""


class GraphPass(Protocol):
    """A rewrite of a graph, in place. `exact` passes must not change the outputs (beyond
    float rounding); approximate ones (fp16) are held to an argmax-agreement floor."""

    exact: ClassVar[bool]

    def run(self, graph: gs.Graph) -> PassResult: ...


@dataclass(frozen=True)
class PassRecord:
    name: str
    changed: int
    description: str
    seconds: float
    max_abs_error: float | None = None
    argmax_agreement: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


class ParityProbe:
    """Runs graphs in ONNX Runtime (CPU) on fixed inputs.

    Figures are reported against the graph the manager started from (cumulative); an exact pass
    is checked against the graph just before it, so the error an approximate pass introduced
    does not count against the exact passes after it.
    """

    def __init__(self, reference: onnx.ModelProto, inputs: np.ndarray, exact_rtol: float = 1e-4,
                 min_agreement: float = 0.995) -> None:
        self.inputs = inputs.astype(np.float32)
        self.reference = self.previous = self._run(reference)
        self.scale = float(np.abs(self.reference).max()) or 1.0
        self.exact_rtol, self.min_agreement = exact_rtol, min_agreement

    def _run(self, model: onnx.ModelProto) -> np.ndarray:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        feed_type = session.get_inputs()[0].type
        x = self.inputs.astype(np.float16) if "float16" in feed_type else self.inputs
        (out,) = session.run(None, {session.get_inputs()[0].name: x})
        return out.astype(np.float32)

    def check(self, model: onnx.ModelProto, name: str, exact: bool) -> tuple[float, float]:
        """Run `model`; raise if the pass broke parity; return (max |error|, agreement) vs the start."""
        out = self._run(model)
        if out.shape != self.reference.shape:
            raise PassError(f"output shape changed from {self.reference.shape} to {out.shape}")
        step = float(np.abs(out - self.previous).max())
        if exact and step > self.exact_rtol * self.scale:
            raise PassError(f"exact pass {name} changed the logits by {step:.3g} (allowed {self.exact_rtol * self.scale:.3g})")
        agreement = float((out.argmax(1) == self.reference.argmax(1)).mean())
        if agreement < self.min_agreement:
            raise PassError(f"pass {name} dropped argmax agreement to {agreement:.5f} (floor {self.min_agreement})")
        self.previous = out
        return float(np.abs(out - self.reference).max()), agreement


class PassManager:
    """Runs `passes` in order on a model; see the module docstring."""

    def __init__(self, passes: Sequence[GraphPass]) -> None:
        self.passes = tuple(passes)

    def run(self, model: onnx.ModelProto, probe: ParityProbe | None = None) -> tuple[onnx.ModelProto, list[PassRecord]]:
        graph = gs.import_onnx(model)
        records: list[PassRecord] = []
        for graph_pass in self.passes:
            name = type(graph_pass).__name__
            started = time.perf_counter()
            try:
                result = graph_pass.run(graph)
                error = agreement = None
                if probe is not None:  # exporting costs a full graph copy: only when it is checked
                    error, agreement = probe.check(_export(graph, model), name, graph_pass.exact)
            except Exception as exc:
                before = ", ".join(r.name for r in records) or "none"
                raise PassError(f"graph pass {name} failed (passes run before it: {before}): {exc}") from exc
            records.append(PassRecord(name, result.changed, result.description,
                                      round(time.perf_counter() - started, 3), error, agreement))
            logger.info("%s: %d change(s) %s", name, result.changed, result.description)
        return _export(graph, model), records


def replace_tensor(tensors: list, old: gs.Tensor, new: gs.Tensor) -> None:
    """Swap `old` for `new` in a node's inputs or outputs (gs lists keep both sides linked, so
    items are assigned one by one)."""
    for i, tensor in enumerate(tensors):
        if tensor is old:
            tensors[i] = new


def _export(graph: gs.Graph, like: onnx.ModelProto) -> onnx.ModelProto:
    """Export with the original model's IR version and opsets (gs would pick its own)."""
    exported = gs.export_onnx(graph, do_type_check=True)
    exported.ir_version = like.ir_version
    del exported.opset_import[:]
    exported.opset_import.extend(like.opset_import)
    exported.producer_name = like.producer_name
    return exported
