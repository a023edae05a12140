"""Export an engine directory as a Triton Inference Server model repository.

    REPOSITORY/NAME/config.pbtxt
    REPOSITORY/NAME/1/model.plan     (TensorRT engines, platform "tensorrt_plan")
    REPOSITORY/NAME/1/model.onnx     (ONNX Runtime engines, platform "onnxruntime_onnx")

The config declares the tile input and logit output without the batch dimension (Triton adds it
for `max_batch_size > 0`), the engine's maximum batch, dynamic batching (tiles from concurrent
requests are batched up to that maximum; preferred sizes never include 1) and the instance group.
For a TensorRT plan it also records the TensorRT version that built it (a comment and the
parameter `nnslim_tensorrt_version`): Triton can only load the plan with that exact version. Triton serves the network
only: clients do the sliding window (nnslim's runtime with a Triton predictor, or their own).
`parse_pbtxt` reads the protobuf text format back, so what is written is checked before the
repository is renamed into place.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

from nnslim.compiler.runtime.backends import BACKENDS, Backend
from nnslim.compiler.runtime.manifest import MANIFEST, EngineManifest, TensorRecord, load_manifest, read_verified
from nnslim.errors import NnslimError
from nnslim.files import fsync_tree, staging_folder, write_bytes_atomic, write_text_atomic

TRITON_TYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16"}


class TritonExportError(NnslimError):
    """An engine that cannot be exported, or a destination that would be overwritten."""


def backend_of(manifest: EngineManifest) -> Backend:
    """The engine's backend record: its model kind says how Triton serves it (platform, file name)."""
    if manifest.backend not in BACKENDS:
        raise TritonExportError(f"engine backend {manifest.backend!r} has no Triton platform in this nnslim")
    return BACKENDS[manifest.backend]


