"""Read nnU-Net v2 checkpoints safely and map their weights onto nnslim's `UNet`.

A checkpoint is loaded with `torch.load(weights_only=True)` and an explicit allow-list (numpy
scalars, arrays and dtypes, `torch.device`); one holding any other global is refused by name
before anything is unpickled (`training.checkpoint.load_weights_only`), and the entries the import
reads (`init_args`, `network_weights`, the mirroring axes) are checked for shape. nnU-Net saves every conv twice (`...convs.0.conv.weight` and
`...convs.0.all_modules.0.weight`) and the whole encoder a second time under `decoder.encoder.`;
those aliases are checked to be copies and dropped, and the rest must match the rebuilt network
key for key and shape for shape.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from nnslim.errors import NnslimError
from nnslim.training.checkpoint import load_weights_only


class NnUNetImportError(NnslimError):
    """A model folder or checkpoint that nnslim cannot import (or will not, for safety)."""


def _allowed_globals() -> list[Any]:
    """What nnU-Net checkpoints legitimately pickle besides tensors and containers."""
    multiarray = (np._core if hasattr(np, "_core") else np.core).multiarray  # numpy 2 / numpy 1
    scalar, reconstruct = multiarray.scalar, multiarray._reconstruct
    dtype_classes = [getattr(np.dtypes, n) for n in dir(np.dtypes) if n.endswith("DType") and n[0].isupper()]
    return [
        scalar, (scalar, "numpy.core.multiarray.scalar"),  # numpy 2 and numpy 1 spellings
        reconstruct, (reconstruct, "numpy.core.multiarray._reconstruct"),
        np.ndarray, np.dtype, *dtype_classes,
        torch.device,
    ]


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read an nnU-Net checkpoint safely (see module docstring) and check its entries."""
    if not path.is_file():
        raise NnUNetImportError(f"checkpoint not found: {path}")
    checkpoint = load_weights_only(
        path, NnUNetImportError, _allowed_globals(),
        advice="nnU-Net checkpoints need only numpy scalars/arrays/dtypes and torch.device besides tensors. If you "
               "trust the file, re-save just its 'network_weights', 'init_args' and "
               "'inference_allowed_mirroring_axes' with plain types.")
    if not isinstance(checkpoint, dict):
        raise NnUNetImportError(f"{path} holds a {type(checkpoint).__name__}, not an nnU-Net checkpoint dict")
    missing = [k for k in ("network_weights", "init_args") if k not in checkpoint]
    if missing:
        raise NnUNetImportError(f"{path} lacks {missing}; is it an nnU-Net v2 checkpoint (checkpoint_final.pth)?")
    _check_entries(path, checkpoint)
    return checkpoint


def _check_entries(path: Path, checkpoint: dict[str, Any]) -> None:
    """The entries the import reads, each refused by key and value when it has another shape."""
    def refuse(key: str, value: Any, expected: str) -> NnUNetImportError:
        return NnUNetImportError(f"{path}: `{key}` is {value!r:.80}, expected {expected}; the checkpoint is damaged "
                                 "or not written by nnU-Net v2 (use the fold's checkpoint_final.pth as nnU-Net saved it)")

    init_args = checkpoint["init_args"]
    if not isinstance(init_args, dict):
        raise refuse("init_args", init_args, "an object with the trainer's arguments (configuration, ...)")
    if not isinstance(init_args.get("configuration"), str) or not init_args["configuration"]:
        raise refuse("init_args.configuration", init_args.get("configuration"),
                     "the name of a configuration of plans.json (e.g. '3d_fullres')")
    weights = checkpoint["network_weights"]
    if not isinstance(weights, dict) or not weights or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in weights.items()):
        shown = {k: type(v).__name__ for k, v in weights.items()} if isinstance(weights, dict) else weights
        raise refuse("network_weights", shown, "a non-empty state dict of tensors")
    axes = checkpoint.get("inference_allowed_mirroring_axes")
    if axes is not None and (not isinstance(axes, (list, tuple)) or not all(
            isinstance(a, (int, np.integer)) and not isinstance(a, bool) and 0 <= a <= 2 for a in axes)
            or len(set(axes)) != len(axes)):
        raise refuse("inference_allowed_mirroring_axes", axes, "a list of distinct spatial axes (0, 1, 2), or None")


def _is_alias(key: str) -> bool:
    return ".all_modules." in key or key.startswith("decoder.encoder.")


def _canonical(key: str) -> str | None:
    """The key an alias duplicates (None if it is not a known alias form)."""
    if key.startswith("decoder.encoder."):
        key = key[len("decoder."):]
    return key if ".all_modules." not in key else None


def map_state_dict(weights: dict[str, torch.Tensor], model: nn.Module, source: str) -> dict[str, torch.Tensor]:
    """nnU-Net's state dict as `model`'s, aliases dropped; any other mismatch is an error."""
    weights = {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in weights.items()}  # DDP / compile
    for key, value in weights.items():
        target = _canonical(key) if key.startswith("decoder.encoder.") else None
        if target is not None and target in weights and not torch.equal(weights[target], value):
            raise NnUNetImportError(f"{source}: {key} differs from {target}; the checkpoint is inconsistent")
    kept = {k: v for k, v in weights.items() if not _is_alias(k)}
    expected = model.state_dict()
    missing = sorted(set(expected) - set(kept))
    unexpected = sorted(set(kept) - set(expected))
    if missing or unexpected:
        raise NnUNetImportError(
            f"{source}: the weights do not match the network rebuilt from plans.json "
            f"(missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}); "
            "was the checkpoint trained with these plans?"
        )
    wrong = [(k, tuple(kept[k].shape), tuple(v.shape)) for k, v in expected.items() if kept[k].shape != v.shape]
    if wrong:
        raise NnUNetImportError(f"{source}: shapes differ from the plans' network, e.g. {wrong[:3]} (checkpoint, plans)")
    return kept
