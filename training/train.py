"""The training loop: nnU-Net's recipe (Dice + CE, SGD Nesterov 0.99, poly LR), resumable.

Determinism: the network is initialised from `seed`, and the batch of iteration `i` of epoch `e`
is drawn from `numpy.random.default_rng([seed, e, i])`, so a resumed run sees the same batches
as an uninterrupted one.

Data parallel: under torchrun (WORLD_SIZE > 1) every process draws and augments the same global
batch and trains on its contiguous share of it in DistributedDataParallel (gloo on CPU, NCCL on
GPU); the batch Dice sums its statistics over processes, so the run takes the same steps as one
process on the whole batch. Only rank 0 validates and writes checkpoints and logs.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from nnslim.training.checkpoint import build_model, network_for, read_checkpoint, save_checkpoint
from nnslim.training.config import ConfigError
from nnslim.compiler.runtime.backends.torch_module import TorchPredictor
from nnslim.compiler.runtime.metrics import dice_scores
from nnslim.compiler.runtime.window.blending import Blending
from nnslim.compiler.runtime.window.config import SlidingWindowConfig
from nnslim.compiler.runtime.window.arrays import to_numpy
from nnslim.compiler.runtime.window.walk import sliding_window_inference
from nnslim.files import write_text_atomic
from nnslim.training.data import Case, Dataset, PatchSampler, augment, load_dataset
from nnslim.training.losses import deep_supervision_loss, dice_ce_loss
from nnslim.training.presets import get_preset
from nnslim.parameters import count_parameters
from nnslim.training.unet import UNet

logger = logging.getLogger(__name__)

LATEST = "checkpoint_latest.pt"
FINAL = "checkpoint_final.pt"


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run needs; defaults are nnU-Net's where nnU-Net has one."""

    preset: str
    dataset: str
    out_dir: str
    epochs: int = 50
    iterations_per_epoch: int = 50
    batch_size: int = 2
    patch_size: tuple[int, int, int] | None = None  # None: the preset's
    learning_rate: float = 0.01
    momentum: float = 0.99
    weight_decay: float = 3e-5
    poly_exponent: float = 0.9
    deep_supervision: bool = True
    oversample_foreground: float = 0.33
    validate_every: int = 5
    fusion_threshold: int | None = None  # None: the preset's FasterFusion channel threshold
    memory: str | None = None  # reversible presets: "reversible", "plain" or "checkpoint" (None: the preset's)
    encoder_depths: tuple[int, ...] | None = None  # reversible presets: blocks per level (None: the preset's)
    decoder_depths: tuple[int, ...] | None = None
    seed: int = 0
    resume: bool = False
    # channels-last 3D tensors: 3.0 s against 3.8 s per tiny 96^3 iteration (batch 2) on this
    # project's Zen 3 CPU; bf16 autocast was over 3x slower there (no native bf16), so it is not offered
    channels_last: bool = True


@dataclass
class TrainResult:
    checkpoint: Path
    history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def final_validation_dice(self) -> float | None:
        scores = [h["val_mean_dice"] for h in self.history if "val_mean_dice" in h]
        return scores[-1] if scores else None


def poly_lr(initial: float, epoch: int, max_epochs: int, exponent: float) -> float:
    return initial * (1 - epoch / max_epochs) ** exponent


@dataclass
class _Run:
    """A training run's live state, shared by the per-epoch steps."""

    config: TrainConfig
    dataset: Dataset
    patch: tuple[int, int, int]
    model: nn.Module  # the network itself (checkpoints, validation)
    network: nn.Module  # what the forward pass calls: the model, or its DistributedDataParallel wrapper
    optimizer: torch.optim.SGD
    share: slice  # this process's part of the global batch
    device: torch.device
    history: list[dict[str, Any]]
    started: float = field(default_factory=time.perf_counter)

    def metadata(self) -> dict[str, Any]:
        return _metadata(self.config, self.dataset, self.patch, self.history, time.perf_counter() - self.started)


