"""A MONAI bundle's pre- and post-processing transforms, mapped to an engine's records
(`monai_bundle` says what each transform becomes).

Transforms are read from `preprocessing.transforms` and `postprocessing.transforms` (a `Compose`),
by class name; the dictionary form (`ScaleIntensityRanged`) is its array transform applied to
`keys`, and a transform whose keys leave out the image (or, after inference, the prediction) does
not touch what nnslim reproduces and is skipped. Every transform nnslim cannot reproduce is listed
in one refusal.
"""

from __future__ import annotations

import math
from typing import Any

from nnslim.errors import NnslimError

# transforms with nothing to reproduce: reading, layout, dtype and device moves, inverting, saving
_NEUTRAL = {"LoadImage", "EnsureChannelFirst", "AddChannel", "EnsureType", "ToTensor", "ToNumpy", "CastToType",
            "ToDevice", "Identity", "Invert", "SaveImage", "CopyItems", "DeleteItems", "SelectItems"}
_INTENSITY = ("ScaleIntensityRange", "NormalizeIntensity")


class TransformError(NnslimError):
    """A bundle transform nnslim cannot reproduce."""


def _name(transform: Any) -> str:
    target = str(transform.get("_target_", "")) if isinstance(transform, dict) else ""
    name = target.rsplit(".", 1)[-1]
    array_form = name[:-1] if name.endswith("d") and name[:-1] in _NEUTRAL | set(_INTENSITY) | {
        "Orientation", "Spacing", "Activations", "AsDiscrete"} else name
    return array_form


def _touches(transform: dict[str, Any], key: str, config: dict[str, Any]) -> bool:
    """Whether the transform applies to `key` (its `keys`, references and literals resolved)."""
    from nnslim.compiler.stages.monai_bundle import BundleError, resolve

    for flag in ("_disabled_", "_requires_", "_mode_"):
        if flag in transform:
            raise BundleError(f"a transform with {flag} ({transform.get('_target_')}): nnslim does not evaluate it; "
                              "remove the transform or the flag")
    keys = resolve(transform.get("keys"), config, f"{transform.get('_target_')}.keys")
    if keys is None:
        return True
    if isinstance(keys, str):
        return keys == key
    if isinstance(keys, (list, tuple)) and all(isinstance(k, str) for k in keys):
        return key in keys
    raise BundleError(f"{transform.get('_target_')}.keys is {keys!r:.60}; MONAI's keys are a name or a list of names")


def _transforms(config: dict[str, Any], section: str) -> list[dict[str, Any]]:
    """The section's transforms, `@` references followed; their arguments are resolved by the
    readers, and only for transforms nnslim reproduces (a `SaveImaged` may hold any expression)."""
    from nnslim.compiler.stages.monai_bundle import follow

    compose = follow(config.get(section) or {}, config, section)
    listed = follow(compose.get("transforms", []), config, section) if isinstance(compose, dict) else compose
    listed = [follow(t, config, f"{section}.transforms[{i}]") for i, t in enumerate(listed)] \
        if isinstance(listed, list) else listed
    if not isinstance(listed, list) or not all(isinstance(t, dict) for t in listed):
        raise TransformError(f"{section}.transforms must be a list of transforms, got {type(listed).__name__}")
    return listed


# the arguments nnslim reads, per transform; the others (dtype, device, meta keys, ...) are never evaluated
_READ = {"Orientation": ("axcodes", "labels"), "Spacing": ("pixdim",),
         "ScaleIntensityRange": ("a_min", "a_max", "b_min", "b_max", "clip"),
         "NormalizeIntensity": ("nonzero", "channel_wise", "subtrahend", "divisor"),
         "Activations": ("softmax", "sigmoid", "other"), "AsDiscrete": ("argmax", "threshold")}


def _arguments(transform: dict[str, Any], name: str, config: dict[str, Any], where: str) -> dict[str, Any]:
    """The arguments nnslim reads of a transform (`_READ`), references and literals resolved."""
    from nnslim.compiler.stages.monai_bundle import resolve

    read = {k: transform[k] for k in _READ.get(name, ()) if k in transform}
    return {**{k: v for k, v in transform.items() if k not in _READ.get(name, ())}, **resolve(read, config, where)}


