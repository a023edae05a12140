"""This machine's convolution peak per precision, measured in the same run as a benchmark.

One large 3x3x3 Conv3d (64 -> 64 channels by default) is timed as a graph of its own:
fp32 in ONNX Runtime and OpenVINO (the faster counts), bf16 in OpenVINO where the CPU has bf16
arithmetic, and int8 in OpenVINO from the same conv quantized to Q/DQ form the way nnslim's int8
stage does it. A benchmark row's "of peak" is its achieved throughput over the peak of its own
precision, so a reduced-precision row is not flattered by an fp32 yardstick.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from nnslim.compiler.stages.quantize import QuantRecipe, quantize_int8
from nnslim.compiler.runtime.backends.openvino_cpu import cpu_has_bf16, cpu_has_vnni, openvino_available
from nnslim.compiler.runtime.backends.onnx_runtime import OnnxRuntimePredictor


def conv_graph(path: Path, channels: int, size: int, seed: int = 0) -> None:
    """A one-node ONNX model: `logits = Conv3d(image)`, 3x3x3, padding 1, dynamic batch."""
    rng = np.random.default_rng(seed)
    weight = (rng.standard_normal((channels, channels, 3, 3, 3)) / np.sqrt(27 * channels)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["image", "w", "b"], ["logits"], name="conv", pads=[1] * 6)],
        "conv_peak",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", channels, size, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", channels, size, size, size])],
        [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(np.zeros(channels, np.float32), "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    onnx.save(model, str(path))


def _median_seconds(predict: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, repeats: int) -> float:
    predict(x)  # warm-up (and OpenVINO's first-inference set-up)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        predict(x)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def conv_peaks(channels: int = 64, size: int = 48, repeats: int = 5, threads: int = 0) -> dict[str, float]:
    """GFLOP/s (2 x MACs per second) of the conv per precision; precisions this machine cannot
    run are absent."""
    flops = 2 * channels * channels * 27 * size**3
    x = torch.from_numpy(np.random.default_rng(1).random((1, channels, size, size, size), dtype=np.float32))
    peaks: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="nnslim-peak-") as tmp:
        fp32 = Path(tmp) / "conv.onnx"
        conv_graph(fp32, channels, size)
        peaks["fp32"] = flops / _median_seconds(OnnxRuntimePredictor(fp32, threads=threads), x, repeats) / 1e9
        if not openvino_available():
            return peaks
        from nnslim.compiler.runtime.backends.openvino_cpu import OpenVinoPredictor

        openvino_fp32 = flops / _median_seconds(OpenVinoPredictor(fp32, threads=threads), x, repeats) / 1e9
        peaks["fp32"] = max(peaks["fp32"], openvino_fp32)
        if cpu_has_bf16():
            peaks["bf16"] = flops / _median_seconds(OpenVinoPredictor(fp32, precision="bf16", threads=threads), x,
                                                    repeats) / 1e9
        int8 = Path(tmp) / "conv.int8.onnx"
        recipe = QuantRecipe("minmax", 0, keep_ends=False, activations="int8" if cpu_has_vnni() else "uint8")
        quantize_int8(fp32, int8, x.numpy(), recipe)
        peaks["int8"] = flops / _median_seconds(OpenVinoPredictor(int8, precision="int8", threads=threads), x,
                                                repeats) / 1e9
    return peaks
