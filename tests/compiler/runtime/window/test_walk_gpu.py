"""The window on a GPU: a PyTorch CUDA predictor, the image, tiles and accumulators as device tensors.

What runs here only where a CUDA GPU is (`gpu` marker; `scripts/gpu_check.sh` runs these on a GPU
machine): the device walk against the CPU walk, fp16 accumulators (nnU-Net's choice on a GPU), the
fallbacks when the device is full (accumulators on the host, the image in pinned host memory with
tiles copied over non-blocking), a walk queued on a side stream, and a whole case end to end.
"""

from __future__ import annotations

import numpy as np
import pytest

from nnslim.compiler.runtime.window.config import SlidingWindowConfig
from nnslim.compiler.runtime.window.walk import sliding_window_inference
from tests.conftest import random_model

pytestmark = pytest.mark.gpu


@pytest.fixture
def torch_cuda():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU; none on this machine")
    return torch


def _image(seed: int = 0, shape=(1, 30, 20, 18)) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)


def _predictors(torch_cuda):
    """The same network (seeded) on the CPU (numpy in and out) and on the GPU (device tensors)."""
    from nnslim.compiler.runtime.backends.torch_module import TorchPredictor

    return TorchPredictor(random_model(), "cpu"), TorchPredictor(random_model(), "cuda")


def test_cuda_accumulation_matches_cpu(torch_cuda):
    cpu, gpu = _predictors(torch_cuda)
    config = SlidingWindowConfig(patch_size=(16, 16, 16), batch_size=2, mirror_axes=(0, 2))
    on_cpu = sliding_window_inference(_image(), cpu, 3, config)  # numpy
    on_gpu = sliding_window_inference(_image(), gpu, 3, config)  # a tensor on the device
    assert isinstance(on_cpu, np.ndarray) and on_gpu.is_cuda
    np.testing.assert_allclose(on_gpu.cpu().numpy(), on_cpu, atol=1e-4, rtol=1e-4)


def test_fp16_accumulators_on_the_gpu_stay_close_to_fp32(torch_cuda):
    _, gpu = _predictors(torch_cuda)
    config = SlidingWindowConfig(patch_size=(16, 16, 16), batch_size=2)
    fp32 = sliding_window_inference(_image(1, (1, 48, 40, 36)), gpu, 3, config)
    fp16 = sliding_window_inference(_image(1, (1, 48, 40, 36)), gpu, 3,
                                    SlidingWindowConfig(patch_size=(16, 16, 16), batch_size=2, accumulate_dtype="float16"))
    assert fp16.dtype == torch_cuda.float16 and fp16.is_cuda
    scale = float(fp32.abs().max())
    assert float((fp16.float() - fp32).abs().max()) <= 1e-2 * scale
    assert float((fp16.float().argmax(0) == fp32.argmax(0)).double().mean()) >= 0.999


def test_a_full_gpu_moves_the_accumulators_and_the_image_to_the_host(torch_cuda, monkeypatch, caplog):
    from nnslim.compiler.runtime.window import arrays

    torch = torch_cuda
    _, gpu = _predictors(torch)
    config = SlidingWindowConfig(patch_size=(16, 16, 16), batch_size=2)
    image = _image(2)
    expected = sliding_window_inference(image, gpu, 3, config).cpu().numpy()
    real_zeros, real_to = arrays.TorchArrays.zeros, torch.Tensor.to

    def full_zeros(self, shape, dtype="float32"):  # the device cannot hold the accumulators or the logits
        if len(shape) >= 3:
            raise torch.OutOfMemoryError("simulated: the device is full")
        return real_zeros(self, shape, dtype)

    monkeypatch.setattr(arrays.TorchArrays, "zeros", full_zeros)
    with caplog.at_level("WARNING"):
        fallen = sliding_window_inference(image, gpu, 3, config)
    assert not fallen.is_cuda  # the logits were collected on the host, from host accumulators
    assert "keeping them on the CPU" in caplog.text
    np.testing.assert_allclose(fallen.numpy(), expected, atol=1e-5, rtol=1e-5)
    monkeypatch.setattr(arrays.TorchArrays, "zeros", real_zeros)

    def image_does_not_fit(self, *args, **kwargs):  # the image alone is too large for the device
        device = args[0] if args else kwargs.get("device")
        if self.numel() == image.size and not self.is_cuda and str(device).startswith("cuda"):
            raise torch.OutOfMemoryError("simulated: the image does not fit")
        return real_to(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", image_does_not_fit)
    with caplog.at_level("WARNING"):
        pinned = sliding_window_inference(image, gpu, 3, config)
    assert "keeping it in pinned host memory" in caplog.text
    np.testing.assert_allclose(pinned.cpu().numpy(), expected, atol=1e-5, rtol=1e-5)


def test_a_walk_queued_on_a_side_stream_gives_the_same_logits(torch_cuda):
    _, gpu = _predictors(torch_cuda)
    config = SlidingWindowConfig(patch_size=(16, 16, 16), batch_size=3)
    expected = sliding_window_inference(_image(3), gpu, 3, config)
    stream = torch_cuda.cuda.Stream()
    with torch_cuda.cuda.stream(stream):
        queued = sliding_window_inference(_image(3), gpu, 3, config)
    stream.synchronize()
    assert torch_cuda.equal(queued, expected)


def test_a_case_end_to_end_on_the_gpu_labels_like_the_cpu(torch_cuda):
    from nnslim.compiler.runtime.segmentation import InferenceOptions, segment_volume
    from nnslim.compiler.runtime.volumes.volume import volume_from_array
    from tests.conftest import manifest_record

    spec = manifest_record(preprocessing={"normalization": {"scheme": "zscore", "mask": "nonzero"},
                                          "mirror_axes": [0, 1, 2]}).spec
    cpu, gpu = _predictors(torch_cuda)
    volume = volume_from_array(_image(4, (1, 40, 33, 27))[0], (1.0, 1.0, 1.0), 1)
    on_cpu, _ = segment_volume(volume, cpu, spec, InferenceOptions(progress=False, mirror=True))
    on_gpu, report = segment_volume(volume, gpu, spec, InferenceOptions(progress=False, mirror=True))
    assert on_gpu.dtype == np.uint8 and on_gpu.shape == (40, 33, 27)
    assert (on_gpu == on_cpu).mean() >= 0.999 and report.evaluated == report.grid
