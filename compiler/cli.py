"""The `nnslim` command line. Each command parses its options into a config and calls one library
function; heavy imports happen inside the commands so `--help` is instant."""

from __future__ import annotations

import logging
from pathlib import Path

import click

# preset names without importing torch (kept in step with training.config.PRESETS by a test)
PRESET_NAMES = [
    "nnunet-3d-fullres", "faster-nnunet", "half-nnunet",
    "flare22-small", "faster-flare22-small", "half-flare22-small",
    "tiny", "tiny-faster",
    "partially-reversible-unet", "partially-reversible-unet-baseline",
    "rev-mbconv-unet", "rev-mbconv-unet-baseline",
]

EPILOG_MAIN = """\b
Examples:
  nnslim prepare-dataset mni-tissue artifacts/data/mni-tissue
  nnslim train --preset tiny --dataset mni-tissue --out artifacts/runs/tiny
  nnslim build-engine artifacts/models/mni-tissue-tiny.pt --out artifacts/engines/tiny
  nnslim infer artifacts/engines/tiny scan.nii.gz -o seg.nii.gz
  nnslim inspect artifacts/engines/tiny
"""


def _user_errors() -> tuple[type[BaseException], ...]:
    from nnslim.compiler.runtime.errors import NnslimError
    from nnslim.training.checkpoint import CheckpointError
    from nnslim.training.config import ConfigError
    from nnslim.training.data import DatasetError

    return (NnslimError, CheckpointError, ConfigError, DatasetError)


def _path(exists: bool = True, **kwargs) -> click.Path:
    return click.Path(exists=exists, path_type=Path, **kwargs)


class NnslimGroup(click.Group):
    """Turns library errors (bad input, stale engine, failed parity) into one message, exit 1."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except click.ClickException:
            raise
        except Exception as exc:
            if isinstance(exc, _user_errors()):
                raise click.ClickException(str(exc)) from exc
            raise


@click.group(cls=NnslimGroup, epilog=EPILOG_MAIN)
@click.option("-v", "--verbose", count=True, help="Log more (-v info, -vv debug).")
@click.version_option(package_name="nnslim")
def cli(verbose: int) -> None:
    """nnslim: compile 3D U-Nets into small, fast engines and segment volumes with them."""
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


def progress_option(f):
    return click.option("--progress/--no-progress", default=True, show_default=True, help="Show progress bars.")(f)


@cli.command("prepare-dataset", epilog="""\b
Example:
  nnslim prepare-dataset mni-tissue artifacts/data/mni-tissue
""")
@click.argument("name", type=click.Choice(["mni-tissue"]))
@click.argument("out_dir", type=_path(exists=False, file_okay=False))
def prepare_dataset(name: str, out_dir: Path) -> None:
    """Write a built-in dataset in nnU-Net's raw layout (imagesTr/, labelsTr/, dataset.json).

    mni-tissue also gets holdout_mask.nii.gz, the band held out from training, for `evaluate --mask`.
    """
    from nnslim.training.data import write_mni_tissue_raw

    out = write_mni_tissue_raw(out_dir)
    click.echo(f"wrote {out}/imagesTr/mni_0000.nii.gz, labelsTr/mni.nii.gz, holdout_mask.nii.gz, dataset.json")


def _list_options(*names: str) -> type[click.Command]:
    """A command class that reads `--opt 0 1 2` as `--opt 0 --opt 1 --opt 2` for the named options
    (values: integers, or "all" as nnU-Net names its fold), as users of nnU-Net type them."""

    class ListOptionsCommand(click.Command):
        def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
            expanded, current = [], None
            for arg in args:
                if current and (arg.isdigit() or arg == "all"):
                    expanded += [current, arg]
                    continue
                current = arg if arg in names else None
                if current is None:
                    expanded.append(arg)
            return super().parse_args(ctx, expanded)

    return ListOptionsCommand


@cli.command(cls=_list_options("--encoder-depths", "--decoder-depths"), epilog="""\b
Examples:
  nnslim train --preset tiny --dataset mni-tissue --out artifacts/runs/tiny
  nnslim train --preset tiny --dataset path/to/Dataset001_X --out runs/x --epochs 100
  nnslim train --preset tiny --dataset mni-tissue --out artifacts/runs/tiny --resume
  nnslim train --preset faster-nnunet --dataset path/to/Dataset001_X --out runs/faster
  nnslim train --preset partially-reversible-unet --dataset path/to/Dataset001_X --out runs/rev \\
      --encoder-depths 1 2 3 3 3 --patch 128 128 128
  torchrun --nproc_per_node 2 .venv/bin/nnslim train --preset tiny --dataset mni-tissue --out runs/ddp