def read_preprocessing(config: dict[str, Any], key: str = "image") -> dict[str, Any]:
    """`{"names": [...], "axcodes": str | None, "pixdim": [3 floats] | None, "intensity": entry | None}`."""
    found: dict[str, Any] = {"names": [], "axcodes": None, "pixdim": None, "intensity": None}
    refused = []
    for transform in _transforms(config, "preprocessing"):
        name = _name(transform)
        if not _touches(transform, key, config):
            continue
        found["names"].append(name)
        if name in _NEUTRAL:
            continue
        transform = _arguments(transform, name, config, f"preprocessing.{name}")
        if name == "Orientation" and not transform.get("labels"):
            found["axcodes"] = str(transform.get("axcodes", "RAS"))
        elif name == "Spacing" and _pixdim(transform.get("pixdim")) is not None:
            found["pixdim"] = _pixdim(transform.get("pixdim"))
        elif name in _INTENSITY and found["intensity"] is None:
            found["intensity"] = _intensity(name, transform)
        else:
            refused.append(_shown(name, transform))
    if refused:
        raise TransformError(f"the bundle's preprocessing has transform(s) nnslim cannot reproduce: {'; '.join(refused)}. "
                             "It reproduces LoadImage, EnsureChannelFirst, Orientation, Spacing, one of "
                             "ScaleIntensityRange / NormalizeIntensity, and type conversions")
    return found


def _pixdim(value: Any) -> list[float] | None:
    values = value if isinstance(value, list) else [value] * 3
    if len(values) != 3 or not all(isinstance(v, (int, float)) and math.isfinite(v) and v > 0 for v in values):
        return None
    return [float(v) for v in values]


def _shown(name: str, transform: dict[str, Any]) -> str:
    args = {k: v for k, v in transform.items() if k not in ("_target_", "keys")}
    return f"{name}({', '.join(f'{k}={v!r}' for k, v in list(args.items())[:4])})"


def _intensity(name: str, transform: dict[str, Any]) -> dict[str, Any]:
    if name == "ScaleIntensityRange":
        values = {k: transform.get(k) for k in ("a_min", "a_max", "b_min", "b_max")}
        if not all(v is None or (isinstance(v, (int, float)) and math.isfinite(v)) for v in values.values()) or \
                values["a_min"] is None or values["a_max"] is None:
            raise TransformError(f"ScaleIntensityRange needs numbers a_min and a_max (b_min, b_max optional), got {values}")
        return {"scheme": "scale-range", **{k: None if v is None else float(v) for k, v in values.items()},
                "clip": bool(transform.get("clip", False))}
    if transform.get("subtrahend") is not None or transform.get("divisor") is not None:
        raise TransformError("NormalizeIntensity with a fixed subtrahend or divisor is not reproduced (only the "
                             "image's own mean and standard deviation)")
    return {"scheme": "monai-zscore", "nonzero": bool(transform.get("nonzero", False)),
            "channel_wise": bool(transform.get("channel_wise", False))}


def intensity_entry(pre: dict[str, Any], in_channels: int) -> dict[str, Any]:
    """The engine's `normalization` record (`runtime.preprocessing.normalize`) for the bundle's intensity transform."""
    entry = pre.get("intensity") or {"scheme": "none"}
    if entry["scheme"] == "monai-zscore" and in_channels > 1 and not entry["channel_wise"]:
        raise TransformError("NormalizeIntensity over all channels together (channel_wise=False) with "
                             f"{in_channels} input channels is not reproduced; nnslim normalizes per channel")
    return {"scheme": "per-channel", "channels": [dict(entry) for _ in range(in_channels)]}


def read_postprocessing(config: dict[str, Any], num_classes: int, key: str = "pred") -> dict[str, Any]:
    """The engine's `postprocessing` record: `{"kind": "argmax"}`, or sigmoid thresholding as
    nnU-Net's regions (`class_order` 1..K, `threshold_logit` = logit of the threshold)."""
    activation, threshold, refused = None, None, []
    for transform in _transforms(config, "postprocessing"):
        name = _name(transform)
        if not _touches(transform, key, config) or name in _NEUTRAL:
            continue
        transform = _arguments(transform, name, config, f"postprocessing.{name}")
        if name == "Activations" and not transform.get("other"):
            activation = "sigmoid" if transform.get("sigmoid") else "softmax" if transform.get("softmax") else activation
        elif name == "AsDiscrete" and transform.get("argmax"):
            threshold = None
        elif name == "AsDiscrete" and isinstance(transform.get("threshold"), (int, float)):
            threshold = float(transform["threshold"])
        else:
            refused.append(_shown(name, transform))
    if refused:
        raise TransformError(f"the bundle's postprocessing has transform(s) nnslim cannot reproduce: {'; '.join(refused)}. "
                             "It reproduces Activations (softmax, sigmoid) and AsDiscrete (argmax, threshold)")
    if threshold is not None and activation != "sigmoid":
        raise TransformError(f"AsDiscrete(threshold={threshold}) after {activation or 'no activation'}: thresholding "
                             "softmax outputs (a multi-label mask) is not reproduced; nnslim maps sigmoid + threshold "
                             "and argmax")
    if threshold is None:
        return {"kind": "argmax"}
    if not 0 < threshold < 1:
        raise TransformError(f"AsDiscrete threshold {threshold} after a sigmoid must be in (0, 1)")
    return {"kind": "regions", "class_order": list(range(1, num_classes + 1)),
            "threshold_logit": math.log(threshold / (1 - threshold)), "label_values": list(range(1, num_classes + 1))}
