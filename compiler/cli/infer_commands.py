"""`nnslim infer` (its options all here, in one stack) and `nnslim evaluate`."""

from __future__ import annotations

from typing import Any

import click

from nnslim.compiler.cli.boundary import EXIT_SOME_CASES_FAILED
from nnslim.compiler.cli.options import (
    TableChoice,
    backends,
    blending_modes,
    probabilities_formats,
    window_rules,
    checked,
    devices,
    part_number,
    path_type,
    precisions,
    progress_option,
    skip_modes,
)
from nnslim.compiler.runtime.safety import check_sha256, check_threads

EPILOG = """\b
Examples:
  nnslim infer artifacts/engines/tiny scan.nii.gz -o seg.nii.gz
  nnslim infer artifacts/engines/tiny scans/ -o segs/ --tta --continue
  nnslim infer artifacts/engines/tiny scans/ -o segs/ --num-parts 4 --part-id 0 --continue
  nnslim infer artifacts/engines/tiny scans/ -o segs/ --num-parts auto --part-id auto --continue
  nnslim infer artifacts/engines/tiny scans/ -o segs/ --log-jsonl segs.jsonl --save-probabilities --preview
  nnslim infer artifacts/engines/tiny scans/ -o segs/ --io-workers 0 --device cpu
  nnslim infer artifacts/engines/tiny scan.nii.gz -o seg_fp32.nii.gz --backend openvino --precision fp32
  nnslim infer engines/liver imagesTs/ -o predictions/ --no-tta --skip roi+mask
  nnslim infer engines/liver big_ct.nii.gz -o seg.nii.gz --memory-cap-mb 1024
  nnslim infer artifacts/engines/tiny scan.nii.gz -o seg_torch.nii.gz --torch-checkpoint model.pt

\b
A folder of outputs also gets OUTPUT/run.json (run-part{K}.json for part K: version, engine,
settings, host, times, counts) and OUTPUT/.nnslim/CASE.nii.gz.json per case written (the engine that
wrote it); --continue segments a case again when its record names another engine or an output it
asks for (.npz, preview) is missing.
"""


# Every infer option, in the order --help shows them. A new option goes here and into
# `inference_options` (window settings) or `infer` (engine loading).
@click.command(epilog=EPILOG)
@click.argument("engine_dir", type=path_type(file_okay=False))
@click.argument("inputs", nargs=-1, required=True, type=path_type())
@click.option("-o", "--output", required=True, type=path_type(exists=False), help="Output file, or folder for a folder input.")
@click.option("--window", type=TableChoice(window_rules), default=None,
              help="Window rules: nnunet (nnU-Net v2's grid and Gaussian, step 0.5) or monai (MONAI's "
                   "SlidingWindowInferer: scan interval int(patch * (1 - overlap)), its Gaussian, step 0.75) "
                   "[default: the engine's; a MONAI bundle's engine records the bundle's settings].")
@click.option("--step", "step_fraction", default=None, type=click.FloatRange(0, 1, min_open=True),
              help="Window step as a fraction of the patch (1 - MONAI's overlap) [default: the window rules'].")
@click.option("--batch", "batch_size", default=None, type=click.IntRange(1), help="Tiles per call (default: engine max).")
@click.option("--tta/--no-tta", "mirror", default=None,
              help="Mirror test-time augmentation (8 passes for 3 axes) [default: on for imported nnU-Net "
                   "models, like nnU-Net; off for nnslim checkpoints].")
@click.option("--threads", default=0, show_default=True, type=click.IntRange(0), callback=checked(check_threads),
              help="CPU threads of the engine's runtime (0: all cores; at most 4 per core).")
@click.option("--skip", type=TableChoice(skip_modes), default="none", show_default=True,
              help="Skip windows (opt-in approximation): outside a body mask, and/or seed 003's ROI test "
                   "(a slab's centre window must predict --roi-threshold foreground voxels).")
@click.option("--roi-threshold", default=1000, show_default=True, type=click.IntRange(0))
@click.option("--blending", type=TableChoice(blending_modes), default=None,
              help="Tile weight where windows overlap: gaussian (sigma = patch/8, drawn by the window rules) or "
                   "constant (plain averaging, MONAI's mode='constant') [default: the window rules'].")