""")
@click.option("--preset", required=True, type=click.Choice(PRESET_NAMES),
              help="Architecture preset (faster-*: FasterFusion units, half-*: halved widths).")
@click.option("--dataset", required=True, help="'mni-tissue' or an nnU-Net raw-layout folder.")
@click.option("--out", "out_dir", required=True, type=_path(exists=False, file_okay=False), help="Run folder.")
@click.option("--epochs", default=50, show_default=True, type=click.IntRange(1))
@click.option("--iterations-per-epoch", default=50, show_default=True, type=click.IntRange(1))
@click.option("--batch-size", default=2, show_default=True, type=click.IntRange(1))
@click.option("--patch", nargs=3, type=click.IntRange(1), default=None, help="Patch size (default: the preset's).")
@click.option("--lr", "learning_rate", default=0.01, show_default=True, type=click.FloatRange(min=0, min_open=True))
@click.option("--validate-every", default=5, show_default=True, type=click.IntRange(1), help="Epochs between validations.")
@click.option("--no-deep-supervision", is_flag=True, help="Train the full-resolution head only.")
@click.option("--fusion-threshold", type=click.IntRange(1), default=None,
              help="Use FasterFusion units in stages with at least this many channels (default: the preset's).")
@click.option("--memory", type=click.Choice(["reversible", "plain", "checkpoint"]), default=None,
              help="Reversible presets: train reversibly, with plain autograd, or with gradient checkpointing.")
@click.option("--encoder-depths", type=click.IntRange(1), multiple=True, metavar="N",
              help="Reversible presets: blocks per encoder level (repeat per level, e.g. --encoder-depths 1 2 3 3 3).")
@click.option("--decoder-depths", type=click.IntRange(1), multiple=True, metavar="N",
              help="Reversible presets: blocks per decoder level, lowest resolution first.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--resume", is_flag=True, help="Continue from OUT/checkpoint_latest.pt if present.")
@progress_option
def train(preset, dataset, out_dir, epochs, iterations_per_epoch, batch_size, patch, learning_rate,
          validate_every, no_deep_supervision, fusion_threshold, memory, encoder_depths, decoder_depths, seed, resume,
          progress) -> None:
    """Train a U-Net (Dice + CE, SGD Nesterov 0.99, poly LR); writes OUT/checkpoint_final.pt.

    Under torchrun (WORLD_SIZE > 1) it trains data-parallel (DistributedDataParallel; gloo on CPU,
    NCCL on GPU): --batch-size is the global batch, split over the processes; only rank 0 writes.
    """
    from tqdm import tqdm

    from nnslim.training.train import TrainConfig
    from nnslim.training.train import train as run_training

    config = TrainConfig(
        preset=preset, dataset=dataset, out_dir=str(out_dir), epochs=epochs,
        iterations_per_epoch=iterations_per_epoch, batch_size=batch_size,
        patch_size=tuple(patch) if patch else None, learning_rate=learning_rate,
        deep_supervision=not no_deep_supervision, validate_every=validate_every, fusion_threshold=fusion_threshold,
        memory=memory, encoder_depths=tuple(encoder_depths) or None, decoder_depths=tuple(decoder_depths) or None,
        seed=seed, resume=resume,
    )
    with tqdm(total=epochs * iterations_per_epoch, unit="it", disable=None if progress else True) as bar:
        def on_iteration(event: dict) -> None:
            bar.update(1)
            bar.set_postfix(epoch=event["epoch"], loss=f"{event['loss']:.3f}")

        result = run_training(config, on_iteration=on_iteration)
    click.echo(f"checkpoint: {result.checkpoint}")
    if result.final_validation_dice is not None:
        click.echo(f"validation mean Dice (held out): {result.final_validation_dice:.4f}")


@cli.command("build-engine", cls=_list_options("--folds"), epilog="""\b
Examples:
  nnslim build-engine artifacts/models/mni-tissue-tiny.pt --out artifacts/engines/tiny
  nnslim build-engine model.pt --out engines/m --patch 64 64 64 --batch 4 \\
      --parity-volume artifacts/data/mni-tissue/imagesTr/mni_0000.nii.gz
  nnslim build-engine artifacts/models/mni-tissue-tiny.pt --out artifacts/engines/tiny-fp16 --precision fp16
  nnslim build-engine artifacts/models/mni-tissue-tiny.pt --out artifacts/engines/tiny-p80 --prune-sparsity 0.8
  nnslim build-engine artifacts/models/mni-tissue-tiny.pt --out artifacts/engines/tiny-s25 \\
      --prune-structured 0.25 --finetune-steps 50
  nnslim build-engine nnUNet_results/Dataset003_Liver/nnUNetTrainer__nnUNetPlans__3d_fullres \\
      --out engines/liver --folds 0 1 2 3 4