def train(
    config: TrainConfig,
    dataset: Dataset | None = None,
    on_iteration: Callable[[dict[str, Any]], None] | None = None,
) -> TrainResult:
    """Train a U-Net and write `checkpoint_latest.pt` (each epoch) and `checkpoint_final.pt`.

    Args:
        config: the run's settings.
        dataset: an already loaded dataset (otherwise `config.dataset` is loaded).
        on_iteration: called after each iteration with epoch, iteration and loss (progress bars).
    """
    out = Path(config.out_dir)
    preset = get_preset(config.preset)
    dataset = dataset or load_dataset(config.dataset)
    arch, patch = _architecture(config, preset, dataset)
    rank, world, device, created_group = _distributed()
    if config.batch_size % world:
        raise ConfigError(f"--batch-size {config.batch_size} is the global batch; it must divide over {world} processes")
    share = slice(rank * config.batch_size // world, (rank + 1) * config.batch_size // world)
    model, optimizer_state, start_epoch, history = _initial_state(config, arch, out)
    model.to(device)
    if config.channels_last:
        model.to(memory_format=torch.channels_last_3d)
    run = _Run(config, dataset, patch, model, _parallel(model, arch, world, device),
               _optimizer(model, config, optimizer_state), share, device, history)
    logger.info("training %s (%d parameters) on %s, patch %s, %d process(es) on %s",
                arch.preset, count_parameters(model), dataset.name, patch, world, device)
    sampler = PatchSampler(dataset.train, patch, config.oversample_foreground)
    for epoch in range(start_epoch, config.epochs):
        record = _train_epoch(run, sampler, epoch, on_iteration)
        if rank == 0:  # rank 0 validates and writes
            _close_epoch(run, record, out)
    if rank == 0:
        model = model.cpu().to(memory_format=torch.contiguous_format)
        save_checkpoint(out / FINAL, _without_deep_supervision(model), run.metadata())
        write_text_atomic(out / "history.json", json.dumps(history, indent=2))
    if world > 1:
        dist.barrier()  # the other ranks return once the checkpoint exists
        if created_group:
            dist.destroy_process_group()
    return TrainResult(out / FINAL, history)


def _architecture(config: TrainConfig, preset, dataset: Dataset) -> tuple[Any, tuple[int, int, int]]:
    """The architecture record for the dataset, and the training patch (checked against its stride)."""
    patch = tuple(config.patch_size or preset.patch_size)
    reversible = {k: getattr(config, k) for k in ("memory", "encoder_depths", "decoder_depths") if getattr(config, k)}
    if reversible and not hasattr(preset, "widths"):
        raise ConfigError(f"{sorted(reversible)} apply to reversible presets, not {preset.name!r}")
    arch = preset.build(
        in_channels=len(dataset.channel_names),
        num_classes=len(dataset.label_names),
        fusion_threshold=config.fusion_threshold,
        deep_supervision=config.deep_supervision,
        **reversible,
    )
    if any(p % s for p, s in zip(patch, arch.total_stride)):
        raise ConfigError(f"patch {patch} must be a multiple of the network's total stride {arch.total_stride}")
    return arch, patch


def _initial_state(config: TrainConfig, arch, out: Path) -> tuple[nn.Module, dict | None, int, list[dict[str, Any]]]:
    """(model, optimizer state, first epoch, history): fresh from `config.seed`, or resumed from
    OUT/checkpoint_latest.pt with --resume."""
    torch.manual_seed(config.seed)
    model = network_for(arch)
    if config.resume and (out / LATEST).is_file():
        payload = read_checkpoint(out / LATEST)
        start_epoch = int(payload["epoch"]) + 1
        logger.info("resuming %s at epoch %d", out / LATEST, start_epoch)
        model = build_model(payload, deep_supervision=config.deep_supervision)
        return model, payload["optimizer"], start_epoch, json.loads(payload["history"])
    if config.resume:
        logger.info("no %s in %s; starting fresh", LATEST, out)
    return model, None, 0, []


def _parallel(model: nn.Module, arch, world: int, device: torch.device) -> nn.Module:
    """The model wrapped in DistributedDataParallel when there are several processes."""
    if world == 1:
        return model
    return DistributedDataParallel(  # the lowest deep-supervision head has weight 0: unused
        model, device_ids=[device.index] if device.type == "cuda" else None,
        find_unused_parameters=bool(getattr(arch, "deep_supervision", False)),
    )


def _train_epoch(run: _Run, sampler: PatchSampler, epoch: int, on_iteration) -> dict[str, Any]:
    """One epoch of SGD at the epoch's poly learning rate; returns its record (mean loss)."""
    config = run.config
    lr = poly_lr(config.learning_rate, epoch, config.epochs, config.poly_exponent)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    run.model.train()
    dtype = next(run.model.parameters()).dtype  # float32, or the default dtype the model was built in
    losses = []
    for iteration in range(config.iterations_per_epoch):
        rng = np.random.default_rng([config.seed, epoch, iteration])
        images, labels = augment(*sampler.sample(config.batch_size, rng), rng)  # the global batch
        batch = torch.from_numpy(images[run.share]).to(run.device, dtype)
        if config.channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last_3d)
        outputs = run.network(batch)
        target = torch.from_numpy(labels[run.share]).to(run.device)
        loss = deep_supervision_loss(outputs, target) if isinstance(outputs, list) else dice_ce_loss(outputs, target)
        run.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), 12.0)  # nnU-Net clips at 12
        run.optimizer.step()
        losses.append(loss.detach().item())
        if on_iteration:
            on_iteration({"epoch": epoch, "iteration": iteration, "loss": losses[-1]})
    return {"epoch": epoch, "lr": lr, "train_loss": float(np.mean(losses))}


