"""Whole volumes through Triton: a Python-backend model that runs nnslim's runtime inside the server.

`nnslim export-triton --whole-volume` writes

    REPOSITORY/NAME/config.pbtxt           backend "python", the interface below
    REPOSITORY/NAME/warmup/spacing         the warmup request's SPACING (the engine's voxel size)
    REPOSITORY/NAME/N/model.py             a few lines that import `TritonPythonModel` from here
    REPOSITORY/NAME/N/engine/              a verified copy of the engine directory

and Triton runs pre-processing, the Gaussian sliding window, TTA and post-processing exactly as
`Engine.segment` (and so `nnslim infer`) does. The interface, fixed so that any Triton client can be
written against it:

    IMAGE          TYPE_FP32  [-1, -1, -1, -1]  channels first, then the array axes nibabel gives
                                                 (`Engine.segment`'s `[C, X, Y, Z]`)
    SPACING        TYPE_FP32  [3]               voxel size in mm along those axes
    LABELS         TYPE_UINT8 [-1, -1, -1]      `[X, Y, Z]`
    PROBABILITIES  TYPE_FP16  [-1, -1, -1, -1]  `[K, X, Y, Z]`, computed only when requested

with `max_batch_size: 0` (one volume per request). Triton treats a request that names no outputs
as asking for all of them: a client that wants labels only names `LABELS` (the README's example).
A request nnslim refuses (NaN spacing, wrong channel count, a volume too large for this machine)
gets an error response with nnslim's message; the server keeps serving. Triton itself refuses a
wrong dtype or rank before the model sees it.

The model's code is this module, so the Python that Triton's Python backend runs must import
`nnslim` (and the engine's backend: OpenVINO, ONNX Runtime or TensorRT): in a Triton container,
`pip install nnslim` into its Python, or name the folders it is in with `NNSLIM_PYTHONPATH` (the
stub ignores PYTHONPATH); `nnslim serve` does the latter for its own server.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import traceback
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from nnslim.compiler.runtime.manifest import MANIFEST, EngineManifest, read_verified
from nnslim.errors import NnslimError

IMAGE, SPACING, LABELS, PROBABILITIES = "IMAGE", "SPACING", "LABELS", "PROBABILITIES"
DEFAULT_NAME = "nnslim"
ENGINE_FOLDER = "engine"
MODEL_FILE = "model.py"
WARMUP_SPACING = "spacing"  # in REPOSITORY/NAME/warmup/, where Triton looks for warmup input files

MODEL_PY = '''\
"""nnslim's whole-volume model for Triton's Python backend (`nnslim export-triton --whole-volume`).

The code is nnslim's own (nnslim.compiler.deploy.whole_volume); this file only imports it. The
Python backend's stub ignores PYTHONPATH: where nnslim is not installed in the stub's Python,
NNSLIM_PYTHONPATH names the folders to import it from (`nnslim serve` sets it to its own path).
"""

import os
import sys

sys.path[:0] = [p for p in os.environ.get("NNSLIM_PYTHONPATH", "").split(os.pathsep) if p and p not in sys.path]

try:
    from nnslim.compiler.deploy.whole_volume import TritonPythonModel  # noqa: F401
except ImportError as exc:
    raise ImportError(f"nnslim is not importable by the Python that Triton's Python backend runs "
                      f"(Python {sys.version.split()[0]} at {sys.prefix}): {exc}. Install nnslim into that "
                      "Python, set NNSLIM_PYTHONPATH to where it is, or serve with `nnslim serve`") from exc
'''


def model_config(name: str, manifest: EngineManifest, instances: int = 1, kind: str | None = None,
                 version_policy: str | None = None, threads: int = 0) -> Any:
    """The `ModelConfig` of the whole-volume model of an engine (see the module docstring)."""
    from nnslim import __version__
    from nnslim.compiler.deploy.triton import TritonExportError, _schema, checked_kind, parse_version_policy

    pb, _ = _schema()
    kind = checked_kind(manifest, kind, instances)
    if int(threads) < 0:
        raise TritonExportError(f"threads must be 0 (the backend's default) or more, got {threads}")
    if manifest.spec.previous_stage is not None:
        raise TritonExportError("this engine is a cascade stage: it also needs its previous stage's segmentation, "
                                "which the whole-volume model does not take yet; export the tile model instead "
                                "(it takes every input channel, the label channels included)")
    fp32, fp16, uint8 = (pb.DataType.Value(t) for t in ("TYPE_FP32", "TYPE_FP16", "TYPE_UINT8"))
    config = pb.ModelConfig(name=name, backend="python", max_batch_size=0)
    if version_policy is not None:
        config.version_policy.CopyFrom(parse_version_policy(version_policy))
    config.input.add(name=IMAGE, data_type=fp32, dims=[-1, -1, -1, -1])
    config.input.add(name=SPACING, data_type=fp32, dims=[3])
    config.output.add(name=LABELS, data_type=uint8, dims=[-1, -1, -1])
    config.output.add(name=PROBABILITIES, data_type=fp16, dims=[-1, -1, -1, -1])
    config.instance_group.add(count=int(instances), kind=pb.ModelInstanceGroup.Kind.Value(kind))
    # channels and classes: IMAGE and PROBABILITIES say -1, so these keep versions of one interface
    parameters = {"nnslim_version": __version__, "nnslim_backend": manifest.backend,
                  "nnslim_precision": manifest.precision, "nnslim_threads": str(int(threads)),
                  "nnslim_in_channels": str(manifest.spec.in_channels), "nnslim_classes": str(manifest.spec.num_classes)}
    model_record = manifest.files.get(manifest.runtime_model)
    if model_record is not None:
        parameters["nnslim_model_sha256"] = model_record.sha256
    for key, value in parameters.items():
        config.parameters[key].string_value = str(value)
    # One patch of zeros at the engine's own voxel size: one tile, no resampling; the model's first
    # request then pays for nothing the load could have done. (Triton's random_data is random bits,
    # up to 1e38: an image nnslim refuses.)
    spec = manifest.spec
    warmup = config.model_warmup.add(name="nnslim_one_patch", batch_size=1)
    image = warmup.inputs[IMAGE]
    image.data_type = fp32
    image.dims.extend([spec.in_channels, *(int(p) for p in spec.patch_size)])
    image.zero_data = True
    spacing = warmup.inputs[SPACING]
    spacing.data_type = fp32
    spacing.dims.append(3)
    spacing.input_data_file = WARMUP_SPACING
    return config


def warmup_files(manifest: EngineManifest) -> dict[str, bytes]:
    """The files of REPOSITORY/NAME/warmup/: the warmup request's SPACING as raw little-endian fp32."""
    spacing = manifest.spec.spacing or (1.0, 1.0, 1.0)
    return {WARMUP_SPACING: np.asarray(spacing, dtype="<f4").tobytes()}


