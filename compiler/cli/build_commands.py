"""`nnslim build-engine`: its options (all here, in one stack), their config, and the summary it prints."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from nnslim.compiler.cli.options import (
    TableChoice,
    backends,
    checked,
    fold_names,
    list_options_command,
    out_dir_option,
    patch_option,
    patch_tuple,
    path_type,
    precisions,
)
from nnslim.compiler.runtime.manifest.schema import MAX_BATCH
from nnslim.compiler.runtime.safety import check_threads

EPILOG = """\b
Examples:
  nnslim build-engine artifacts/models/mni-tissue-tiny.pt --out artifacts/engines/tiny \\
      --parity-volume artifacts/data/mni-tissue/imagesTr/mni_0000.nii.gz
  nnslim build-engine model.pt --out engines/m --patch 64 64 64 --batch 4 \\
      --parity-volume scan.nii.gz --calibration scan2.nii.gz --calibration scan3.nii.gz
  nnslim build-engine artifacts/models/mni-tissue-tiny.pt --out artifacts/engines/tiny-ov --backend openvino --precision fp32
  nnslim build-engine artifacts/models/mni-tissue-tiny.pt --out artifacts/engines/tiny-ort --precision fp32
  nnslim build-engine artifacts/models/mni-tissue-tiny.pt --out artifacts/engines/tiny-fp16 --precision fp16
  nnslim build-engine artifacts/models/mni-tissue-tiny.pt --out artifacts/engines/tiny-p80 --prune-sparsity 0.8
  nnslim build-engine artifacts/models/mni-tissue-tiny.pt --out artifacts/engines/tiny-s25 \\
      --prune-structured 0.25 --finetune-steps 50
  nnslim build-engine nnUNet_results/Dataset003_Liver/nnUNetTrainer__nnUNetPlans__3d_fullres \\
      --out engines/liver --folds 0 1 2 3 4
  nnslim build-engine nnUNet_results/Dataset003_Liver/nnUNetTrainer__nnUNetPlans__3d_fullres \\
      --out engines/liver-012 --folds 0,1,2 --checkpoint-name checkpoint_best.pth
  nnslim build-engine nnUNet_results/Dataset003_Liver/nnUNetTrainer__nnUNetPlans__3d_fullres \\
      --out engines/liver-pp --postprocessing crossval_results_folds_0_1_2_3_4/postprocessing.pkl
  nnslim build-engine exported.onnx --out engines/theirs --metadata exported.json --precision fp32
  nnslim build-engine spleen_ct_segmentation/ --out engines/spleen --precision fp32
  nnslim build-engine exported.pt2 --out engines/program --metadata exported.json
