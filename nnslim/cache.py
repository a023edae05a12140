"""nnslim's cache folder: compiled models kept between runs (OpenVINO blobs, TensorRT plans)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """$NNSLIM_CACHE, else ~/.cache/nnslim (each user of a cache gets a subfolder per tool)."""
    return Path(os.environ.get("NNSLIM_CACHE") or Path.home() / ".cache" / "nnslim")