def write_version(engine_dir: Path, manifest: EngineManifest, folder: Path) -> None:
    """A version folder: `model.py` and a copy of the engine directory made of the bytes that were
    verified against its manifest (the manifest and every file it lists, nothing else)."""
    from nnslim.files import write_bytes_atomic, write_text_atomic

    target = folder / ENGINE_FOLDER
    target.mkdir()
    for name, record in manifest.files.items():
        destination = target / PurePosixPath(name)
        destination.parent.mkdir(parents=True, exist_ok=True)
        data = read_verified(engine_dir, manifest, name)
        if data is not None:
            write_bytes_atomic(destination, data)
            continue
        source = engine_dir / PurePosixPath(name)  # external data: copied by path, as verified
        shutil.copyfile(source, destination)
        for extra in record.external_data or ():
            (destination.parent / extra).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source.parent / extra, destination.parent / extra)
    shutil.copyfile(engine_dir / MANIFEST, target / MANIFEST)
    write_text_atomic(folder / MODEL_FILE, MODEL_PY)


class TritonPythonModel:
    """Triton's Python-backend model: one engine per instance, one volume per request."""

    def initialize(self, args: dict[str, str]) -> None:
        import triton_python_backend_utils as pb_utils

        from nnslim import __version__
        from nnslim.compiler.runtime.engine import load_engine

        self.pb = pb_utils
        config = json.loads(args["model_config"])
        parameters = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        written_by = parameters.get("nnslim_version")
        if written_by and written_by != __version__:
            logging.getLogger(__name__).warning("this model was exported by nnslim %s and runs on nnslim %s",
                                                written_by, __version__)
        device = "cpu"
        if args.get("model_instance_kind") == "GPU":
            # before anything opens CUDA in this process: the instance's GPU is the only one it sees
            os.environ["CUDA_VISIBLE_DEVICES"] = str(args.get("model_instance_device_id", "0"))
            device = "cuda"
        folder = Path(args["model_repository"]) / str(args["model_version"]) / ENGINE_FOLDER
        self.engine = load_engine(folder, threads=int(parameters.get("nnslim_threads") or 0), device=device)

    def execute(self, requests: list[Any]) -> list[Any]:
        return [self._respond(request) for request in requests]

    def _respond(self, request: Any) -> Any:
        pb = self.pb
        try:
            image = _input(pb, request, IMAGE)
            spacing = tuple(float(v) for v in np.asarray(_input(pb, request, SPACING), dtype=np.float64).reshape(-1))
            want_probabilities = PROBABILITIES in request.requested_output_names()
            result = self.engine.segment(image, spacing, return_probabilities=want_probabilities)
            labels, probabilities = result if want_probabilities else (result, None)
            outputs = [_output(pb, LABELS, labels, np.uint8)]
            if probabilities is not None:
                outputs.append(_output(pb, PROBABILITIES, probabilities, np.float16))
            return pb.InferenceResponse(output_tensors=outputs)
        except (NnslimError, MemoryError) as exc:  # the request's fault, or too large for this machine
            what = f"{type(exc).__name__}: {exc}" if isinstance(exc, MemoryError) else str(exc)
            return pb.InferenceResponse(error=_error(pb, what, "INVALID_ARG"))
        except Exception as exc:  # a bug: say so, keep serving
            pb.Logger.log_error(traceback.format_exc())
            return pb.InferenceResponse(error=_error(pb, f"nnslim failed on this request: "
                                                        f"{type(exc).__name__}: {exc}", "INTERNAL"))

    def finalize(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.close()


# Tensors cross by DLPack, not `as_numpy()` / `Tensor(name, array)`: Triton's Python backend stubs are
# built against numpy 1, and with numpy 2 installed their numpy views read and write the wrong bytes
# (seen with the nvidia-pytriton 0.7.0 stubs: inputs of garbage, outputs of zero bytes).
def _input(pb: Any, request: Any, name: str) -> np.ndarray:
    return np.from_dlpack(pb.get_input_tensor_by_name(request, name))


def _output(pb: Any, name: str, array: np.ndarray, dtype: Any) -> Any:
    array = np.ascontiguousarray(array, dtype=dtype)
    if not array.flags.writeable:  # DLPack (before 1.0) cannot say read-only: numpy refuses to export
        array = array.copy()
    return pb.Tensor.from_dlpack(name, array.__dlpack__())


def _error(pb: Any, message: str, code: str) -> Any:
    """A TritonError with a status code where this Python backend knows codes (2023 and later)."""
    error_type = pb.TritonError
    return error_type(message, getattr(error_type, code)) if hasattr(error_type, code) else error_type(message)