""")
@click.argument("checkpoint", type=_path())
@click.option("--out", "out_dir", required=True, type=_path(exists=False, file_okay=False), help="Engine directory.")
@click.option("--patch", nargs=3, type=click.IntRange(1), default=None, help="Tile size (default: training patch).")
@click.option("--batch", "batch_size", default=2, show_default=True, type=click.IntRange(1), help="Tiles per call (max batch).")
@click.option("--backend", type=click.Choice(["auto", "onnxruntime", "tensorrt"]), default="auto", show_default=True)
@click.option("--parity-volume", type=_path(dir_okay=False), default=None,
              help="A real volume to cut parity tiles from (default: synthetic tiles).")
@click.option("--parity-tiles", default=4, show_default=True, type=click.IntRange(1))
@click.option("--precision", type=click.Choice(["fp32", "fp16"]), default="fp32", show_default=True,
              help="fp16: weights and activations in fp16, normalizations and I/O in fp32 (explicit Casts).")
@click.option("--parity-rtol", default=None, type=click.FloatRange(min=0),
              help="Max |logit error| vs PyTorch, relative to the largest logit [default: 1e-2 fp32, 5e-2 fp16].")
@click.option("--min-agreement", default=None, type=click.FloatRange(0, 1),
              help="Min argmax agreement vs PyTorch [default: 0.999 fp32, 0.995 fp16].")
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
              help="nnU-Net model folder: folds to ensemble (logits averaged), e.g. --folds 0 1 2 [default: 0].")
@click.option("--checkpoint-name", type=click.Choice(["checkpoint_final.pth", "checkpoint_best.pth"]),
              default="checkpoint_final.pth", show_default=True, help="nnU-Net model folder: which checkpoint of each fold.")
@click.option("--workspace-mb", default=4096, show_default=True, type=click.IntRange(16),
              help="TensorRT: workspace memory pool limit.")
@click.option("--trt-opt-level", default=3, show_default=True, type=click.IntRange(0, 5),
              help="TensorRT: builder optimization level (higher: longer build, maybe faster plan).")
@click.option("--trt-fp16-mode", type=click.Choice(["typed", "flag"]), default="typed", show_default=True,
              help="TensorRT fp16: the fp16 graph (strongly typed; the only way on TensorRT 11) or "
                   "TensorRT 10's FP16 builder flag on the fp32 graph.")
@click.option("--engine-cache", type=_path(file_okay=False), default=None,
              help="TensorRT plan cache [default: $NNSLIM_CACHE/tensorrt or ~/.cache/nnslim/tensorrt].")
@click.option("--timing-cache", type=_path(dir_okay=False), default=None,
              help="TensorRT timing cache file (read if present, updated after a build).")
def build_engine(checkpoint, out_dir, patch, batch_size, backend, parity_volume, parity_tiles, precision,
                 parity_rtol, min_agreement, no_pass_parity, prune_sparsity, prune_threshold, structured_ratio,
                 two_four, finetune_steps, finetune_dataset, folds, checkpoint_name, workspace_mb, trt_opt_level,
                 trt_fp16_mode, engine_cache, timing_cache) -> None:
    """Compile a checkpoint into an engine directory (ONNX model, manifest, report).

    CHECKPOINT is an nnslim checkpoint (.pt) or a trained nnU-Net v2 model folder
    (Trainer__Plans__Configuration with plans.json, dataset.json and fold_N/); nnU-Net
    checkpoints are read weights-only with an allow-list, never unpickled freely.

    Exits non-zero, writing nothing, when the engine disagrees with PyTorch beyond the tolerance.
    """
    from nnslim.compiler.build.parity import ParityTolerance
    from nnslim.compiler.build.pipeline import BuildConfig
    from nnslim.compiler.build.prune import PruneSettings
    from nnslim.compiler.build.pipeline import build_engine as run_build

    default = ParityTolerance.for_precision(precision)
    tolerance = ParityTolerance(
        default.max_rel_logit_error if parity_rtol is None else parity_rtol,
        default.min_argmax_agreement if min_agreement is None else min_agreement,
    )
    if prune_sparsity is not None and prune_threshold is not None:
        raise click.UsageError("--prune-sparsity and --prune-threshold are alternatives; give one")
    if finetune_steps and structured_ratio is None:
        raise click.UsageError("--finetune-steps needs --prune-structured")
    prune = PruneSettings(
        sparsity=prune_sparsity, threshold=prune_threshold, structured_ratio=structured_ratio, two_four=two_four,
        finetune_steps=finetune_steps, finetune_dataset=finetune_dataset,
    )
    config = BuildConfig(
        checkpoint=checkpoint, out_dir=out_dir, patch_size=tuple(patch) if patch else None, batch_size=batch_size,
        backend=backend, parity_volume=parity_volume, parity_tiles=parity_tiles, precision=precision,
        tolerance=tolerance, pass_parity=not no_pass_parity, prune=prune,
        folds=_fold_names(folds), nnunet_checkpoint=checkpoint_name, trt_workspace_mb=workspace_mb,
        trt_optimization_level=trt_opt_level, trt_fp16_mode=trt_fp16_mode, engine_cache=engine_cache,
        timing_cache=timing_cache,
    )
    result = run_build(config)
    p, m = result.parity, result.manifest["model"]
    click.echo(f"engine: {result.out_dir} (backend {result.manifest['backend']})")
    r = m["reparameterization"]
    click.echo(
        f"reparameterized: {r['faster_fusion_blocks_fused']} FasterFusion blocks fused, {r['batchnorms_folded']} "
        f"BatchNorms folded; parameters {r['parameters_before']:,} -> {r['parameters_after']:,}"
    )
    if m["pruning"]:
        pr = m["pruning"]
        line = f"pruned: conv weight sparsity {pr['global_sparsity']:.1%}"
        if "structured" in pr:
            st = pr["structured"]
            line += f"; structured: parameters {st['parameters_before']:,} -> {st['parameters_after']:,}"
        click.echo(line + f"; model.opt.onnx {m['runtime_model_size']['bytes']:,} B, "
                   f"{m['runtime_model_size']['compressed_bytes']:,} B compressed")
    click.echo(f"conv MACs per patch {m['macs_per_patch'] / 1e9:.2f} G")
    passes = next(st for st in result.manifest["stages"] if st["name"] == "passes")
    for record in passes["results"]:
        figures = "" if record["max_abs_error"] is None else (
            f"  (vs export: max |error| {record['max_abs_error']:.2e}, agreement {record['argmax_agreement']:.6f})")
        click.echo(f"  {record['name']:<32} {record['changed']:>4} change(s){figures}")
    click.echo(
        f"parity vs PyTorch on {p.tiles} tiles ({result.manifest['precision']}): max |logit error| "
        f"{p.max_abs_logit_error:.2e} ({p.max_rel_logit_error:.1e} of the largest logit), "
        f"argmax agreement {p.argmax_agreement:.6f}"
    )


@cli.command(epilog="""\b
Examples:
  nnslim infer artifacts/engines/tiny scan.nii.gz -o seg.nii.gz
  nnslim infer artifacts/engines/tiny scans/ -o segs/ --tta
  nnslim infer engines/liver imagesTs/ -o predictions/ --no-tta --skip roi+mask
  nnslim infer engines/liver big_ct.nii.gz -o seg.nii.gz --memory-cap-mb 1024
  nnslim infer artifacts/engines/tiny scan.nii.gz -o seg_torch.nii.gz --torch-checkpoint model.pt
