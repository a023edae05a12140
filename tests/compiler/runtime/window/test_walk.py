import itertools
import math
from dataclasses import replace

import numpy as np
import pytest

from nnslim.compiler.runtime.window.blending import Blending
from nnslim.errors import InputError
from nnslim.compiler.runtime.window.walk import LogitChunk, sliding_window_inference, stream_logits
from nnslim.compiler.runtime.window.config import SlidingWindowConfig
from nnslim.compiler.runtime.window.grid import pad_to_patch, tile_slices
from nnslim.compiler.runtime.window.grid import compute_steps
from nnslim.compiler.runtime.window.blending import gaussian_importance_map
from nnslim.compiler.runtime.window.selection import SKIP_MODES, WindowSelection


class Elementwise:
    """A predictor whose logits are elementwise functions of the tile: stitching must be exact."""

    device = "cpu"

    def __init__(self, *functions):
        self.functions = functions
        self.calls = 0

    def __call__(self, tiles):
        self.calls += 1
        return np.concatenate([f(tiles) for f in self.functions], axis=1)


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
    weights = gaussian_importance_map(patch, dtype="float64")
    axes = [np.exp(-((np.arange(p) - p // 2) ** 2) / (2 * (p / 8) ** 2)) for p in patch]
    expected = np.einsum("i,j,k->ijk", *axes)
    expected *= 10 / expected.max()
    np.testing.assert_allclose(weights, expected, rtol=1e-10)
    assert weights.max() == pytest.approx(10.0)
    assert np.unravel_index(weights.argmax(), patch) == (32, 24, 20)


def test_default_blending_is_nnunets_gaussian():
    assert SlidingWindowConfig(patch_size=(8, 8, 8)).blending == Blending("gaussian", 1 / 8, 10.0)
    np.testing.assert_array_equal(Blending().weights((20, 12, 16)), gaussian_importance_map((20, 12, 16)))
    np.testing.assert_array_equal(Blending("constant").weights((3, 4, 5)), np.ones((3, 4, 5), dtype=np.float32))
    wider = Blending(sigma_scale=1 / 4).weights((32, 32, 32))
    assert wider[0, 16, 16] > Blending().weights((32, 32, 32))[0, 16, 16]  # sigma_scale is used
    with pytest.raises(ValueError, match="blending mode"):
        Blending("triangle")


def test_gaussian_zeros_clamped_after_the_cast_to_the_accumulation_dtype():
    """nnU-Net casts the map to its fp16 accumulators, then clamps zeros: far corners underflow
    in fp16 and must not get weight 0 (they would count as uncovered voxels)."""
    wide = gaussian_importance_map((40, 56, 48), dtype="float64")
    assert wide.min() < 6e-8  # below fp16's smallest subnormal
    half = gaussian_importance_map((40, 56, 48), dtype="float16")
    assert half.min() > 0
    cast = wide.astype(np.float16)
    assert half.min() == cast[cast > 0].min() and half[0, 0, 0] == half.min()
    # in fp32 nothing underflows: the cast and the clamp commute, the map is the float64 one rounded
    np.testing.assert_array_equal(gaussian_importance_map((40, 56, 48)), wide.astype(np.float32))


def test_gaussian_zeros_replaced_by_smallest_nonzero():
    weights = gaussian_importance_map((9, 9, 9), sigma_scale=1 / 32, dtype="float64")
    assert weights.min() > 0
    # sigma 0.28 truncates at radius 1: corners were zero and now hold the smallest kept value
    nonzero_in_kernel = weights[3:6, 3:6, 3:6]
    assert weights[0, 0, 0] == nonzero_in_kernel.min()


def test_pad_to_patch_is_centred():
    image = np.arange(1 * 5 * 20 * 3, dtype=np.float32).reshape(1, 5, 20, 3)
    padded, region = pad_to_patch(image, (8, 16, 8))
    assert padded.shape == (1, 8, 20, 8)
    assert [s.start for s in region[1:]] == [1, 0, 2]  # below = diff // 2
    np.testing.assert_array_equal(padded[region], image)
    assert padded.sum() == image.sum()


@pytest.mark.parametrize("shape", [(37, 41, 29), (10, 20, 5), (16, 16, 16), (33, 17, 50)])
@pytest.mark.parametrize("step", [0.5, 0.33, 1.0])
def test_stitching_reproduces_elementwise_predictor(shape, step):
    image = np.random.default_rng(0).standard_normal((1, *shape))
    config = SlidingWindowConfig(patch_size=(16, 16, 16), step_fraction=step, batch_size=3, accumulate_dtype="float64")
    logits = sliding_window_inference(image, Elementwise(lambda t: t + 1, lambda t: 2 * t), 2, config)
    assert logits.shape == (2, *shape)
    assert np.abs(logits[0] - (image[0] + 1)).max() < 1e-12
    assert np.abs(logits[1] - 2 * image[0]).max() < 1e-12


def test_stitching_float32_accumulator_and_uniform_weights():
    image = np.random.default_rng(1).standard_normal((1, 23, 40, 19), dtype=np.float32)
    for blending in (Blending(), Blending("constant")):
        config = SlidingWindowConfig(patch_size=(16, 16, 16), blending=blending)
        logits = sliding_window_inference(image, Elementwise(lambda t: t + 1), 1, config)
        np.testing.assert_allclose(logits[0], image[0] + 1, rtol=1e-6, atol=1e-6)


def test_mirror_tta_runs_every_flip_and_is_exact_for_elementwise():
    image = np.random.default_rng(2).standard_normal((1, 20, 18, 16))
    predictor = Elementwise(lambda t: t * 3)
    config = SlidingWindowConfig(patch_size=(16, 16, 16), step_fraction=1.0, mirror_axes=(0, 1, 2),
                                 accumulate_dtype="float64")
    logits = sliding_window_inference(image, predictor, 1, config)
    tiles = len(tile_slices((20, 18, 16), config.patch_size, config.step_fraction))
    assert predictor.calls == 8 * tiles
    assert np.abs(logits[0] - 3 * image[0]).max() < 1e-12


def test_wrong_predictor_output_shape_is_reported():
    config = SlidingWindowConfig(patch_size=(16, 16, 16))
    with pytest.raises(ValueError, match="predictor returned shape"):
        sliding_window_inference(np.zeros((1, 16, 16, 16), dtype=np.float32), Elementwise(lambda t: t), 2, config)


class PositionDependent:
    """A predictor whose logits depend on where a voxel sits in its tile: `x * scale_k + R_k[pos]`,
    with R a fixed random tensor over the tile. Overlapping tiles disagree, so the result depends
    on the blend weights (an elementwise predictor cannot tell them apart)."""

    device = "cpu"

    def __init__(self, patch, num_classes=2, seed=0):
        self.offsets = np.random.default_rng(seed).standard_normal((num_classes, *patch))
        self.scales = np.arange(1, num_classes + 1, dtype=np.float64).reshape(1, -1, 1, 1, 1)

    def __call__(self, tiles):
        return tiles[:, :1] * self.scales + self.offsets


def reference_gaussian(patch, sigma_scale=1 / 8, value_scaling=10.0):
    """nnU-Net's importance map written out: per axis a sampled Gaussian around P // 2, cut at
    scipy's radius int(4 sigma + 0.5), outer product, maximum scaled to 10, zeros -> smallest nonzero."""
    axes = []
    for p in patch:
        sigma, x = p * sigma_scale, np.arange(p) - p // 2
        axes.append(np.where(np.abs(x) <= int(4 * sigma + 0.5), np.exp(-(x**2) / (2 * sigma**2)), 0.0))
    weights = np.einsum("i,j,k->ijk", *axes)
    weights *= value_scaling / weights.max()
    weights[weights == 0] = weights[weights > 0].min()
    return weights


def brute_force_nnunet(image, predict, num_classes, patch, step, mirror_axes=(), gaussian=True):
    """nnU-Net v2's sliding window, independently and plainly: pad centred, loop over every
    window start, add weight * prediction (mirror-averaged) and the weight, divide, crop."""
    shape = image.shape[1:]
    below = [max(p - s, 0) // 2 for s, p in zip(shape, patch)]
    padded = np.pad(image, [(0, 0)] + [(b, max(p - s, 0) - b) for s, p, b in zip(shape, patch, below)])
    starts = []
    for size, p in zip(padded.shape[1:], patch):
        n = math.ceil((size - p) / (p * step)) + 1
        starts.append([0] if n == 1 else [round(i * (size - p) / (n - 1)) for i in range(n)])
    weight = reference_gaussian(patch) if gaussian else np.ones(patch)
    total = np.zeros((num_classes, *padded.shape[1:]))
    weights = np.zeros(padded.shape[1:])
    flips = [c for r in range(len(mirror_axes) + 1) for c in itertools.combinations(mirror_axes, r)]
    for x, y, z in itertools.product(*starts):
        where = (slice(x, x + patch[0]), slice(y, y + patch[1]), slice(z, z + patch[2]))
        tile = padded[(slice(None), *where)][None].copy()
        prediction = sum(np.flip(predict(np.flip(tile, [a + 2 for a in f])), [a + 2 for a in f]) for f in flips) / len(flips)
        total[(slice(None), *where)] += weight * prediction[0]
        weights[where] += weight
    crop = tuple(slice(b, b + s) for b, s in zip(below, shape))
    return (total / weights)[(slice(None), *crop)]


BLEND_CASES = [  # (image shape, patch, step, mirror axes)
    ((37, 41, 29), (16, 16, 16), 0.5, ()),
    ((37, 41, 29), (16, 16, 16), 0.33, ()),
    ((10, 45, 23), (16, 12, 20), 0.5, ()),  # the tile is larger than the image along axis 0
    ((33, 17, 50), (16, 20, 12), 0.33, ()),  # ... along axis 1; the walk goes along axis 2
    ((21, 19, 30), (12, 16, 16), 0.5, (0, 2)),  # mirror TTA on a position-dependent predictor
]


@pytest.mark.parametrize("shape,patch,step,mirror_axes", BLEND_CASES)
def test_blending_matches_a_brute_force_nnunet_reference(shape, patch, step, mirror_axes):
    image = np.random.default_rng(5).standard_normal((1, *shape))
    predictor = PositionDependent(patch)
    expected = brute_force_nnunet(image, predictor, 2, patch, step, mirror_axes)
    config = SlidingWindowConfig(patch_size=patch, step_fraction=step, batch_size=3, mirror_axes=mirror_axes,
                                 accumulate_dtype="float64")
    logits = sliding_window_inference(image, predictor, 2, config)
    np.testing.assert_allclose(logits, expected, rtol=1e-9, atol=1e-9)
    # the comparison is sharp: other blend weights give a visibly different answer
    constant = sliding_window_inference(image, predictor, 2, replace(config, blending=Blending("constant")))
    assert np.abs(constant - expected).max() > 1e-2
    np.testing.assert_allclose(constant, brute_force_nnunet(image, predictor, 2, patch, step, mirror_axes, False),
                               rtol=1e-9, atol=1e-9)


def test_chunks_come_in_the_models_axis_order_whatever_the_walk():
    image = np.random.default_rng(6).standard_normal((1, 20, 18, 61))
    predictor = PositionDependent((16, 16, 16))
    config = SlidingWindowConfig(patch_size=(16, 16, 16), accumulate_dtype="float64")
    whole = sliding_window_inference(image, predictor, 2, config)
    for axis in (0, 1, 2):
        chunks: list[LogitChunk] = []
        stream_logits(image, predictor, 2, config, chunks.append, slab_axis=axis)
        assert {c.axis for c in chunks} == {axis}
        assert [c.start for c in chunks] == sorted(c.start for c in chunks) and chunks[0].start == 0
        assert chunks[-1].stop == image.shape[1 + axis]
        for chunk in chunks:
            assert chunk.logits.shape[1:] == tuple(whole[(slice(None), *chunk.index)].shape[1:])
            np.testing.assert_allclose(chunk.logits, whole[(slice(None), *chunk.index)], rtol=1e-12, atol=1e-12)


def test_memory_cap_picks_fp16_accumulators_then_refuses_before_predicting():
    from nnslim.compiler.runtime.window.plan import accumulator_dtype

    image = np.random.default_rng(7).standard_normal((1, 64, 48, 48), dtype=np.float32)
    predictor = Elementwise(lambda t: t, lambda t: -t)
    config = SlidingWindowConfig(patch_size=(16, 16, 16))  # walk along axis 0: slab 16 x 48 x 48, 3 values
    fp32_mb = 3 * 16 * 48 * 48 * 4 / 2**20
    assert accumulator_dtype((64, 48, 48), 2, replace(config, memory_cap_mb=fp32_mb)) == "float32"
    capped = replace(config, memory_cap_mb=fp32_mb / 2)
    assert accumulator_dtype((64, 48, 48), 2, capped) == "float16"
    chunks = []
    stream_logits(image, predictor, 2, capped, chunks.append)
    assert {c.logits.dtype for c in chunks} == {np.dtype(np.float16)}
    with pytest.raises(InputError, match="even in fp16"):
        stream_logits(image, predictor, 2, replace(config, memory_cap_mb=fp32_mb / 3), chunks.append)
    assert predictor.calls == len(tile_slices((64, 48, 48), config.patch_size, config.step_fraction))  # the refused walk predicted nothing


def test_one_vocabulary_for_skip_modes():
    assert tuple(SKIP_MODES) == ("none", "mask", "roi", "roi+mask")
    assert WindowSelection().mode == "none"
    with pytest.raises(InputError, match="none, mask, roi, roi\\+mask"):
        WindowSelection("full")
    with pytest.raises(InputError, match="needs a body mask"):
        WindowSelection("roi+mask")
