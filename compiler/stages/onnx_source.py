"""An ONNX file as the build's input: any 3D segmentation graph `[N, C, X, Y, Z] -> [N, K, X, Y, Z]`
or 2D graph `[N, C, H, W] -> [N, K, H, W]` (logits; or probabilities or sigmoid regions, named by
the metadata's `output`: `source.AsLogits`), static or dynamic batch and spatial axes, with what the
runtime must know of it given as metadata (`source.MODULE_KEYS`; from `build-engine --metadata
FILE.json` or the Python API).

The graph is built as it is (nothing to fuse or prune in PyTorch): its input and output are renamed
to the engine's `image` and `logits`, the graph passes make the batch dynamic and optimize it, and
the parity reference is ONNX Runtime fp32 on the original file (`OnnxReference`). A 2D graph
`[N, C, H, W]` is driven with 3D tiles one slice thick (`source.SliceWrapper`; Squeeze and Unsqueeze
nodes around it). Refused, naming what was seen: more or fewer than one input or output, a rank
other than 4 or 5 (or one the patch_size contradicts), a static channel count other than the metadata's, static spatial axes other than the patch,
a static class count other than the number of label names. Weights in external data files are read
and embedded (the graph and its weights as one file, under protobuf's 2 GB).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx.external_data_helper
import torch
from torch import nn

from nnslim.compiler.stages.source import TINY, AsLogits, SliceWrapper, Source, SourceError, module_metadata

INPUT, OUTPUT = "image", "logits"  # the engine's tensor names (`engine_manifest`)
NETWORK_OUTPUT = "nnslim_network_output"  # the graph's own output, when nodes follow it (`_as_logits`, `_as_3d`)
SLICE_INPUT = "nnslim_slice"  # a 2D graph's own input, after the Squeeze of the 3D tile (`_as_3d`)


class OnnxReference(nn.Module):
    """The original graph on ONNX Runtime's CPU provider, fp32, as a module (the parity reference).
    A graph with a static batch is run one tile at a time."""

    def __init__(self, data: bytes, input_name: str, static_batch: int | None) -> None:
        super().__init__()
        import onnxruntime as ort

        self.session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
        self.input_name, self.static_batch = input_name, static_batch

    def forward(self, tiles: torch.Tensor) -> torch.Tensor:
        array = np.ascontiguousarray(tiles.detach().cpu().numpy(), dtype=np.float32)
        step = self.static_batch or len(array)
        outs = [self.session.run(None, {self.input_name: array[i:i + step]})[0] for i in range(0, len(array), step)]
        return torch.from_numpy(np.concatenate(outs))

    def __deepcopy__(self, memo: dict) -> OnnxReference:  # a session is not copied; it is stateless to run
        return self


def _dims(value_info: onnx.ValueInfoProto) -> list[int | str]:
    shape = value_info.type.tensor_type.shape
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in shape.dim]


def onnx_source(path: str | Path, metadata: dict[str, Any]) -> Source:
    """Read and check an ONNX segmentation graph (module docstring); the graph, renamed, is
    `Source.graph`, what the export stage writes."""
    path = Path(path)
    try:
        proto = onnx.load(str(path))  # with its external data (weights beside it), which the engine embeds
        onnx.external_data_helper.convert_model_from_external_data(proto)
        data = proto.SerializeToString()
    except Exception as exc:  # an unreadable file, protobuf's DecodeError, missing data: all mean "not a model"
        raise SourceError(f"{path} cannot be read as an ONNX model with its data: {type(exc).__name__}: {exc}") from None
    graph = proto.graph
    inputs = [i for i in graph.input if i.name not in {t.name for t in graph.initializer}]
    if len(inputs) != 1 or len(graph.output) != 1:
        raise SourceError(f"{path} has {len(inputs)} input(s) and {len(graph.output)} output(s); nnslim builds graphs "
                          "with one image input [N, C, X, Y, Z] and one logits output [N, K, X, Y, Z]")
    (source_input,), source_output = inputs, graph.output[0]
    dims_in, dims_out = _dims(source_input), _dims(source_output)
    if len(dims_in) not in (4, 5) or len(dims_out) != len(dims_in):
        raise SourceError(f"{path} maps {dims_in} to {dims_out}; nnslim builds 3D graphs [N, C, X, Y, Z] -> "
                          "[N, K, X, Y, Z] and 2D graphs [N, C, H, W] -> [N, K, H, W]")
    metadata = dict(metadata)
    if "patch_size" not in metadata and all(isinstance(d, int) and d > 0 for d in dims_in[2:]):
        metadata["patch_size"] = tuple(dims_in[2:])  # a graph of one static tile size: that is the patch
    if isinstance(dims_in[1], int) and dims_in[1] > 0:
        metadata.setdefault("in_channels", dims_in[1])
    meta = module_metadata(metadata, f"{path.name} needs metadata")
    patch, labels, channels = meta["patch_size"], meta["label_names"], meta["in_channels"]
    if (len(dims_in) == 4) != (meta["slice_axis"] is not None):
        raise SourceError(f"{path} is a {len(dims_in) - 2}D graph ({dims_in}) but its metadata's patch_size "
                          f"{list(metadata['patch_size'])} is {'3D' if meta['slice_axis'] is None else '2D'}; a 2D "
                          "graph has a patch_size of 2 ints (and slice_axis: the volume axis it slices)")
    own_patch = [p for a, p in enumerate(patch) if a != meta["slice_axis"]]  # the graph's own spatial axes
    checks = [(dims_in[1], channels, "channels"), (dims_out[1], len(labels), "classes (one per label name)"),
              *((d, p, "patch") for d, p in zip(dims_in[2:], own_patch)),
              *((d, p, "patch") for d, p in zip(dims_out[2:], own_patch))]
    wrong = [f"{what}: the graph says {d}, the metadata {want}" for d, want, what in checks
             if isinstance(d, int) and d > 0 and d != want]
    if wrong:
        raise SourceError(f"{path} does not fit its metadata: {'; '.join(wrong)}")
    static_batch = dims_in[0] if isinstance(dims_in[0], int) and dims_in[0] > 0 else None
    reference: nn.Module = OnnxReference(data, source_input.name, static_batch)
    renamed = _renamed(proto, source_input.name, source_output.name, meta["output"], meta["slice_axis"])
    if meta["slice_axis"] is not None:
        reference = SliceWrapper(reference, meta["slice_axis"])
    if meta["output"] != "logits":
        reference = AsLogits(reference, meta["output"])
    _check_batches(renamed, path, channels, patch)
    full = {k: meta[k] for k in ("label_names", "normalization", "spacing", "mirror_axes", "dataset")}
    return Source(model=reference, architecture={"name": "onnx", "file": path.name, "opset": _opset(proto)},
                  metadata={**full, "patch_size": list(patch)}, in_channels=channels, num_classes=len(labels),
                  total_stride=meta["total_stride"], files=[path], preprocessing=meta["preprocessing"],
                  postprocessing=meta["postprocessing"], kind="onnx",
                  details={"graph_sha256": hashlib.sha256(data).hexdigest(), "static_batch": static_batch,
                           "output": meta["output"]},
                  graph=renamed)


def _check_batches(graph: bytes, path: Path, channels: int, patch: tuple[int, ...]) -> None:
    """The engine runs batches of tiles: the renamed graph (batch axis symbolic) must take two."""
    import onnxruntime as ort

    try:
        session = ort.InferenceSession(graph, providers=["CPUExecutionProvider"])
        session.run(None, {INPUT: np.zeros((2, channels, *patch), np.float32)})
    except Exception as exc:  # ONNX Runtime's own error types: the graph cannot run a batch of 2
        raise SourceError(f"{path} does not run on a batch of 2 tiles of {list(patch)} ({type(exc).__name__}: {exc}); a "
                          "graph that hard-codes batch 1 (a Reshape to a fixed shape) must be exported again with a "
                          "dynamic batch axis") from None


def _renamed(proto: onnx.ModelProto, old_in: str, old_out: str, output: str = "logits",
             slice_axis: int | None = None) -> bytes:
    """The graph with its input and output named as the engine's (every reference to them too) and
    a symbolic batch axis (intermediate shapes dropped: they would pin it); probabilities turned
    into logits as `source.AsLogits` does (`_as_logits`); a 2D graph driven with 3D tiles as
    `source.SliceWrapper` does (`_as_3d`)."""
    proto = onnx.ModelProto.FromString(proto.SerializeToString())
    names = {old_in: INPUT if slice_axis is None else SLICE_INPUT,
             old_out: OUTPUT if output == "logits" and slice_axis is None else NETWORK_OUTPUT}
    graph = proto.graph
    del graph.value_info[:]
    for tensor in [*graph.input, *graph.output]:
        tensor.name = names.get(tensor.name, tensor.name)
        if tensor.name in (INPUT, OUTPUT, SLICE_INPUT, NETWORK_OUTPUT):
            first = tensor.type.tensor_type.shape.dim[0]
            first.Clear()
            first.dim_param = "batch"
    for node in graph.node:
        node.input[:] = [names.get(n, n) for n in node.input]
        node.output[:] = [names.get(n, n) for n in node.output]
    if slice_axis is not None:
        _as_3d(graph, slice_axis, output)
    elif output != "logits":
        _as_logits(graph, output, NETWORK_OUTPUT)
    proto.producer_name = "nnslim"
    return proto.SerializeToString()


def _as_3d(graph: onnx.GraphProto, axis: int, output: str) -> None:
    """A 2D graph (input renamed `SLICE_INPUT`, output `NETWORK_OUTPUT`) between a Squeeze of the
    engine's 3D `INPUT` at the slice axis and an Unsqueeze back, with a 5D input and output."""
    from onnx import helper, numpy_helper

    graph.initializer.append(numpy_helper.from_array(np.array([2 + axis], np.int64), "nnslim_slice_axis"))
    unsqueezed = OUTPUT if output == "logits" else "nnslim_unsqueezed"
    graph.node.insert(0, helper.make_node("Squeeze", [INPUT, "nnslim_slice_axis"], [SLICE_INPUT]))
    graph.node.append(helper.make_node("Unsqueeze", [NETWORK_OUTPUT, "nnslim_slice_axis"], [unsqueezed]))
    image = next(i for i in graph.input if i.name == SLICE_INPUT)
    for tensor in (image, graph.output[0]):
        shape = tensor.type.tensor_type.shape
        dims = [onnx.TensorShapeProto.Dimension(dim_value=1) if a == 2 + axis else d for a, d in
                enumerate([*shape.dim[:2 + axis], None, *shape.dim[2 + axis:]])]
        del shape.dim[:]
        shape.dim.extend(dims)
    image.name = INPUT
    graph.output[0].name = unsqueezed
    if output != "logits":
        _as_logits(graph, output, unsqueezed)


