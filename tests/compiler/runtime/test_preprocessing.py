import numpy as np
import pytest

from compiler.runtime.errors import EngineError
from compiler.runtime.preprocessing import normalize
from training.data import zscore_normalize


def test_runtime_normalization_equals_training_normalization():
    rng = np.random.default_rng(0)
    image = rng.normal(100, 20, (2, 20, 21, 22)).astype(np.float32)
    image[:, :5] = 0  # background, excluded from the statistics
    ours = normalize(image, {"scheme": "zscore", "mask": "nonzero"})
    np.testing.assert_array_equal(ours, zscore_normalize(image))
    foreground = ours[0][image[0] != 0]
    assert abs(foreground.mean()) < 1e-5 and abs(foreground.std() - 1) < 1e-5


def test_unknown_scheme_is_refused():
    with pytest.raises(EngineError, match="unsupported normalization"):
        normalize(np.zeros((1, 2, 2, 2)), {"scheme": "ct"})
