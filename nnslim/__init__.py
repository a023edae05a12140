"""nnslim: a deployment compiler and runtime for 3D U-Net (nnU-Net-style) segmentation models.

Installed, everything lives under this one import name:

    nnslim.compiler.build      build stages: load, re-parameterize, prune, export, passes, parity
    nnslim.compiler.runtime    deployment: engine loading, backends, sliding window, volume I/O
    nnslim.compiler.workflows  experiments and workflows: bench, prune-sweep, pseudo-labeling
    nnslim.compiler.deploy     packaging for serving (Triton)
    nnslim.training            models, data, losses, the training loop

The repository keeps `compiler/` and `training/` as top-level folders; `pyproject.toml` maps them
under `nnslim`, so installing nnslim never shadows a user's own `training` package.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("nnslim")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = ["InferenceOptions", "__version__", "load_engine"]


def __getattr__(name: str):
    """The Python API, imported on first use (so `import nnslim` and `nnslim --help` stay light):

        engine = nnslim.load_engine("engines/brain")        # verifies hashes, picks the backend
        labels = engine.segment(array, spacing=(1.0, 1.0, 1.0))
        labels, probabilities = engine.segment(array, return_probabilities=True)  # + float16 [K, *array.shape]
    """
    if name in ("load_engine", "InferenceOptions"):
        from nnslim.compiler.runtime import engine

        return getattr(engine, name)
    raise AttributeError(f"module 'nnslim' has no attribute {name!r}")
