"""Export an engine directory as a Triton Inference Server model repository entry.

    REPOSITORY/NAME/config.pbtxt           Triton's model configuration (the newest export's)
    REPOSITORY/NAME/nnslim_manifest.json   the newest version's engine manifest (preprocessing for clients)
    REPOSITORY/NAME/N/model.plan           TensorRT engines (platform "tensorrt_plan")
    REPOSITORY/NAME/N/model.onnx           ONNX Runtime and OpenVINO engines (platform "onnxruntime_onnx")
    REPOSITORY/NAME/N/nnslim_manifest.json that version's engine manifest

The configuration is a `ModelConfig` message of Triton's own schema (`tritonclient`'s
`model_config_pb2`, the `triton` extra), written with protobuf's text format and parsed back before
anything is moved into place, so a field Triton does not know cannot be written or read. It holds:

- the tile input and logit output without the batch dimension (Triton adds it for
  `max_batch_size > 0`), the engine's maximum batch, and dynamic batching (tiles of concurrent
  requests batched up to that maximum; preferred sizes never include 1);
- the instance group on the engine's device: `KIND_CPU` for CPU backends (onnxruntime, openvino),
  `KIND_GPU` for GPU ones (a TensorRT plan, onnxruntime-cuda); a CPU-only Triton refuses KIND_GPU;
- the engine's file for its chosen precision (`manifest.runtime_model`: the int8 Q/DQ graph, the
  fp16 graph, the plan), and the parameters `nnslim_backend`, `nnslim_precision` and
  `nnslim_model_sha256` (Triton's backends ignore keys they do not read);
- an OpenVINO engine is served by Triton's ONNX Runtime backend with OpenVINO as its CPU execution
  accelerator, which gets no options (device "CPU", no precision key): an int8 Q/DQ graph still runs
  int8, a bf16 engine (fp32 graph + bf16 hint in nnslim) runs fp32 there. Triton's own `openvino`
  backend takes `HINT_BF16` but compiles for a fixed batch and pads smaller ones with a pad size it
  never resets (a later full batch returns too few rows): no home for dynamically batched tiles;
- for a TensorRT plan the TensorRT version that built it (a comment and the parameter
  `nnslim_tensorrt_version`): Triton can only load the plan with that exact version;
- `model_warmup`: one tile of the patch size (batch 1, zeros), run when the model loads, so the
  first request does not pay for compilation;
- a `version_policy` when asked for (`latest:N`, `all`, `specific:1,3`).

Exporting again to the same name adds the next version folder (2, 3, ...). The configuration is
shared by all versions, so the new engine must have the same interface (platform, batch, inputs,
outputs, and for plans the TensorRT version); otherwise the export is refused and nothing changes.
Nothing the repository held is deleted: a replaced `config.pbtxt` (or root manifest not kept in a
version folder) stays beside as `*.before-vN`. This model serves the network only: clients do the
sliding window. `whole_volume=True` writes instead the Python-backend model that segments whole
volumes inside Triton (`whole_volume`), versioned the same way.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nnslim.compiler.runtime.backends import BACKENDS, Backend
from nnslim.compiler.runtime.manifest import MANIFEST, EngineManifest, TensorRecord, load_manifest, read_verified
from nnslim.compiler.deploy.schema import (
    TritonExportError,
    _check_specific,
    _schema,
    parse_version_policy,
    version_policy_text,
)
from nnslim.files import fsync_tree, staging_folder, write_bytes_atomic, write_text_atomic

TRITON_TYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16"}
KINDS = ("KIND_CPU", "KIND_GPU")
CONFIG = "config.pbtxt"
MANIFEST_COPY = "nnslim_manifest.json"
WARMUP = "nnslim_patch_tile"
_VERSION = re.compile(r"[1-9][0-9]*")


@dataclass(frozen=True)
class TritonExport:
    """What an export wrote: the model folder, the version number it added and its model file."""

    model_dir: Path
    version: int
    model_file: str

    @property
    def config(self) -> Path:
        return self.model_dir / CONFIG


def backend_of(manifest: EngineManifest) -> Backend:
    """The engine's backend record: its model kind says how Triton serves it (platform, file name)."""
    if manifest.backend not in BACKENDS:
        raise TritonExportError(f"engine backend {manifest.backend!r} has no Triton platform in this nnslim")
    return BACKENDS[manifest.backend]


def instance_kind(manifest: EngineManifest) -> str:
    """KIND_CPU for an engine whose backend runs on the CPU, KIND_GPU otherwise."""
    return "KIND_CPU" if backend_of(manifest).device == "cpu" else "KIND_GPU"


