"""nnU-Net's `postprocessing.pkl` (from `nnUNetv2_find_best_configuration`), read without running it.

The file is a pickle of `(functions, keyword arguments)`. Unpickling it with `pickle.load` would run
whatever it names, so it is read with an allow-listed unpickler (`read_steps`): nnU-Net's own
post-processing function is mapped by its module and name to nnslim's implementation, numpy integers
to Python integers decoded from their bytes (no numpy object is built from the file), and any other
name is refused before anything is built. Sizes and nesting are bounded. What it may hold:

    nnunetv2.postprocessing.remove_connected_components.remove_all_but_largest_component_from_segmentation
        labels_or_regions: a label, a region (a tuple of labels) or a list of them; background_label

`read_steps` returns them as JSON-ready steps, `{"function": "remove_all_but_largest_component",
"regions": [[label, ...], ...], "background_label": label}` (a label is a region of one), the form an
engine's manifest stores (`build-engine --postprocessing`, checked by `check_steps`).
`apply_steps` then does what nnU-Net's `apply_postprocessing` does: for each step, the voxels of
those labels or regions keep only their largest connected component (26-connectivity, as
scikit-image's `label` with its default; components tied for largest are all kept) and the rest
become background.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from nnslim.compiler.runtime.nnunet import pickles
from nnslim.errors import InputError

LARGEST_COMPONENT = "remove_all_but_largest_component"
_FUNCTIONS = {
    ("nnunetv2.postprocessing.remove_connected_components", "remove_all_but_largest_component_from_segmentation"):
        LARGEST_COMPONENT,
}
MAX_BYTES = 1 << 20  # a post-processing file is a few hundred bytes


class _Function(str):
    """An allow-listed function, as the name of nnslim's implementation (never called)."""


MAX_LABEL = 255  # nnslim's label maps are uint8
MAX_LABELS = 10_000  # labels named by all steps together (a dataset has at most 255)


def _label(value: Any, where: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_LABEL:
        return value
    raise InputError(f"{where} holds {pickles.shown(value)}; a label is an integer in 0..{MAX_LABEL}")


def _labels(value: Any, where: str) -> list[list[int]]:
    """nnU-Net's `labels_or_regions` (a label, a region: a tuple of labels, or a list of labels and
    regions) as a list of regions; anything else (a list inside a list, say) is refused."""
    items = value if isinstance(value, list) and value else [value]
    if len(items) > MAX_LABEL + 1:
        raise InputError(f"{where} lists {len(items)} labels or regions; a dataset has at most {MAX_LABEL}")
    regions = []
    for item in items:
        if isinstance(item, tuple) and 0 < len(item) <= MAX_LABEL + 1:
            regions.append([_label(v, where) for v in item])
        else:
            regions.append([_label(item, where)])
    return regions


def read_steps(path: str | Path) -> list[dict[str, Any]]:
    """The steps of an nnU-Net `postprocessing.pkl` (module docstring): `[{"function", "labels_or_regions",
    "background_label"}, ...]`; anything else in the file is an `InputError`."""
    path = Path(path)
    names = {key: _Function(name) for key, name in _FUNCTIONS.items()}  # numbers: integers only
    loaded = pickles.read(path, "an nnU-Net postprocessing.pkl", names, pickles.INTEGERS, MAX_BYTES)
    if not (isinstance(loaded, tuple) and len(loaded) == 2 and all(isinstance(x, list) for x in loaded)
            and len(loaded[0]) == len(loaded[1])):
        raise InputError(f"{path.name} holds {type(loaded).__name__}; nnU-Net's is (functions, keyword arguments)")
    steps = []
    if len(loaded[0]) > 100:
        raise InputError(f"{path.name} lists {len(loaded[0])} steps; nnU-Net writes a handful")
    for i, (function, kwargs) in enumerate(zip(*loaded)):
        if not isinstance(function, _Function) or not isinstance(kwargs, dict) or \
                not set(kwargs) <= {"labels_or_regions", "background_label"} or "labels_or_regions" not in kwargs:
            raise InputError(f"{path.name}: step {i} is {pickles.shown(function, 60)} with {pickles.shown(kwargs, 80)}; "
                             "expected nnU-Net's "
                             "remove_all_but_largest_component_from_segmentation with labels_or_regions")
        where = f"{path.name}: step {i}"
        steps.append({"function": str(function), "regions": _labels(kwargs["labels_or_regions"], where),
                      "background_label": _label(kwargs.get("background_label", 0), f"{where} background_label")})
    return check_steps(steps, path.name)


def check_steps(steps: Any, where: str = "postprocessing.steps") -> list[dict[str, Any]]:
    """Steps as `read_steps` returns them and a manifest stores them (JSON): each
    `{"function": "remove_all_but_largest_component", "regions": [[label, ...], ...],
    "background_label": label}`; the union of the regions keeps its largest component."""
    if not isinstance(steps, list) or len(steps) > 100:
        raise InputError(f"{where} is {pickles.shown(steps, 60)}; expected a list of at most 100 steps")
    named = 0
    for i, step in enumerate(steps):
        regions = step.get("regions") if isinstance(step, dict) else None
        if isinstance(regions, list):
            named += sum(len(r) if isinstance(r, list) else 1 for r in regions)
        if named > MAX_LABELS:
            raise InputError(f"{where} names more than {MAX_LABELS} labels; nnU-Net's steps name a dataset's few")
        if not (isinstance(step, dict) and set(step) == {"function", "regions", "background_label"}
                and step["function"] == LARGEST_COMPONENT and isinstance(regions, list) and regions
                and all(isinstance(r, list) and r for r in regions)):
            raise InputError(f"{where}[{i}] is {pickles.shown(step, 80)}; expected {{\"function\": "
                             f"\"{LARGEST_COMPONENT}\", \"regions\": [[label, ...], ...], \"background_label\": label}}")
        for region in regions:
            for label in region:
                _label(label, f"{where}[{i}].regions")
        _label(step["background_label"], f"{where}[{i}].background_label")
    return steps


def _mask(labels: np.ndarray, regions: list[list[int]]) -> np.ndarray:
    """The voxels of any of the regions (a region: the voxels of any of its labels)."""
    return np.isin(labels, sorted({label for region in regions for label in region}))


def apply_steps(labels: np.ndarray, steps: list[dict[str, Any]]) -> np.ndarray:
    """`labels` after the steps (module docstring); a new array, the input is left as it is."""
    from scipy.ndimage import label

    out = labels
    for step in steps:
        mask = _mask(out, step["regions"])
        components, count = label(mask, structure=np.ones((3,) * out.ndim, dtype=bool))
        if count <= 1:
            continue
        sizes = np.bincount(components.ravel())[1:]
        keep = np.isin(components, np.flatnonzero(sizes == sizes.max()) + 1)
        out = out.copy() if out is labels else out
        out[mask & ~keep] = step["background_label"]
    return out
