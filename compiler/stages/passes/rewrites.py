"""Exact graph rewrites: constant folding, no-op removal, BatchNorm folding, cleanup, dynamic batch.

BatchNorm folding in the graph (for models that reach export with a BN left, e.g. imported
ones): with `s = gamma / sqrt(var + eps)`, a Conv's weight is scaled per output channel
(axis 0), a ConvTranspose's along axis 1 (groups = 1 only), and the bias becomes
`(b - mean) * s + beta`.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import onnx_graphsurgeon as gs

from nnslim.compiler.stages.passes.base import PassError, PassResult, replace_tensor


def _consumers(tensor: gs.Tensor) -> list[gs.Node]:
    return list(tensor.outputs)


def _bypass(graph: gs.Graph, node: gs.Node) -> bool:
    """Remove a node whose first output equals its first input. False when that is impossible
    (graph input wired straight to a graph output)."""
    source, target = node.inputs[0], node.outputs[0]
    if target in graph.outputs:
        if source in graph.inputs or source in graph.outputs or isinstance(source, gs.Constant):
            return False
        # the producer's tensor takes over the graph output's name, so the interface is unchanged
        index = graph.outputs.index(target)
        target.name, source.name = f"{target.name}__removed", target.name
        graph.outputs[index] = source
        source.dtype, source.shape = target.dtype or source.dtype, target.shape or source.shape
    for consumer in _consumers(target):
        replace_tensor(consumer.inputs, target, source)
    node.outputs.clear()
    node.inputs.clear()
    return True


def _finish(graph: gs.Graph, changed: int) -> None:
    if changed:
        graph.cleanup().toposort()


class FoldConstantsPass:
    """Evaluate every subgraph whose inputs are all constants (onnx-graphsurgeon + ONNX Runtime)."""

    exact: ClassVar[bool] = True

    def run(self, graph: gs.Graph) -> PassResult:
        before = len(graph.nodes)
        graph.fold_constants().cleanup().toposort()
        folded = before - len(graph.nodes)
        return PassResult(folded, f"{folded} node(s) folded into constants")


class RemoveNoOpsPass:
    """Drop Identity, inference Dropout, Casts to the input's own type and Reshapes to the input's
    own shape."""

    exact: ClassVar[bool] = True

    def run(self, graph: gs.Graph) -> PassResult:
        removed: dict[str, int] = {}
        for node in list(graph.nodes):
            if not self._is_noop(node):
                continue
            if _bypass(graph, node):
                removed[node.op] = removed.get(node.op, 0) + 1
        _finish(graph, sum(removed.values()))
        return PassResult(sum(removed.values()), ", ".join(f"{n} {op}" for op, n in sorted(removed.items())))

    @staticmethod
    def _is_noop(node: gs.Node) -> bool:
        if not node.inputs or not node.outputs:
            return False
        if node.op == "Identity":
            return True
        if node.op == "Dropout":
            # the mask output must be unused and training_mode, if given, a constant False
            if len(node.outputs) > 1 and _consumers(node.outputs[1]):
                return False
            if len(node.inputs) > 2:
                mode = node.inputs[2]
                return isinstance(mode, gs.Constant) and not bool(np.asarray(mode.values))
            return True
        source = node.inputs[0]
        if node.op == "Cast":
            return source.dtype is not None and np.dtype(source.dtype) == _onnx_to_numpy(node.attrs.get("to"))
        if node.op == "Reshape":
            target = node.inputs[1]
            if not isinstance(target, gs.Constant) or source.shape is None:
                return False
            wanted = [int(v) for v in np.asarray(target.values).ravel()]
            if len(wanted) != len(source.shape) or node.attrs.get("allowzero", 0) or wanted.count(-1) > 1:
                return False
            # 0 copies the input's dimension; a single -1 is then forced to equal the input's too
            return all(w in (0, -1) or w == s for w, s in zip(wanted, source.shape))
        return False


def _onnx_to_numpy(elem_type: int | None) -> np.dtype | None:
    if elem_type is None:
        return None
    from onnx import helper

    return np.dtype(helper.tensor_dtype_to_np_dtype(elem_type))


class FoldBatchNormIntoConvPass:
    """Fold BatchNormalization into the Conv / ConvTranspose that feeds only it."""

    exact: ClassVar[bool] = True

    def run(self, graph: gs.Graph) -> PassResult:
        folded = 0
        for bn in [n for n in graph.nodes if n.op == "BatchNormalization"]:
            if bn.attrs.get("training_mode", 0) or len(bn.outputs) != 1:
                continue
            source = bn.inputs[0]
            if len(source.inputs) != 1 or len(_consumers(source)) != 1 or source in graph.outputs:
                continue
            conv = source.inputs[0]
            if conv.op not in ("Conv", "ConvTranspose"):
                continue
            if conv.op == "ConvTranspose" and conv.attrs.get("group", 1) != 1:
                continue
            weight = conv.inputs[1]
            bias = conv.inputs[2] if len(conv.inputs) > 2 else None
            params = bn.inputs[1:5]
            tensors = [weight, *params] + ([bias] if bias is not None else [])
            if not all(isinstance(t, gs.Constant) for t in tensors):
                continue  # graph-input weights or computed parameters
            if len(_consumers(weight)) != 1 or (bias is not None and len(_consumers(bias)) != 1):
                continue  # shared initializers: folding would change the other users
            gamma, beta, mean, var = (np.asarray(p.values, dtype=np.float64) for p in params)
            scale = gamma / np.sqrt(var + bn.attrs.get("epsilon", 1e-5))
            w = np.asarray(weight.values, dtype=np.float64)
            axis = 1 if conv.op == "ConvTranspose" else 0
            shape = [1] * w.ndim
            shape[axis] = -1
            b = np.asarray(bias.values, dtype=np.float64) if bias is not None else np.zeros_like(mean)
            dtype = np.asarray(weight.values).dtype
            new_weight = gs.Constant(f"{conv.name or source.name}_bn_weight", (w * scale.reshape(shape)).astype(dtype))
            new_bias = gs.Constant(f"{conv.name or source.name}_bn_bias", ((b - mean) * scale + beta).astype(dtype))
            conv.inputs[1] = new_weight
            if len(conv.inputs) > 2:
                conv.inputs[2] = new_bias
            else:
                conv.inputs.append(new_bias)
            target = bn.outputs[0]
            bn.outputs.clear()
            bn.inputs.clear()
            conv.outputs[0] = target
            folded += 1
        _finish(graph, folded)
        return PassResult(folded, f"{folded} BatchNormalization folded")


class RemoveUnusedPass:
    """Drop nodes and node outputs that nothing consumes (initializers no node reads are dropped
    whenever a graph is exported, by every pass)."""

    exact: ClassVar[bool] = True

    def run(self, graph: gs.Graph) -> PassResult:
        nodes, tensors = len(graph.nodes), len(graph.tensors())
        graph.cleanup(remove_unused_node_outputs=True).toposort()
        removed_nodes, removed_tensors = nodes - len(graph.nodes), tensors - len(graph.tensors())
        return PassResult(removed_nodes + removed_tensors, f"{removed_nodes} node(s), {removed_tensors} tensor(s) removed")


class MakeBatchDynamicPass:
    """Give the graph inputs and outputs a symbolic batch dimension."""

    exact: ClassVar[bool] = True

    def __init__(self, name: str = "batch") -> None:
        self.name = name

    def run(self, graph: gs.Graph) -> PassResult:
        io = [t for t in [*graph.inputs, *graph.outputs] if t.shape and isinstance(t.shape[0], int)]
        if not io:
            return PassResult(0, "batch already dynamic")
        fixed = {t.shape[0] for t in io}
        for node in graph.nodes:
            if node.op == "Reshape" and isinstance(node.inputs[1], gs.Constant):
                first = int(np.asarray(node.inputs[1].values).ravel()[0])
                if first in fixed and first not in (0, -1):
                    raise PassError(
                        f"Reshape {node.name!r} hard-codes the batch size {first}; re-export with a dynamic batch"
                    )
        for tensor in io:
            tensor.shape = [self.name, *tensor.shape[1:]]
        for tensor in graph.tensors().values():  # stale intermediate shapes would pin the batch
            if isinstance(tensor, gs.Variable) and tensor not in io and tensor.shape and tensor.shape[0] in fixed:
                tensor.shape = None
        return PassResult(len(io), f"batch dimension of {len(io)} graph input/output(s) made symbolic")
