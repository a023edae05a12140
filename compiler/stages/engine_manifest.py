"""The engine directory's manifest and report, as the build writes them.

The runtime reads (and validates) manifests in `nnslim.compiler.runtime.manifest`; this module
only assembles one from what the build stages produced, and renders it as `report.md`.

An engine is shipped, and scans (often checkpoints too) live in folders named after patients, so
what the build records of a path is its name only (`shipped_name`, `shipped_argv`), never its folders.
"""

from __future__ import annotations

import json
import os
import platform
import sys
from datetime import datetime, timezone
from pathlib import Path, PurePath
from typing import Any

import onnx
import torch

from nnslim.compiler.runtime.manifest import EngineManifest, IORecord, ParityRecord, SelectionRecord, TensorRecord
from nnslim.compiler.stages.report import PerfRow, perf_table
from nnslim.compiler.stages.source import Source
from nnslim.files import sha256_file, write_text_atomic
from nnslim.compiler.runtime.backends.tensorrt_plan import BackendUnavailable, import_tensorrt


def source_name(config: Any) -> str:
    """What the engine records as its source: the checkpoint's or folder's name, or `<module Class>`."""
    if config.checkpoint is None and config.module is not None:
        return f"<module {config.module.details['class']}>"
    return shipped_name(config.checkpoint)


def shipped_name(path: str | os.PathLike) -> str:
    """What an engine records of a path it was built from: the last component, never the folders
    (module docstring). The one rule for every path the build records: checkpoint, parity and
    calibration volumes, the output folder, the command line."""
    text = os.fspath(path)
    return PurePath(text).name or text


def shipped_argv(argv: list[str]) -> list[str]:
    """A command line with every path in it reduced to its name: an argument with a folder separator
    is a path, also as `--option=PATH`."""
    def one(arg: str) -> str:
        option, equals, value = arg.partition("=") if arg.startswith("--") else ("", "", arg)
        return option + equals + (shipped_name(value) if "/" in value or os.sep in value else value)
    return [one(str(a)) for a in argv]


def _tensorrt_version() -> str | None:
    try:
        return import_tensorrt().__version__
    except BackendUnavailable:
        return None


def _tool_versions() -> dict[str, Any]:
    import onnxruntime

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "tensorrt": _tensorrt_version(),
        "openvino": _openvino_version(),
        "platform": platform.platform(),
    }


def _openvino_version() -> str | None:
    try:
        import openvino
    except ImportError:
        return None
    return openvino.__version__


def engine_manifest(
    config: Any,
    chosen: dict[str, str],
    source: Source,
    patch: tuple[int, int, int],
    stages: list[dict[str, Any]],
    parity: ParityRecord,
    model_stats: dict[str, Any],
) -> EngineManifest:
    """The manifest (everything but `files`, `selection` and an artifact's record, which the
    pipeline adds).

    Args:
        chosen: the engine's runtime choice: `backend`, `precision` and `runtime_model` (the file).
        parity: the chosen runtime's parity, with its gate.
    """
    metadata = source.metadata
    in_channels, num_classes = source.in_channels, source.num_classes
    command = (
        f"nnslim build-engine {source_name(config)} --out {shipped_name(config.out_dir)} "
        f"--patch {' '.join(map(str, patch))} "
        f"--batch {config.batch_size} --backend {config.backend} --precision {config.precision}"
    )
    if source.kind == "nnunet-v2":
        command += f" --folds {' '.join(source.details['folds'])} --checkpoint-name {config.nnunet_checkpoint}"
    return EngineManifest(
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        backend=chosen["backend"],
        precision=chosen["precision"],
        runtime_model=chosen["runtime_model"],
        io=IORecord(TensorRecord("image", "float32", ("batch", in_channels, *patch)),
                    TensorRecord("logits", "float32", ("batch", num_classes, *patch)),
                    (1, config.batch_size, config.batch_size)),
        preprocessing=source.preprocessing,
        labels=tuple(metadata["label_names"]),
        postprocessing={**source.postprocessing, **({"steps": list(config.postprocessing_steps)}
                                                     if config.postprocessing_steps else {})},
        model={"architecture": source.architecture, **model_stats},
        source={
            "kind": source.kind,
            "checkpoint": source_name(config),
            "checkpoint_sha256": _source_digest(config, source),
            **source.details,
            "dataset": metadata.get("dataset"),
            "training": _without_folders(metadata.get("training")),
        },
        stages=tuple(stages),
        parity=parity,
        tools=_tool_versions(),
        build={"command": command, "argv": shipped_argv(sys.argv)},
    )


def _without_folders(record: Any) -> Any:
    """The checkpoint's training record with the paths in it (its dataset and output folders) reduced
    to names; its other strings are names and numbers already."""
    if isinstance(record, dict):
        return {k: _without_folders(v) for k, v in record.items()}
    if isinstance(record, list):
        return [_without_folders(v) for v in record]
    return shipped_name(record) if isinstance(record, str) and ("/" in record or os.sep in record) else record