""")
@click.argument("engine_dir", type=_path(file_okay=False))
@click.argument("inputs", nargs=-1, required=True, type=_path())
@click.option("-o", "--output", required=True, type=_path(exists=False), help="Output file, or folder for a folder input.")
@click.option("--step", "step_fraction", default=0.5, show_default=True, type=click.FloatRange(0, 1, min_open=True),
              help="Window step as a fraction of the patch.")
@click.option("--batch", "batch_size", default=None, type=click.IntRange(1), help="Tiles per call (default: engine max).")
@click.option("--tta/--no-tta", "mirror", default=None,
              help="Mirror test-time augmentation (8 passes for 3 axes) [default: on for imported nnU-Net "
                   "models, like nnU-Net; off for nnslim checkpoints].")
@click.option("--threads", default=0, show_default=True, type=click.IntRange(0), help="ONNX Runtime threads (0: all cores).")
@click.option("--skip", type=click.Choice(["none", "mask", "roi", "roi+mask"]), default="none", show_default=True,
              help="Skip windows (opt-in approximation): outside a body mask, and/or seed 003's ROI test "
                   "(a slab's centre window must predict --roi-threshold foreground voxels).")
@click.option("--roi-threshold", default=1000, show_default=True, type=click.IntRange(0))
@click.option("--memory-cap-mb", type=click.FloatRange(min=1), default=None,
              help="Cap for the slab accumulators (fp16 above it; an error if a slab does not fit even then).")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="ONNX Runtime engines: CPU, or the CUDA execution provider (TensorRT engines always use the GPU).")
@click.option("--ort-tensorrt", is_flag=True, help="With --device cuda: ONNX Runtime's TensorRT execution provider first.")
@click.option("--torch-checkpoint", type=_path(), default=None,
              help="Run this PyTorch checkpoint (or nnU-Net model folder) instead of the engine, with the "
                   "engine's settings (parity checks).")
@progress_option
def infer(engine_dir, inputs, output, step_fraction, batch_size, mirror, threads, skip, roi_threshold, memory_cap_mb,
          device, ort_tensorrt, torch_checkpoint, progress) -> None:
    """Segment NIfTI volumes with an engine (tiled sliding window, nnU-Net numerics).

    INPUTS is one file (3D, or 4D with channels last), the channel files of one case
    (CASE_0000.nii.gz CASE_0001.nii.gz ...), or one folder of cases.
    """
    from nnslim.compiler.runtime.engine import InferenceOptions, load_engine, segment_files

    engine = load_engine(engine_dir, threads=threads, device=device, ort_tensorrt=ort_tensorrt)
    predictor = None
    if torch_checkpoint:
        from nnslim.compiler.runtime.predictors import TorchPredictor

        if Path(torch_checkpoint).is_dir():  # the nnU-Net model folder the engine was built from
            from nnslim.compiler.build.nnunet_import import read_model_folder

            source = engine.manifest["source"]
            network = read_model_folder(torch_checkpoint, tuple(source.get("folds") or ("0",)),
                                        source.get("checkpoint_name", "checkpoint_final.pth")).network()
        else:
            from nnslim.training.checkpoint import load_model

            network = load_model(torch_checkpoint)[0]
        predictor = TorchPredictor(network, device=engine.predictor.device)
    options = InferenceOptions(step_fraction=step_fraction, batch_size=batch_size, mirror=mirror, progress=progress,
                               skip=skip, roi_threshold=roi_threshold, memory_cap_mb=memory_cap_mb)
    results = segment_files(engine, list(inputs), output, options, predictor=predictor)
    runner = f"PyTorch ({torch_checkpoint})" if torch_checkpoint else f"{engine.manifest['backend']} engine"
    for r in results:
        w = r.windows
        skipped = f", {w['skipped_by_mask'] + w['skipped_by_roi']} skipped" if skip != "none" else ""
        click.echo(f"{r.name}: {r.output} shape {r.shape}, {w['evaluated']} of {w['grid']} windows{skipped} "
                   f"({r.tiles} network calls), {r.seconds:.2f} s with {runner}")


@cli.command(epilog="""\b
Examples:
  nnslim evaluate seg.nii.gz artifacts/data/mni-tissue/labelsTr/mni.nii.gz \\
      --mask artifacts/data/mni-tissue/holdout_mask.nii.gz --labels-from artifacts/engines/tiny
  nnslim evaluate seg_onnxruntime.nii.gz seg_torch.nii.gz --json artifacts/parity.json
