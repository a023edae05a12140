import numpy as np
import torch
import pytest

from nnslim.errors import EngineError
from nnslim.compiler.runtime.preprocessing import DEFAULT_NORMALIZATION, nnslim_normalize, normalize, zscore_normalize


def reference_zscore(image):
    """nnslim's z-score written out (the formula training used before it shared the runtime's)."""
    image = np.asarray(image, dtype=np.float32)
    out = np.empty_like(image)
    for c, channel in enumerate(image):
        values = channel[channel != 0] if (channel != 0).any() else channel
        out[c] = (channel - float(values.mean())) / max(float(values.std()), 1e-8)
    return out


def test_training_normalizes_with_the_runtimes_function():
    from nnslim.training import data

    assert data.nnslim_normalize is nnslim_normalize  # one function, not two that must agree
    assert data.Dataset("d", (), (), (1, 1, 1), [], [], "", "").normalization == DEFAULT_NORMALIZATION
    rng = np.random.default_rng(0)
    image = rng.normal(100, 20, (2, 20, 21, 22)).astype(np.float32)
    image[:, :5] = 0  # background, excluded from the statistics
    ours = normalize(image, {"scheme": "zscore", "mask": "nonzero"})
    np.testing.assert_array_equal(ours, reference_zscore(image))  # bit for bit
    np.testing.assert_array_equal(zscore_normalize(image), ours)
    foreground = ours[0][image[0] != 0]
    assert abs(foreground.mean()) < 1e-5 and abs(foreground.std() - 1) < 1e-5
    assert image[0, 0, 0, 0] == 0 and image.mean() > 50  # the caller's array is left alone


def test_zscore_edge_cases():
    empty = np.zeros((1, 3, 3, 3), dtype=np.float32)  # no nonzero voxel: all voxels, std floored
    np.testing.assert_array_equal(zscore_normalize(empty), empty)
    constant = np.full((1, 2, 2, 2), 7.0, dtype=np.float32)
    np.testing.assert_array_equal(zscore_normalize(constant), np.zeros_like(constant))
    rng = np.random.default_rng(2)
    image = rng.normal(5, 2, (1, 6, 7, 8)).astype(np.float32)
    image[0, :2] = 0
    whole = normalize(image, {"scheme": "zscore", "mask": "none"})
    np.testing.assert_array_equal(whole, (image - float(image.mean())) / float(image.std()))
    # nnU-Net's per-channel "zscore" (no mask) is the same computation
    np.testing.assert_array_equal(normalize(image, {"scheme": "per-channel", "channels": [{"scheme": "zscore"}]}), whole)


def test_unknown_scheme_is_refused():
    with pytest.raises(EngineError, match="unsupported normalization"):
        normalize(np.zeros((1, 2, 2, 2)), {"scheme": "ct"})


def test_masked_zscore_leaves_voxels_outside_the_mask_alone():
    rng = np.random.default_rng(1)
    image = rng.normal(50, 10, (1, 8, 9, 10)).astype(np.float32)
    mask = np.zeros((8, 9, 10), dtype=bool)
    mask[2:6, 2:7, 3:8] = True
    out = normalize(image, {"scheme": "per-channel", "channels": [{"scheme": "zscore", "mask": "nonzero-region"}]}, mask)
    np.testing.assert_array_equal(out[0][~mask], image[0][~mask])
    assert abs(out[0][mask].mean()) < 1e-5 and abs(out[0][mask].std() - 1) < 1e-5


def test_ct_normalization_clips_then_applies_the_stored_statistics():
    image = np.array([[[[-2000.0, 0.0, 100.0, 5000.0]]]], dtype=np.float32)
    entry = {"scheme": "ct", "clip": [-100.0, 250.0], "mean": 60.0, "std": 45.0}
    out = normalize(image, {"scheme": "per-channel", "channels": [entry]})
    np.testing.assert_allclose(out.ravel(), (np.array([-100.0, 0.0, 100.0, 250.0]) - 60.0) / 45.0, rtol=1e-6)


def test_regions_are_painted_in_class_order():
    from nnslim.compiler.runtime.postprocessing import logits_to_labels

    # heads: whole (1, 2, 3), core (2, 3), enhancing (3); sigmoid > 0.5 means logit > 0
    logits = np.array([[[2.0, 2.0, 2.0, -1.0]], [[-1.0, 3.0, 3.0, -1.0]], [[-1.0, -1.0, 0.5, 4.0]]], np.float32)
    labels = logits_to_labels(logits, {"kind": "regions", "class_order": [1, 2, 3]})
    assert labels.tolist() == [[1, 2, 3, 3]]
    assert logits_to_labels(torch.from_numpy(logits), {"kind": "regions", "class_order": [1, 2, 3]}).tolist() == \
        [[1, 2, 3, 3]]  # a tensor (a GPU walk's logits) gives the same host labels