def _close_epoch(run: _Run, record: dict[str, Any], out: Path) -> None:
    """Rank 0 after an epoch: validate when due, log, and write checkpoint_latest.pt."""
    config, dataset, epoch = run.config, run.dataset, record["epoch"]
    if dataset.validation and ((epoch + 1) % config.validate_every == 0 or epoch == config.epochs - 1):
        dice = validate(run.model, dataset.validation, len(dataset.label_names), run.patch)
        record["val_dice"] = dict(zip(dataset.label_names[1:], dice))
        record["val_mean_dice"] = float(np.nanmean(dice))
    run.history.append(record)
    logger.info("epoch %d: %s", epoch, record)
    save_checkpoint(out / LATEST, run.model, run.metadata(), extra={
        "optimizer": run.optimizer.state_dict(), "epoch": epoch, "history": json.dumps(run.history),
    })


def _distributed() -> tuple[int, int, torch.device, bool]:
    """(rank, world size, device, whether this call created the process group), from torchrun's
    environment; a single process without it."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if world == 1:
        return 0, 1, device, False
    created = not dist.is_initialized()
    if created:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return dist.get_rank(), dist.get_world_size(), device, created


def _optimizer(model: UNet, config: TrainConfig, state: dict | None = None) -> torch.optim.SGD:
    optimizer = torch.optim.SGD(model.parameters(), lr=config.learning_rate, momentum=config.momentum, nesterov=True,
                                weight_decay=config.weight_decay)
    if state is not None:
        optimizer.load_state_dict(state)  # after moving the model: state follows the parameters' device
    return optimizer


def _without_deep_supervision(model: UNet) -> UNet:
    model.set_deep_supervision(False)
    model.config = dataclasses.replace(model.config, deep_supervision=False)
    return model


def _metadata(config: TrainConfig, dataset: Dataset, patch: tuple, history: list, seconds: float) -> dict[str, Any]:
    last_val = next((h for h in reversed(history) if "val_dice" in h), None)
    return {
        "patch_size": list(patch),
        "spacing": list(dataset.spacing),
        "normalization": dict(dataset.normalization),
        "label_names": list(dataset.label_names),
        "channel_names": list(dataset.channel_names),
        "mirror_axes": [0, 1, 2],
        "dataset": dataset.describe(),
        "training": {
            "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(config).items()},
            "epochs_done": len(history),
            "seconds": round(seconds, 1),
            "torch": torch.__version__,
            "validation_dice": last_val["val_dice"] if last_val else None,
            "validation_mean_dice": last_val["val_mean_dice"] if last_val else None,
        },
    }


@torch.no_grad()
def validate(model: UNet, cases: list[Case], num_classes: int, patch: tuple[int, int, int]) -> list[float]:
    """Mean per-class Dice over validation cases, segmented by the runtime's sliding window.

    The window steps a whole patch (nnU-Net's grid at step 1: the fewest windows that cover the
    case, overlaps averaged), so validation costs about one forward pass per patch of the case;
    a case's `score_mask` restricts scoring to its held-out voxels.
    """
    was_training, deep = model.training, model.decoder.deep_supervision
    device = next(model.parameters()).device
    model.set_deep_supervision(False)
    predictor = TorchPredictor(model, device)
    config = SlidingWindowConfig(patch_size=patch, step_fraction=1.0, blending=Blending("constant"))
    scores = []
    for case in cases:
        logits = sliding_window_inference(case.image.astype(np.float32, copy=False), predictor, num_classes, config)
        prediction = to_numpy(logits.argmax(0))
        target = case.label.astype(np.int64)
        if case.score_mask is not None:
            prediction, target = prediction[case.score_mask], target[case.score_mask]
        scores.append(dice_scores(prediction, target, list(range(1, num_classes))))
    model.train(was_training)
    model.set_deep_supervision(deep)
    return [float(v) for v in np.nanmean(np.array(scores, dtype=float), axis=0)]
