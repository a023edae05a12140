"""nnU-Net's ensemble of configurations (`nnUNetv2_ensemble`), on nnU-Net's prediction files.

Each input folder holds `CASE.npz` (key `probabilities`, `[K, Z, Y, X]`) and `CASE.pkl` (the case's
properties) for the same cases, as `nnUNetv2_predict --save_probabilities` and
`nnslim-predict-nnunet --save_probabilities` write them, plus `dataset.json`. For each case the
probabilities are averaged in float32 (nnU-Net's `average_probabilities`), turned into labels as
nnU-Net's `LabelManager` does (argmax; region-based datasets: `p > 0.5` in `regions_class_order`,
later regions on top), and written in the dataset's `file_ending` with the geometry the first
folder's `.pkl` records (`sitk_stuff` or `nibabel_stuff`). `dataset.json` goes beside them; with
`save_npz`, the averaged `CASE.npz` and the `.pkl` too.

The `.pkl` files are read with an allow-list (`pickles`), never unpickled freely.
"""

from __future__ import annotations

import json
import math
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from nnslim.compiler.runtime.nnunet import pickles
from nnslim.compiler.runtime.nnunet import files
from nnslim.compiler.runtime.manifest.schema import parse_json
from nnslim.compiler.runtime.safety import require_fits
from nnslim.compiler.runtime.volumes.header import Geometry, SitkReference
from nnslim.compiler.runtime.volumes.volume import save_segmentation
from nnslim.errors import InputError
from nnslim.files import atomic_path

MAX_AXIS = 1 << 16  # voxels along one axis of a case


def read_properties(path: Path) -> dict[str, Any]:
    """A case's `.pkl` (`pickles`: numbers and small numeric arrays only)."""
    props = pickles.read(path, "an nnU-Net properties .pkl")
    if not isinstance(props, dict):
        raise InputError(f"{path.name} holds {type(props).__name__}; nnU-Net's properties are a dict")
    return props


def _numbers(value: Any, count: int, where: str) -> tuple[float, ...]:
    """`count` finite numbers (a tuple, list or small array), or an error naming what is there."""
    try:
        values = np.asarray(value, dtype=np.float64).ravel()
    except (TypeError, ValueError, OverflowError):
        values = np.zeros(0)
    if values.size != count or not np.all(np.isfinite(values)):
        raise InputError(f"{where} is {pickles.shown(value, 80)}; expected {count} finite numbers")
    return tuple(float(v) for v in values)


def geometry(props: dict[str, Any], name: str) -> Geometry:
    """Where the case's voxels sit, from its properties (SimpleITKIO's or NibabelIO's record)."""
    import nibabel as nib

    if isinstance(props.get("sitk_stuff"), dict):
        stuff = props["sitk_stuff"]
        spacing = _numbers(stuff.get("spacing"), 3, f"{name}: sitk_stuff.spacing")
        if not all(0 < s <= 1e4 for s in spacing):
            raise InputError(f"{name}: sitk_stuff.spacing is {spacing}; each voxel size must be in (0, 1e4] mm")
        return Geometry(itk=SitkReference(_numbers(stuff.get("origin"), 3, f"{name}: sitk_stuff.origin"), spacing,
                                          _numbers(stuff.get("direction"), 9, f"{name}: sitk_stuff.direction")))
    if isinstance(props.get("nibabel_stuff"), dict):
        affine = np.asarray(_numbers(props["nibabel_stuff"].get("original_affine"), 16,
                                     f"{name}: nibabel_stuff.original_affine")).reshape(4, 4)
        return Geometry(nifti=nib.Nifti1Image(np.zeros((1, 1, 1), dtype=np.uint8), affine))
    raise InputError(f"{name} has neither sitk_stuff nor nibabel_stuff; nnslim writes segmentations with "
                     "nnU-Net's SimpleITKIO or NibabelIO geometry only")


def label_rule(dataset: dict[str, Any]) -> tuple[int, list[int] | None]:
    """(heads, regions_class_order or None) of a dataset.json, as nnU-Net's LabelManager reads it."""
    labels = dataset.get("labels")
    if not isinstance(labels, dict) or not labels:
        raise InputError("dataset.json has no 'labels' mapping")
    values = [v for k, v in labels.items() if k != "ignore"]
    if not any(isinstance(v, (list, tuple)) and len(v) > 1 for v in values):
        return len(values), None
    order = dataset.get("regions_class_order")
    if not isinstance(order, list) or not all(type(c) is int and 0 < c <= 255 for c in order):
        raise InputError(f"dataset.json: region-based labels need regions_class_order (label values), got "
                         f"{pickles.shown(order, 60)}")
    return len(order), order


def to_labels(probabilities: np.ndarray, regions: list[int] | None) -> np.ndarray:
    """nnU-Net's `convert_probabilities_to_segmentation`: uint8 labels of `[K, ...]` probabilities."""
    if regions is None:
        return probabilities.argmax(0).astype(np.uint8)
    labels = np.zeros(probabilities.shape[1:], dtype=np.uint8)
    for head, value in enumerate(regions):
        labels[probabilities[head] > 0.5] = value
    return labels