@click.option("--memory-cap-mb", type=click.FloatRange(min=1), default=None,
              help="Cap for the slab accumulators (fp16 above it; an error if a slab does not fit even then).")
@click.option("--backend", type=TableChoice(backends), default=None,
              help="Run the engine on this backend instead of the one its build chose (a choice the build "
                   "checked; the fp32 graph may run on any ONNX backend).")
@click.option("--precision", type=TableChoice(precisions), default=None,
              help="Run this precision of the engine instead of the one its build chose.")
@click.option("--num-parts", default="1", show_default=True, callback=part_number(1), metavar="N|auto",
              help="Folder mode: split the sorted cases into this many parts (one per machine or process). auto: "
                   "$SLURM_ARRAY_TASK_COUNT or $WORLD_SIZE.")
@click.option("--part-id", default="0", show_default=True, callback=part_number(0), metavar="K|auto",
              help="Folder mode: which part this run segments (0 .. --num-parts - 1), like nnUNetv2_predict. auto: "
                   "from the scheduler: $SLURM_ARRAY_TASK_ID, $JOB_COMPLETION_INDEX (Kubernetes Indexed Job) or "
                   "$RANK (torchrun). Each part writes its own run-part{K}.json and previews index; `nnslim report "
                   "OUTPUT` merges them.")
@click.option("--engine-sha256", default=None, metavar="HEX", callback=checked(check_sha256),
              help="Refuse the engine unless its manifest.json has this sha256 (pin it; `nnslim inspect` prints it).")
@click.option("--overwrite", is_flag=True,
              help="Folder mode: replace outputs that already exist (each is logged; a case that fails loses its "
                   "earlier output too).")
@click.option("--continue", "resume", is_flag=True,
              help="Folder mode: skip cases whose output already exists (outputs are written atomically), unless "
                   "its record names another engine or an output asked for (.npz, preview) is missing: those run "
                   "again (an output with no nnslim record is kept).")
@click.option("--device", type=TableChoice(devices), default="auto", show_default=True,
              help="auto: the GPU when the engine's backend can use one here (ONNX Runtime's CUDA execution "
                   "provider, or a TensorRT plan), else the CPU; each case's line names it (-v logs why). cuda: ONNX Runtime's CUDA "
                   "execution provider (TensorRT engines always use the GPU).")
@click.option("--ort-tensorrt", is_flag=True, help="With --device cuda: ONNX Runtime's TensorRT execution provider first.")
@click.option("--torch-checkpoint", type=path_type(), default=None,
              help="Run this PyTorch checkpoint (or nnU-Net model folder) instead of the engine, with the "
                   "engine's settings (parity checks).")
@click.option("--log-jsonl", type=path_type(exists=False, dir_okay=False), default=None, metavar="FILE",
              help="Append one JSON line per case to FILE as it finishes (fields above). Not an input or output.")
@click.option("--io-workers", default=1, show_default=True, type=click.IntRange(0, 8),
              help="Folder mode: read the next case and write finished ones in background threads while the "
                   "network runs (N writer threads; at most one case read ahead). 0: one step after another.")
@click.option("--save-probabilities", is_flag=True,
              help="Also write CASE.npz beside each label map: key 'probabilities', float16 [classes, *label map "
                   "shape], softmax in the label map's geometry (argmax = the labels). Not for region-based engines.")
@click.option("--probabilities-format", type=TableChoice(probabilities_formats), default="nnslim", show_default=True,
              help="With --save-probabilities: nnslim (float16 [K, X, Y, Z]) or nnunet (nnU-Net's float32 CASE.npz in "
                   "its axis order plus CASE.pkl, which nnUNetv2_ensemble and nnUNetv2_apply_postprocessing read).")
@click.option("--previous-stage", type=path_type(file_okay=False), default=None,
              help="A cascade engine's other input (nnU-Net's 3d_cascade_fullres): the folder of its previous stage's "
                   "segmentations, one per case under the case's output name (as nnU-Net's -prev_stage_predictions).")