# odd sizes, down and up, anisotropic: (input [C, *spatial], output spatial)
RESAMPLE_CASES = [((1, 37, 41, 29), (18, 57, 29)), ((2, 13, 7, 50), (26, 3, 17)), ((3, 9, 9, 9), (9, 9, 9)),
                  ((1, 64, 33, 12), (107, 33, 7)), ((1, 5, 40), (9, 23)), ((1, 1, 16, 16), (1, 31, 8))]


@pytest.mark.parametrize("shape,out", RESAMPLE_CASES)
def test_resample_reproduces_torch_trilinear_without_torch(shape, out):
    """The runtime's numpy resampling against torch's `interpolate(..., align_corners=False)`, which
    it replaces: the same indices and float32 weights, the same order of axes (the last first);
    torch's compiled kernel fuses some multiply-adds, so single values differ by float32 rounding of
    the sums, a few 1e-6 of the data's range."""
    from nnslim.compiler.runtime.preprocessing import resample

    data = np.random.default_rng(sum(shape)).standard_normal(shape).astype(np.float32) * 100
    mode = {2: "bilinear", 3: "trilinear"}[len(out)]
    expected = torch.nn.functional.interpolate(torch.from_numpy(data)[None], size=out, mode=mode,
                                               align_corners=False)[0].numpy()
    ours = resample(data, out)
    assert ours.shape == expected.shape and ours.dtype == np.float32
    np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-5 * np.abs(data).max())


def test_prepare_and_to_labels_round_trip_geometry():
    """Axis reversal + transpose + crop + resampling, then back: shapes and placement exact."""
    from nnslim.compiler.runtime.preprocessing import prepare
    from nnslim.compiler.runtime.postprocessing import to_labels

    data = np.zeros((1, 30, 20, 10), dtype=np.float32)  # nibabel order (X, Y, Z)
    data[0, 5:25, 3:17, 2:8] = 1.0 + np.random.default_rng(0).random((20, 14, 6))
    pre = {
        "normalization": {"scheme": "per-channel", "channels": [{"scheme": "none"}]},
        "axis_order": "reversed", "transpose_forward": [1, 0, 2], "crop_to_nonzero": True,
        "resample": True, "spacing": [1.0, 2.0, 1.5],  # model axes: (Y, Z, X)
    }
    prepared = prepare(data, (1.5, 1.0, 2.0), pre)  # input spacing (X, Y, Z)
    assert prepared.permutation == (1, 2, 0)
    assert prepared.cropped_shape == (14, 6, 20)
    assert tuple(prepared.image.shape[1:]) == (14, 6, 20)  # spacing already matches: no resampling
    coarse = prepare(data, (3.0, 1.0, 2.0), pre)  # X twice as coarse as the model's 1.5 mm
    assert tuple(coarse.image.shape[1:]) == (14, 6, 40)
    # "logits" that mark the object: class 1 everywhere in the crop
    logits = np.stack([np.zeros(coarse.image.shape[1:], np.float32), np.ones(coarse.image.shape[1:], np.float32)])
    labels = to_labels(logits, coarse)
    assert labels.shape == (30, 20, 10)
    np.testing.assert_array_equal(labels, (data[0] != 0).astype(np.uint8))


def test_default_scheme_keeps_air_at_zero_like_nnunets_mask_for_norm():
    """Statistics from the nonzero voxels; zeros stay 0, the value the runtime pads with."""
    rng = np.random.default_rng(3)
    image = rng.normal(100, 20, (1, 10, 11, 12)).astype(np.float32)
    image[:, :4] = 0
    ours = normalize(image, DEFAULT_NORMALIZATION)
    inside = image[0] != 0
    assert (ours[0][~inside] == 0).all()
    np.testing.assert_array_equal(ours[0][inside], reference_zscore(image)[0][inside])
    # the older scheme (no "outside" key) still turns air into one negative constant
    old = normalize(image, {"scheme": "zscore", "mask": "nonzero"})
    assert np.unique(old[0][~inside]).size == 1 and old[0][~inside][0] < -3
    with pytest.raises(EngineError, match="outside"):
        normalize(image, {"scheme": "zscore", "mask": "none", "outside": "zero"})
