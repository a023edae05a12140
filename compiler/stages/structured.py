"""Structured channel pruning of a UNet: physically smaller convolutions.

A *channel group* is one tensor's channels: the output of a conv-norm-act unit or of a transposed
conv. Removing channel `c` of a group removes, consistently:
- in its producer: output filter `c` of the conv (and bias), the norm's `gamma[c]`, `beta[c]`;
  for a ConvTranspose the weight's axis 1;
- in every consumer: input channel `c`, at the group's offset inside the consumer's input
  layout. A decoder stage's first conv reads `cat(upsampled, skip)`, so its input is two groups
  laid end to end; the skip group is also read by the next encoder stage, and a decoder stage's
  output by the next transposed conv and its segmentation head.

Channel importance: `|gamma| * ||w_c|| + |beta|` for a unit with an affine norm (a channel with
zero filter and zero norm parameters outputs LeakyReLU(0) = 0, so removing it is exact), and
`||w_c|| + |b_c|` otherwise. Each group drops the `floor(ratio * size)` least important channels
and keeps at least one. FasterFusion units (split 1:3 by Slice) and GroupNorm (groups must divide
the width) are refused with a clear error.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import nn

from nnslim.errors import NnslimError
from nnslim.training.blocks import ConvNormAct, FasterFusionBlock
from nnslim.training.unet import UNet


class StructuredPruningError(NnslimError, ValueError):
    """A model the structured pruner cannot rewrite."""


@dataclass
class ChannelGroup:
    name: str
    size: int
    importance: torch.Tensor


def _units(stage: nn.Module) -> list[ConvNormAct]:
    return list(stage.convs)


def _layout(model: UNet) -> tuple[dict[str, ChannelGroup], dict[str, list[str | int]]]:
    """Channel groups, and for every conv / transposed conv / head the groups its input is made
    of (an int stands for unprunable channels, i.e. the image)."""
    enc = [_units(stage[0]) for stage in model.encoder.stages]
    dec = [_units(stage) for stage in model.decoder.stages]
    for unit in [u for stage in enc + dec for u in stage]:
        if isinstance(unit, FasterFusionBlock):
            raise StructuredPruningError("structured pruning of FasterFusion units is not supported; "
                                         "use magnitude pruning (--prune-sparsity) for FasterFusion models")
        if isinstance(unit.norm, nn.GroupNorm):
            raise StructuredPruningError("structured pruning with GroupNorm is not supported (groups must divide widths)")
    names = {id(m): n for n, m in model.named_modules()}
    groups, inputs = {}, {}
    for unit in [u for stage in enc + dec for u in stage]:
        groups[names[id(unit)]] = ChannelGroup(names[id(unit)], unit.conv.out_channels, _unit_importance(unit))
    for d, up in enumerate(model.decoder.transpconvs):
        w = up.weight.detach()
        importance = w.transpose(0, 1).flatten(1).norm(dim=1) + (up.bias.detach().abs() if up.bias is not None else 0)
        groups[names[id(up)]] = ChannelGroup(names[id(up)], up.out_channels, importance)

    def unit_name(u: nn.Module) -> str:
        return names[id(u)]

    n = len(enc)
    for s, stage in enumerate(enc):
        for i, unit in enumerate(stage):
            if i > 0:
                inputs[unit_name(unit)] = [unit_name(stage[i - 1])]
            elif s > 0:
                inputs[unit_name(unit)] = [unit_name(enc[s - 1][-1])]
            else:
                inputs[unit_name(unit)] = [unit.conv.in_channels]
    for d, stage in enumerate(dec):
        up = model.decoder.transpconvs[d]
        inputs[names[id(up)]] = [unit_name(enc[-1][-1]) if d == 0 else unit_name(dec[d - 1][-1])]
        for i, unit in enumerate(stage):
            if i == 0:
                inputs[unit_name(unit)] = [names[id(up)], unit_name(enc[n - 2 - d][-1])]
            else:
                inputs[unit_name(unit)] = [unit_name(stage[i - 1])]
        inputs[names[id(model.decoder.seg_layers[d])]] = [unit_name(stage[-1])]
    return groups, inputs


def _unit_importance(unit: ConvNormAct) -> torch.Tensor:
    w = unit.conv.weight.detach().flatten(1).norm(dim=1)
    norm = unit.norm
    if getattr(norm, "weight", None) is not None and getattr(norm, "bias", None) is not None:
        return norm.weight.detach().abs() * w + norm.bias.detach().abs()
    return w + (unit.conv.bias.detach().abs() if unit.conv.bias is not None else 0)


def structured_keep(model: UNet, ratio: float) -> dict[str, torch.Tensor]:
    """Decide: the sorted channel indices each group keeps."""
    if not 0.0 <= ratio < 1.0:
        raise StructuredPruningError(f"ratio must be in [0, 1), got {ratio}")
    groups, _ = _layout(model)
    keep = {}
    for name, group in groups.items():
        drop = min(int(math.floor(ratio * group.size)), group.size - 1)
        order = torch.argsort(group.importance, descending=True, stable=True)
        keep[name] = torch.sort(order[: group.size - drop]).values
    return keep


@torch.no_grad()
def apply_structured(model: UNet, keep: dict[str, torch.Tensor]) -> UNet:
    """Apply: a copy of `model` with the dropped channels physically removed."""
    model = copy.deepcopy(model)
    groups, inputs = _layout(model)
    unknown = set(keep) - set(groups)
    if unknown:
        raise StructuredPruningError(f"unknown channel groups {sorted(unknown)}")
    full = {name: torch.arange(g.size) for name, g in groups.items()}
    kept = {**full, **keep}

    def input_index(layout: list[str | int]) -> torch.Tensor:
        pieces, offset = [], 0
        for part in layout:
            if isinstance(part, int):
                pieces.append(torch.arange(part) + offset)
                offset += part
            else:
                pieces.append(kept[part] + offset)
                offset += groups[part].size
        return torch.cat(pieces)

    for name, module in list(model.named_modules()):
        if isinstance(module, ConvNormAct):
            module.conv = _slice_conv(module.conv, kept[name], input_index(inputs[name]))
            module.norm = _slice_norm(module.norm, kept[name])
        elif isinstance(module, nn.ConvTranspose3d):
            _replace(model, name, _slice_conv(module, kept[name], input_index(inputs[name])))
        elif name in inputs and isinstance(module, nn.Conv3d):  # segmentation heads
            _replace(model, name, _slice_conv(module, torch.arange(module.out_channels), input_index(inputs[name])))
    return model


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def _slice_conv(conv: nn.Module, out_index: torch.Tensor, in_index: torch.Tensor) -> nn.Module:
    if conv.groups != 1:
        raise StructuredPruningError("grouped convolutions are not supported by structured pruning")
    transposed = isinstance(conv, nn.ConvTranspose3d)
    out_axis, in_axis = (1, 0) if transposed else (0, 1)
    weight = conv.weight.detach().index_select(out_axis, out_index).index_select(in_axis, in_index)
    cls = type(conv)
    new = cls(len(in_index), len(out_index), conv.kernel_size, conv.stride, conv.padding,
              bias=conv.bias is not None, **({} if not transposed else {"output_padding": conv.output_padding}))
    new.weight = nn.Parameter(weight.clone())
    if conv.bias is not None:
        new.bias = nn.Parameter(conv.bias.detach().index_select(0, out_index).clone())
    return new


def _slice_norm(norm: nn.Module, index: torch.Tensor) -> nn.Module:
    if isinstance(norm, nn.Identity):
        return norm
    new = copy.deepcopy(norm)
    new.num_features = len(index)
    for attr in ("weight", "bias"):
        if getattr(norm, attr, None) is not None:
            setattr(new, attr, nn.Parameter(getattr(norm, attr).detach().index_select(0, index).clone()))
    for attr in ("running_mean", "running_var"):
        if getattr(norm, attr, None) is not None:
            setattr(new, attr, getattr(norm, attr).index_select(0, index).clone())
    return new


def widths(model: UNet) -> dict[str, int]:
    """Output channels of every channel group, for the manifest."""
    groups, _ = _layout(model)
    return {name: g.size for name, g in groups.items()}


def finetune(model: nn.Module, dataset: str, steps: int, patch: tuple[int, int, int], learning_rate: float = 1e-3,
             batch_size: int = 2, seed: int = 0) -> list[float]:
    """A short fine-tune after structured pruning (Dice + CE, SGD Nesterov 0.99); returns losses."""
    import numpy as np

    from nnslim.training.data import PatchSampler, augment, load_dataset
    from nnslim.training.losses import dice_ce_loss

    data = load_dataset(dataset)
    sampler = PatchSampler(data.train, patch)
    optimizer = torch.optim.SGD(model.parameters(), lr=learning_rate, momentum=0.99, nesterov=True, weight_decay=3e-5)
    model.train()
    losses = []
    for step in range(steps):
        rng = np.random.default_rng([seed, 10_000, step])
        images, labels = augment(*sampler.sample(batch_size, rng), rng)
        output = model(torch.from_numpy(images))
        output = output[0] if isinstance(output, list) else output
        loss = dice_ce_loss(output, torch.from_numpy(labels))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.detach().item())
    model.eval()
    return losses