def _load(path: Path, heads: int, voxels: int) -> np.ndarray:
    """`CASE.npz`'s probabilities, float `[heads, Z, Y, X]` with `voxels` voxels (the case's `.pkl`
    says how many): its header is read and checked (shape, float16/32/64) before anything is
    decompressed, and nothing past those bytes is read."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive, archive.open("probabilities.npy") as member:
            version = np.lib.format.read_magic(member)
            headers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
            if version not in headers:
                raise InputError(f"{path.name}: an .npy of format version {version}; numpy writes 1.0 or 2.0")
            shape, fortran, dtype = headers[version](member, max_header_size=10000)
            if (len(shape) != 4 or shape[0] != heads or not all(type(n) is int and n > 0 for n in shape)
                    or math.prod(shape[1:]) != voxels or dtype.str[1:] not in ("f2", "f4", "f8")):
                raise InputError(f"{path.name}: probabilities of shape {shape} ({dtype}); the dataset has {heads} "
                                 f"output(s) and the case {voxels} voxels (its .pkl): expected float "
                                 f"[{heads}, Z, Y, X]")
            data = member.read(math.prod(shape) * dtype.itemsize + 1)
    except InputError:
        raise
    except (OSError, ValueError, KeyError, EOFError, RuntimeError, NotImplementedError, zipfile.BadZipFile,
            zlib.error) as exc:  # zipfile: encrypted members (RuntimeError), unknown compression
        raise InputError(f"{path.name} is not nnU-Net's probabilities file (an .npz with key 'probabilities'): "
                         f"{type(exc).__name__}: {exc}") from None
    if len(data) != math.prod(shape) * dtype.itemsize:
        raise InputError(f"{path.name}: the probabilities' bytes do not fit their shape {shape}")
    return np.frombuffer(data, dtype).reshape(shape, order="F" if fortran else "C")


def merge_case(inputs: list[Path], target: Path, dataset: dict[str, Any], save_npz: bool = False,
               steps: tuple[dict, ...] = ()) -> Path:
    """One case: average `inputs`' probabilities, label, write `target` (module docstring)."""
    heads, regions = label_rule(dataset)
    props = read_properties(inputs[0].with_suffix(".pkl"))
    shape = props.get("shape_before_cropping")
    if not (isinstance(shape, (tuple, list)) and len(shape) == 3 and all(type(n) is int and 0 < n <= MAX_AXIS
                                                                           for n in shape)):
        raise InputError(f"{inputs[0].with_suffix('.pkl').name}: shape_before_cropping is {pickles.shown(shape)}; "
                         f"expected the case's 3 axis lengths (nnU-Net's properties record them)")
    voxels = math.prod(shape)
    require_fits(4 * voxels * (3 * heads + 1), f"ensembling {inputs[0].stem} ({heads} x {voxels} probabilities)",
                 "ensemble on a machine with more memory")
    total = None
    for path in inputs:
        probabilities = _load(path, heads, voxels)
        if total is not None and probabilities.shape != total.shape:
            raise InputError(f"{path.name}: probabilities of shape {probabilities.shape} in {path.parent.name}, "
                             f"{total.shape} in {inputs[0].parent.name}; ensemble predictions of the same cases")
        total = probabilities.astype(np.float32) if total is None else total + probabilities
    average = total / np.float32(len(inputs))
    labels = to_labels(average, regions)
    if steps:
        from nnslim.compiler.runtime.nnunet.postprocessing import apply_steps

        labels = apply_steps(labels, list(steps))
    if save_npz:  # files.save takes nnslim's [K, X, Y, Z]
        files.save(average.transpose(0, 3, 2, 1), props, target.parent / f"{inputs[0].stem}.npz")
    return save_segmentation(np.ascontiguousarray(labels.transpose(2, 1, 0)), geometry(props, inputs[0].name), target)


def ensemble_folders(folders: list[Path], output: Path, save_npz: bool = False, workers: int = 1,
                     steps: tuple[dict, ...] = (), progress: bool = True) -> list[Path]:
    """nnUNetv2_ensemble (module docstring): the segmentations written, one per case."""
    folders, output = [Path(f) for f in folders], Path(output)
    if len(folders) < 1 or not all(f.is_dir() for f in folders):
        raise InputError(f"-i: {', '.join(str(f) for f in folders if not f.is_dir()) or 'nothing'} is not a folder "
                         "of predictions (nnUNetv2_predict --save_probabilities output)")
    if any(output.resolve() == f.resolve() for f in folders):
        raise InputError(f"-o {output} is one of the input folders; write the ensemble to another folder")
    dataset_file = folders[0] / "dataset.json"
    if not dataset_file.is_file():
        raise InputError(f"{folders[0]} has no dataset.json (nnUNetv2_predict leaves one beside its predictions)")
    dataset = parse_json(dataset_file.read_bytes(), dataset_file, InputError, "use the dataset.json nnU-Net wrote")
    ending = dataset.get("file_ending") if isinstance(dataset, dict) else None
    if not isinstance(ending, str) or not ending.startswith(".") or "/" in ending:
        raise InputError(f"dataset.json: file_ending is {ending!r:.40}; expected a suffix like .nii.gz")
    label_rule(dataset)
    cases = [sorted(p.stem for p in f.glob("*.npz")) for f in folders]
    if not cases[0] or any(c != cases[0] for c in cases):
        differ = sorted(set().union(*map(set, cases)) - set.intersection(*map(set, cases)))
        raise InputError("the folders do not hold the same cases' probabilities" +
                         (f" (in some, not all: {', '.join(differ[:5])})" if differ else " (none found: .npz files)"))
    output.mkdir(parents=True, exist_ok=True)
    with atomic_path(output / "dataset.json") as tmp:
        tmp.write_text(json.dumps(dataset, indent=4), encoding="utf-8")
    jobs = [([f / f"{case}.npz" for f in folders], output / f"{case}{ending}") for case in cases[0]]
    with ThreadPoolExecutor(max(1, min(workers, 8))) as pool, \
            tqdm(total=len(jobs), desc="ensemble", unit="case", disable=None if progress else True) as bar:
        futures = [pool.submit(merge_case, files, target, dataset, save_npz, steps) for files, target in jobs]
        written = []
        for future in futures:
            written.append(future.result())
            bar.update()
    return written

