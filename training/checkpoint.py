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
import math
import os
import re
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from nnslim.compiler.runtime.manifest.schema import MAX_PATCH
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
    payload = load_weights_only(path, CheckpointError,
                                advice="If you trust the file, load it in your own code and save its weights "
                                       "with nnslim (nnslim train, or nnslim.training.checkpoint.save_checkpoint).")
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
    _check_sections(path, payload)
    return payload


def _check_sections(path: Path, payload: dict[str, Any]) -> None:
    """The shapes every reader relies on (architecture record, weights, the metadata the build
    needs), each refused by key and value: a damaged checkpoint fails here, not deep in a build."""
    def refuse(key: str, value: Any, expected: str) -> CheckpointError:
        return CheckpointError(f"{path}: `{key}` is {value!r:.80}, expected {expected}; the checkpoint is damaged "
                               "or was not written by nnslim (re-save it with nnslim train)")

    architecture = payload["architecture"]
    if not isinstance(architecture, dict) or not isinstance(architecture.get("config"), dict):
        raise refuse("architecture", architecture, "an object with a name and a config object")
    weights = payload["state_dict"]
    if not isinstance(weights, dict) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
        shown = {k: type(v).__name__ for k, v in weights.items()} if isinstance(weights, dict) else weights
        raise refuse("state_dict", shown, "an object of tensors")
    metadata = payload["metadata"]
    if not isinstance(metadata, dict):
        raise refuse("metadata", metadata, "an object (patch_size, normalization, label_names, ...)")
    for key in ("patch_size", "normalization"):
        if key not in metadata:
            raise CheckpointError(f"{path}: the metadata lacks `{key}`, which the engine needs; the checkpoint is "
                                  "incomplete (nnslim train writes it)")
    patch = metadata["patch_size"]
    if (not isinstance(patch, (list, tuple)) or len(patch) not in (2, 3)
            or not all(type(p) is int and 1 <= p <= MAX_PATCH for p in patch)):
        raise refuse("metadata.patch_size", patch, f"2 or 3 integers in [1, {MAX_PATCH}]")
    if not isinstance(metadata["normalization"], dict):
        raise refuse("metadata.normalization", metadata["normalization"], 'an object such as {"scheme": "zscore"}')
    spacing = metadata.get("spacing")
    if spacing is not None and (not isinstance(spacing, (list, tuple)) or not all(
            isinstance(s, (int, float)) and not isinstance(s, bool) and math.isfinite(s) and s > 0 for s in spacing)):
        raise refuse("metadata.spacing", spacing, "a list of positive voxel sizes in mm (or null)")


def load_weights_only(path: Path, error: Callable[[str], Exception], allowed: Iterable[Any] = (),
                      advice: str = "") -> Any:
    """`torch.load(path, weights_only=True)`, reporting what it refuses in nnslim's words.

    A global outside `allowed` (torch's default set aside) is refused by name before anything is
    unpickled: nnslim never unpickles code, so the message names the global and says so, where
    torch's would lead with advice to load the file unsafely. `allowed` takes objects or
    `(object, "pickled.name")` pairs, as `torch.serialization.safe_globals` does."""
    allowed = list(allowed)
    try:
        found = set(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # not a zip-format torch file: torch.load's own unpickler decides below
        found = set()
    refused = sorted(found - _global_names(allowed))
    if refused:
        raise error(_blocked(path, refused, advice))
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for truncated / foreign / unsafe files
        blocked = sorted(set(re.findall(r"GLOBAL ([\w.]+)", str(exc))))
        if blocked:
            raise error(_blocked(path, blocked, advice)) from exc
        raise error(f"cannot read checkpoint {path} ({type(exc).__name__}: {_torch_load_reason(exc)}); the file is "
                    "truncated, corrupt or not a weights-only torch file. " + advice) from exc


def _blocked(path: Path, names: list[str], advice: str) -> str:
    return (f"refusing to load {path}: Unsupported global {', '.join(names)} in its pickle. nnslim will not "
            "unpickle it: unpickling can run arbitrary code, and a checkpoint needs only tensors and plain data. "
            + advice)


def _global_names(allowed: list[Any]) -> set[str]:
    """The pickled names of allow-listed globals (`(object, name)` pairs give their own)."""
    return {item[1] if isinstance(item, tuple) else f"{item.__module__}.{item.__qualname__}" for item in allowed}


def _torch_load_reason(exc: Exception) -> str:
    """torch.load's message without its advice (it leads with how to unpickle unsafely)."""
    advice = ("weights_only", "Weights only load failed", "Check the documentation", "safe_globals")
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip() and not any(a in ln for a in advice)]
    return "; ".join(lines)[:300] or type(exc).__name__


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
