"""TensorRT runtime on the CPU tier: plan compatibility, missing-TensorRT and NULL-factory messages;
the GPU tier (`gpu` marker, skipped without a GPU): the GPU sliding window.

The runtime against the real TensorRT 10.x / 11.x bindings is `tests/compiler/test_tensorrt_bindings.py`.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from nnslim.errors import EngineError
from nnslim.compiler.runtime.manifest import TensorRTRecord
from nnslim.compiler.runtime.backends.tensorrt_plan import BackendUnavailable, check_compatibility, create, import_tensorrt


def _has_tensorrt() -> bool:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False
    return True


def test_plan_for_another_tensorrt_or_gpu_is_refused_with_the_rebuild_command():
    manifest = TensorRTRecord(version="10.9.0", gpu="NVIDIA A100", compute_capability=(8, 0))
    rebuild = "rebuild it: nnslim build-engine m.pt --out e --backend tensorrt"
    check_compatibility(manifest, "10.9.0", (8, 0), rebuild)  # same machine: fine
    with pytest.raises(EngineError, match=r"TensorRT 10\.9\.0 but this machine has 11\.0\.0.*nnslim build-engine m\.pt"):
        check_compatibility(manifest, "11.0.0", (8, 0), rebuild)
    with pytest.raises(EngineError, match=r"compute capability \[8, 0\] \(NVIDIA A100\).*\[8, 9\].*nnslim build-engine"):
        check_compatibility(manifest, "10.9.0", (8, 9), rebuild)


@pytest.mark.skipif(_has_tensorrt(), reason="TensorRT is installed here")
def test_missing_tensorrt_names_the_extras():
    with pytest.raises(BackendUnavailable, match=r"pip install 'nnslim\[tensorrt\]' \(the CUDA 13 set.*'nnslim\[tensorrt-cu12\]'"):
        import_tensorrt()


def test_null_factory_becomes_backend_unavailable_and_other_type_errors_pass():
    """The message pybind11 raises when TensorRT's C factory returns NULL (seen with the real
    bindings in test_tensorrt_bindings.py); here a plain callable stands in for trt.Builder."""

    def Builder(logger):  # noqa: N802 - named like the TensorRT class it stands in for
        raise TypeError("pybind11::init(): factory function returned nullptr")

    with pytest.raises(BackendUnavailable, match=r"could not create its Builder.*nvidia-smi.*driver 580"):
        create(Builder, object())

    def broken(logger):
        raise TypeError("Builder() takes 1 argument")

    with pytest.raises(TypeError, match="takes 1 argument"):
        create(broken, object())


# ---------------------------------------------------------------- GPU tier (skips here)

@pytest.mark.gpu
def test_gpu_sliding_window_equals_cpu(checkpoint_path, small_volume):
    from nnslim.compiler.runtime.backends.torch_module import TorchPredictor
    from nnslim.compiler.runtime.preprocessing import normalize
    from nnslim.compiler.runtime.window.config import SlidingWindowConfig
    from nnslim.compiler.runtime.window.walk import sliding_window_inference
    from nnslim.compiler.runtime.volumes.volume import load_volume
    from nnslim.training.checkpoint import load_model

    model, metadata = load_model(checkpoint_path)
    image = torch.from_numpy(normalize(load_volume(small_volume, 1).data, metadata["normalization"]))
    config = SlidingWindowConfig(patch_size=(16, 16, 16), batch_size=2, mirror_axes=(0, 1, 2))
    cpu = sliding_window_inference(image, TorchPredictor(model), 3, config)
    gpu = sliding_window_inference(image, TorchPredictor(model, device="cuda"), 3, config)
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-3, atol=1e-3)
    half = sliding_window_inference(image, TorchPredictor(model, device="cuda"), 3,
                                    replace(config, accumulate_dtype=torch.float16))
    assert (half.argmax(0).cpu() == cpu.argmax(0)).float().mean() >= 0.999