def _inside(path: Path, folder: Path) -> str:
    """A file of a model folder as the manifest names it: relative to the folder (`fold_0/...`)."""
    try:
        return Path(path).resolve().relative_to(Path(folder).resolve()).as_posix()
    except ValueError:
        return shipped_name(path)


def write_report(path: Path, manifest: EngineManifest) -> None:
    """`report.md`: the manifest in readable form (written atomically)."""
    parity, model, io = manifest.parity, manifest.model, manifest.io
    fused = model["reparameterization"]
    tolerance = parity.tolerance
    lines = [
        f"# nnslim engine ({manifest.backend})",
        "",
        f"Built {manifest.created} from `{manifest.source['checkpoint']}`.",
        "",
        "| | |",
        "|---|---|",
        f"| input | `{io.input.name}` {list(io.input.shape)} |",
        f"| output | `{io.output.name}` {list(io.output.shape)} |",
        f"| labels | {', '.join(manifest.labels)} |",
        f"| parameters | {model['parameters']:,} (trained form: {fused['parameters_before']:,}) |",
        f"| reparameterization | {fused['faster_fusion_blocks_fused']} FasterFusion blocks fused, "
        f"{fused['batchnorms_folded']} BatchNorms folded |",
        f"| conv MACs per patch | {model['macs_per_patch'] / 1e9:.2f} G |",
        f"| conv weight sparsity | {model['conv_weight_sparsity']:.1%} |",
        f"| {manifest.runtime_model} size | {model['runtime_model_size']['bytes']:,} B raw, "
        f"{model['runtime_model_size']['compressed_bytes']:,} B zlib-compressed |",
        "",
        "## Model (the headline benchmark's table, one row: MACs per tile, agreement on the parity tiles)",
        "",
        *perf_table([PerfRow(
            name=f"{manifest.backend} engine", parameters=model["parameters"], macs=model["macs_per_patch"],
            model_bytes=model["runtime_model_size"]["bytes"],
            model_bytes_compressed=model["runtime_model_size"]["compressed_bytes"],
            agreement=parity.argmax_agreement,
        )]),
        "",
        *_selection_lines(manifest.selection),
        f"## Parity ({manifest.backend} {manifest.precision} vs PyTorch fp32)",
        "",
        f"- tiles: {parity.source}",
        f"- max |logit error|: {parity.max_abs_logit_error:.3g}, {parity.max_rel_logit_error:.2e} of the largest "
        f"logit (tolerance {tolerance.max_rel_logit_error:.2e})",
        f"- mean |logit error|: {parity.mean_abs_logit_error:.3g}",
        f"- argmax agreement: {parity.argmax_agreement:.6f} (needed {tolerance.min_argmax_agreement})",
        "",
        *([f"![where the engine and PyTorch disagree on the parity tiles]({parity.figure})", ""]
          if parity.figure else []),
        "## Stages",
        "",
        "| stage | seconds | settings |",
        "|---|---|---|",
        *(f"| {s['name']} | {s['seconds']} | `{json.dumps(s['settings'])}` |" for s in manifest.stages),
        "",
    ]
    write_text_atomic(path, "\n".join(lines))


def _selection_lines(selection: SelectionRecord | None) -> list[str]:
    """The candidates table of `--precision auto` (nothing for a single explicit choice)."""
    if selection is None or len(selection.candidates) < 2:
        return []
    machine = selection.machine
    lines = ["## Engine selection (fastest candidate inside its parity gate)", "",
             f"Machine: {machine.get('name', '?')}, {machine.get('cores')} cores, "
             f"flags {' '.join(machine.get('flags', []))}; PyTorch eager "
             f"{selection.reference_seconds_per_batch:.3f} s per batch of {selection.batch}.", "",
             "| backend | precision | s / batch | x eager | agreement | max rel error | gate | |",
             "|---|---|---|---|---|---|---|---|"]
    for c in selection.candidates:
        seconds = f"{c.seconds_per_batch:.3f}" if c.seconds_per_batch else "-"
        speedup = f"{c.speedup_vs_torch:.2f}x" if c.speedup_vs_torch else "-"
        verdict = "**chosen**" if (c.backend, c.precision) == (selection.backend, selection.precision) else (
            "passed" if c.passed else f"rejected{': ' + c.error if c.error else ''}")
        agreement = c.parity.argmax_agreement if c.parity else float("nan")
        error = c.parity.max_rel_logit_error if c.parity else float("nan")
        gate = c.tolerance.min_argmax_agreement if c.tolerance else "-"
        lines.append(f"| {c.backend} | {c.precision} | {seconds} | {speedup} | {agreement:.5f} | {error:.2e} | "
                     f">= {gate} | {verdict} |")
    return [*lines, ""]


def _source_digest(config: Any, source: Any) -> str | dict[str, str]:
    """The sha256 of what the engine was built from: per fold file, the checkpoint, or a module's
    state dict (its parameter names and bytes)."""
    if source.kind == "pytorch-module":
        return source.details["state_dict_sha256"]
    if source.kind in ("nnunet-v2", "monai-bundle"):
        return {_inside(f, config.checkpoint): sha256_file(f) for f in source.files}
    return sha256_file(source.files[0])
