"""nnU-Net's resampling rule, reproduced: what an nnU-Net engine's manifest records under
`preprocessing.resampling` (`{"rule": "nnunet", "data": {...}, "seg": {...}, "probabilities": {...}}`,
each the plans' `resampling_fn_*_kwargs`: `order`, `order_z`, `force_separate_z`).

nnU-Net v2 (`resample_data_or_seg_to_shape`, nnunetv2 2.8 with batchgenerators 0.25) resamples:
- images with `order` 3 splines (scikit-image's `resize`: `scipy.ndimage.zoom` with `grid_mode`,
  edge padding, the result clipped to the input's range), in float64;
- label maps (a cascade's previous stage) one label at a time: each label's indicator at `order` 1,
  the label with the highest score wins, exact ties go to the nearest neighbour's label
  (batchgenerators' `resize_segmentation`, `seg_tiebreak="nearest"`);
- when either spacing is anisotropic (largest / smallest > 3) along one axis, "separately": each
  slice across that axis in 2D as above, then along the axis with `order_z` (0: nearest).
Logits go back to the input's spacing with the `probabilities` entry: linear in the plane (the same
rule as nnslim's trilinear streaming, `postprocessing`) and, separately, `order_z` along the
anisotropic axis: `axis_orders` gives the streaming labeler that per-axis order.

scipy does the interpolation (`zoom`, the function scikit-image calls); this module only decides
what nnU-Net decides: which axis, which order, and how labels are voted.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from nnslim.errors import EngineError

ANISOTROPY = 3.0  # nnU-Net's ANISO_THRESHOLD
KINDS = ("data", "seg", "probabilities")
DEFAULTS = {"data": {"order": 3, "order_z": 0, "force_separate_z": None},
            "seg": {"order": 1, "order_z": 0, "force_separate_z": None},
            "probabilities": {"order": 1, "order_z": 0, "force_separate_z": None}}


def settings(record: Any, kind: str) -> dict[str, Any]:
    """One kind's checked `order`, `order_z`, `force_separate_z` from a manifest's `resampling` record."""
    entry = record.get(kind, DEFAULTS[kind]) if isinstance(record, dict) else None
    if not isinstance(entry, dict):
        raise EngineError(f"manifest preprocessing.resampling.{kind} is {entry!r:.60}, expected an object with "
                          "order, order_z and force_separate_z; rebuild the engine")
    out = {**DEFAULTS[kind], "separate_z_anisotropy_threshold": ANISOTROPY,
           **{k: v for k, v in entry.items() if k in (*DEFAULTS[kind], "separate_z_anisotropy_threshold")}}
    threshold = out["separate_z_anisotropy_threshold"]
    if type(threshold) not in (int, float) or not 1 <= threshold <= 1e6:
        raise EngineError(f"manifest preprocessing.resampling.{kind}.separate_z_anisotropy_threshold is "
                          f"{threshold!r:.40}, expected a number in [1, 1e6]; rebuild the engine")
    limit = 5
    for key in ("order", "order_z"):
        if type(out[key]) is not int or not 0 <= out[key] <= limit:
            raise EngineError(f"manifest preprocessing.resampling.{kind}.{key} is {out[key]!r}, expected an integer "
                              f"in 0..{limit}; rebuild the engine")
    if kind == "probabilities" and out["order"] != 1:
        raise EngineError(f"preprocessing.resampling.probabilities.order {out['order']}: nnslim resamples logits back "
                          "linearly (order 1, nnU-Net's default) only")
    if out["order_z"] > 1:
        raise EngineError(f"preprocessing.resampling.{kind}.order_z {out['order_z']}: nnslim reproduces orders 0 and "
                          "1 along the anisotropic axis (nnU-Net's default is 0)")
    if out["force_separate_z"] not in (None, True, False):
        raise EngineError(f"manifest preprocessing.resampling.{kind}.force_separate_z is {out['force_separate_z']!r}"
                          ", expected null, true or false; rebuild the engine")
    return out


def _lowres_axes(spacing: tuple[float, ...]) -> np.ndarray:
    s = np.asarray(spacing, dtype=float)
    return np.where(max(s) / s == 1)[0]


def separate_axis(current: tuple[float, ...], new: tuple[float, ...], force: bool | None,
                  threshold: float = ANISOTROPY) -> int | None:
    """The axis nnU-Net resamples on its own (`determine_do_sep_z_and_axis`), or None."""
    if force is not None:
        axes = _lowres_axes(current) if force else None
    elif max(current) / min(current) > threshold:
        axes = _lowres_axes(current)
    elif max(new) / min(new) > threshold:
        axes = _lowres_axes(new)
    else:
        axes = None
    return int(axes[0]) if axes is not None and len(axes) == 1 else None


def _separate(rule: dict[str, Any], current: tuple[float, ...], new: tuple[float, ...]) -> int | None:
    """`separate_axis` with a rule's `force_separate_z` and threshold."""
    return separate_axis(current, new, rule["force_separate_z"],
                         rule.get("separate_z_anisotropy_threshold", ANISOTROPY))


def zoom(image: np.ndarray, shape: tuple[int, ...], order: int) -> np.ndarray:
    """scikit-image's `resize(image, shape, order, mode="edge", anti_aliasing=False)` on float64."""
    from scipy import ndimage

    factors = np.divide(image.shape, shape)
    out = ndimage.zoom(image, [1 / f for f in factors], order=order, mode="nearest", grid_mode=True)
    return np.clip(out, image.min(), image.max(), out=out)


