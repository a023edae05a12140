"""Preprocessing before the sliding window, as the manifest's `preprocessing` entry says.

`prepare`, each step only when the entry asks for it:
0. `orientation` (MONAI's `Orientation`, e.g. "RAS"): the voxel axes flipped and permuted so that
   they run along those world directions (`reorientation`, from the scan's affine; exact, no
   interpolation). An in-memory array has no affine and is taken as already oriented.
1. axis order: `"reversed"` turns nibabel's `[X, Y, Z]` voxel array into SimpleITK's `[Z, Y, X]`
   (what nnU-Net trains on); then `transpose_forward` permutes the axes (spacing follows).
2. `crop_to_nonzero`: crop to the bounding box of the voxels nonzero in any channel (holes
   filled), as nnU-Net does; the mask is kept for masked z-score.
3. normalization, per channel (nnU-Net's classes) or nnslim's single z-score (see `normalize`).
4. `resample`: to the model's spacing (trilinear, torch's `interpolate` rule with
   `align_corners=False`, in numpy: `linear_weights`), shape `round(size * old / new)`;
   a 2D model's spacing has two entries and the first axis keeps its spacing.
The `Prepared` record keeps what undoes the geometry after the window (`postprocessing`).

An entry with `resampling` (nnU-Net engines: `{"rule": "nnunet", ...}`) resamples as nnU-Net does
instead (`nnunet.resampling`: third-order splines, anisotropic axes on their own, logits back with that
per-axis order); an entry with `previous_stage` (a cascade) appends the previous stage's label map
as one-hot channels (`previous_labels`). Without `resampling` (nnslim's and ONNX models), both
ways are trilinear.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from nnslim.errors import EngineError, InputError

# nnslim's own schemes: (scheme, mask, outside). "outside": "zero" is nnU-Net's `use_mask_for_norm`:
# voxels outside the nonzero mask stay 0, so air, the runtime's padding and a volume a user zeroed
# outside the body all reach the network as the same 0. "transform" (older checkpoints) z-scores them
# too, which turns air into one negative constant that differs from the padding.
SCHEMES = {("zscore", "nonzero", "transform"), ("zscore", "none", "transform"), ("zscore", "nonzero", "zero")}
DEFAULT_NORMALIZATION = {"scheme": "zscore", "mask": "nonzero", "outside": "zero"}
CHANNEL_SCHEMES = ("ct", "zscore", "none", "rescale01", "rgb01", "scale-range", "monai-zscore")


def zscore_channel(channel: np.ndarray, statistics_from: np.ndarray | None = None) -> np.ndarray:
    """In place: subtract the mean and divide by the standard deviation (floored at 1e-8) of the
    voxels in `statistics_from` (all voxels when None or empty); every voxel is transformed.

    The one z-score of nnslim: training (`training.data`) and inference use it. float32
    arithmetic, statistics taken in float32 and applied as Python floats (nnU-Net's order).
    """
    values = channel[statistics_from] if statistics_from is not None and statistics_from.any() else channel
    mean, std = float(values.mean()), max(float(values.std()), 1e-8)
    del values  # large volumes: free the masked copy before transforming
    channel -= mean
    channel /= std
    return channel


def zscore_normalize(image: np.ndarray, nonzero: bool = True, zero_outside: bool = False) -> np.ndarray:
    """nnslim's normalization of `[C, *spatial]`: per channel, `zscore_channel` with the statistics
    of the channel's nonzero voxels (`nonzero`), or of all voxels. With `zero_outside` the voxels
    that are 0 stay 0 (nnU-Net's `use_mask_for_norm`). Returns a float32 copy."""
    image = np.array(image, dtype=np.float32)  # a copy: the caller's volume is left as it is
    for channel in image:  # in place on the copy: large volumes hold one normalized copy, not two
        outside = channel == 0 if zero_outside else None
        zscore_channel(channel, channel != 0 if nonzero else None)
        if outside is not None:
            channel[outside] = 0.0
    return image


def nnslim_normalize(image: np.ndarray, normalization: dict) -> np.ndarray:
    """nnslim's own scheme (`SCHEMES`), as a checkpoint's or manifest's `normalization` entry names it:
    the one function training and inference both normalize with."""
    key = (normalization.get("scheme"), normalization.get("mask", "none"), normalization.get("outside", "transform"))
    if key not in SCHEMES:
        raise EngineError(f"unsupported normalization {normalization}; this nnslim knows (scheme, mask, outside) in "
                          f"{sorted(SCHEMES)}")
    return zscore_normalize(image, nonzero=key[1] == "nonzero", zero_outside=key[2] == "zero")


def normalize(image: np.ndarray, normalization: dict, mask: np.ndarray | None = None) -> np.ndarray:
    """Normalize `[C, *spatial]` as the manifest's `normalization` entry says.

    nnslim's own scheme, `{"scheme": "zscore", "mask": "nonzero" | "none", "outside": "zero" |
    "transform"}`: `nnslim_normalize`, the function training normalizes with.

    nnU-Net's, `{"scheme": "per-channel", "channels": [...]}`, one entry per channel:
    `ct` clips to `clip` and applies the stored `mean` / `std`; `zscore` uses the channel's own
    statistics, with `mask: "nonzero-region"` only inside `mask` (the crop's nonzero region,
    voxels outside it unchanged); `rescale01` maps min..max to 0..1; `rgb01` divides by 255;
    `none` leaves the channel as it is. Arithmetic in float32 in nnU-Net's order.

    MONAI's (a bundle's transforms, `stages.monai_bundle`): `scale-range` is
    `ScaleIntensityRange`: `(x - a_min) / (a_max - a_min)`, then `* (b_max - b_min) + b_min` and
    clipped to `[b_min, b_max]` when `clip`; `monai-zscore` is `NormalizeIntensity` per channel:
    `(x - mean) / std` over the voxels that are nonzero (`nonzero`; the others stay) or all, a zero
    std taken as 1.
    """
    if normalization.get("scheme") != "per-channel":
        return nnslim_normalize(image, normalization)
    image = np.array(image, dtype=np.float32)  # a copy: the caller's volume is left as it is
    channels = normalization.get("channels") or []
    if len(channels) != len(image):
        raise EngineError(f"normalization lists {len(channels)} channels but the image has {len(image)}")
    for c, entry in enumerate(channels):
        image[c] = _normalize_channel(image[c], entry, mask)
    return image


def _normalize_channel(channel: np.ndarray, entry: dict, mask: np.ndarray | None) -> np.ndarray:
    scheme = entry.get("scheme")
    if scheme == "ct":
        lower, upper = entry["clip"]
        np.clip(channel, lower, upper, out=channel)
        channel -= entry["mean"]
        channel /= max(entry["std"], 1e-8)
    elif scheme == "zscore" and entry.get("mask") == "nonzero-region" and mask is not None:
        channel[mask] = zscore_channel(channel[mask])  # only inside the region, as nnU-Net
    elif scheme == "zscore":
        zscore_channel(channel)
    elif scheme == "rescale01":
        channel -= channel.min()
        channel /= max(float(channel.max()), 1e-8)
    elif scheme == "rgb01":
        channel /= 255.0
    elif scheme == "scale-range":
        _scale_range(channel, entry)
    elif scheme == "monai-zscore":
        selected = channel != 0 if entry.get("nonzero") else np.ones(channel.shape, dtype=bool)
        if selected.any():
            values = channel[selected]
            std = float(values.std())
            channel[selected] = (values - float(values.mean())) / (std if std != 0.0 else 1.0)
    elif scheme != "none":
        raise EngineError(f"unsupported channel normalization {entry}; this nnslim knows {CHANNEL_SCHEMES}")
    return channel


def _scale_range(channel: np.ndarray, entry: dict) -> None:
    """MONAI's `ScaleIntensityRange`, in place, in its order (`normalize`)."""
    a_min, a_max, b_min, b_max = (entry.get(k) for k in ("a_min", "a_max", "b_min", "b_max"))
    if a_max == a_min:  # MONAI warns and shifts
        channel -= a_min
        if b_min is not None:
            channel += b_min
        return
    channel -= a_min
    channel /= a_max - a_min
    if b_min is not None and b_max is not None:
        channel *= b_max - b_min
        channel += b_min
    if entry.get("clip"):
        np.clip(channel, b_min, b_max, out=channel)


def nonzero_mask(data: np.ndarray) -> np.ndarray:
    """Voxels nonzero in any channel, holes filled (nnU-Net's crop mask)."""
    from scipy.ndimage import binary_fill_holes  # only nnU-Net engines crop: scipy is imported then

    return binary_fill_holes(np.any(data != 0, axis=0))


def bounding_box(mask: np.ndarray) -> tuple[slice, ...]:
    """The smallest box holding every True voxel (the whole array when there is none)."""
    if not mask.any():
        return tuple(slice(0, s) for s in mask.shape)
    box = []
    for axis in range(mask.ndim):
        present = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        box.append(slice(int(present[0]), int(present[-1]) + 1))
    return tuple(box)


def resampled_shape(shape: tuple[int, ...], spacing: tuple[float, ...], target: tuple[float, ...]) -> tuple[int, ...]:
    """nnU-Net's rule: `round(size * spacing / target)` per axis."""
    return tuple(int(round(s * a / b)) for s, a, b in zip(shape, spacing, target))


def linear_weights(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Linear interpolation from `n_in` samples to `n_out`, as torch's `interpolate` does it with
    `align_corners=False` (in float32): output `o` reads `x = max(0, (o + 0.5) * n_in / n_out - 0.5)`
    from samples `i0 = floor(x)` and `i1 = min(i0 + 1, n_in - 1)` with weights `1 - f` and `f`,
    `f = x - i0`. Returns `(i0, i1, w0, w1)`, one entry per output sample."""
    scale = np.float32(n_in) / np.float32(n_out)
    x = np.maximum((np.arange(n_out, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5), np.float32(0))
    i0 = np.minimum(x.astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    w1 = (x - i0).astype(np.float32)
    return i0, i1, (np.float32(1) - w1).astype(np.float32), w1


def axis_weights(n_in: int, n_out: int, order: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """`linear_weights` (order 1), or nnU-Net's nearest sample along an anisotropic axis (order 0,
    `resampling.nearest_indices`), in the same `(i0, i1, w0, w1)` form."""
    if order == 0:
        from nnslim.compiler.runtime.nnunet.resampling import nearest_indices

        return nearest_indices(n_in, n_out)
    return linear_weights(n_in, n_out)


def resample_axis(data, axis: int, n_out: int, arrays=None, order: int = 1):
    """`data` resampled to `n_out` samples along `axis` (`axis_weights`: linear, or nearest for
    order 0): numpy, or a torch tensor on its device with `arrays` its namespace (`window.arrays`)."""
    n_in = data.shape[axis]
    if n_in == n_out:
        return data
    i0, i1, w0, w1 = axis_weights(n_in, n_out, order)
    shape = [1] * data.ndim
    shape[axis] = n_out
    if arrays is not None:
        w0, w1 = (arrays.beside(arrays.asarray(w), data) for w in (w0, w1))
    lower = data[(slice(None),) * axis + (i0,)]
    upper = data[(slice(None),) * axis + (i1,)]
    return lower * w0.reshape(shape) + upper * w1.reshape(shape)


def resample(data: np.ndarray, shape: tuple[int, ...], orders: tuple[int, ...] | None = None) -> np.ndarray:
    """`[C, *spatial]` to `shape` by (tri)linear interpolation, as torch's `interpolate` with
    `align_corners=False` (or nearest along the axes whose entry of `orders` is 0): one axis at a
    time, the last first (torch's order); unchanged when the shape is equal."""
    if tuple(data.shape[1:]) == tuple(shape):
        return data
    out = np.asarray(data, dtype=np.float32)
    for axis in reversed(range(1, out.ndim)):
        out = resample_axis(out, axis, int(shape[axis - 1]), order=orders[axis - 1] if orders else 1)
    return out.astype(data.dtype, copy=False)


@dataclass
class Prepared:
    """A normalized model-space image and what `postprocessing` needs to undo the geometry."""

    image: np.ndarray              # [C, *model-space shape], float32
    permutation: tuple[int, ...]   # model axis i is input array axis permutation[i]
    flips: tuple[int, ...]         # input array axes reversed before the permutation (orientation)
    full_shape: tuple[int, ...]    # permuted, before cropping
    box: tuple[slice, ...]         # the crop inside full_shape
    cropped_shape: tuple[int, ...]  # before resampling
    spacing: tuple[float, ...]     # permuted input spacing
    target_spacing: tuple[float, ...] | None
    back_orders: tuple[int, ...] = (1, 1, 1)  # per model axis, how logits go back: 1 linear, 0 nearest


def _permutation(pre: dict, oriented: tuple[int, ...] = (0, 1, 2)) -> tuple[int, ...]:
    order = (2, 1, 0) if pre.get("axis_order") == "reversed" else (0, 1, 2)
    transpose = tuple(pre.get("transpose_forward") or (0, 1, 2))
    if sorted(transpose) != [0, 1, 2]:
        raise EngineError(f"transpose_forward {transpose} is not a permutation of (0, 1, 2)")
    return tuple(oriented[order[t]] for t in transpose)


def model_axes(pre: dict) -> tuple[int, ...]:
    """The network's axes as input array axes (axis order and `transpose_forward`; no orientation)."""
    return _permutation(pre)


def reorientation(axcodes: str | None, ras_axes: np.ndarray | None) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """MONAI's `Orientation(axcodes)` as `(order, flips)`: oriented axis j is input axis `order[j]`,
    and the input axes in `flips` are reversed first (nibabel's `io_orientation` of the scan's
    3x3 RAS matrix `ras_axes`, `ornt_transform` to `axcodes`). Identity without either."""
    if not axcodes or ras_axes is None:
        return (0, 1, 2), ()
    from nibabel.orientations import axcodes2ornt, io_orientation, ornt_transform

    affine = np.eye(4)
    affine[:3, :3] = ras_axes
    transform = ornt_transform(io_orientation(affine), axcodes2ornt(tuple(axcodes)))
    order = tuple(int(a) for a in np.argsort(transform[:, 0]))
    return order, tuple(int(a) for a in range(3) if transform[a, 1] == -1)


def target_spacing(pre: dict, spacing: tuple[float, ...]) -> tuple[float, ...] | None:
    """The model's spacing for this image (a 2D model keeps the first axis' spacing)."""
    target = pre.get("spacing")
    if not target:
        return None
    target = tuple(float(s) for s in target)
    return (spacing[0], *target) if len(target) == len(spacing) - 1 else target


def prepare(data: np.ndarray, spacing: tuple[float, ...], pre: dict, ras_axes: np.ndarray | None = None,
            previous: np.ndarray | None = None) -> Prepared:
    """Input array `[C, X, Y, Z]` with its voxel spacing (and its RAS axes, for `orientation`) ->
    normalized model-space image (module docstring). `previous`: a cascade's previous-stage label
    map `[X, Y, Z]`, required when the entry has `previous_stage` (`previous_labels`)."""
    oriented, flips = reorientation(pre.get("orientation"), ras_axes)
    permutation = _permutation(pre, oriented)
    stage = cascade_labels(pre)
    if stage is not None:
        check_previous(previous, tuple(data.shape[1:]), pre)
    if flips:
        data = np.flip(data, tuple(a + 1 for a in flips))
        previous = None if previous is None else np.flip(previous, flips)
    data = np.ascontiguousarray(data.transpose(0, *(p + 1 for p in permutation)))
    spacing = tuple(float(spacing[p]) for p in permutation)
    full_shape = data.shape[1:]
    mask = None
    box = tuple(slice(0, s) for s in full_shape)
    if pre.get("crop_to_nonzero"):
        mask = nonzero_mask(data)
        box = bounding_box(mask)
        data, mask = data[(slice(None), *box)], mask[box]
    seg = None
    if stage is not None:  # nnU-Net: labelled voxels join the normalization mask, unlabelled ones outside it are -1
        seg = np.ascontiguousarray(previous.transpose(permutation))[box].astype(np.int16)
        if mask is not None:
            seg[(seg == 0) & ~mask] = -1
            mask = seg >= 0
    image = normalize(data, pre["normalization"], mask)
    target = target_spacing(pre, spacing) if pre.get("resample") else None
    rule, orders = pre.get("resampling"), (1, 1, 1)
    if target is not None:
        shape = resampled_shape(image.shape[1:], spacing, target)
        if rule is None:
            image = resample(image, shape)
        else:
            from nnslim.compiler.runtime.nnunet import resampling

            image = resampling.resample_image(image, shape, spacing, target, resampling.settings(rule, "data"))
            orders = resampling.axis_orders(resampling.settings(rule, "probabilities"), target, spacing)
    prepared = Prepared(image, permutation, flips, full_shape, box, tuple(data.shape[1:]), spacing, target, orders)
    if seg is not None:
        prepared.image = np.concatenate([image, previous_labels(seg, prepared, pre, stage)])
    return prepared


def cascade_labels(pre: dict) -> list[int] | None:
    """A cascade entry's foreground labels (`previous_stage.labels`), checked; None for other engines."""
    stage = pre.get("previous_stage")
    if stage is None:
        return None
    labels = stage.get("labels") if isinstance(stage, dict) else None
    if not isinstance(labels, list) or not all(type(v) is int for v in labels):
        raise EngineError(f"manifest preprocessing.previous_stage is {stage!r:.80}, expected its foreground labels; "
                          "rebuild the engine")
    return labels


def check_previous(previous: np.ndarray | None, shape: tuple[int, ...], pre: dict) -> None:
    """A cascade's previous-stage label map is there and has the image's shape `[X, Y, Z]`."""
    if previous is None:
        raise InputError(f"this engine is a cascade stage: it needs the segmentation of its previous stage "
                         f"({pre['previous_stage'].get('configuration', 'another configuration')}) beside the image")
    if tuple(previous.shape) != tuple(shape):
        raise InputError(f"the previous stage's segmentation has shape {tuple(previous.shape)}, the image "
                         f"{tuple(shape)}; use the segmentation the previous stage wrote for this case")


def previous_labels(seg: np.ndarray, prepared: Prepared, pre: dict, labels: list[int]) -> np.ndarray:
    """A cascade's extra input (nnU-Net's `3d_cascade_fullres`): the previous stage's labels, already
    in model space and cropped as the image (background outside the nonzero mask -1, as nnU-Net's
    cropping makes it: it changes which label wins a vote), resampled as nnU-Net resamples
    segmentations (`nnunet.resampling.resample_labels`), one float32 channel per foreground label."""
    shape = tuple(prepared.image.shape[1:])
    if seg.shape != shape:
        from nnslim.compiler.runtime.nnunet import resampling

        rule = resampling.settings(pre.get("resampling") or {}, "seg")
        seg = resampling.resample_labels(seg, shape, prepared.spacing, prepared.target_spacing, rule)
    return np.stack([seg == v for v in labels]).astype(np.float32)