def _as_logits(graph: onnx.GraphProto, output: str, produced: str) -> None:
    """Nodes after the network's output (`produced`) that make `OUTPUT` from it: `log(clip(p))` for
    probabilities, `log(clip(p) / (1 - clip(p)))` for sigmoid regions."""
    from onnx import helper, numpy_helper

    low, high = TINY, 1.0 if output == "probabilities" else 1.0 - TINY
    graph.initializer.extend([numpy_helper.from_array(np.array(v, np.float32), n) for n, v in
                              (("nnslim_low", low), ("nnslim_high", high), ("nnslim_one", 1.0))])
    nodes = [helper.make_node("Clip", [produced, "nnslim_low", "nnslim_high"], ["nnslim_p"])]
    if output == "probabilities":
        nodes.append(helper.make_node("Log", ["nnslim_p"], [OUTPUT]))
    else:
        nodes += [helper.make_node("Sub", ["nnslim_one", "nnslim_p"], ["nnslim_q"]),
                  helper.make_node("Div", ["nnslim_p", "nnslim_q"], ["nnslim_odds"]),
                  helper.make_node("Log", ["nnslim_odds"], [OUTPUT])]
    graph.node.extend(nodes)
    graph.output[0].name = OUTPUT


def _opset(proto: onnx.ModelProto) -> int | None:
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