@click.option("--preview", is_flag=True,
              help="Also draw a PNG per case (labels over the image): OUTPUT/previews/CASE.png and "
                   "OUTPUT/previews/index.html for a folder, OUTPUT_STEM.png beside a single output.")
@click.option("--ray", default=None, is_flag=False, flag_value="local", metavar="[ADDRESS]",
              help="Folder mode: run the cases on a Ray cluster (Ray Data; one engine per actor; the ray extra). "
                   "No ADDRESS: a local Ray started for the run; auto: $RAY_ADDRESS; or ray://head:10001. Workers "
                   "need the engine, inputs and output folder at the same paths.")
@click.option("--ray-actors", default=None, type=click.IntRange(1, 4096),
              help="With --ray: actors, each holding one engine and an equal share of the cluster's CPUs (or one "
                   "GPU for a GPU engine) [default: one per node, with all its cores].")
@progress_option
def infer(**o: Any) -> None:
    """Segment NIfTI volumes with an engine (tiled sliding window, nnU-Net numerics).

    INPUTS is one file (3D, or 4D with channels last), the channel files of one case
    (CASE_0000.nii.gz CASE_0001.nii.gz ...), or one folder of cases.

    \b
    --log-jsonl FILE appends one JSON object per case, flushed as the case finishes:
      case           the case name
      status         "ok", "failed", or "skipped" (--continue: its output existed)
      seconds        its read + compute + write time (overlapped I/O: its own stages)
      windows        {"grid", "evaluated", "skipped_by_mask", ...}: the WindowReport (null unless ok)
      tiles          network calls (windows evaluated x mirror passes)
      output         the label map's path
      probabilities  CASE.npz (--save-probabilities), else null
      preview        the PNG (--preview), else null
      error          why the case failed, else null
      started        when its read began (UTC, ISO 8601), finished: when it was reported
      engine_sha256  the engine's manifest sha256; nnslim_version, backend, device, part ([K, N])
    """
    from nnslim.compiler.runtime.cases.parts import resolve_part
    from nnslim.compiler.runtime.cases.plan import OptionConflict
    from nnslim.compiler.runtime.engine import load_engine
    from nnslim.compiler.runtime.cases.run import segment_files

    refuse_idle_options(click.get_current_context(), o)
    part = resolve_part(*_auto_together(click.get_current_context(), o))  # before the engine: fails at once
    engine = load_engine(o["engine_dir"], threads=o["threads"], device=o["device"], ort_tensorrt=o["ort_tensorrt"],
                         backend=o["backend"], precision=o["precision"], expected_sha256=o["engine_sha256"])
    checkpoint = o["torch_checkpoint"]
    predictor = None
    if checkpoint:
        from nnslim.compiler.stages.source import reference_predictor

        predictor = reference_predictor(engine, checkpoint)
    runner = f"PyTorch ({checkpoint})" if checkpoint else f"{engine.runtime.label} engine on {engine.device}"

    def report(r) -> None:  # each case's line as soon as it is done
        if r.error:
            click.echo(f"{r.name}: FAILED ({r.error}); no output written", err=True)
            return
        w = r.windows
        skipped = f", {w['skipped_by_mask'] + w['skipped_by_roi']} skipped" if o["skip"] != "none" else ""
        click.echo(f"{r.name}: {r.output} shape {r.shape}, {w['evaluated']} of {w['grid']} windows{skipped} "
                   f"({r.tiles} network calls), {r.seconds:.2f} s with {runner}")

    existing = "overwrite" if o["overwrite"] else "continue" if o["resume"] else "refuse"
    try:
        results = segment_files(engine, list(o["inputs"]), o["output"], inference_options(o), predictor=predictor,
                                existing=existing, on_case=report, part=part, batch=batch_options(o),
                                runner=_ray_runner(o, engine))
    except OptionConflict as exc:  # options that cannot do anything for these inputs: the command line must change
        raise click.UsageError(str(exc), ctx=click.get_current_context()) from exc
    failed = [r.name for r in results if r.error]
    if failed:
        click.echo(f"{len(failed)} of {len(results)} case(s) failed: {', '.join(failed)}", err=True)
        raise SystemExit(EXIT_SOME_CASES_FAILED)


