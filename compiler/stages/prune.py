"""Pruning (seed 001 and what actually speeds up).

Deciding and applying are separate: `magnitude_masks` / `two_four_masks` return boolean keep
masks, `apply_masks` zeroes the weights they drop (in place, no parametrization left behind).

- Magnitude pruning: one global threshold `tau` over every Conv / ConvTranspose weight; a weight
  is dropped when `|w| < tau`. By target sparsity `s`, the `round(s * N)` smallest magnitudes are
  dropped (ties at the cut broken by position), which fixes `tau` as the smallest kept magnitude.
  Weights are counted once per storage (shared tensors count once).
- 2:4 semi-structured: in every group of four consecutive input channels of a conv (at each
  output channel and kernel position) the two smallest magnitudes are dropped, the pattern
  TensorRT's `SPARSE_WEIGHTS` kernels use.

Unstructured zeros leave dense kernels as slow as before; they shrink a compressed file.
Structured pruning (`structured.py`) removes whole channels and does change latency.
"""

from __future__ import annotations

import copy
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils import parametrize

from nnslim.errors import SettingsError

PRUNABLE = (nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d)


@dataclass(frozen=True)
class LayerSparsity:
    name: str
    region: str  # encoder | bottleneck | decoder | head
    kind: str
    shape: tuple[int, ...]
    parameters: int
    zeros: int
    mean_abs: float

    @property
    def sparsity(self) -> float:
        return self.zeros / self.parameters if self.parameters else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "shape": list(self.shape), "sparsity": self.sparsity}


def prunable_weights(model: nn.Module) -> dict[str, nn.Parameter]:
    """Conv / ConvTranspose weights by module name, one entry per storage; deep-supervision heads
    that inference does not run (and export drops) are left out."""
    seen, weights = set(), {}
    inactive = _inactive_heads(model)
    for name, module in model.named_modules():
        if isinstance(module, PRUNABLE) and name not in inactive:
            key = (module.weight.untyped_storage().data_ptr(), module.weight.storage_offset())
            if key not in seen:
                seen.add(key)
                weights[name] = module.weight
    return weights


def threshold_for_sparsity(model: nn.Module, sparsity: float) -> float:
    """The smallest magnitude kept when the `round(sparsity * N)` smallest are dropped."""
    if not 0.0 <= sparsity < 1.0:
        raise SettingsError(f"sparsity must be in [0, 1), got {sparsity}")
    magnitudes = torch.cat([w.detach().abs().flatten() for w in prunable_weights(model).values()])
    k = int(round(sparsity * magnitudes.numel()))
    if k == 0:
        return 0.0
    return float(torch.sort(magnitudes).values[k])


def magnitude_masks(model: nn.Module, threshold: float | None = None, sparsity: float | None = None) -> dict[str, torch.Tensor]:
    """Keep masks (`True` = keep) for one global magnitude threshold or target sparsity."""
    if (threshold is None) == (sparsity is None):
        raise SettingsError("give exactly one of threshold or sparsity")
    weights = prunable_weights(model)
    if threshold is not None:
        if threshold < 0:
            raise SettingsError(f"threshold must be >= 0, got {threshold}")
        return {name: w.detach().abs() >= threshold for name, w in weights.items()}
    # exact count: rank all magnitudes once, drop the k smallest
    flat = torch.cat([w.detach().abs().flatten() for w in weights.values()])
    k = int(round(sparsity * flat.numel()))
    keep = torch.ones(flat.numel(), dtype=torch.bool)
    if k:
        keep[torch.argsort(flat, stable=True)[:k]] = False
    masks, offset = {}, 0
    for name, w in weights.items():
        masks[name] = keep[offset : offset + w.numel()].view_as(w)
        offset += w.numel()
    return masks


