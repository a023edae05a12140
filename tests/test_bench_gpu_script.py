"""scripts/bench_gpu.py: one row that cannot be built is reported, the other rows still run."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from nnslim.compiler.stages.tensorrt_builder import TensorRTBuildError
from nnslim.errors import EngineError

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_gpu.py"


@pytest.fixture(scope="module")
def bench_gpu():
    spec = importlib.util.spec_from_file_location("bench_gpu", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_failed_row_is_skipped_with_its_reason_and_the_others_run(bench_gpu):
    runners, skipped = {}, {}

    def failed_build():
        raise TensorRTBuildError("TensorRT cannot parse model.opt.onnx (1 error(s))")

    def cpu_fallback():
        raise EngineError("ONNX Runtime 1.31.1 could not start ['CUDAExecutionProvider']")

    def out_of_memory():
        raise RuntimeError("CUDA out of memory")

    bench_gpu.try_row("TensorRT fp32", failed_build, runners, skipped)
    bench_gpu.try_row("ONNX Runtime CUDA", cpu_fallback, runners, skipped)
    bench_gpu.try_row("TensorRT fp16", out_of_memory, runners, skipped)
    bench_gpu.try_row("PyTorch fp32", lambda: "runner", runners, skipped)
    assert runners == {"PyTorch fp32": "runner"}
    assert skipped == {"TensorRT fp32": "TensorRTBuildError: TensorRT cannot parse model.opt.onnx (1 error(s))",
                       "ONNX Runtime CUDA": "EngineError: ONNX Runtime 1.31.1 could not start ['CUDAExecutionProvider']",
                       "TensorRT fp16": "RuntimeError: CUDA out of memory"}
    with pytest.raises(KeyError):  # a bug in the script itself is not hidden as a skipped row
        bench_gpu.try_row("broken", lambda: {}["missing"], runners, skipped)