""")
@click.argument("prediction", type=_path(dir_okay=False))
@click.argument("reference", type=_path(dir_okay=False))
@click.option("--mask", type=_path(dir_okay=False), default=None, help="Evaluate only where this volume is nonzero.")
@click.option("--labels-from", type=_path(file_okay=False), default=None, help="Engine directory whose label names to use.")
@click.option("--json", "json_out", type=_path(exists=False, dir_okay=False), default=None, help="Also write the figures here.")
def evaluate(prediction, reference, mask, labels_from, json_out) -> None:
    """Dice per label and voxel agreement between two label volumes."""
    from nnslim.compiler.runtime.files import write_json_atomic
    from nnslim.compiler.runtime.manifest import read_manifest
    from nnslim.compiler.runtime.metrics import evaluate_files

    names = read_manifest(labels_from, verify=False)["labels"] if labels_from else None
    result = evaluate_files(prediction, reference, mask, names)
    where = f" inside {mask}" if mask else ""
    click.echo(f"{prediction} vs {reference}{where} ({result.voxels:,} voxels)")
    for name, score in result.dice.items():
        click.echo(f"  Dice {name:<16} {score:.4f}")
    click.echo(f"  mean Dice          {result.mean_dice:.4f}")
    click.echo(f"  voxel agreement    {result.agreement:.6f}")
    if json_out:
        write_json_atomic(json_out, result.to_dict())


@cli.command("pseudo-label", epilog="""\b
Examples:
  nnslim pseudo-label Dataset022_FLARE22 unlabeled_images/ --out runs/pl \\
      --teacher-preset nnunet-3d-fullres --student-preset flare22-small --rounds 3 --threshold 0.1
  nnslim pseudo-label data/tiny unlabeled/ --out runs/pl-tiny --teacher-preset tiny --student-preset tiny \\
      --teacher-epochs 2 --student-epochs 2 --iterations-per-epoch 10 --patch 32 32 32