"""


# Every build-engine option, in the order --help shows them. A new option goes here and into
# `build_config` below.
@click.command("build-engine", cls=list_options_command("--folds"), epilog=EPILOG)
@click.argument("checkpoint", type=path_type())
@out_dir_option("Engine directory.")
@click.option("--metadata", type=path_type(dir_okay=False), default=None, metavar="FILE.json",
              help="For an ONNX file or a .pt2 program: what the runtime must know of the graph, as JSON: patch_size, label_names "
                   "(required unless the graph's shapes say them), in_channels, normalization, spacing, mirror_axes, "
                   "total_stride.")
@patch_option("Tile size (default: training patch).")
@click.option("--batch", "batch_size", default=2, show_default=True, type=click.IntRange(1, MAX_BATCH),
              help="Tiles per call (max batch), up to the runtime's limit.")
@click.option("--backend", type=TableChoice(backends, ("auto",)), default="auto",
              show_default=True, help="auto: TensorRT on a machine with it and a GPU, else every CPU backend installed.")
@click.option("--precision", type=TableChoice(precisions, ("auto",)), default="auto",
              show_default=True,
              help="auto: time every (backend, precision) candidate on the parity tiles and keep the fastest inside "
                   "its parity gate. fp32 alone (with --backend auto): ONNX Runtime fp32, as before. fp16: an fp16 "
                   "graph (norms and I/O fp32). bf16: OpenVINO's bf16 on CPUs that have it. int8: a Q/DQ graph "
                   "calibrated on --calibration (needs real volumes).")
@click.option("--parity-volume", type=path_type(dir_okay=False), default=None,
              help="A real volume to cut parity tiles from (default: synthetic tiles; then no int8 candidate).")
@click.option("--parity-tiles", default=4, show_default=True, type=click.IntRange(1),
              help="Tiles that parity (and each candidate's timing) is measured on; the build refuses, before "
                   "allocating them, a count (with --patch and --batch) that this machine's memory cannot hold.")
@click.option("--calibration", multiple=True, type=path_type(dir_okay=False), metavar="VOLUME",
              help="int8 calibration volume (repeatable) [default: the parity volume].")
@click.option("--calibration-tiles", default=4, show_default=True, type=click.IntRange(1),
              help="int8 calibration tiles per calibration volume.")
@click.option("--threads", default=0, show_default=True, type=click.IntRange(0), callback=checked(check_threads),
              help="CPU threads of the candidates while they are timed (0: each backend's default; at most 4 per "
                   "core).")
@click.option("--parity-rtol", default=None, type=click.FloatRange(min=0),
              help="With an explicit --precision: max |logit error| vs PyTorch, relative to the largest logit "
                   "[default: the precision's gate: 1e-2 fp32, 5e-2 fp16, 1e-1 bf16, 3e-1 int8].")
@click.option("--min-agreement", default=None, type=click.FloatRange(0, 1),
              help="With an explicit --precision: min argmax agreement vs PyTorch "
                   "[default: 0.999 fp32, 0.995 fp16 / bf16, 0.99 int8].")
@click.option("--overwrite", is_flag=True, help="Replace --out even when it is not an nnslim engine (its files are lost).")
@click.option("--no-pass-parity", is_flag=True, help="Skip the ONNX Runtime parity check after each graph pass.")
@click.option("--prune-sparsity", type=click.FloatRange(0, 1, max_open=True), default=None,
              help="Magnitude-prune this fraction of conv weights (one global threshold, seed 001).")
@click.option("--prune-threshold", type=click.FloatRange(min=0), default=None,
              help="Magnitude-prune every conv weight with |w| below this.")
@click.option("--prune-structured", "structured_ratio", type=click.FloatRange(0, 1, max_open=True), default=None,
              help="Remove this fraction of the channels of every layer (physically smaller convs).")
@click.option("--two-four", is_flag=True, help="2:4 sparsity along input channels (TensorRT SPARSE_WEIGHTS).")
@click.option("--finetune-steps", type=click.IntRange(0), default=0, show_default=True,
              help="Fine-tune steps after --prune-structured.")
@click.option("--finetune-dataset", default=None, help="Dataset for --finetune-steps (default: the checkpoint's).")
@click.option("--folds", multiple=True, default=None, metavar="FOLD...",
              help="nnU-Net model folder: folds to ensemble (logits averaged), e.g. --folds 0 1 2 or "
                   "--folds 0,1,2 [default: every fold_N the folder has, printed].")
@click.option("--checkpoint-name", default="checkpoint_final.pth", show_default=True, metavar="FILE",
              help="nnU-Net model folder: the checkpoint file in each fold folder (any name, like nnUNetv2_predict -chk; "
                   "e.g. checkpoint_best.pth).")
@click.option("--postprocessing", "postprocessing_pkl", type=path_type(dir_okay=False), default=None, metavar="PKL",
              help="nnU-Net's postprocessing.pkl (from nnUNetv2_find_best_configuration): the engine records its "
                   "steps and applies them to every label map (read with an allow-list, never unpickled).")
@click.option("--workspace-mb", default=4096, show_default=True, type=click.IntRange(16),
              help="TensorRT: workspace memory pool limit.")
@click.option("--trt-opt-level", default=3, show_default=True, type=click.IntRange(0, 5),
              help="TensorRT: builder optimization level (higher: longer build, maybe faster plan).")
@click.option("--trt-fp16-mode", type=click.Choice(["typed", "flag"]), default="typed", show_default=True,
              help="TensorRT fp16: the fp16 graph (strongly typed; the only way on TensorRT 11) or "
                   "TensorRT 10's FP16 builder flag on the fp32 graph.")
@click.option("--engine-cache", type=path_type(file_okay=False), default=None,
              help="TensorRT plan cache [default: $NNSLIM_CACHE/tensorrt or ~/.cache/nnslim/tensorrt].")
@click.option("--timing-cache", type=path_type(dir_okay=False), default=None,
              help="TensorRT timing cache base name; the file used is keyed by TensorRT version and GPU "
                   "(read if present, updated after a build).")
def build_engine(**options: Any) -> None:
    """Compile a checkpoint into an engine directory (ONNX model, manifest, report).

    CHECKPOINT is an nnslim checkpoint (.pt), a trained nnU-Net v2 model folder
    (Trainer__Plans__Configuration with plans.json, dataset.json and fold_N/), a MONAI bundle
    (configs/metadata.json, configs/inference.json, models/model.pt; the engine reproduces its
    transforms and SlidingWindowInferer), or an ONNX graph or torch.export program (.pt2)
    [N, C, X, Y, Z] -> [N, K, X, Y, Z] with --metadata; checkpoints are read weights-only with an allow-list, never unpickled
    freely, and a bundle's config runs no code.

    Exits non-zero, writing nothing, when the engine disagrees with PyTorch beyond the tolerance.
    """
    from nnslim.compiler.stages.pipeline import build_engine as run_build

    result = run_build(build_config(options))
    for line in summary_lines(result):
        click.echo(line)


def build_config(o: dict[str, Any]):
    """The `BuildConfig` for build-engine's parsed options (flag conflicts are usage errors, exit 2)."""
    from nnslim.compiler.runtime.manifest import Tolerance
    from nnslim.compiler.runtime.precision import get_precision
    from nnslim.compiler.stages.plan import BuildConfig
    from nnslim.compiler.stages.prune import PruneSettings

    if o["prune_sparsity"] is not None and o["prune_threshold"] is not None:
        raise click.UsageError("--prune-sparsity and --prune-threshold are alternatives; give one")
    if o["finetune_steps"] and o["structured_ratio"] is None:
        raise click.UsageError("--finetune-steps needs --prune-structured")
    calibrating = o["calibration"] or click.get_current_context().get_parameter_source("calibration_tiles") \
        in (click.core.ParameterSource.COMMANDLINE, click.core.ParameterSource.ENVIRONMENT)
    if calibrating and o["precision"] != "auto" and not get_precision(o["precision"]).calibrated:
        raise click.UsageError(f"--calibration / --calibration-tiles calibrate int8, but --precision {o['precision']} "
                               "is not calibrated: drop them, or build --precision int8 (or auto)")
    tolerance = None  # each precision's own gate
    if o["parity_rtol"] is not None or o["min_agreement"] is not None:
        if o["precision"] == "auto":
            raise click.UsageError("--parity-rtol / --min-agreement set one precision's gate; give --precision too")
        default = get_precision(o["precision"]).tolerance
        tolerance = Tolerance(
            default.max_rel_logit_error if o["parity_rtol"] is None else o["parity_rtol"],
            default.min_argmax_agreement if o["min_agreement"] is None else o["min_agreement"],
        )
    prune = PruneSettings(
        sparsity=o["prune_sparsity"], threshold=o["prune_threshold"], structured_ratio=o["structured_ratio"],
        two_four=o["two_four"], finetune_steps=o["finetune_steps"], finetune_dataset=o["finetune_dataset"],
    )
    return BuildConfig(
        checkpoint=o["checkpoint"], out_dir=o["out_dir"], patch_size=patch_tuple(o["patch"]), module=_onnx(o),
        batch_size=o["batch_size"], backend=o["backend"], parity_volume=o["parity_volume"],
        parity_tiles=o["parity_tiles"], precision=o["precision"], tolerance=tolerance,
        pass_parity=not o["no_pass_parity"], prune=prune, folds=fold_names(o["folds"]),
        nnunet_checkpoint=o["checkpoint_name"], trt_workspace_mb=o["workspace_mb"],
        trt_optimization_level=o["trt_opt_level"], trt_fp16_mode=o["trt_fp16_mode"],
        engine_cache=o["engine_cache"], timing_cache=o["timing_cache"], calibration=tuple(o["calibration"]),
        calibration_tiles=o["calibration_tiles"], threads=o["threads"], overwrite=o["overwrite"],
        postprocessing_steps=_postprocessing_steps(o["postprocessing_pkl"]),
    )


