"""nnU-Net's resampling rule (`runtime.nnunet.resampling`), as nnU-Net engines record it.

In CI: the properties nnU-Net's rule has (shapes, the anisotropic axis taken by nearest sample, the
spline output clipped to the input's range, labels voted with nearest-neighbour tie-breaks, the
cascade's one-hot channels with nnU-Net's outside-the-body label). With nnU-Net installed (`nnunet`),
nnunetv2's own `resample_data_or_seg_to_shape` gives the same arrays: images and label maps
exactly, logits within float32 rounding.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from nnslim.compiler.runtime.nnunet import resampling
from nnslim.compiler.runtime.preprocessing import prepare, resample
from nnslim.errors import EngineError, InputError
from tests.compiler.test_predict_nnunet import NNUNET_PYTHON

DATA = resampling.DEFAULTS["data"]
SEG = resampling.DEFAULTS["seg"]
PROBABILITIES = resampling.DEFAULTS["probabilities"]


def image(seed=0, shape=(1, 20, 24, 22)):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def label_map(shape=(20, 24, 22)):
    seg = np.zeros(shape, np.int16)
    seg[3:15, 4:20, 5:18] = 1
    seg[8:12, 8:14, 6:10] = 2
    return seg


def test_anisotropic_axis_is_resampled_by_nearest_sample():
    data = image()
    out = resampling.resample_image(data, (9, 24, 22), (4.0, 1.0, 1.0), (9.0, 1.0, 1.0), DATA)
    # the plane keeps its size, so each output slice is one input slice, unchanged
    assert out.shape == (1, 9, 24, 22)
    assert all(any(np.array_equal(out[0, i], data[0, j]) for j in range(20)) for i in range(9))
    assert resampling.separate_axis((4.0, 1.0, 1.0), (1.0, 1.0, 1.0), None) == 0
    assert resampling.separate_axis((1.0, 1.0, 1.0), (1.0, 1.0, 3.5), None) == 2
    assert resampling.separate_axis((1.0, 1.0, 1.0), (1.5, 1.0, 1.0), None) is None
    assert resampling.axis_orders(PROBABILITIES, (4.0, 1.0, 1.0), (1.0, 1.0, 1.0)) == (0, 1, 1)


def test_splines_stay_inside_the_inputs_range():
    data = image()
    out = resampling.resample_image(data, (31, 37, 30), (1.0, 1.0, 1.0), (0.65, 0.65, 0.74), DATA)
    assert out.shape == (1, 31, 37, 30) and out.dtype == np.float32
    assert out.min() >= data.min() and out.max() <= data.max() and out.max() == pytest.approx(data.max(), abs=0.5)


def test_labels_are_voted_and_ties_go_to_the_nearest_label():
    seg = label_map()
    doubled = resampling.resample_labels(seg, (40, 48, 44), (1.0,) * 3, (0.5,) * 3, SEG)
    assert set(np.unique(doubled)) == {0, 1, 2}
    for label in (1, 2):
        assert (doubled == label).sum() == pytest.approx(8 * (seg == label).sum(), rel=0.15)
    # halving stripes 1, 2, 1, 2, ... along one axis: every output voxel lies halfway between a 1 and a 2
    # (a tie); the nearest sample is the later one, a 2 (plain argmax would keep the lower label, 1)
    stripes = np.broadcast_to((1 + np.arange(20) % 2)[:, None, None], (20, 6, 6)).astype(np.int16)
    halved = resampling.resample_labels(stripes, (10, 6, 6), (1.0,) * 3, (2.0, 1.0, 1.0), SEG)
    assert halved.shape == (10, 6, 6) and np.all(halved == 2)


def test_cascade_channels_one_hot_in_model_space():
    pre = {"normalization": {"scheme": "per-channel", "channels": [{"scheme": "none"}]}, "axis_order": "reversed",
           "crop_to_nonzero": True, "resample": True, "spacing": [2.0, 1.0, 1.0],
           "resampling": {"rule": "nnunet"}, "previous_stage": {"configuration": "3d_lowres", "labels": [1, 2]}}
    data = np.zeros((1, 24, 22, 20), np.float32)
    data[0, 2:20, 3:19, 1:19] = 1 + image(shape=(18, 16, 18))
    seg = label_map((20, 22, 24)).transpose(2, 1, 0)  # nibabel order [X, Y, Z]
    prepared = prepare(data, (1.0, 1.0, 1.0), pre, previous=seg)
    assert prepared.image.shape[0] == 3 and prepared.image.shape[1:] == (9, 16, 18)
    assert set(np.unique(prepared.image[1:])) <= {0.0, 1.0} and prepared.image[1:].sum(0).max() == 1
    with pytest.raises(InputError, match="cascade stage"):
        prepare(data, (1.0, 1.0, 1.0), pre)
    with pytest.raises(InputError, match="shape"):
        prepare(data, (1.0, 1.0, 1.0), pre, previous=seg[:-1])


@pytest.mark.parametrize("record, says", [({"data": {"order": 9}}, "order"), ({"seg": {"order_z": 3}}, "order_z"),
                                          ({"probabilities": "linear"}, "expected an object")])
def test_a_damaged_record_is_an_engine_error(record, says):
    with pytest.raises(EngineError, match=says):
        for kind in resampling.KINDS:
            resampling.settings(record, kind)


REFERENCE = """
import sys, numpy as np
from nnunetv2.preprocessing.resampling.default_resampling import resample_data_or_seg_to_shape
d = dict(np.load(sys.argv[1]))
out = {}
for case in sorted({k.split(':')[1] for k in d}):
    a, shape, cur, new, kw = (d[f'{k}:{case}'] for k in ('in', 'shape', 'cur', 'new', 'kw'))
    out[case] = resample_data_or_seg_to_shape(a, shape, cur, new, is_seg=bool(kw[0]), order=int(kw[1]),
                                              order_z=int(kw[2]), force_separate_z=None)
