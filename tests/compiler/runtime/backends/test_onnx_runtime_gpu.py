"""`OnnxRuntimeGpuPredictor`: a session that ONNX Runtime quietly moved to the CPU is refused.

`onnxruntime-gpu` lists CUDAExecutionProvider as available on any machine, and when the provider
cannot load (here: no CUDA 13 libraries, no GPU) it creates the session on the CPU. That is
reproduced for real on this CPU-only machine; only torch's "is a GPU visible" is answered yes.
"""

from __future__ import annotations

import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from nnslim.errors import EngineError
from nnslim.compiler.runtime.backends.onnx_runtime import OnnxRuntimeGpuPredictor


def _tiny_model(path):
    graph = helper.make_graph([helper.make_node("Relu", ["image"], ["logits"])], "tiny",
                              [helper.make_tensor_value_info("image", TensorProto.FLOAT, [None, 1, 4, 4, 4])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [None, 1, 4, 4, 4])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10), path)
    return path


def test_session_that_fell_back_to_the_cpu_is_refused(tmp_path, monkeypatch):
    model = _tiny_model(tmp_path / "tiny.onnx")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("this onnxruntime has no CUDA provider at all")
    session = ort.InferenceSession(str(model), providers=["CUDAExecutionProvider"])
    if "CUDAExecutionProvider" in session.get_providers():
        pytest.skip("the CUDA provider really loads here: nothing falls back")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(EngineError, match=r"could not start \['CUDAExecutionProvider'\].*would run on "
                                          r"\['CPUExecutionProvider'\].*built for CUDA .*--device cpu"):
        OnnxRuntimeGpuPredictor(model)
    with pytest.raises(EngineError, match=r"TensorrtExecutionProvider.*libnvinfer\.so\.10"):
        OnnxRuntimeGpuPredictor(model, tensorrt=True, cache_dir=tmp_path / "ort-trt")


@pytest.mark.gpu
def test_onnxruntime_cuda_predictor_equals_cpu(engine_dir):
    from nnslim.compiler.runtime.backends.onnx_runtime import OnnxRuntimePredictor

    tiles = torch.randn(2, 1, 16, 16, 16)
    cpu = OnnxRuntimePredictor(engine_dir / "model.opt.onnx")(tiles)
    gpu = OnnxRuntimeGpuPredictor(engine_dir / "model.opt.onnx")(tiles.cuda())
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-3, atol=1e-3)
