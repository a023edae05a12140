"""The engine directory's manifest and report, as the build writes them.

The runtime reads (and validates) manifests in `nnslim.compiler.runtime.manifest`; this module
only assembles one from what the build stages produced, and renders it as `report.md`.
"""

from __future__ import annotations

import json
import platform
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import onnx
import torch

from nnslim.compiler.build.parity import ParityReport, ParityTolerance
from nnslim.compiler.build.report import PerfRow, perf_table
from nnslim.compiler.build.source import Source
from nnslim.compiler.runtime.files import write_text_atomic
from nnslim.compiler.runtime.manifest import FORMAT, FORMAT_VERSION, sha256_file
from nnslim.compiler.runtime.tensorrt_runtime import BackendUnavailable, import_tensorrt


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
    parity: ParityReport,
    tolerance: ParityTolerance,
    model_stats: dict[str, Any],
) -> dict[str, Any]:
    """The manifest (everything but `files`, which the pipeline adds last).

    Args:
        chosen: the engine's runtime choice: `backend`, `precision` and `runtime_model` (the file).
    """
    metadata = source.metadata
    in_channels, num_classes = source.in_channels, source.num_classes
    command = (
        f"nnslim build-engine {config.checkpoint} --out {config.out_dir} --patch {' '.join(map(str, patch))} "
        f"--batch {config.batch_size} --backend {config.backend} --precision {config.precision}"
    )
    if source.kind == "nnunet-v2":
        command += f" --folds {' '.join(config.folds)} --checkpoint-name {config.nnunet_checkpoint}"
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "backend": chosen["backend"],
        "runtime_model": chosen["runtime_model"],
        "io": {
            "input": {"name": "image", "dtype": "float32", "shape": ["batch", in_channels, *patch]},
            "output": {"name": "logits", "dtype": "float32", "shape": ["batch", num_classes, *patch]},
            "batch": {"min": 1, "opt": config.batch_size, "max": config.batch_size},
        },
        "preprocessing": source.preprocessing,
        "labels": list(metadata["label_names"]),
        "postprocessing": source.postprocessing,
        "model": {"architecture": source.architecture, **model_stats},
        "source": {
            "kind": source.kind,
            "checkpoint": str(config.checkpoint),
            "checkpoint_sha256": {str(f): sha256_file(f) for f in source.files} if source.kind == "nnunet-v2"
            else sha256_file(source.files[0]),
            **source.details,
            "dataset": metadata.get("dataset"),
            "training": metadata.get("training"),
        },
        "stages": stages,
        "parity": {**parity.to_dict(), "tolerance": vars(tolerance)},
        "precision": chosen["precision"],
        "tools": _tool_versions(),
        "build": {"command": command, "argv": sys.argv},
    }


def write_report(path: Path, manifest: dict[str, Any]) -> None:
    """`report.md`: the manifest in readable form (written atomically)."""
    parity, model = manifest["parity"], manifest["model"]
    fused = model["reparameterization"]
    lines = [
        f"# nnslim engine ({manifest['backend']})",
        "",
        f"Built {manifest['created']} from `{manifest['source']['checkpoint']}`.",
        "",
        "| | |",
        "|---|---|",
        f"| input | `{manifest['io']['input']['name']}` {manifest['io']['input']['shape']} |",
        f"| output | `{manifest['io']['output']['name']}` {manifest['io']['output']['shape']} |",
        f"| labels | {', '.join(manifest['labels'])} |",
        f"| parameters | {model['parameters']:,} (trained form: {fused['parameters_before']:,}) |",
        f"| reparameterization | {fused['faster_fusion_blocks_fused']} FasterFusion blocks fused, "
        f"{fused['batchnorms_folded']} BatchNorms folded |",
        f"| conv MACs per patch | {model['macs_per_patch'] / 1e9:.2f} G |",
        f"| conv weight sparsity | {model['conv_weight_sparsity']:.1%} |",
        f"| model.opt.onnx size | {model['runtime_model_size']['bytes']:,} B raw, "
        f"{model['runtime_model_size']['compressed_bytes']:,} B zlib-compressed |",
        "",
        "## Model (the headline benchmark's table, one row: MACs per tile, agreement on the parity tiles)",
        "",
        *perf_table([PerfRow(
            name=f"{manifest['backend']} engine", parameters=model["parameters"], macs=model["macs_per_patch"],
            model_bytes=model["runtime_model_size"]["bytes"],
            model_bytes_compressed=model["runtime_model_size"]["compressed_bytes"],
            agreement=parity["argmax_agreement"],
        )]),
        "",
        *_selection_lines(manifest.get("selection")),
        f"## Parity ({manifest['backend']} {manifest['precision']} vs PyTorch fp32)",
        "",
        f"- tiles: {parity['source']}",
        f"- max |logit error|: {parity['max_abs_logit_error']:.3g}, {parity['max_rel_logit_error']:.2e} of the largest "
        f"logit (tolerance {parity['tolerance']['max_rel_logit_error']:.2e})",
        f"- mean |logit error|: {parity['mean_abs_logit_error']:.3g}",
        f"- argmax agreement: {parity['argmax_agreement']:.6f} (needed {parity['tolerance']['min_argmax_agreement']})",
        "",
        *([f"![where the engine and PyTorch disagree on the parity tiles]({parity['figure']})", ""]
          if parity.get("figure") else []),
        "## Stages",
        "",
        "| stage | seconds | settings |",
        "|---|---|---|",
        *(f"| {s['name']} | {s['seconds']} | `{json.dumps(s['settings'])}` |" for s in manifest["stages"]),
        "",
    ]
    write_text_atomic(path, "\n".join(lines))


def _selection_lines(selection: dict[str, Any] | None) -> list[str]:
    """The candidates table of `--precision auto` (nothing for a single explicit choice)."""
    if not selection or len(selection["candidates"]) < 2:
        return []
    lines = ["## Engine selection (fastest candidate inside its parity gate)", "",
             f"Machine: {selection['machine'].get('name', '?')}, {selection['machine'].get('cores')} cores, "
             f"flags {' '.join(selection['machine'].get('flags', []))}; PyTorch eager "
             f"{selection['reference_seconds_per_batch']:.3f} s per batch of {selection['batch']}.", "",
             "| backend | precision | s / batch | x eager | agreement | max rel error | gate | |",
             "|---|---|---|---|---|---|---|---|"]
    for c in selection["candidates"]:
        parity, tol = c.get("parity") or {}, c.get("tolerance") or {}
        seconds = f"{c['seconds_per_batch']:.3f}" if c.get("seconds_per_batch") else "-"
        speedup = f"{c['speedup_vs_torch']:.2f}x" if c.get("speedup_vs_torch") else "-"
        verdict = "**chosen**" if (c["backend"], c["precision"]) == (selection["backend"], selection["precision"]) else (
            "passed" if c["passed"] else f"rejected{': ' + c['error'] if c.get('error') else ''}")
        lines.append(f"| {c['backend']} | {c['precision']} | {seconds} | {speedup} | "
                     f"{parity.get('argmax_agreement', float('nan')):.5f} | {parity.get('max_rel_logit_error', float('nan')):.2e} | "
                     f">= {tol.get('min_argmax_agreement', '-')} | {verdict} |")
    return [*lines, ""]
