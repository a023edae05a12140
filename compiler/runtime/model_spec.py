"""What the runtime needs to know about a model, read from an engine's manifest."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from nnslim.compiler.runtime.errors import EngineError
from nnslim.compiler.runtime.manifest import rebuild_hint


@dataclass(frozen=True)
class ModelSpec:
    """What the runtime needs to know about a model; read from the manifest."""

    in_channels: int
    num_classes: int
    patch_size: tuple[int, int, int]
    max_batch: int
    normalization: dict
    label_names: tuple[str, ...]
    spacing: tuple[float, ...] | None
    mirror_axes: tuple[int, ...]
    input_name: str
    output_name: str
    preprocessing: dict = field(default_factory=dict)  # the manifest entry, for `prepare`
    postprocessing: dict = field(default_factory=lambda: {"kind": "argmax"})
    tta_default: bool = False  # mirror TTA unless the user says otherwise (nnU-Net models: on)

    @classmethod
    def from_manifest(cls, manifest: dict[str, Any]) -> ModelSpec:
        try:
            io, pre = manifest["io"], manifest["preprocessing"]
            return cls(
                in_channels=int(io["input"]["shape"][1]),
                num_classes=int(io["output"]["shape"][1]),
                patch_size=tuple(int(v) for v in io["input"]["shape"][2:]),
                max_batch=int(io["batch"]["max"]),
                normalization=dict(pre["normalization"]),
                label_names=tuple(manifest["labels"]),
                spacing=tuple(pre["spacing"]) if pre.get("spacing") else None,
                mirror_axes=tuple(pre.get("mirror_axes", ())),
                input_name=io["input"]["name"],
                output_name=io["output"]["name"],
                preprocessing=dict(pre),
                postprocessing=dict(manifest.get("postprocessing") or {"kind": "argmax"}),
                tta_default=bool(pre.get("tta_default", False)),
            )
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise EngineError(f"manifest lacks or garbles {exc}; {rebuild_hint(manifest)}") from exc
