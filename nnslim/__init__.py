"""nnslim: a deployment compiler and runtime for 3D U-Net (nnU-Net-style) segmentation models.

Installed, everything lives under this one import name:

    nnslim.compiler.stages     build stages: load, re-parameterize, prune, export, passes, parity
    nnslim.compiler.runtime    deployment: engine loading, backends, sliding window, volume I/O
    nnslim.compiler.workflows  experiments and workflows: bench, prune-sweep, pseudo-labeling
    nnslim.compiler.deploy     packaging for serving (Triton)
    nnslim.training            models, data, losses, the training loop
    nnslim.errors, nnslim.files, nnslim.cache, nnslim.parameters   helpers every part shares

The repository keeps `compiler/` and `training/` as top-level folders; `pyproject.toml` maps them
under `nnslim`, so installing nnslim never shadows a user's own `training` package.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

try:
    __version__ = version("nnslim")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

# Run from a source checkout (its root first on sys.path: `python -m`, pytest), this file is the
# repository's nnslim/ folder, which does not hold compiler/ and training/: they sit beside it, so
# the package's search path takes the repository root too. Installed (a wheel, or the editable
# link tree of scripts/setup.sh), nnslim/compiler/ is right here and nothing is added.
_here = Path(__file__).parent
if not (_here / "compiler").is_dir() and (_here.parent / "compiler" / "__init__.py").is_file():
    __path__ = [*__path__, str(_here.parent)]

__all__ = ["InferenceOptions", "__version__", "build_engine", "load_engine", "segment_files"]


def __getattr__(name: str):
    """The Python API, imported on first use (so `import nnslim` and `nnslim --help` stay light):

        engine = nnslim.load_engine("engines/brain")        # verifies hashes, picks the backend
        labels = engine.segment(array, spacing=(1.0, 1.0, 1.0))
        labels, probabilities = engine.segment(array, "engine", return_probabilities=True)  # training spacing
        labels = engine.segment(sitk_array, spacing[::-1], axis_order="sitk")  # SimpleITK's / nnU-Net's [Z, Y, X]
        results = nnslim.segment_files(engine, [Path("scans/")], Path("segs/"))
        nnslim.build_engine("model.pt", "engines/brain")    # or an nnU-Net folder, or an nn.Module + metadata
    """
    if name in ("load_engine", "InferenceOptions"):
        from nnslim.compiler.runtime import engine

        return getattr(engine, name)
    if name == "segment_files":
        from nnslim.compiler.runtime.cases.run import segment_files

        return segment_files
    if name == "build_engine":  # needs the build extra (torch, onnx)
        from nnslim.compiler.stages.api import build_engine

        return build_engine
    raise AttributeError(f"module 'nnslim' has no attribute {name!r}")