# (option, when it does something, what to do): given on the command line without its condition, the
# option would be ignored without a word, so it is a usage error instead.
_TORCH = ("with --torch-checkpoint", "--torch-checkpoint runs PyTorch instead of the engine's runtime, which this "
          "option configures: drop one of them")
_IDLE_OPTIONS = (
    ("roi_threshold", lambda o: "roi" in o["skip"], ("without --skip roi or roi+mask", "it is the ROI test's "
     "threshold: add --skip roi (or roi+mask), or drop it")),
    ("ort_tensorrt", lambda o: o["device"] == "cuda", ("without --device cuda", "it puts ONNX Runtime's TensorRT "
     "provider first on the GPU: add --device cuda, or drop it")),
    *((name, lambda o: not o["torch_checkpoint"], _TORCH) for name in ("backend", "precision", "threads", "ort_tensorrt")),
    ("ray", lambda o: not o["torch_checkpoint"], ("with --torch-checkpoint", "--ray opens the engine on each Ray actor; "
     "the PyTorch reference runs here only: drop one of them")),
    ("ray_actors", lambda o: o["ray"] is not None, ("without --ray", "it is the number of Ray actors: add --ray, or "
     "drop it")),
    ("io_workers", lambda o: o["ray"] is None, ("with --ray", "each Ray actor reads, segments and writes its cases "
     "in turn: drop --io-workers")),
    ("probabilities_format", lambda o: o["save_probabilities"], ("without --save-probabilities", "it is the format of "
     "the probabilities: add --save-probabilities, or drop it")),
)


def _auto_together(ctx: click.Context, o: dict[str, Any]) -> tuple[Any, Any]:
    """--part-id auto with --num-parts left at its default (or the other way round) means both from
    the scheduler: a default of 1 part (or part 0) would make every array task segment the same cases."""
    from click.core import ParameterSource

    part_id, num_parts = o["part_id"], o["num_parts"]
    defaulted = {name: ctx.get_parameter_source(name) == ParameterSource.DEFAULT for name in ("part_id", "num_parts")}
    if part_id == "auto" and defaulted["num_parts"]:
        num_parts = "auto"
    if num_parts == "auto" and defaulted["part_id"]:
        part_id = "auto"
    return part_id, num_parts


def _ray_runner(o: dict[str, Any], engine: Any) -> Any:
    """With --ray: the runner that sends the folder's cases to Ray actors (`cases.ray_runner`)."""
    if o["ray"] is None:
        return None
    from pathlib import Path

    from nnslim.compiler.runtime.cases.ray_runner import RayRunner

    if o["ray"] not in ("local", "auto") and Path(o["ray"]).exists():  # `--ray ENGINE ...`: the address ate it
        raise click.UsageError(f"--ray took {o['ray']!r} as the cluster's address, but it is a path: write --ray "
                               "after the inputs, or give it a value (--ray local, --ray auto, --ray ray://head:10001)")

    return RayRunner(engine.directory, engine.opened_with or {}, engine.device, o["ray"], o["ray_actors"] or 0)


def refuse_idle_options(ctx: click.Context, o: dict[str, Any]) -> None:
    """Usage errors for options that contradict each other or would do nothing (`_IDLE_OPTIONS`;
    those that depend on the inputs being a folder are `plan.OptionConflict`, raised for the API too)."""
    from click.core import ParameterSource

    from nnslim.compiler.runtime.backends.choice import gpu_backends
    from nnslim.compiler.runtime.cases.plan import is_folder_input

    def given(name: str) -> bool:
        return ctx.get_parameter_source(name) in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)

    def shown(name: str) -> str:
        option = next(p for p in ctx.command.params if p.name == name)
        return option.opts[0] if getattr(option, "is_flag", False) else f"{option.opts[0]} {o[name]}"

    if o["overwrite"] and o["resume"]:
        raise click.UsageError("--overwrite and --continue contradict each other: --overwrite replaces the outputs "
                               "that exist, --continue keeps them and skips their cases; pass one", ctx=ctx)
    for name, works, (unless, advice) in _IDLE_OPTIONS:
        if given(name) and not works(o):
            raise click.UsageError(f"{shown(name)} does nothing {unless}: {advice}", ctx=ctx)
    if o["device"] == "cuda" and o["backend"] and o["backend"] not in gpu_backends():
        raise click.UsageError(f"--backend {o['backend']} runs on the CPU only, so --device cuda would be ignored; pass "
                               f"--device cpu, or a GPU backend ({', '.join(gpu_backends())})", ctx=ctx)
    if given("io_workers") and not is_folder_input(list(o["inputs"])):
        raise click.UsageError(f"{shown('io_workers')} overlaps the cases of a folder, but the input is one case; "
                               "drop --io-workers, or give the folder of cases", ctx=ctx)


