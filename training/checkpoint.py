"""The nnslim checkpoint: one file that `torch.load(..., weights_only=True)` can read.

Layout (all plain data and tensors, nothing pickled by class):

    {
      "format": "nnslim.checkpoint", "format_version": 1,
      "architecture": {"name": "unet3d", "config": UNetConfig.to_dict()},
      "state_dict": {...},
      "metadata": {"patch_size": [...], "spacing": [...], "normalization": {...},
                   "label_names": [...], "dataset": {...}, "training": {...}},
      "optimizer": {...}            # optional, training checkpoints only
    }
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from nnslim.errors import NnslimError
from nnslim.files import atomic_path
from nnslim.training.config import ConfigError, UNetConfig
from nnslim.training.revunet import RevUNet, RevUNetConfig
from nnslim.training.unet import UNet

FORMAT = "nnslim.checkpoint"
FORMAT_VERSION = 1
# architecture record name -> (config class, network class); "unet3d" is nnslim's UNet (2D or 3D)
ARCHITECTURES = {"unet3d": (UNetConfig, UNet), "rev_unet": (RevUNetConfig, RevUNet)}


def network_for(config: UNetConfig | RevUNetConfig) -> UNet | RevUNet:
    """The network class a configuration describes, built."""
    return next(network for kind, network in ARCHITECTURES.values() if isinstance(config, kind))(config)


def _architecture_name(model: UNet | RevUNet) -> str:
    return next(name for name, (_, network) in ARCHITECTURES.items() if isinstance(model, network))


class CheckpointError(NnslimError, ValueError):
    """A checkpoint file that is missing, corrupt, or not in nnslim's format."""


def save_checkpoint(
    path: str | os.PathLike,
    model: UNet,
    metadata: dict[str, Any],
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint atomically (temp file in the same folder, then rename).

    Args:
        path: destination file.
        model: the network; its config becomes the architecture record.
        metadata: patch size, spacing, normalization, label names, dataset and training facts
            (JSON-able values only).
        extra: additional top-level entries such as optimizer state for resuming.
    """
    path = Path(path)
    payload: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "architecture": {"name": _architecture_name(model), "config": model.config.to_dict()},
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        # a JSON round trip keeps the metadata plain data (no str subclasses such as TorchVersion,
        # which the weights-only unpickler refuses)
        "metadata": json.loads(json.dumps(metadata)),
    }
    payload.update(extra or {})
    with atomic_path(path) as tmp:  # an interrupted save never leaves a truncated checkpoint
        torch.save(payload, tmp)
    return path


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load and validate a checkpoint dict (weights only, never arbitrary objects)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for truncated / foreign files
        reason = _torch_load_reason(exc)
        raise CheckpointError(
            f"cannot read checkpoint {path} ({type(exc).__name__}: {reason}); "
            "the file is truncated, corrupt or not a weights-only torch file. Re-save it with nnslim train."
        ) from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise CheckpointError(
            f"{path} is not an nnslim checkpoint (format tag {found!r}, expected {FORMAT!r}). "
            "nnU-Net model folders are imported with a separate command."
        )
    if payload.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format version {payload.get('format_version')!r}; "
            f"this nnslim reads version {FORMAT_VERSION}. Upgrade nnslim."
        )
    for key in ("architecture", "state_dict", "metadata"):
        if key not in payload:
            raise CheckpointError(f"{path} lacks the {key!r} entry; the file is incomplete")
    return payload


def _torch_load_reason(exc: Exception) -> str:
    """The informative line of torch.load's message (it leads with advice to unpickle unsafely)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    for i, line in enumerate(lines):
        if "Unsupported global" in line:
            return line[:300]
        if line.endswith("WeightsUnpickler error:") and i + 1 < len(lines):
            return f"not a weights-only pickle: {lines[i + 1][:200]}"
    return (lines[0] if lines else type(exc).__name__)[:200]


def build_model(payload: dict[str, Any], deep_supervision: bool = False) -> UNet:
    """Rebuild the network from a checkpoint dict and load its weights (strictly)."""
    arch = payload["architecture"]
    name = arch.get("name")
    if name not in ARCHITECTURES:
        raise CheckpointError(f"unknown architecture {name!r}; known: {sorted(ARCHITECTURES)}")
    config_cls, model_cls = ARCHITECTURES[name]
    try:
        config = config_cls.from_dict(arch["config"])
    except (ConfigError, TypeError) as exc:
        raise CheckpointError(f"invalid architecture record: {exc}") from exc
    model = model_cls(config)
    try:
        model.load_state_dict(payload["state_dict"], strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"weights do not match the architecture: {str(exc)[:500]}") from exc
    model.set_deep_supervision(deep_supervision)
    return model


def load_model(path: str | os.PathLike) -> tuple[UNet, dict[str, Any]]:
    """Read a checkpoint and return `(model in eval mode, metadata)`."""
    payload = read_checkpoint(path)
    model = build_model(payload)
    model.eval()
    return model, payload["metadata"]