np.savez(sys.argv[2], **out)
"""


@pytest.mark.nnunet
@pytest.mark.skipif(not NNUNET_PYTHON, reason="set NNSLIM_NNUNET_PYTHON to a Python with nnunetv2")
def test_nnunets_own_resampling_gives_the_same_arrays(tmp_path):
    seg = label_map()[None].copy()
    seg[0, 0:3] = -1  # nnU-Net's label for background outside the crop mask
    aniso = ((4.0, 1.0, 1.0), (9.0, 0.65, 0.74))
    cases = {"data": (image(), (27, 30, 17), (1.0, 1.2, 1.1), (0.8, 0.9, 1.4), (0, 3, 0)),
             "data_aniso": (image(), (9, 37, 30), *aniso, (0, 3, 0)),
             "seg": (seg, (40, 48, 44), (1.0,) * 3, (0.5,) * 3, (1, 1, 0)),
             "seg_odd": (seg, (27, 31, 17), (1.0,) * 3, (0.75, 0.77, 1.3), (1, 1, 0)),
             "seg_aniso": (seg, (9, 37, 30), *aniso, (1, 1, 0)),
             "logits_aniso": (image(), (45, 37, 30), (4.0, 1.0, 1.0), (1.8, 0.65, 0.74), (0, 1, 0))}
    arrays = {f"{k}:{name}": np.asarray(v) for name, c in cases.items()
              for k, v in zip(("in", "shape", "cur", "new", "kw"), c)}
    np.savez(tmp_path / "in.npz", **arrays)
    (tmp_path / "reference.py").write_text(REFERENCE)
    subprocess.run([NNUNET_PYTHON, str(tmp_path / "reference.py"), str(tmp_path / "in.npz"), str(tmp_path / "out.npz")],
                   check=True, timeout=300, stdout=sys.stdout)
    reference = np.load(tmp_path / "out.npz")
    for name, (a, shape, cur, new, kw) in cases.items():
        rule = {"order": kw[1], "order_z": kw[2], "force_separate_z": None}
        if name.startswith("data"):
            ours = resampling.resample_image(a, shape, cur, new, rule)
        elif name.startswith("seg"):
            ours = resampling.resample_labels(a[0], shape, cur, new, rule)[None]
        else:  # logits back to the input's spacing: the streaming labeler's per-axis rule
            ours = resample(a, shape, resampling.axis_orders(rule, cur, new))
        assert ours.shape == reference[name].shape, name
        tolerance = 1e-5 if name.startswith("logits") else 0.0  # float32 here, float64 in nnU-Net
        assert np.abs(ours.astype(np.float64) - reference[name]).max() <= tolerance, name


PREPROCESSOR = """
import json, sys, numpy as np
from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
from nnunetv2.utilities.label_handling.label_handling import convert_labelmap_to_one_hot
cfg = json.load(open(sys.argv[1]))
kwargs = {k: {"is_seg": k == "seg", "order": 3 if k == "data" else 1, "order_z": 0, "force_separate_z": None}
          for k in ("data", "seg", "probabilities")}