def batch_options(o: dict[str, Any]):
    """What infer's parsed options write beside the label maps (`BatchOptions`)."""
    from nnslim.compiler.runtime.cases.batch import BatchOptions

    return BatchOptions(io_workers=o["io_workers"], save_probabilities=o["save_probabilities"],
                        probabilities_format=o["probabilities_format"], preview=o["preview"],
                        log_jsonl=o["log_jsonl"], previous_stage=o["previous_stage"])


def inference_options(o: dict[str, Any]):
    """The sliding-window settings of infer's parsed options."""
    from nnslim.compiler.runtime.segmentation import InferenceOptions

    return InferenceOptions(
        window=o["window"], step_fraction=o["step_fraction"], batch_size=o["batch_size"], mirror=o["mirror"],
        progress=o["progress"], skip=o["skip"], roi_threshold=o["roi_threshold"], memory_cap_mb=o["memory_cap_mb"],
        blending=o["blending"],
    )


@click.command(epilog="""\b
Examples:
  nnslim evaluate seg.nii.gz artifacts/data/mni-tissue/labelsTr/mni.nii.gz \\
      --mask artifacts/data/mni-tissue/holdout_mask.nii.gz --labels-from artifacts/engines/tiny
  nnslim evaluate seg_onnxruntime.nii.gz seg_torch.nii.gz --json artifacts/parity.json
""")
@click.argument("prediction", type=path_type(dir_okay=False))
@click.argument("reference", type=path_type(dir_okay=False))
@click.option("--mask", type=path_type(dir_okay=False), default=None, help="Evaluate only where this volume is nonzero.")
@click.option("--labels-from", type=path_type(file_okay=False), default=None, help="Engine directory whose label names to use.")
@click.option("--json", "json_out", type=path_type(exists=False, dir_okay=False), default=None, help="Also write the figures here.")
def evaluate(prediction, reference, mask, labels_from, json_out) -> None:
    """Dice per label and voxel agreement between two label volumes (any format infer writes:
    .nii.gz, .nii, .mha, .nrrd)."""
    from nnslim.files import write_json_atomic
    from nnslim.compiler.runtime.manifest import load_manifest
    from nnslim.compiler.runtime.metrics import evaluate_files
    from nnslim.compiler.runtime.safety import refuse_input_as_output
    from nnslim.errors import InputError

    if json_out:
        refuse_input_as_output(json_out, {"prediction": prediction, "reference": reference, "mask": mask}, "--json")
        if labels_from and labels_from.resolve() in json_out.resolve().parents:
            raise InputError(f"--json {json_out} is inside the engine directory {labels_from} (--labels-from); writing "
                             "it would change that engine. Give --json a path outside it")
    names = list(load_manifest(labels_from, verify=False).labels) if labels_from else None
    result = evaluate_files(prediction, reference, mask, names)
    where = f" inside {mask}" if mask else ""
    click.echo(f"{prediction} vs {reference}{where} ({result.voxels:,} voxels)")
    for name, score in result.dice.items():
        click.echo(f"  Dice {name:<16} {score:.4f}")
    click.echo(f"  mean Dice          {result.mean_dice:.4f}")
    click.echo(f"  voxel agreement    {result.agreement:.6f}")
    if json_out:
        write_json_atomic(json_out, result.to_dict())
