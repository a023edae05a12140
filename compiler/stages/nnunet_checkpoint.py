"""Read nnU-Net v2 checkpoints safely and map their weights onto nnslim's `UNet`.

A checkpoint is loaded with `torch.load(weights_only=True)` and an explicit allow-list (numpy
scalars, arrays and dtypes, `torch.device`); one holding any other global is refused before
anything is unpickled. nnU-Net saves every conv twice (`...convs.0.conv.weight` and
`...convs.0.all_modules.0.weight`) and the whole encoder a second time under `decoder.encoder.`;
those aliases are checked to be copies and dropped, and the rest must match the rebuilt network
key for key and shape for shape.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from nnslim.errors import NnslimError


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


def _allowed_names() -> set[str]:
    names = set()
    for item in _allowed_globals():
        if isinstance(item, tuple):
            names.add(item[1])
        else:
            names.add(f"{item.__module__}.{item.__qualname__}")
    return names


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read an nnU-Net checkpoint safely (see module docstring) and check its entries."""
    if not path.is_file():
        raise NnUNetImportError(f"checkpoint not found: {path}")
    try:
        found = set(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception as exc:  # not a zip-format torch file
        raise NnUNetImportError(f"cannot read {path} as a torch checkpoint ({type(exc).__name__}: {exc})") from exc
    refused = sorted(found - _allowed_names())
    if refused:
        raise NnUNetImportError(
            f"refusing to load {path}: it pickles {', '.join(refused)}, which is outside the allow-list for "
            "nnU-Net checkpoints (numpy scalars/arrays/dtypes, torch.device). Unpickling it could run "
            "arbitrary code. If you trust the file, re-save just its 'network_weights', 'init_args' and "
            "'inference_allowed_mirroring_axes' with plain types."
        )
    try:
        with torch.serialization.safe_globals(_allowed_globals()):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as exc:
        raise NnUNetImportError(f"cannot load {path} with weights_only=True: {str(exc).splitlines()[0][:300]}") from exc
    if not isinstance(checkpoint, dict):
        raise NnUNetImportError(f"{path} holds a {type(checkpoint).__name__}, not an nnU-Net checkpoint dict")
    missing = [k for k in ("network_weights", "init_args") if k not in checkpoint]
    if missing:
        raise NnUNetImportError(f"{path} lacks {missing}; is it an nnU-Net v2 checkpoint (checkpoint_final.pth)?")
    return checkpoint


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
