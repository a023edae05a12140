"""Slab-streamed accumulation, window skipping (ROI / mask), streamed resampling, memory cap."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from torch import nn

from nnslim.errors import InputError
from nnslim.compiler.runtime.backends.torch_module import TorchPredictor
from nnslim.compiler.runtime.preprocessing import resample
from nnslim.compiler.runtime.postprocessing import StreamingLabeler, logits_to_labels
from nnslim.compiler.runtime.window.walk import LogitChunk, sliding_window_inference, stream_logits
from nnslim.compiler.runtime.window.config import SlidingWindowConfig
from nnslim.compiler.runtime.window.selection import WindowReport, WindowSelection
from nnslim.compiler.runtime.window.grid import pad_to_patch
from nnslim.compiler.runtime.window.plan import accumulator_dtype
from nnslim.compiler.runtime.window.mask import body_mask
from nnslim.compiler.runtime.window.grid import compute_steps, eq2_window_count
from nnslim.compiler.runtime.window.blending import gaussian_importance_map
from tests.conftest import random_model


class Threshold(nn.Module):
    """A real network with known output: class 1 where the intensity exceeds 0.5 (1x1x1 conv)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(1, 2, 1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([0.0, 10.0]).view(2, 1, 1, 1, 1))
            self.conv.bias.copy_(torch.tensor([0.0, -5.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def whole_volume_reference(image, predictor, num_classes, config):
    """Accumulate every window into whole-volume buffers, divide once at the end (nnU-Net's way)."""
    padded, region = pad_to_patch(image, config.patch_size)
    logits = np.zeros((num_classes, *padded.shape[1:]), dtype=np.float32)
    weights = np.zeros(padded.shape[1:], dtype=np.float32)
    gaussian = gaussian_importance_map(config.patch_size)
    for start in itertools.product(*compute_steps(padded.shape[1:], config.patch_size, config.step_fraction)):
        sl = tuple(slice(s, s + p) for s, p in zip(start, config.patch_size))
        logits[(slice(None), *sl)] += predictor(padded[(slice(None), *sl)][None])[0] * gaussian
        weights[sl] += gaussian
    return (logits / weights)[region]


def test_slab_accumulation_equals_whole_volume_accumulation():
    image = np.random.default_rng(0).standard_normal((1, 37, 30, 21), dtype=np.float32)
    predictor = TorchPredictor(random_model())
    config = SlidingWindowConfig(patch_size=(16, 16, 16), step_fraction=0.5, batch_size=1)  # as the reference
    expected = whole_volume_reference(image, predictor, 3, config)
    chunks = []
    report = stream_logits(image, predictor, 3, config, chunks.append)
    assert {c.axis for c in chunks} == {0}  # the long axis
    assert [c.start for c in chunks] == sorted(c.start for c in chunks)  # in order
    assert sum(c.stop - c.start for c in chunks) == 37  # every slice exactly once
    streamed = np.concatenate([c.logits for c in chunks], axis=1)
    np.testing.assert_allclose(streamed, expected, rtol=1e-6, atol=1e-6)
    assert report.evaluated == report.grid == 4 * 3 * 2 and report.uncovered_voxels == 0
    np.testing.assert_allclose(sliding_window_inference(image, predictor, 3, config), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("slab_axis", [0, 2])
def test_streamed_labels_equal_labels_from_whole_logits_with_resampling(slab_axis):
    image = np.random.default_rng(1).standard_normal((1, 40, 26, 22), dtype=np.float32)
    predictor = TorchPredictor(random_model())
    config = SlidingWindowConfig(patch_size=(16, 16, 16))
    logits = sliding_window_inference(image, predictor, 3, config)
    for cropped_shape in [(40, 26, 22), (57, 19, 30)]:  # no resampling; up along x, down and up elsewhere
        expected = logits_to_labels(resample(logits, cropped_shape), None)
        labeler = StreamingLabeler(tuple(image.shape[1:]), cropped_shape, None)
        stream_logits(image, predictor, 3, config, labeler, slab_axis=slab_axis)
        labels = labeler.result()
        assert labels.shape == cropped_shape  # the model's axis order, whichever axis was walked
        agreement = (labels == expected).mean()
        assert agreement == 1.0 if cropped_shape == (40, 26, 22) else agreement >= 0.999


def test_labeler_refuses_a_walk_that_ends_early_or_changes_axis():
    labeler = StreamingLabeler((4, 3, 2), (4, 3, 2), None)
    with pytest.raises(RuntimeError, match="no logit chunk arrived"):
        labeler.result()
    labeler(LogitChunk(1, 0, np.zeros((2, 4, 1, 2), dtype=np.float32)))
    with pytest.raises(ValueError, match="one walk per labeler"):
        labeler(LogitChunk(0, 0, np.zeros((2, 1, 3, 2), dtype=np.float32)))
    with pytest.raises(RuntimeError, match="streamed 1 of 3"):  # without resampling a chunk is labelled at once
        labeler.result()


def _two_objects(size=(48, 96, 96)):
    """A bright column through the in-plane centre (slices 0..23 only) and a small cube near a
    corner of the plane at slices 4..9: off-centre, but in slabs whose centre window is active."""
    image = np.zeros((1, *size), dtype=np.float32)
    image[0, :24, 40:56, 40:56] = 1.0
    image[0, 4:10, 2:8, 85:92] = 1.0
    return image


def test_roi_skipping_finds_an_off_centre_object_and_skips_empty_slabs():
    image = _two_objects()
    predictor = TorchPredictor(Threshold())
    config = SlidingWindowConfig(patch_size=(16, 32, 32))
    full_report, roi_report = WindowReport(), WindowReport()
    full = sliding_window_inference(image, predictor, 2, config, report=full_report).argmax(0)
    roi = sliding_window_inference(image, predictor, 2, config, selection=WindowSelection("roi", 100),
                                   report=roi_report).argmax(0)
    assert int(full[4:10, 2:8, 85:92].sum()) == 6 * 6 * 7  # the full grid segments the corner cube
    assert np.array_equal(roi, full)  # ROI too: its slabs were active, so their whole plane was evaluated
    assert roi_report.grid == full_report.grid == 5 * 5 * 5
    assert roi_report.evaluated < full_report.evaluated and roi_report.skipped_by_roi > 0
    assert roi_report.evaluated + roi_report.skipped_by_roi == roi_report.grid
    assert roi_report.uncovered_voxels > 0  # slices 32..47: only centre windows ran; counted, background


def test_roi_skipping_with_no_foreground_matches_the_full_grid_where_it_predicts():
    image = np.zeros((1, 48, 64, 64), dtype=np.float32)
    predictor = TorchPredictor(Threshold())
    config = SlidingWindowConfig(patch_size=(16, 32, 32))
    report = WindowReport()
    roi = sliding_window_inference(image, predictor, 2, config, selection=WindowSelection("roi", 1), report=report)
    full = sliding_window_inference(image, predictor, 2, config)
    assert report.evaluated == 5  # one centre window per slab
    assert report.evaluated < report.grid == 5 * 3 * 3
    assert np.array_equal(roi.argmax(0), full.argmax(0))  # background everywhere, covered or not
    covered = np.abs(roi).sum(0) > 0
    np.testing.assert_allclose(roi[:, covered], full[:, covered], rtol=1.3e-6, atol=1e-5)  # identical where it predicted


def test_mask_skipping_on_a_padded_field_of_view():
    """The MNI-like case: anatomy in the middle of a large empty field of view."""
    image = np.zeros((1, 64, 128, 128), dtype=np.float32)
    image[0, 16:48, 40:88, 40:88] = np.random.default_rng(2).random((32, 48, 48), dtype=np.float32) + 0.2
    predictor = TorchPredictor(Threshold())
    config = SlidingWindowConfig(patch_size=(32, 32, 32))
    report = WindowReport()
    masked = sliding_window_inference(image, predictor, 2, config, report=report,
                                      selection=WindowSelection("mask", mask=body_mask(image)))
    full = sliding_window_inference(image, predictor, 2, config)
    assert np.array_equal(masked.argmax(0), full.argmax(0))
    assert report.skipped_by_mask > 0 and report.evaluated + report.skipped_by_mask == report.grid == 3 * 7 * 7
    assert report.evaluated <= 0.55 * report.grid


def test_body_mask_separates_ct_air_from_tissue():
    rng = np.random.default_rng(3)
    ct = rng.normal(-1000, 20, (30, 30, 30)).astype(np.float32)  # air with noise
    ct[10:20, 10:20, 10:20] = rng.normal(40, 30, (10, 10, 10))  # soft tissue
    mask = body_mask(ct[None])
    assert bool(mask[10:20, 10:20, 10:20].all())  # all the tissue
    assert int(mask.sum()) <= 12**3 and not bool(mask[:8].any())  # and the air at most one voxel around it


def test_eq2_counts_windows_as_printed_and_the_grid_has_one_more_per_axis():
    assert eq2_window_count((100, 100, 100), (50, 50, 50), 0.5) == 8
    steps = compute_steps((100, 100, 100), (50, 50, 50), 0.5)
    assert [len(s) for s in steps] == [3, 3, 3]


def test_memory_cap_switches_to_fp16_then_refuses():
    from nnslim.compiler.runtime.engine import InferenceOptions, ModelSpec
    from nnslim.compiler.runtime.segmentation import window_config

    spec = ModelSpec(in_channels=1, num_classes=14, patch_size=(32, 128, 192), max_batch=2, normalization={},
                     label_names=tuple(str(i) for i in range(14)), spacing=None, mirror_axes=(), input_name="image",
                     output_name="logits")
    shape = (600, 512, 512)  # the slab is 32 x 512 x 512: 15 channels x 8M voxels = 480 MB in fp32

    def dtype(cap):  # the engine hands the cap to the window, which sizes its accumulators
        config = window_config(spec, InferenceOptions(memory_cap_mb=cap))
        assert config.memory_cap_mb == cap and config.accumulate_dtype == "float32"
        return accumulator_dtype(shape, spec.num_classes, config)

    assert dtype(1000) == "float32"
    assert dtype(300) == "float16"
    with pytest.raises(InputError, match="even in fp16"):
        dtype(100)


def test_walking_along_the_long_axis_gives_the_same_logits():
    from nnslim.compiler.runtime.window.grid import walk_order

    image = np.random.default_rng(4).standard_normal((1, 20, 18, 61), dtype=np.float32)
    predictor = TorchPredictor(random_model())
    config = SlidingWindowConfig(patch_size=(16, 16, 16), batch_size=1, mirror_axes=(0, 2))
    assert walk_order(image.shape[1:], config.patch_size, config.step_fraction) == (2, 0, 1)  # z has the most window positions
    config_plain = SlidingWindowConfig(patch_size=(16, 16, 16), batch_size=1)
    expected = whole_volume_reference(image, predictor, 3, config_plain)
    np.testing.assert_allclose(sliding_window_inference(image, predictor, 3, config_plain), expected,
                               rtol=1e-5, atol=1e-5)
    # with mirroring: the same as walking along axis 0
    along_z = sliding_window_inference(image, predictor, 3, config)
    chunks = []
    stream_logits(image, predictor, 3, config, lambda chunk: chunks.append(chunk.logits), slab_axis=0)
    np.testing.assert_allclose(along_z, np.concatenate(chunks, axis=1), rtol=1e-5, atol=1e-5)


def test_roi_counts_foreground_inside_the_body_only():
    """A network that labels everything foreground (as instance-normalized networks can do on
    all-air tiles) must not keep slabs of pure air active."""
    everything = nn.Conv3d(1, 2, 1)
    with torch.no_grad():
        everything.weight.zero_()
        everything.bias.copy_(torch.tensor([0.0, 1.0]))
    image = np.zeros((1, 96, 32, 32), dtype=np.float32)
    image[0, 40:56, 8:24, 8:24] = 1.0  # a body in the middle third only
    config = SlidingWindowConfig(patch_size=(16, 16, 16))
    report = WindowReport()
    sliding_window_inference(image, TorchPredictor(everything), 2, config, report=report,
                             selection=WindowSelection("roi", 100, mask=body_mask(image)))
    slabs = 11  # (96 - 16) / 8 + 1 positions along the walk axis
    # slabs whose centre window holds >= 100 body-mask voxels (the mask is the body grown by one
    # voxel, 39..56): starts 24 and 56 (one 18 x 18 slice each), 32, 40, 48
    active = 5
    assert report.evaluated == slabs + active * (report.grid // slabs - 1)


def test_body_mask_finds_tissue_around_a_zero_background_that_is_not_the_darkest_value():
    """nnslim's default normalization keeps air at 0 while CSF-like tissue runs negative: the
    percentile cut alone would call the air body; the constant background rule does not."""
    rng = np.random.default_rng(4)
    image = np.zeros((40, 40, 40), dtype=np.float32)
    image[10:30, 10:30, 10:30] = rng.normal(0.5, 1.0, (20, 20, 20))  # z-scored tissue, a third below 0
    image[18:22, 18:22, 18:22] = -1.5  # dark structure inside the body
    mask = body_mask(image[None])
    assert bool(mask[10:30, 10:30, 10:30].all())  # the body, dark parts included
    assert int(mask.sum()) <= 22**3 and not bool(mask[:8].any()) and not bool(mask[32:].any())
