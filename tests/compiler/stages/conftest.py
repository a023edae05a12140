"""Fixtures shared by the int8 tests: the hand-built graph of `test_quantize.py` and its calibration tiles."""

from pathlib import Path

import numpy as np
import pytest

from tests.compiler.stages.test_quantize import write_graph


@pytest.fixture(scope="module")
def graph(tmp_path_factory) -> Path:
    return write_graph(tmp_path_factory.mktemp("qdq") / "model.onnx")


@pytest.fixture(scope="module")
def tiles() -> np.ndarray:
    return np.random.default_rng(1).standard_normal((4, 1, 8, 8, 8)).astype(np.float32)