""")
@click.argument("labeled", type=_path(file_okay=False))
@click.argument("unlabeled", type=_path(file_okay=False))
@click.option("--out", "out_dir", required=True, type=_path(exists=False, file_okay=False))
@click.option("--teacher-preset", type=click.Choice(PRESET_NAMES), default="nnunet-3d-fullres", show_default=True)
@click.option("--student-preset", type=click.Choice(PRESET_NAMES), default="flare22-small", show_default=True)
@click.option("--rounds", default=3, show_default=True, type=click.IntRange(2), help="Teacher rounds K (eq. 1 needs >= 2).")
@click.option("--threshold", default=0.1, show_default=True, type=click.FloatRange(min=0),
              help="Keep scans whose uncertainty (seed 003 eq. 1) is below this.")
@click.option("--teacher-epochs", default=50, show_default=True, type=click.IntRange(1))
@click.option("--student-epochs", default=50, show_default=True, type=click.IntRange(1))
@click.option("--iterations-per-epoch", default=50, show_default=True, type=click.IntRange(1))
@click.option("--patch", nargs=3, type=click.IntRange(1), default=None, help="Training patch (default: the presets').")
@click.option("--seed", default=0, show_default=True, type=int)
def pseudo_label(labeled, unlabeled, out_dir, teacher_preset, student_preset, rounds, threshold, teacher_epochs,
                 student_epochs, iterations_per_epoch, patch, seed) -> None:
    """Iterative pseudo labeling (seed 003): a teacher labels UNLABELED scans over several rounds,
    stable scans (uncertainty below --threshold) join LABELED (nnU-Net raw layout) to train the student."""
    from nnslim.compiler.workflows.pseudo_labeling import PseudoLabelConfig, run_pseudo_labeling

    record = run_pseudo_labeling(PseudoLabelConfig(
        labeled=labeled, unlabeled=unlabeled, out_dir=out_dir, teacher_preset=teacher_preset,
        student_preset=student_preset, rounds=rounds, threshold=threshold, teacher_epochs=teacher_epochs,
        student_epochs=student_epochs, iterations_per_epoch=iterations_per_epoch,
        patch_size=tuple(patch) if patch else None, seed=seed,
    ))
    for name, u in sorted(record["uncertainty"].items()):
        click.echo(f"  {name:<24} u = {'inf' if u is None else f'{u:.4f}'}  {'kept' if name in record['selected'] else 'rejected'}")
    click.echo(f"{len(record['selected'])} of {len(record['uncertainty'])} scans kept; student: {record['student']}")


@cli.command(epilog="""\b
Examples:
  nnslim bench artifacts/models/mni-tissue-tiny.pt artifacts/data/mni-tissue/imagesTr/mni_0000.nii.gz \\
      --out artifacts/bench/headline/mni-tissue-tiny --patch 96 96 96
  nnslim bench model.pt scan.nii.gz --out bench/ --batch 4 --repeats 5 --prune-sparsity 0.8
