import math

import numpy as np
import pytest
import torch

from nnslim.compiler.runtime.sliding_window import (
    SlidingWindowConfig,
    compute_steps,
    gaussian_importance_map,
    pad_to_patch,
    sliding_window_inference,
    tile_slices,
)


class Elementwise:
    """A predictor whose logits are elementwise functions of the tile: stitching must be exact."""

    device = torch.device("cpu")

    def __init__(self, *functions):
        self.functions = functions
        self.calls = 0

    def __call__(self, tiles):
        self.calls += 1
        return torch.cat([f(tiles) for f in self.functions], dim=1)


def test_steps_match_nnunet_example():
    assert compute_steps((110, 64, 64), (64, 64, 64), 0.5) == [[0, 23, 46], [0], [0]]


@pytest.mark.parametrize("size,patch,step", [(197, 64, 0.5), (233, 64, 0.5), (100, 30, 0.33), (65, 64, 0.5), (128, 64, 1.0)])
def test_steps_against_formula(size, patch, step):
    n = math.ceil((size - patch) / (patch * step)) + 1
    expected = [0] if n == 1 else [int(np.round(i * (size - patch) / (n - 1))) for i in range(n)]
    (steps,) = compute_steps((size,), (patch,), step)
    assert steps == expected
    assert steps[0] == 0 and steps[-1] == size - patch
    assert all(b - a <= patch for a, b in zip(steps, steps[1:]))  # full coverage


def test_gaussian_is_separable_sampled_gaussian_with_max_10():
    patch = (64, 48, 40)  # 4 sigma covers every voxel, so scipy's truncation does not bite
    weights = gaussian_importance_map(patch, dtype=torch.float64).numpy()
    axes = [np.exp(-((np.arange(p) - p // 2) ** 2) / (2 * (p / 8) ** 2)) for p in patch]
    expected = np.einsum("i,j,k->ijk", *axes)
    expected *= 10 / expected.max()
    np.testing.assert_allclose(weights, expected, rtol=1e-10)
    assert weights.max() == pytest.approx(10.0)
    assert np.unravel_index(weights.argmax(), patch) == (32, 24, 20)


def test_gaussian_zeros_replaced_by_smallest_nonzero():
    weights = gaussian_importance_map((9, 9, 9), sigma_scale=1 / 32, dtype=torch.float64)
    assert weights.min() > 0
    # sigma 0.28 truncates at radius 1: corners were zero and now hold the smallest kept value
    nonzero_in_kernel = weights[3:6, 3:6, 3:6]
    assert weights[0, 0, 0] == nonzero_in_kernel.min()


def test_pad_to_patch_is_centred():
    image = torch.arange(1 * 5 * 20 * 3, dtype=torch.float32).reshape(1, 5, 20, 3)
    padded, region = pad_to_patch(image, (8, 16, 8))
    assert padded.shape == (1, 8, 20, 8)
    assert [s.start for s in region[1:]] == [1, 0, 2]  # below = diff // 2
    assert torch.equal(padded[region], image)
    assert padded.sum() == image.sum()


@pytest.mark.parametrize("shape", [(37, 41, 29), (10, 20, 5), (16, 16, 16), (33, 17, 50)])
@pytest.mark.parametrize("step", [0.5, 0.33, 1.0])
def test_stitching_reproduces_elementwise_predictor(shape, step):
    torch.manual_seed(0)
    image = torch.randn(1, *shape, dtype=torch.float64)
    config = SlidingWindowConfig(patch_size=(16, 16, 16), step_fraction=step, batch_size=3,
                                 accumulate_dtype=torch.float64)
    logits = sliding_window_inference(image, Elementwise(lambda t: t + 1, lambda t: 2 * t), 2, config)
    assert logits.shape == (2, *shape)
    assert (logits[0] - (image[0] + 1)).abs().max() < 1e-12
    assert (logits[1] - 2 * image[0]).abs().max() < 1e-12


def test_stitching_float32_accumulator_and_uniform_weights():
    image = torch.randn(1, 23, 40, 19)
    for gaussian in (True, False):
        config = SlidingWindowConfig(patch_size=(16, 16, 16), gaussian=gaussian)
        logits = sliding_window_inference(image, Elementwise(lambda t: t + 1), 1, config)
        torch.testing.assert_close(logits[0], image[0] + 1, rtol=1e-6, atol=1e-6)


def test_mirror_tta_runs_every_flip_and_is_exact_for_elementwise():
    image = torch.randn(1, 20, 18, 16, dtype=torch.float64)
    predictor = Elementwise(lambda t: t * 3)
    config = SlidingWindowConfig(patch_size=(16, 16, 16), step_fraction=1.0, mirror_axes=(0, 1, 2),
                                 accumulate_dtype=torch.float64)
    logits = sliding_window_inference(image, predictor, 1, config)
    tiles = len(tile_slices((20, 18, 16), config))
    assert predictor.calls == 8 * tiles
    assert (logits[0] - 3 * image[0]).abs().max() < 1e-12


def test_wrong_predictor_output_shape_is_reported():
    config = SlidingWindowConfig(patch_size=(16, 16, 16))
    with pytest.raises(ValueError, match="predictor returned shape"):
        sliding_window_inference(torch.zeros(1, 16, 16, 16), Elementwise(lambda t: t), 2, config)


@pytest.mark.gpu
def test_cuda_accumulation_matches_cpu():
    from nnslim.compiler.runtime.predictors import TorchPredictor
    from tests.conftest import random_model

    image = torch.randn(1, 30, 20, 18)
    config = SlidingWindowConfig(patch_size=(16, 16, 16), batch_size=2)
    cpu = sliding_window_inference(image, TorchPredictor(random_model(), "cpu"), 3, config)
    gpu = sliding_window_inference(image, TorchPredictor(random_model(), "cuda"), 3, config)
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-4, rtol=1e-4)