def config_pbtxt(name: str, manifest: EngineManifest, instances: int = 1, kind: str = "KIND_GPU",
                 max_queue_delay_us: int = 100) -> str:
    """The `config.pbtxt` for an engine's manifest."""
    backend = backend_of(manifest)
    io = manifest.io
    max_batch = int(io.batch[2])
    # A preferred size of 1 would let the batcher send single tiles at once, which is what dynamic
    # batching is there to avoid; with max 1 there is nothing to prefer.
    preferred = sorted({b for b in (max_batch // 2, max_batch) if b >= 2})

    def tensor(entry: TensorRecord) -> str:
        dims = ", ".join(str(int(d)) for d in entry.shape[1:])
        return f'  {{\n    name: "{entry.name}"\n    data_type: {TRITON_TYPES[entry.dtype]}\n    dims: [ {dims} ]\n  }}'

    return "\n".join([
        *_plan_record(manifest),
        f'name: "{name}"',
        f'platform: "{backend.kind.triton_platform}"',
        f"max_batch_size: {max_batch}",
        "input [",
        tensor(io.input),
        "]",
        "output [",
        tensor(io.output),
        "]",
        "dynamic_batching {",
        *([f"  preferred_batch_size: [ {', '.join(map(str, preferred))} ]"] if preferred else []),
        f"  max_queue_delay_microseconds: {max_queue_delay_us}",
        "}",
        "instance_group [",
        "  {",
        f"    count: {instances}",
        f"    kind: {kind}",
        "  }",
        "]",
        *_plan_parameters(manifest),
        *_accelerator(backend),
        "",
    ])


def _accelerator(backend: Backend) -> list[str]:
    """A backend with a CPU accelerator (OpenVINO): Triton runs the ONNX graph through ONNX Runtime's
    execution provider of that name."""
    if backend.triton_accelerator is None:
        return []
    return ["optimization {", "  execution_accelerators {",
            f'    cpu_execution_accelerator: [ {{ name: "{backend.triton_accelerator}" }} ]', "  }", "}"]


def _plan_record(manifest: EngineManifest) -> list[str]:
    """Comment lines saying which TensorRT and GPU a plan needs (Triton's TensorRT must be that one)."""
    built = manifest.tensorrt
    if manifest.backend != "tensorrt" or built is None:
        return []
    return [f"# TensorRT plan built with TensorRT {built.version} for {built.gpu} "
            f"(compute capability {list(built.compute_capability)}): serve it with a Triton release whose "
            "TensorRT is exactly this version, on this GPU family"]


def _plan_parameters(manifest: EngineManifest) -> list[str]:
    """The plan's TensorRT version as a config parameter, so tools can check it before loading."""
    if manifest.backend != "tensorrt" or manifest.tensorrt is None:
        return []
    return ["parameters {", '  key: "nnslim_tensorrt_version"',
            f'  value: {{ string_value: "{manifest.tensorrt.version}" }}', "}"]


_TOKEN = re.compile(r'\s*(?:(#[^\n]*)|("(?:[^"\\]|\\.)*")|([{}\[\]:,])|([A-Za-z0-9_.+-]+))')


def parse_pbtxt(text: str) -> dict[str, Any]:
    """Protobuf text format -> nested dicts; a repeated field becomes a list (always a list for
    `[...]` values and for fields given more than once)."""
    tokens: list[str] = []
    position = 0
    while position < len(text):
        match = _TOKEN.match(text, position)
        if not match or match.end() == position:
            if text[position:].strip() == "":
                break
            raise TritonExportError(f"cannot parse config.pbtxt at {text[position:position + 30]!r}")
        position = match.end()
        token = match.group(2) or match.group(3) or match.group(4)
        if token:
            tokens.append(token)

    def value(i: int) -> tuple[Any, int]:
        token = tokens[i]
        if token == "{":
            return message(i + 1, "}")
        if token == "[":
            items, i = [], i + 1
            while tokens[i] != "]":
                item, i = value(i)
                items.append(item)
                if tokens[i] == ",":
                    i += 1
            return items, i + 1
        if token.startswith('"'):
            return token[1:-1], i + 1
        for number in (int, float):
            try:
                return number(token), i + 1
            except ValueError:
                pass
        return token, i + 1  # enum names and booleans

    def message(i: int, end: str | None) -> tuple[dict[str, Any], int]:
        fields: dict[str, Any] = {}
        while i < len(tokens) and tokens[i] != end:
            key = tokens[i]
            i += 1
            if tokens[i] == ":":
                i += 1
            item, i = value(i)
            if key in fields:
                previous = fields[key] if isinstance(fields[key], list) else [fields[key]]
                fields[key] = previous + (item if isinstance(item, list) else [item])
            else:
                fields[key] = item
        if end is not None:
            if i >= len(tokens):
                raise TritonExportError(f"config.pbtxt: unclosed '{{' (expected {end!r})")
            i += 1
        return fields, i

    parsed, _ = message(0, None)
    return parsed


def export_triton(engine_dir: str | Path, repository: str | Path, name: str | None = None, instances: int = 1,
                  kind: str = "KIND_GPU") -> Path:
    """Write `repository/name/` (config and version 1 model) from a verified engine directory."""
    engine_dir, repository = Path(engine_dir), Path(repository)
    manifest = load_manifest(engine_dir)
    name = name or engine_dir.name
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise TritonExportError(f"model name {name!r} must be letters, digits, '_', '.' or '-'")
    model_file = backend_of(manifest).kind.triton_file
    target = repository / name
    if target.exists():
        raise TritonExportError(f"{target} exists; remove it or choose another --name")
    text = config_pbtxt(name, manifest, instances, kind)
    parsed = parse_pbtxt(text)
    if parsed.get("name") != name or parsed.get("max_batch_size") != manifest.io.batch[2]:
        raise TritonExportError(f"generated config.pbtxt does not read back as written: {parsed}")
    with staging_folder(target, "exporting") as staging:
        (staging / "1").mkdir()
        write_text_atomic(staging / "config.pbtxt", text)
        model = read_verified(engine_dir, manifest, manifest.runtime_model)  # the bytes that were hashed
        if model is None:  # external data: copied by path, as verified
            shutil.copyfile(engine_dir / manifest.runtime_model, staging / "1" / model_file)
        else:
            write_bytes_atomic(staging / "1" / model_file, model)
        shutil.copyfile(engine_dir / MANIFEST, staging / "nnslim_manifest.json")  # preprocessing for clients
        fsync_tree(staging)
        staging.rename(target)
    return target
