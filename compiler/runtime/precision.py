"""Numeric precisions as data: one record per precision, so adding one touches this table, the
function that makes its graph, and the capability sets of the backends that run it.

Where a precision lives:
- fp32: the exported graph after the graph passes (`model.opt.onnx`).
- fp16: an fp16 graph (nnslim's fp16 pass: fp16 convs, fp32 norms and I/O); GPU backends.
- bf16: a *runtime hint* on the fp32 graph (OpenVINO's inference precision on CPUs with
  AVX512_BF16 or AMX; PyTorch autocast); there is no bf16 graph.
- int8: explicit Q/DQ nodes in the graph (symmetric, zero-point 0, per-channel weights,
  calibrated on real tiles), the one int8 form that TensorRT 10/11, OpenVINO and ONNX Runtime all
  run. Layers left unquantized run in the backend's reduced float precision where it has one.

Each precision has a parity gate against PyTorch fp32, used by `build-engine` on the parity tiles
and by the benchmarks on whole volumes: a candidate outside its gate is never chosen.
"""

from __future__ import annotations

from dataclasses import dataclass

from nnslim.compiler.runtime.manifest import Tolerance
from nnslim.errors import InputError


@dataclass(frozen=True)
class Precision:
    """One precision, the graph it runs, and its parity gate.

    Attributes:
        name: as written in manifests and on the command line.
        graph: which graph file the engine needs for it (a precision's own, or "fp32").
        max_rel_logit_error: max |logit error| / max |reference logit| on the parity tiles.
        min_agreement: argmax agreement with PyTorch fp32 (tiles at build time, volumes in benchmarks).
        max_dice_drop: mean Dice against labels may fall at most this much below fp32's, where labels
            are known (benchmarks); None: not gated on Dice.
        runs_as: one line for the README / manifest on what executes it.
        producer: "module:function" of the build step that makes its graph from the optimized fp32
            graph (`nnslim.compiler.stages.graphs`); None: the fp32 graph itself.
        calibrated: its graph needs real calibration tiles (`--parity-volume` / `--calibration`).
        cpu_auto: `--precision auto` tries it on CPU backends (fp16 is a GPU precision: CPUs
            convert it back to fp32).
    """

    name: str
    graph: str
    max_rel_logit_error: float
    min_agreement: float
    max_dice_drop: float | None
    runs_as: str
    producer: str | None = None
    calibrated: bool = False
    cpu_auto: bool = True

    @property
    def tolerance(self) -> Tolerance:
        """The parity gate as the manifest records it."""
        return Tolerance(self.max_rel_logit_error, self.min_agreement)


# ONNX Runtime's CPU reductions (InstanceNormalization) accumulate in float32 and lose precision
# as tiles grow (3e-4 of the logit scale at 96^3, 6e-3 at 160^3 on the demo model), hence 1e-2
# for fp32. Reduced precisions carry 8-10 mantissa bits (bf16, fp16) or 8-bit codes (int8)
# through every conv; their error bound is loose and the agreement floor is the gate that matters.
PRECISIONS: dict[str, Precision] = {
    p.name: p
    for p in (
        Precision("fp32", "fp32", 1e-2, 0.999, None, "the fp32 graph"),
        Precision("fp16", "fp16", 5e-2, 0.995, None, "the fp16 graph (fp32 norms and I/O)",
                  producer="nnslim.compiler.stages.passes.fp16:float16_graph", cpu_auto=False),
        Precision("bf16", "fp32", 1e-1, 0.995, None, "the fp32 graph with a bf16 runtime hint"),
        Precision("int8", "int8", 3e-1, 0.99, 0.01, "the Q/DQ int8 graph (unquantized layers in bf16 where the CPU has it)",
                  producer="nnslim.compiler.stages.quantize:int8_graph", calibrated=True),
    )
}

AUTO = "auto"


def get_precision(name: str) -> Precision:
    """The record for `name`; an unknown name is an error, never another precision's gate."""
    try:
        return PRECISIONS[name]
    except KeyError:
        raise InputError(f"unknown precision {name!r}; choose one of {', '.join(PRECISIONS)} (or {AUTO!r})") from None


def graph_producer(graph: str) -> str | None:
    """The producer of a graph kind (the first precision that names it); None for the fp32 graph."""
    return next((p.producer for p in PRECISIONS.values() if p.graph == graph and p.producer), None)