def two_four_masks(model: nn.Module, min_channels: int = 4) -> dict[str, torch.Tensor]:
    """2:4 keep masks along input channels for every conv with a multiple of 4 input channels
    (and at least `min_channels`); other layers are left dense."""
    masks = {}
    for name, w in prunable_weights(model).items():
        module = model.get_submodule(name)
        cin_axis = 0 if isinstance(module, nn.ConvTranspose3d) else 1
        cin = w.shape[cin_axis]
        if cin % 4 or cin < min_channels:
            continue
        moved = w.detach().abs().movedim(cin_axis, -1)  # [..., Cin]
        groups = moved.reshape(*moved.shape[:-1], cin // 4, 4)
        order = groups.argsort(dim=-1, stable=True)
        keep = torch.ones_like(groups, dtype=torch.bool)
        keep.scatter_(-1, order[..., :2], False)
        masks[name] = keep.reshape(moved.shape).movedim(-1, cin_axis)
    return masks


def check_two_four(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Raise unless every group of four input channels of each masked layer holds >= 2 zeros."""
    for name in masks:
        module = model.get_submodule(name)
        w = module.weight.detach()
        cin_axis = 0 if isinstance(module, nn.ConvTranspose3d) else 1
        moved = w.movedim(cin_axis, -1)
        zeros = (moved.reshape(*moved.shape[:-1], -1, 4) == 0).sum(-1)
        if (zeros < 2).any():
            raise SettingsError(f"{name}: {int((zeros < 2).sum())} group(s) of four input channels hold fewer than 2 zeros")


@torch.no_grad()
def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> nn.Module:
    """Zero the dropped weights in place and return the model.

    Post-condition: plain tensors (no parametrization), shapes unchanged, every dropped weight 0.
    """
    for name, mask in masks.items():
        weight = model.get_submodule(name).weight
        if mask.shape != weight.shape:
            raise SettingsError(f"mask for {name} has shape {tuple(mask.shape)}, weight {tuple(weight.shape)}")
        weight.mul_(mask.to(weight.dtype))
    for name, mask in masks.items():
        module = model.get_submodule(name)
        if parametrize.is_parametrized(module) or bool((module.weight[~mask] != 0).any()):
            raise RuntimeError(f"pruning post-condition failed for {name}")
    return model


def layer_sparsity(model: nn.Module) -> list[LayerSparsity]:
    """Per-layer counts in network order, each layer labelled encoder / bottleneck / decoder / head."""
    stages = _encoder_stage_count(model)
    rows = []
    for name, w in prunable_weights(model).items():
        rows.append(LayerSparsity(
            name=name,
            region=_region(name, stages),
            kind=type(model.get_submodule(name)).__name__,
            shape=tuple(w.shape),
            parameters=w.numel(),
            zeros=int((w == 0).sum()),
            mean_abs=float(w.detach().abs().mean()),
        ))
    return rows


def global_sparsity(model: nn.Module, rows: list[LayerSparsity] | None = None) -> float:
    """Zero fraction over all prunable weights (`rows`: an already computed `layer_sparsity`)."""
    rows = layer_sparsity(model) if rows is None else rows
    total = sum(r.parameters for r in rows)
    return sum(r.zeros for r in rows) / total if total else 0.0


def region_sparsity(rows: list[LayerSparsity]) -> dict[str, float]:
    regions: dict[str, list[int]] = {}
    for r in rows:
        zeros, total = regions.setdefault(r.region, [0, 0])
        regions[r.region] = [zeros + r.zeros, total + r.parameters]
    return {k: z / t for k, (z, t) in regions.items()}


def _inactive_heads(model: nn.Module) -> set[str]:
    decoder = getattr(model, "decoder", None)
    if decoder is None or getattr(decoder, "deep_supervision", True) or not hasattr(decoder, "seg_layers"):
        return set()
    return {f"decoder.seg_layers.{i}" for i in range(len(decoder.seg_layers) - 1)}


def _encoder_stage_count(model: nn.Module) -> int:
    encoder = getattr(model, "encoder", None)
    return len(encoder.stages) if encoder is not None and hasattr(encoder, "stages") else 0


def _region(name: str, stages: int) -> str:
    parts = name.split(".")
    if parts[0] == "encoder" and len(parts) > 2 and parts[1] == "stages":
        return "bottleneck" if stages and int(parts[2]) == stages - 1 else "encoder"
    if parts[0] == "decoder":
        return "head" if parts[1] == "seg_layers" else "decoder"
    return "other"


def file_sizes(path) -> dict[str, int]:
    """Raw and zlib-compressed (level 6) size of a file: zeros shrink only the latter."""
    data = Path(path).read_bytes()
    return {"bytes": len(data), "compressed_bytes": len(zlib.compress(data, 6))}



@dataclass(frozen=True)
class PruneSettings:
    """What the build's prune stage does (all off by default).

    Attributes:
        sparsity: global magnitude pruning to this fraction of conv weights.
        threshold: global magnitude pruning of every weight with |w| < threshold.
        structured_ratio: fraction of channels removed from every channel group.
        two_four: 2:4 pruning along input channels (TensorRT SPARSE_WEIGHTS).
        finetune_steps: fine-tune steps after structured pruning.
        finetune_dataset: dataset for the fine-tune ("mni-tissue" or a raw-layout folder).
    """

    sparsity: float | None = None
    threshold: float | None = None
    structured_ratio: float | None = None
    two_four: bool = False
    finetune_steps: int = 0
    finetune_dataset: str | None = None

    @property
    def active(self) -> bool:
        return any(v is not None for v in (self.sparsity, self.threshold, self.structured_ratio)) or self.two_four

    def validate(self) -> None:
        if self.sparsity is not None and self.threshold is not None:
            raise SettingsError("give either a prune sparsity or a prune threshold, not both")
        if self.finetune_steps and self.structured_ratio is None:
            raise SettingsError("fine-tuning applies after structured pruning; add a structured ratio")
        if self.finetune_steps and not self.finetune_dataset:
            raise SettingsError("fine-tuning needs a dataset (--finetune-dataset)")


def prune_for_deploy(model: nn.Module, settings: PruneSettings, patch: tuple[int, int, int]) -> tuple[nn.Module, dict]:
    """Prune a deploy-form model (a copy) as `settings` say; return it and what was done."""
    settings.validate()
    report: dict = {"settings": asdict(settings)}
    model = copy.deepcopy(model)
    if settings.structured_ratio is not None:
        from nnslim.compiler.stages.structured import apply_structured, structured_keep, widths
        from nnslim.parameters import count_parameters

        before, params_before = widths(model), count_parameters(model)
        model = apply_structured(model, structured_keep(model, settings.structured_ratio))
        report["structured"] = {"widths_before": before, "widths_after": widths(model),
                                "parameters_before": params_before, "parameters_after": count_parameters(model)}
        if settings.finetune_steps:
            from nnslim.compiler.stages.structured import finetune

            losses = finetune(model, settings.finetune_dataset, settings.finetune_steps, patch)
            report["finetune"] = {"steps": settings.finetune_steps, "first_loss": losses[0], "last_loss": losses[-1]}
    if settings.sparsity is not None or settings.threshold is not None:
        threshold = settings.threshold if settings.threshold is not None else threshold_for_sparsity(model, settings.sparsity)
        apply_masks(model, magnitude_masks(model, threshold=settings.threshold, sparsity=settings.sparsity))
        report["magnitude"] = {"threshold": threshold}
    if settings.two_four:
        masks = two_four_masks(model)
        apply_masks(model, masks)
        check_two_four(model, masks)
        report["two_four"] = {"layers": len(masks)}
    rows = layer_sparsity(model)
    report["global_sparsity"] = global_sparsity(model, rows)
    report["region_sparsity"] = region_sparsity(rows)
    return model.eval(), report