def checked_kind(manifest: EngineManifest, kind: str | None, instances: int) -> str:
    """The instance kind (None: from the engine's device), refused where Triton could not serve it."""
    kind = kind or instance_kind(manifest)
    if kind not in KINDS:
        raise TritonExportError(f"instance kind {kind!r}: use one of {', '.join(KINDS)}")
    if backend_of(manifest).kind.name == "plan" and kind != "KIND_GPU":
        raise TritonExportError(f"a TensorRT plan runs only on the GPU it was built for; {kind} cannot serve it")
    if instances < 1:
        raise TritonExportError(f"instances must be at least 1, got {instances}")
    return kind


def valid_model_name(name: str) -> bool:
    """A name Triton serves a model under: letters, digits, '_', '.', '-'; not '.' or '..'."""
    return bool(re.fullmatch(r"[A-Za-z0-9_.-]+", name)) and name not in (".", "..")


def model_config(name: str, manifest: EngineManifest, instances: int = 1, kind: str | None = None,
                 max_queue_delay_us: int = 100, version_policy: str | None = None) -> Any:
    """The `ModelConfig` message for an engine's manifest (kind None: from the engine's device)."""
    pb, _ = _schema()
    backend, kind = backend_of(manifest), checked_kind(manifest, kind, instances)
    io = manifest.io
    max_batch = int(io.batch[2])
    config = pb.ModelConfig(name=name, platform=backend.kind.triton_platform, max_batch_size=max_batch)
    if version_policy is not None:
        config.version_policy.CopyFrom(parse_version_policy(version_policy))
    config.input.add(name=io.input.name, data_type=_data_type(pb, io.input), dims=_dims(io.input))
    config.output.add(name=io.output.name, data_type=_data_type(pb, io.output), dims=_dims(io.output))
    # A preferred size of 1 would let the batcher send single tiles at once, which is what dynamic
    # batching is there to avoid; with max 1 there is nothing to prefer.
    preferred = sorted({b for b in (max_batch // 2, max_batch) if b >= 2})
    config.dynamic_batching.preferred_batch_size.extend(preferred)
    config.dynamic_batching.max_queue_delay_microseconds = int(max_queue_delay_us)
    config.instance_group.add(count=int(instances), kind=pb.ModelInstanceGroup.Kind.Value(kind))
    if backend.triton_accelerator is not None and kind == "KIND_CPU":
        accelerators = config.optimization.execution_accelerators.cpu_execution_accelerator
        accelerators.add(name=backend.triton_accelerator)
    parameters = {"nnslim_backend": manifest.backend, "nnslim_precision": manifest.precision}
    model_record = manifest.files.get(manifest.runtime_model)
    if model_record is not None:
        parameters["nnslim_model_sha256"] = model_record.sha256
    if backend.kind.name == "plan" and manifest.tensorrt is not None and manifest.tensorrt.version:
        parameters["nnslim_tensorrt_version"] = str(manifest.tensorrt.version)
    for key, value in parameters.items():
        config.parameters[key].string_value = str(value)
    warmup = config.model_warmup.add(name=WARMUP, batch_size=1)
    tile = warmup.inputs[io.input.name]
    tile.data_type = _data_type(pb, io.input)
    tile.dims.extend(_dims(io.input))
    tile.zero_data = True
    return config


def _data_type(pb: Any, entry: TensorRecord) -> int:
    if entry.dtype not in TRITON_TYPES:
        raise TritonExportError(f"tensor {entry.name!r} has dtype {entry.dtype}, which this export does not map "
                                f"to a Triton type ({', '.join(TRITON_TYPES)})")
    return pb.DataType.Value(TRITON_TYPES[entry.dtype])


def _dims(entry: TensorRecord) -> list[int]:
    """A tensor's dims without the batch axis (Triton adds it for max_batch_size > 0)."""
    return [int(d) for d in entry.shape[1:]]


def config_pbtxt(name: str, manifest: EngineManifest, instances: int = 1, kind: str | None = None,
                 max_queue_delay_us: int = 100, version_policy: str | None = None) -> str:
    """The `config.pbtxt` text for an engine's manifest (see `model_config`), checked by reading it back."""
    config = model_config(name, manifest, instances, kind, max_queue_delay_us, version_policy)
    return "".join(f"{line}\n" for line in _plan_record(manifest)) + _checked_text(config)


def _checked_text(config: Any) -> str:
    """A `ModelConfig` as config.pbtxt text, read back with Triton's schema to be sure."""
    text = _schema()[1].MessageToString(config)
    if read_config(text) != config:
        raise TritonExportError("the generated config.pbtxt does not read back as written")
    return text


def read_config(text: str) -> Any:
    """A `config.pbtxt` parsed with Triton's schema; any field or value it does not define is refused."""
    pb, text_format = _schema()
    try:
        return text_format.Parse(text, pb.ModelConfig())
    except text_format.ParseError as exc:
        raise TritonExportError(f"config.pbtxt is not a valid Triton model configuration: {exc}") from None


def _plan_record(manifest: EngineManifest) -> list[str]:
    """Comment lines saying which TensorRT and GPU a plan needs (Triton's TensorRT must be that one)."""
    built = manifest.tensorrt
    if backend_of(manifest).kind.name != "plan" or built is None:
        return []
    return [f"# TensorRT plan built with TensorRT {built.version} for {built.gpu} "
            f"(compute capability {list(built.compute_capability)}): serve it with a Triton release whose "
            "TensorRT is exactly this version, on this GPU family"]


def _interface(config: Any) -> dict[str, Any]:
    """What every version of one model must share: the config is one for all of them."""
    def tensors(entries: Any) -> list[str]:
        return [_schema()[1].MessageToString(e, as_one_line=True) for e in entries]

    parameters = {key: value.string_value for key, value in config.parameters.items()}
    return {"platform": config.platform, "backend": config.backend, "max_batch_size": config.max_batch_size,
            "input": tensors(config.input), "output": tensors(config.output),
            "TensorRT version": parameters.get("nnslim_tensorrt_version"),
            "channels": parameters.get("nnslim_in_channels"), "classes": parameters.get("nnslim_classes")}


def _versions(model_dir: Path) -> list[int]:
    return sorted(int(p.name) for p in model_dir.iterdir() if _VERSION.fullmatch(p.name) and p.is_dir())


def _keep_previous(path: Path, new: bytes, version: int, copies: list[Path] = ()) -> None:
    """Before `path` is replaced by `new`: keep its old bytes beside it as `NAME.before-vVERSION`,
    unless they are unchanged or already kept in one of `copies`."""
    if not path.is_file():
        return
    old = path.read_bytes()
    if old == new or any(c.is_file() and c.read_bytes() == old for c in copies):
        return
    keep, n = path.with_name(f"{path.name}.before-v{version}"), 1
    while keep.exists():
        keep, n = path.with_name(f"{path.name}.before-v{version}.{n}"), n + 1
    write_bytes_atomic(keep, old)


def _write_version(engine_dir: Path, manifest: EngineManifest, folder: Path, model_file: str) -> None:
    """The engine's runtime model (the verified bytes, or the file and its external data) and its manifest."""
    model = read_verified(engine_dir, manifest, manifest.runtime_model)  # the bytes that were hashed
    if model is None:  # external data: copied by path, as verified, with the files it names
        source = engine_dir / manifest.runtime_model
        shutil.copyfile(source, folder / model_file)
        for name in manifest.files[manifest.runtime_model].external_data or ():
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source.parent / name, folder / name)
    else:
        write_bytes_atomic(folder / model_file, model)
    shutil.copyfile(engine_dir / MANIFEST, folder / MANIFEST_COPY)


@dataclass(frozen=True)
class _Layout:
    """What one export writes: the config text, the version folder's writer and model file, and
    files at the model folder's root (name relative to it -> bytes)."""

    text: str
    model_file: str
    write_version: Callable[[Path], None]
    root_files: dict[str, bytes]


def _layout(engine_dir: Path, manifest: EngineManifest, name: str, instances: int, kind: str | None,
            version_policy: str | None, max_queue_delay_us: int, whole_volume: bool, threads: int) -> _Layout:
    manifest_bytes = (engine_dir / MANIFEST).read_bytes()
    if not whole_volume:
        model_file = backend_of(manifest).kind.triton_file
        return _Layout(config_pbtxt(name, manifest, instances, kind, max_queue_delay_us, version_policy), model_file,
                       lambda folder: _write_version(engine_dir, manifest, folder, model_file),
                       {MANIFEST_COPY: manifest_bytes})  # preprocessing for clients
    from nnslim.compiler.deploy import whole_volume as wv

    text = _checked_text(wv.model_config(name, manifest, instances, kind, version_policy, threads))
    root = {f"warmup/{k}": v for k, v in wv.warmup_files(manifest).items()}
    return _Layout(text, wv.MODEL_FILE, lambda folder: wv.write_version(engine_dir, manifest, folder), root)


def export_triton(engine_dir: str | Path, repository: str | Path, name: str | None = None, instances: int = 1,
                  kind: str | None = None, version_policy: str | None = None,
                  max_queue_delay_us: int = 100, whole_volume: bool = False, threads: int = 0) -> TritonExport:
    """Write `repository/name/` from a verified engine directory: a new model (config and version 1),
    or the next version of an existing one with the same interface (module docstring).

    Args:
        kind: "KIND_CPU" or "KIND_GPU"; None: from the engine's device.
        version_policy: `latest:N`, `all` or `specific:1,3`; None: kept from an existing config
            (else unset: Triton's default, the newest version only).
        whole_volume: write the Python-backend model that segments whole volumes with nnslim's
            runtime inside Triton (`whole_volume`); name None then means "nnslim".
        threads: with whole_volume, the CPU threads of each instance's engine (0: the backend's default).
    """
    engine_dir, repository = Path(engine_dir), Path(repository)
    manifest = load_manifest(engine_dir)
    real_engine, real_repository = engine_dir.resolve(), repository.resolve()
    if real_repository == real_engine or real_engine in real_repository.parents:
        raise TritonExportError(f"the repository {repository} is inside the engine directory {engine_dir}: the engine "
                                "would no longer be only its listed files; choose a repository outside it")
    given, name = name, name or ("nnslim" if whole_volume else engine_dir.name)
    if not valid_model_name(name):
        origin = "" if given else " (the engine folder's name; choose one with --name)"
        raise TritonExportError(f"model name {name!r}{origin} must be letters, digits, '_', '.' or '-', and not "
                                f"'.' or '..'")
    target = repository / name
    if not target.exists():
        if version_policy is not None:
            _check_specific(version_policy, [1], target)
        layout = _layout(engine_dir, manifest, name, instances, kind, version_policy, max_queue_delay_us,
                         whole_volume, threads)
        with staging_folder(target, "exporting") as staging:
            (staging / "1").mkdir()
            layout.write_version(staging / "1")
            write_text_atomic(staging / CONFIG, layout.text)
            for relative, data in layout.root_files.items():
                (staging / relative).parent.mkdir(parents=True, exist_ok=True)
                write_bytes_atomic(staging / relative, data)
            fsync_tree(staging)
            try:
                staging.rename(target)
            except OSError as exc:
                raise TritonExportError(f"{target} appeared while exporting ({exc}); export again") from None
        return TritonExport(target, 1, layout.model_file)
    return _add_version(engine_dir, manifest, target, name, instances, kind, version_policy, max_queue_delay_us,
                        whole_volume, threads)


def _add_version(engine_dir: Path, manifest: EngineManifest, target: Path, name: str, instances: int,
                 kind: str | None, version_policy: str | None, max_queue_delay_us: int, whole_volume: bool,
                 threads: int) -> TritonExport:
    """The next version folder of an existing model, and its config rewritten when the interface is the same."""
    config_path = target / CONFIG
    if not target.is_dir() or not config_path.is_file():
        raise TritonExportError(f"{target} exists and is not a Triton model folder (no {CONFIG}); "
                                "choose another --name")
    try:
        existing = read_config(config_path.read_text())
    except UnicodeDecodeError as exc:
        raise TritonExportError(f"{config_path} is not text ({exc}); fix or move it, or choose another --name") from None
    except TritonExportError as exc:
        raise TritonExportError(f"{config_path}: {exc}; fix it, or choose another --name") from None
    versions = _versions(target)
    version = (versions[-1] if versions else 0) + 1
    if version_policy is None:
        version_policy = version_policy_text(existing)
    if version_policy is not None:
        _check_specific(version_policy, [*versions, version], target)
    layout = _layout(engine_dir, manifest, name, instances, kind, version_policy, max_queue_delay_us,
                     whole_volume, threads)
    text = layout.text
    old, new = _interface(existing), _interface(read_config(text))
    changed = [f"{key}: {old[key]!r} -> {new[key]!r}" for key in new if old[key] != new[key]]
    if changed:
        raise TritonExportError(
            f"{target} serves another interface than this engine ({'; '.join(changed)}); one config.pbtxt serves "
            f"all versions, so this engine cannot be version {version} of {name!r}: choose another --name")
    folder = target / str(version)
    with staging_folder(folder, "exporting") as staging:
        layout.write_version(staging)
        fsync_tree(staging)
        try:
            staging.rename(folder)
        except OSError as exc:
            raise TritonExportError(f"{folder} appeared while exporting ({exc}); export again") from None
    # the version folder first: until the config is rewritten, the old one (same interface) serves it
    _keep_previous(config_path, text.encode(), version)
    write_text_atomic(config_path, text)
    copies = [target / str(v) / MANIFEST_COPY for v in versions]
    for relative, data in layout.root_files.items():
        _keep_previous(target / relative, data, version, copies if relative == MANIFEST_COPY else [])
        (target / relative).parent.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(target / relative, data)
    return TritonExport(target, version, layout.model_file)