def _coordinates(n_in: int, n_out: int) -> np.ndarray:
    """nnU-Net's sample positions `s * (o + 0.5) - 0.5` (`s = n_in / n_out`), clamped as mode "nearest" does."""
    return np.clip(float(n_in) / n_out * (np.arange(n_out) + 0.5) - 0.5, 0, n_in - 1)


def along_axis(data: np.ndarray, axis: int, n_out: int, order: int) -> np.ndarray:
    """`map_coordinates(..., order, mode="nearest")` at nnU-Net's coordinates (`_coordinates`)
    along `axis` only (the plane's coordinates are the identity there): nearest or linear."""
    n_in = data.shape[axis]
    x = _coordinates(n_in, n_out)
    moved = np.moveaxis(data, axis, 0)
    if order == 0:
        return np.moveaxis(moved[np.floor(x + 0.5).astype(np.int64)], 0, axis)
    i0 = np.floor(x).astype(np.int64)
    i1 = np.minimum(i0 + 1, n_in - 1)
    f = (x - i0).reshape(-1, *[1] * (data.ndim - 1))
    return np.moveaxis(moved[i0] * (1 - f) + moved[i1] * f, 0, axis)


def nearest_indices(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """`along_axis`'s order 0 as `(i0, i1, w0, w1)` for the streaming labeler (`linear_weights`' form)."""
    i0 = np.floor(_coordinates(n_in, n_out) + 0.5).astype(np.int64)
    return i0, i0, np.ones(n_out, np.float32), np.zeros(n_out, np.float32)


def _separately(channel: np.ndarray, shape: tuple[int, ...], axis: int, order_z: int, resize) -> np.ndarray:
    """Each slice across `axis` resized in 2D by `resize`, then `along_axis` with `order_z`."""
    plane = tuple(s for a, s in enumerate(shape) if a != axis)
    slices = np.moveaxis(channel, axis, 0)
    in_plane = np.moveaxis(np.stack([resize(s, plane) for s in slices]), 0, axis)
    if channel.shape[axis] == shape[axis]:
        return in_plane
    return along_axis(in_plane, axis, shape[axis], order_z)


def resample_image(data: np.ndarray, shape: tuple[int, ...], current: tuple[float, ...], new: tuple[float, ...],
                   rule: dict[str, Any]) -> np.ndarray:
    """`[C, *spatial]` float32 to `shape`, as nnU-Net resamples images (module docstring)."""
    shape = tuple(int(s) for s in shape)
    if tuple(data.shape[1:]) == shape:
        return data
    axis = _separate(rule, current, new)
    out = np.zeros((data.shape[0], *shape), dtype=data.dtype)
    for c in range(data.shape[0]):
        channel = data[c].astype(np.float64)
        if axis is None:
            out[c] = zoom(channel, shape, rule["order"])
        else:
            out[c] = _separately(channel, shape, axis, rule["order_z"], lambda s, p: zoom(s, p, rule["order"]))
    return out


def resize_labels(seg: np.ndarray, shape: tuple[int, ...], order: int) -> np.ndarray:
    """batchgenerators' `resize_segmentation` (`seg_tiebreak="nearest"`): each label's indicator
    resized, the highest score wins (the lower label on a tie), and where the nearest neighbour's
    label shares the top score (and it is above 0) that label wins."""
    if order == 0:
        return zoom(seg.astype(np.float64), shape, 0).astype(seg.dtype)
    labels = np.unique(seg)
    if len(labels) == 1:
        return np.full(shape, labels[0], dtype=seg.dtype)
    nearest = zoom(seg.astype(np.float64), shape, 0)
    best, win, nearest_score = None, np.zeros(shape, dtype=np.int32), np.zeros(shape)
    for i, label in enumerate(labels):
        score = zoom((seg == label).astype(np.float64), shape, order)
        if best is None:
            best = score
        else:
            win[score > best] = i
            np.maximum(best, score, out=best)
        np.copyto(nearest_score, score, where=nearest == label)
    tied = (nearest_score == best) & (nearest_score > 0)
    win[tied] = np.searchsorted(labels, nearest[tied])
    return labels[win].astype(seg.dtype, copy=False)


def resample_labels(seg: np.ndarray, shape: tuple[int, ...], current: tuple[float, ...], new: tuple[float, ...],
                    rule: dict[str, Any]) -> np.ndarray:
    """A label map `[*spatial]` to `shape`, as nnU-Net resamples a previous stage's segmentation."""
    shape = tuple(int(s) for s in shape)
    if tuple(seg.shape) == shape:
        return seg
    axis = _separate(rule, current, new)
    if axis is None:
        return resize_labels(seg, shape, rule["order"])
    if rule["order_z"] == 0:  # nnU-Net: nearest label values along the axis
        return _separately(seg, shape, axis, 0, lambda s, p: resize_labels(s, p, rule["order"]))
    in_plane = _separately(seg, tuple(s if a != axis else seg.shape[axis] for a, s in enumerate(shape)), axis, 0,
                           lambda s, p: resize_labels(s, p, rule["order"]))
    out = np.zeros(shape, dtype=seg.dtype)
    for label in np.unique(in_plane):  # each label's indicator along the axis, rounded, later labels on top
        out[np.round(along_axis((in_plane == label).astype(np.float64), axis, shape[axis], rule["order_z"])) > 0.5] \
            = label
    return out


def axis_orders(rule: dict[str, Any], model_spacing: tuple[float, ...], spacing: tuple[float, ...]) -> tuple[int, ...]:
    """Per model axis, the order logits are resampled back with (1 linear, 0 nearest): nnU-Net's
    `probabilities` entry from the model's spacing to the input's."""
    axis = _separate(rule, model_spacing, spacing)
    return tuple(rule["order_z"] if a == axis else 1 for a in range(len(spacing)))