def _postprocessing_steps(path: Path | None) -> tuple[dict, ...]:
    """--postprocessing's steps (`runtime.nnunet.postprocessing.read_steps`), before anything is built."""
    if path is None:
        return ()
    from nnslim.compiler.runtime.nnunet.postprocessing import read_steps

    return tuple(read_steps(path))


def _onnx(o: dict[str, Any]):
    """An ONNX file's or a torch.export program's source, read with its --metadata (None for other
    inputs, which refuse --metadata)."""
    import json

    suffix = o["checkpoint"].suffix.lower()
    if o["metadata"] is not None and suffix not in METADATA_SUFFIXES:
        raise click.UsageError("--metadata describes an ONNX graph or a .pt2 program; a checkpoint, an nnU-Net model "
                               "folder or a MONAI bundle carries its own: drop it")
    if suffix not in METADATA_SUFFIXES:
        return None
    metadata = {}
    if o["metadata"] is not None:
        try:
            metadata = json.loads(o["metadata"].read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise click.BadParameter(f"{o['metadata']} is not readable JSON ({exc})", param_hint="--metadata") from None
        if not isinstance(metadata, dict):
            raise click.BadParameter(f"{o['metadata']} holds {type(metadata).__name__}, not an object of keys",
                                     param_hint="--metadata")
    if suffix == ".pt2":
        from nnslim.compiler.stages.program_source import program_source

        return program_source(o["checkpoint"], metadata)
    from nnslim.compiler.stages.onnx_source import onnx_source

    return onnx_source(o["checkpoint"], metadata)


METADATA_SUFFIXES = (".onnx", ".pt2")  # inputs described by --metadata


def summary_lines(result) -> list[str]:
    """What build-engine prints: the engine, what was fused and pruned, the passes, and parity."""
    p, manifest = result.parity, result.manifest
    m = manifest.model
    r = m["reparameterization"]
    lines = [
        f"engine: {result.out_dir} ({manifest.backend} {manifest.precision})",
        f"reparameterized: {', '.join(f'{n} {name}' for name, n in r['fused'].items()) or 'nothing to fuse'}; "
        f"parameters {r['parameters_before']:,} -> {r['parameters_after']:,}",
    ]
    if m["pruning"]:
        pr = m["pruning"]
        line = f"pruned: conv weight sparsity {pr['global_sparsity']:.1%}"
        if "structured" in pr:
            st = pr["structured"]
            line += f"; structured: parameters {st['parameters_before']:,} -> {st['parameters_after']:,}"
        lines.append(line + f"; {manifest.runtime_model} {m['runtime_model_size']['bytes']:,} B, "
                     f"{m['runtime_model_size']['compressed_bytes']:,} B compressed")
    lines.append(f"conv MACs per patch {m['macs_per_patch'] / 1e9:.2f} G")
    for stage in manifest.stages:  # the graph passes, and the passes of graphs made from them (fp16)
        for record in stage.get("results", []) if isinstance(stage.get("results"), list) else []:
            figures = "" if record.get("max_abs_error") is None else (
                f"  (vs export: max |error| {record['max_abs_error']:.2e}, agreement {record['argmax_agreement']:.6f})")
            lines.append(f"  {record['name']:<32} {record['changed']:>4} change(s){figures}")
    lines += _selection_lines(manifest.selection)
    lines.append(
        f"parity vs PyTorch on {p.tiles} tiles ({manifest.backend} {manifest.precision}): max |logit error| "
        f"{p.max_abs_logit_error:.2e} ({p.max_rel_logit_error:.1e} of the largest logit), "
        f"argmax agreement {p.argmax_agreement:.6f}"
    )
    return lines


def _selection_lines(selection) -> list[str]:
    """The candidates of `--precision auto`, fastest first, with their gate verdicts."""
    if selection is None or len(selection.candidates) < 2:
        return []
    lines = [f"candidates (batch {selection.batch}; PyTorch eager {selection.reference_seconds_per_batch:.3f} s):"]
    for c in selection.candidates:
        chosen = (c.backend, c.precision) == (selection.backend, selection.precision)
        timing = f"{c.seconds_per_batch:.3f} s ({c.speedup_vs_torch:.2f}x)" if c.seconds_per_batch else "-"
        agreement = f"agreement {c.parity.argmax_agreement:.5f}" if c.parity else c.error
        verdict = "chosen" if chosen else ("passed" if c.passed else "outside its gate")
        lines.append(f"  {c.backend:<12} {c.precision:<5} {timing:<18} {agreement}  {verdict}")
    return lines + [f"  skipped: {s}" for s in selection.skipped]