""")
@click.argument("checkpoint", type=_path(dir_okay=False))
@click.argument("volume", type=_path(dir_okay=False))
@click.option("--out", "out_dir", required=True, type=_path(exists=False, file_okay=False))
@click.option("--patch", nargs=3, type=click.IntRange(1), default=None, help="Tile size (default: training patch).")
@click.option("--batch", "batch_size", default=4, show_default=True, type=click.IntRange(1))
@click.option("--repeats", default=3, show_default=True, type=click.IntRange(1), help="Runs per row (median).")
@click.option("--prune-sparsity", default=0.5, show_default=True, type=click.FloatRange(0, 1, max_open=True))
@click.option("--structured-ratio", default=0.25, show_default=True, type=click.FloatRange(0, 1, max_open=True))
@click.option("--skip", type=click.Choice(["mask", "roi", "roi+mask"]), default="mask", show_default=True)
def bench(checkpoint, out_dir, volume, patch, batch_size, repeats, prune_sparsity, structured_ratio, skip) -> None:
    """The usual way (PyTorch eager, batch 1) against nnslim stage by stage on one volume, in one run:
    seconds, speed-up, MACs and GFLOP/s against the machine's convolution peak, sizes, memory, and
    agreement; writes OUT/report.md, plots and bench.json."""
    from nnslim.compiler.workflows.bench import BenchConfig, run_bench

    result = run_bench(BenchConfig(
        checkpoint=checkpoint, volume=volume, out_dir=out_dir, patch_size=tuple(patch) if patch else None,
        batch_size=batch_size, repeats=repeats, prune_sparsity=prune_sparsity, structured_ratio=structured_ratio,
        skip=skip,
    ), log=lambda m: click.echo(m, err=True))
    click.echo((Path(out_dir) / "report.md").read_text())
    click.echo(f"written {out_dir}/report.md, bench.json and plots ({len(result['rows'])} rows)")


@cli.command("export-triton", epilog="""\b
Examples:
  nnslim export-triton artifacts/engines/tiny model_repository
  nnslim export-triton engines/liver /models --name liver_ct --instances 2
""")
@click.argument("engine_dir", type=_path(file_okay=False))
@click.argument("repository", type=_path(exists=False, file_okay=False))
@click.option("--name", default=None, help="Model name in the repository [default: the engine directory's name].")
@click.option("--instances", default=1, show_default=True, type=click.IntRange(1), help="Model instances per GPU.")
@click.option("--kind", type=click.Choice(["KIND_GPU", "KIND_CPU"]), default="KIND_GPU", show_default=True)
def export_triton(engine_dir, repository, name, instances, kind) -> None:
    """Write a Triton Inference Server model repository entry (config.pbtxt with dynamic batching,
    and the plan or ONNX model) from an engine directory."""
    from nnslim.compiler.deploy.triton import export_triton as run_export

    target = run_export(engine_dir, repository, name, instances, kind)
    click.echo(f"Triton model written to {target} (config.pbtxt, 1/{next((target / '1').iterdir()).name})")


def _fold_names(folds: tuple[str, ...]) -> tuple[str, ...]:
    """Fold names from repeated --folds (see `_FoldsCommand`), also accepting "0,1,2"."""
    names = [f for group in folds for f in group.replace(",", " ").split()]
    return tuple(names) or ("0",)


def _floats(ctx, param, value):
    if value is None:
        return None
    try:
        return tuple(float(v) for v in value.split(","))
    except ValueError:
        raise click.BadParameter(f"expected comma-separated numbers, got {value!r}") from None


@cli.command("prune-sweep", epilog="""\b
Examples:
  nnslim prune-sweep artifacts/models/mni-tissue-tiny.pt \\
      --volume artifacts/data/mni-tissue/imagesTr/mni_0000.nii.gz \\
      --labels artifacts/data/mni-tissue/labelsTr/mni.nii.gz --out artifacts/prune-sweep/tiny
  nnslim prune-sweep model.pt --volume scan.nii.gz --thresholds 0.01,0.02,0.05 --out artifacts/sweep
