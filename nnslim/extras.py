"""Optional parts of nnslim and the install extra that brings each, so a missing one is one clear
error naming the extra (the CLI's boundary turns an import of a missing module into it).

`pip install nnslim` is the CPU runtime (numpy, nibabel, OpenVINO, no torch); the extras add the
build (torch, onnx, ...), an ONNX Runtime wheel, the GPU runtime, SimpleITK's formats, plots, the
demo data, TensorRT and Triton's model-configuration schema (pyproject.toml).
"""

from __future__ import annotations

import importlib.util

from nnslim.errors import NnslimError

ORT = "'nnslim[onnxruntime]' (its CPU wheel) or 'nnslim[gpu]' (onnxruntime-gpu, for an NVIDIA GPU); not both"
# top-level module -> (what it is for, how to install it)
EXTRAS = {
    "torch": ("building engines, training and the PyTorch reference", "'nnslim[build]'"),
    "onnx": ("building engines", "'nnslim[build]'"),
    "onnxscript": ("building engines", "'nnslim[build]'"),
    "onnx_graphsurgeon": ("building engines", "'nnslim[build]'"),
    "onnxruntime": ("ONNX Runtime engines and builds", ORT),
    "SimpleITK": (".mha, .mhd, .nrrd, .nhdr and DICOM", "'nnslim[io]'"),
    "matplotlib": ("plots and previews", "'nnslim[plots]'"),
    "nilearn": ("the MNI demo data", "'nnslim[demo]'"),
    "tensorrt": ("TensorRT engines", "'nnslim[gpu,tensorrt-cu13]' (or tensorrt-cu12 for a CUDA 12 driver)"),
    "tritonclient": ("Triton model configurations (export-triton)", "'nnslim[triton]'"),
    "ray": ("infer --ray (a folder on a Ray cluster)", "'nnslim[ray]'"),
    "monai": ("MONAI bundles (build-engine BUNDLE_DIR)", "'nnslim[monai]' (install torch first, so pip keeps it)"),
    "yaml": ("MONAI bundles with a YAML config", "'nnslim[monai]'"),
}


class MissingExtraError(NnslimError, ImportError):
    """An optional part of nnslim is not installed; the message names the extra that installs it."""


def missing_extra(module: str, needed_for: str | None = None) -> MissingExtraError:
    """The error for a missing optional module (by its top-level name)."""
    top = module.split(".")[0]
    purpose, install = EXTRAS.get(top, ("this", f"the package '{top}'"))
    return MissingExtraError(f"{needed_for or purpose} needs {top}, which is not installed: pip install {install}")


def installed(module: str) -> bool:
    """Whether `module`'s top-level package is installed (found without importing it)."""
    return importlib.util.find_spec(module.split(".")[0]) is not None


def require(module: str, needed_for: str | None = None) -> None:
    """Refuse, naming the extra, when `module` is not installed (before any work starts)."""
    if not installed(module):
        raise missing_extra(module, needed_for)
