"""The graphs of an engine beyond the fp32 one, each made by its precision's producer.

`model.opt.onnx` is the optimized fp32 graph (export + graph passes). A precision whose graph is
another file names, in its record (`nnslim.compiler.runtime.precision.PRECISIONS`), the function
that makes it from the fp32 graph: `produce` resolves that name and calls it with a `GraphJob`,
which carries everything a producer may need (the parity tiles and PyTorch's logits for them, the
calibration volumes, the backends that will run the graph). A producer returns the graph file and
what the manifest records of its stage. The pipeline calls `produce` for every graph its
candidates need and never names a precision.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from nnslim.compiler.runtime.precision import graph_producer


@dataclass(frozen=True)
class GraphJob:
    """What a graph producer gets.

    Attributes:
        fp32: the optimized fp32 graph (`model.opt.onnx`).
        staging: the engine directory being built (write the graph here).
        tiles: the parity tiles `[N, C, *patch]`; expected: PyTorch fp32 logits for them.
        batch_size: the engine's batch.
        in_channels, patch, preprocessing: the model's input, to cut calibration tiles.
        calibration: real volumes for calibration (empty: none given).
        calibration_tiles: tiles per calibration volume.
        backends: the backends that will run the graph, the one to score it on first.
        compiled_for: the backend that compiles the graph into its own artifact (e.g. "tensorrt"),
            or None when the graph itself runs.
        pass_parity: check ONNX Runtime parity after each graph pass.
    """

    fp32: Path
    staging: Path
    tiles: torch.Tensor
    expected: torch.Tensor
    batch_size: int
    in_channels: int
    patch: tuple[int, ...]
    preprocessing: dict[str, Any]
    calibration: tuple[Path, ...] = ()
    calibration_tiles: int = 4
    backends: tuple[str, ...] = ()
    compiled_for: str | None = None
    pass_parity: bool = True


Producer = Callable[[GraphJob], "tuple[Path, dict[str, Any]]"]


def produce(graph: str, job: GraphJob) -> tuple[Path, dict[str, Any]]:
    """Make the `graph` kind of graph (its precision record's producer); returns the file and the stage record."""
    name = graph_producer(graph)
    if name is None:
        raise ValueError(f"no precision names a producer for the {graph!r} graph")
    module, _, function = name.partition(":")
    producer: Producer = getattr(importlib.import_module(module), function)
    return producer(job)