""")
@click.argument("checkpoint", type=_path(dir_okay=False))
@click.option("--volume", required=True, type=_path(dir_okay=False), help="Volume to segment at every level.")
@click.option("--labels", type=_path(dir_okay=False), default=None, help="Reference labels, for true Dice.")
@click.option("--mask", type=_path(dir_okay=False), default=None, help="Score only where this volume is nonzero.")
@click.option("--sparsities", callback=_floats, default=None,
              help="Comma-separated target sparsities [default: 0,0.5,0.7,0.8,0.85,0.9,0.95].")
@click.option("--thresholds", callback=_floats, default=None, help="Comma-separated magnitude thresholds instead.")
@click.option("--min-proxy-dice", default=0.95, show_default=True, type=click.FloatRange(0, 1))
@click.option("--out", "out_dir", required=True, type=_path(exists=False, file_okay=False), help="Writes sweep.json, sweep.png.")
@progress_option
def prune_sweep(checkpoint, volume, labels, mask, sparsities, thresholds, min_proxy_dice, out_dir, progress) -> None:
    """Global magnitude pruning at several levels without retraining (seed 001): proxy Dice of
    pruned vs unpruned segmentations, true Dice, and the largest sparsity at proxy Dice >= 0.95."""
    from nnslim.compiler.workflows.prune_sweep import DEFAULT_SPARSITIES, SweepConfig, run_sweep

    if sparsities is not None and thresholds is not None:
        raise click.UsageError("--sparsities and --thresholds are alternatives; give one")
    config = SweepConfig(
        checkpoint=checkpoint, volume=volume, labels=labels, mask=mask, out_dir=out_dir,
        sparsities=None if thresholds is not None else (sparsities or DEFAULT_SPARSITIES),
        thresholds=thresholds, min_proxy_dice=min_proxy_dice, progress=progress,
    )
    result = run_sweep(config)
    click.echo(f"{'sparsity':>9} {'threshold':>10} {'proxy Dice':>11}" + (f" {'true Dice':>10}" if labels else ""))
    for row in result["levels"]:
        line = f"{row['sparsity']:>9.3f} {row['threshold']:>10.3g} {row['proxy_mean_dice']:>11.4f}"
        click.echo(line + (f" {row['true_mean_dice']:>10.4f}" if labels else ""))
    best = result["largest_sparsity_at_min_proxy_dice"]
    click.echo(f"largest sparsity at proxy Dice >= {min_proxy_dice}: " + (f"{best:.1%}" if best is not None else "none"))
    if result["best_level"]:
        click.echo("sparsity by region: " + ", ".join(
            f"{k} {v:.1%}" for k, v in result["best_level"]["region_sparsity"].items()))
        click.echo(f"{'layer':<36} {'region':<10} {'weights':>9} {'sparsity':>9} {'mean |w|':>9}")
        for layer in result["layers_at_best_level"]:
            click.echo(f"{layer['name']:<36} {layer['region']:<10} {layer['parameters']:>9,} "
                       f"{layer['sparsity']:>9.1%} {layer['mean_abs_unpruned']:>9.4f}")
    click.echo(f"written: {out_dir / 'sweep.json'}, {out_dir / 'sweep.png'}")


@cli.command(epilog="""\b
Examples:
  nnslim inspect artifacts/engines/mni-tissue-tiny
  nnslim inspect artifacts/engines/mni-tissue-tiny/model.onnx
""")
@click.argument("target", type=_path())
def inspect(target) -> None:
    """Op histogram, parameters, MACs, dtypes, sparsity and TensorRT compatibility of an ONNX model
    or an engine directory (plus its manifest summary)."""
    from nnslim.compiler.build.inspect_model import format_summary, inspect_path

    click.echo(format_summary(inspect_path(target)))


def main() -> None:
    """Console entry point."""
    cli(prog_name="nnslim")


if __name__ == "__main__":
    main()