configuration = {"data_identifier": "x", "preprocessor_name": "DefaultPreprocessor", "batch_size": 2,
                 "patch_size": [8, 8, 8], "median_image_size_in_voxels": [8, 8, 8], "spacing": cfg["target"],
                 "normalization_schemes": ["ZScoreNormalization"], "use_mask_for_norm": [cfg["mask"]],
                 **{f"resampling_fn_{k}": "resample_data_or_seg_to_shape" for k in kwargs},
                 **{f"resampling_fn_{k}_kwargs": v for k, v in kwargs.items()}, "architecture": {}, "batch_dice": False}
plans = {"dataset_name": "D", "plans_name": "p", "original_median_spacing_after_transp": [1, 1, 1],
         "original_median_shape_after_transp": [1, 1, 1], "image_reader_writer": "SimpleITKIO",
         "transpose_forward": cfg["tf"], "transpose_backward": np.argsort(cfg["tf"]).tolist(),
         "configurations": {"c": configuration}, "experiment_planner_used": "x", "label_manager": "LabelManager",
         "foreground_intensity_properties_per_channel": {"0": {}}}
manager = PlansManager(plans)
dataset = {"labels": {"background": 0, "a": 1, "b": 2}, "channel_names": {"0": "MR"}, "file_ending": ".nii.gz"}
case = np.load(sys.argv[2])
data, seg, props = DefaultPreprocessor(verbose=False).run_case_npy(
    case["data"], case["seg"].astype(np.float32), {"spacing": list(case["spacing"])}, manager,
    manager.get_configuration("c"), dataset)
one_hot = convert_labelmap_to_one_hot(seg[0], manager.get_label_manager(dataset).foreground_labels, data.dtype)
np.save(sys.argv[3], np.vstack((data, one_hot)))
"""


@pytest.mark.nnunet
@pytest.mark.skipif(not NNUNET_PYTHON, reason="set NNSLIM_NNUNET_PYTHON to a Python with nnunetv2")
@pytest.mark.parametrize("mask, tf, spacing, target", [
    (True, [0, 1, 2], [1.0, 1.0, 1.0], [1.0, 1.0, 1.0]),
    (False, [2, 0, 1], [1.0, 0.7, 0.9], [1.1, 1.4, 0.6]),
    (True, [1, 2, 0], [5.0, 0.8, 0.8], [1.3, 1.1, 4.0]),
])
def test_a_cascade_case_is_prepared_as_nnunets_preprocessor_prepares_it(tmp_path, mask, tf, spacing, target):
    """Image and one-hot channels from nnU-Net's DefaultPreprocessor: a zero corner inside the crop
    box that the previous stage labelled (so the normalization mask includes it, as nnU-Net's does),
    transposed axes, anisotropic spacing with separate-z resampling."""
    import json

    rng = np.random.default_rng(0)
    data = rng.normal(100, 20, (1, 10, 24, 22)).astype(np.float32)  # nnU-Net's [C, Z, Y, X]
    data[:, :, :8, :8] = 0
    seg = np.zeros((1, 10, 24, 22), np.int16)
    seg[0, 2:8, 1:12, 5:15], seg[0, 3:6, 10:20, 8:20] = 1, 2
    (tmp_path / "cfg.json").write_text(json.dumps({"tf": tf, "target": target, "mask": mask}))
    np.savez(tmp_path / "case.npz", data=data, seg=seg, spacing=np.array(spacing))
    (tmp_path / "preprocessor.py").write_text(PREPROCESSOR)
    subprocess.run([NNUNET_PYTHON, str(tmp_path / "preprocessor.py"), str(tmp_path / "cfg.json"),
                    str(tmp_path / "case.npz"), str(tmp_path / "ref.npy")], check=True, timeout=300)
    reference = np.load(tmp_path / "ref.npy")
    pre = {"normalization": {"scheme": "per-channel",
                             "channels": [{"scheme": "zscore", "mask": "nonzero-region" if mask else "none"}]},
           "spacing": target, "axis_order": "reversed", "transpose_forward": tf, "crop_to_nonzero": True,
           "resample": True, "resampling": {"rule": "nnunet"},
           "previous_stage": {"configuration": "3d_lowres", "labels": [1, 2]}}
    ours = prepare(data.transpose(0, 3, 2, 1), tuple(spacing[::-1]), pre, previous=seg[0].transpose(2, 1, 0)).image
    assert ours.shape == reference.shape
    assert np.abs(ours - reference).max() <= 1e-4  # float32 rounding of the statistics
