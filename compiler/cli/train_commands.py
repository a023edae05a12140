"""Commands that make training data and train networks: prepare-dataset, train, pseudo-label."""

from __future__ import annotations

from pathlib import Path

import click

from nnslim.compiler.cli.options import (
    PRESET_NAMES, list_options_command, out_dir_option, patch_option, patch_tuple, path_type, progress_option,
)


@click.command("prepare-dataset", epilog="""\b
Example:
  nnslim prepare-dataset mni-tissue artifacts/data/mni-tissue
""")
@click.argument("name", type=click.Choice(["mni-tissue"]))
@click.argument("out_dir", type=path_type(exists=False, file_okay=False))
def prepare_dataset(name: str, out_dir: Path) -> None:
    """Write a built-in dataset in nnU-Net's raw layout (imagesTr/, labelsTr/, dataset.json).

    mni-tissue also gets holdout_mask.nii.gz, the band held out from training, for `evaluate --mask`.
    """
    from nnslim.training.data import write_mni_tissue_raw

    out = write_mni_tissue_raw(out_dir)
    click.echo(f"wrote {out}/imagesTr/mni_0000.nii.gz, labelsTr/mni.nii.gz, holdout_mask.nii.gz, dataset.json")


@click.command(cls=list_options_command("--encoder-depths", "--decoder-depths"), epilog="""\b
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
@out_dir_option("Run folder.")
@click.option("--epochs", default=50, show_default=True, type=click.IntRange(1))
@click.option("--iterations-per-epoch", default=50, show_default=True, type=click.IntRange(1))
@click.option("--batch-size", default=2, show_default=True, type=click.IntRange(1))
@patch_option("Patch size (default: the preset's).")
@click.option("--lr", "learning_rate", default=0.01, show_default=True, type=click.FloatRange(min=0, min_open=True))
@click.option("--validate-every", default=5, show_default=True, type=click.IntRange(1), help="Epochs between validations.")
@click.option("--no-deep-supervision", is_flag=True, help="Train the full-resolution head only.")
@click.option("--fusion-threshold", type=click.IntRange(1), default=None,
              help="Use FasterFusion units in stages with at least this many channels (default: the preset's).")
@click.option("--memory", type=click.Choice(["reversible", "plain", "checkpoint"]), default=None,
              help="Reversible presets: train reversibly, with plain autograd, or with gradient checkpointing.")
@click.option("--encoder-depths", type=click.IntRange(1), multiple=True, metavar="N",
              help="Reversible presets: blocks per encoder level (e.g. --encoder-depths 1 2 3 3 3, or 1,2,3,3,3).")
@click.option("--decoder-depths", type=click.IntRange(1), multiple=True, metavar="N",
              help="Reversible presets: blocks per decoder level, lowest resolution first.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--resume", is_flag=True, help="Continue from OUT/checkpoint_latest.pt if present.")
@click.option("--channels-last/--no-channels-last", default=True, show_default=True,
              help="Channels-last 3D memory layout (faster convolutions on CPU; same arithmetic).")
@progress_option
def train(preset, dataset, out_dir, epochs, iterations_per_epoch, batch_size, patch, learning_rate,
          validate_every, no_deep_supervision, fusion_threshold, memory, encoder_depths, decoder_depths, seed, resume,
          channels_last, progress) -> None:
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
        patch_size=patch_tuple(patch), learning_rate=learning_rate,
        deep_supervision=not no_deep_supervision, validate_every=validate_every, fusion_threshold=fusion_threshold,
        memory=memory, encoder_depths=tuple(encoder_depths) or None, decoder_depths=tuple(decoder_depths) or None,
        seed=seed, resume=resume, channels_last=channels_last,
    )
    with tqdm(total=epochs * iterations_per_epoch, unit="it", disable=None if progress else True) as bar:
        def on_iteration(event: dict) -> None:
            bar.update(1)
            bar.set_postfix(epoch=event["epoch"], loss=f"{event['loss']:.3f}")

        result = run_training(config, on_iteration=on_iteration)
    click.echo(f"checkpoint: {result.checkpoint}")
    if result.final_validation_dice is not None:
        click.echo(f"validation mean Dice (held out): {result.final_validation_dice:.4f}")


@click.command("pseudo-label", epilog="""\b
Examples:
  nnslim pseudo-label nnUNet_raw/Dataset022_FLARE22 unlabeled_images/ --out runs/pl \\
      --teacher-preset nnunet-3d-fullres --student-preset flare22-small --rounds 3 --threshold 0.1
  nnslim pseudo-label data/tiny unlabeled/ --out runs/pl-tiny --teacher-preset tiny --student-preset tiny \\
      --teacher-epochs 2 --student-epochs 2 --iterations-per-epoch 10 --patch 32 32 32
""")
@click.argument("labeled", type=path_type(file_okay=False))
@click.argument("unlabeled", type=path_type(file_okay=False))
@out_dir_option()
@click.option("--teacher-preset", type=click.Choice(PRESET_NAMES), default="nnunet-3d-fullres", show_default=True)
@click.option("--student-preset", type=click.Choice(PRESET_NAMES), default="flare22-small", show_default=True)
@click.option("--rounds", default=3, show_default=True, type=click.IntRange(2), help="Teacher rounds K (eq. 1 needs >= 2).")
@click.option("--threshold", default=0.1, show_default=True, type=click.FloatRange(min=0),
              help="Keep scans whose uncertainty (seed 003 eq. 1) is below this.")
@click.option("--teacher-epochs", default=50, show_default=True, type=click.IntRange(1))
@click.option("--student-epochs", default=50, show_default=True, type=click.IntRange(1))
@click.option("--iterations-per-epoch", default=50, show_default=True, type=click.IntRange(1))
@patch_option("Training patch (default: the presets').")
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
        patch_size=patch_tuple(patch), seed=seed,
    ))
    for name, u in sorted(record["uncertainty"].items()):
        click.echo(f"  {name:<24} u = {'inf' if u is None else f'{u:.4f}'}  {'kept' if name in record['selected'] else 'rejected'}")
    click.echo(f"{len(record['selected'])} of {len(record['uncertainty'])} scans kept; student: {record['student']}")
