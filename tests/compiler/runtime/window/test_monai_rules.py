"""The "monai" window rules against MONAI's own `sliding_window_inference`, on the same network.

A random 3D convolution (its output depends on where a tile sits in the padded image, so a wrong
window start, weight or padding shows) predicts every tile; nnslim's walk with MONAI's rules must
give MONAI's logits to float32 rounding, on volumes smaller than, equal to and larger than the
patch, for several overlaps, both blending modes, a sigma_scale and a pad value.
"""

import numpy as np
import pytest

monai_inferers = pytest.importorskip("monai.inferers", reason="monai is not installed (the dev set installs it)")
torch = pytest.importorskip("torch")

from nnslim.compiler.runtime.window.blending import Blending, monai_importance_map  # noqa: E402
from nnslim.compiler.runtime.window.config import SlidingWindowConfig  # noqa: E402
from nnslim.compiler.runtime.window.grid import compute_steps  # noqa: E402
from nnslim.compiler.runtime.window.rules import WINDOW_RULES, from_record, resolve  # noqa: E402
from nnslim.compiler.runtime.window.walk import sliding_window_inference  # noqa: E402


class ConvPredictor:
    device = "cpu"

    def __init__(self, channels: int = 2, classes: int = 3) -> None:
        torch.manual_seed(0)
        self.net = torch.nn.Conv3d(channels, classes, 3, padding=1).eval()

    def torch(self, tiles):
        with torch.no_grad():
            return self.net(tiles)

    def __call__(self, tiles):
        return self.torch(torch.from_numpy(np.ascontiguousarray(tiles))).numpy()


CASES = [  # image size, patch, overlap, mode, sigma_scale, cval
    ((40, 33, 27), (16, 16, 16), 0.25, "gaussian", 0.125, 0.0),
    ((40, 33, 27), (16, 16, 16), 0.5, "constant", 0.125, 0.0),
    ((21, 16, 9), (16, 16, 16), 0.6, "gaussian", 0.25, 0.0),   # equal to and smaller than the patch
    ((12, 30, 19), (16, 12, 8), 0.1, "gaussian", 0.125, -1.5),  # padded with cval
    ((35, 20, 20), (15, 9, 7), 0.7, "constant", 0.125, 2.0),    # odd patch, int(P * 0.3) rounding
]


@pytest.mark.parametrize("size, patch, overlap, mode, sigma, cval", CASES)
def test_monai_rules_reproduce_sliding_window_inference(size, patch, overlap, mode, sigma, cval):
    image = np.random.default_rng(1).normal(size=(2, *size)).astype(np.float32)
    predictor = ConvPredictor()
    expected = monai_inferers.sliding_window_inference(
        torch.from_numpy(image)[None], roi_size=patch, sw_batch_size=3, predictor=predictor.torch, overlap=overlap,
        mode=mode, sigma_scale=sigma, padding_mode="constant", cval=cval)[0].numpy()
    config = SlidingWindowConfig(patch_size=patch, step_fraction=1 - overlap, batch_size=3,
                                 blending=Blending(mode, sigma, rule="monai"), grid="monai", pad_value=cval)
    got = sliding_window_inference(image, predictor, 3, config)
    assert got.shape == expected.shape == (3, *size)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_monai_grid_and_weight_match_monai_helpers():
    from monai.data.utils import compute_importance_map, dense_patch_slices
    from monai.inferers.utils import _get_scan_interval

    for size, patch, overlap in [((100, 64, 37), (64, 64, 32), 0.25), ((97, 80, 81), (32, 48, 80), 0.6)]:
        interval = _get_scan_interval(size, patch, 3, (overlap,) * 3)
        starts = sorted({tuple(s.start for s in window) for window in dense_patch_slices(size, patch, interval)})
        mine = compute_steps(size, patch, 1 - overlap, "monai")
        assert starts == sorted(tuple(int(v) for v in t) for t in np.array(np.meshgrid(*mine, indexing="ij")).reshape(3, -1).T)
    for patch, sigma in [((16, 12, 9), 0.125), ((96, 96, 96), 0.5)]:
        np.testing.assert_allclose(monai_importance_map(patch, sigma), compute_importance_map(patch, "gaussian", sigma),
                                   rtol=2e-6, atol=0)


def test_rules_record_round_trip_and_overrides():
    monai = WINDOW_RULES["monai"]
    assert from_record(monai.to_record()) == monai
    assert from_record(None) == WINDOW_RULES["nnunet"]
    bundle = from_record({"rules": "monai", "step_fraction": 0.5, "blending": "constant", "sigma_scale": 0.125,
                          "pad_value": 0.0})
    assert resolve(bundle) == bundle
    assert resolve(bundle, "nnunet") == WINDOW_RULES["nnunet"]  # another rule set brings its own defaults
    assert resolve(bundle, step_fraction=0.6).step_fraction == 0.6
    assert resolve(bundle, blending="gaussian").blending == Blending("gaussian", 0.125, rule="monai")
    with pytest.raises(Exception, match="window rules 'fancy'"):
        from_record({"rules": "fancy"})
    with pytest.raises(Exception, match="malformed"):
        from_record({"rules": "monai", "step_fraction": 2.0, "blending": "gaussian", "sigma_scale": 0.1})
