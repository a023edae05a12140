"""nnU-Net v2's prediction files, so that its own tools read nnslim's output as theirs
(`infer --save-probabilities --probabilities-format nnunet`, and `nnslim-predict-nnunet`):

- `CASE.npz`: key `probabilities`, float32 `[K, *image]` in nnU-Net's array order: the image as
  SimpleITK gives it (`[Z, Y, X]`; nnU-Net's `NibabelIO` transposes nibabel's array to the same), so
  nnslim's `[K, X, Y, Z]` reversed. Outside the nonzero crop: background with probability 1.
- `CASE.pkl`: the properties nnU-Net's reader returned and its preprocessing added: `sitk_stuff`
  (`SimpleITKIO`: spacing, origin and direction as SimpleITK reports them) or `nibabel_stuff`
  (`NibabelIO`: the original affine), `spacing` (in that array order), and the crop:
  `shape_before_cropping`, `bbox_used_for_cropping`, `shape_after_cropping_and_before_resampling`
  (in the network's axes, which for an engine from an nnU-Net model are nnU-Net's).
  `nnUNetv2_ensemble` writes segmentations from these with nnU-Net's own reader/writer.
- Beside them in the output folder (`write_provenance`): `dataset.json`, `plans.json` and
  `predict_from_raw_data_args.json`, as `nnUNetv2_predict` leaves them.

Written with the standard library's pickle: writing a pickle runs nothing; reading one is for
nnU-Net to do (nnslim never unpickles these).
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from nnslim.files import atomic_path

READERS = ("SimpleITKIO", "NibabelIO")


def properties(geometry: Any, crop: dict[str, Any], reader: str = "SimpleITKIO") -> dict[str, Any]:
    """The `.pkl` properties of one case (module docstring); `crop` holds the three crop keys."""
    itk = geometry.as_itk()
    spacing = [float(s) for s in itk.spacing[:3]][::-1]  # nnU-Net's array order is SimpleITK's, [Z, Y, X]
    if reader == "NibabelIO" and getattr(geometry, "nifti", None) is not None:
        stuff: dict[str, Any] = {"nibabel_stuff": {"original_affine": np.asarray(geometry.nifti.affine)}}
    else:
        stuff = {"sitk_stuff": {"spacing": tuple(float(s) for s in itk.spacing[:3]),
                                "origin": tuple(float(o) for o in itk.origin[:3]),
                                "direction": tuple(float(d) for d in itk.direction)}}
    return {**stuff, "spacing": spacing, **crop}


def crop_record(full_shape: tuple[int, ...], box: tuple[slice, ...], cropped_shape: tuple[int, ...]) -> dict[str, Any]:
    """nnU-Net's three crop keys from a `Prepared`'s geometry (the network's axes)."""
    return {"shape_before_cropping": tuple(int(s) for s in full_shape),
            "bbox_used_for_cropping": [[int(s.start), int(s.stop)] for s in box],
            "shape_after_cropping_and_before_resampling": tuple(int(s) for s in cropped_shape)}


def save(probabilities: np.ndarray, props: dict[str, Any], npz: Path) -> tuple[Path, Path]:
    """`CASE.npz` and `CASE.pkl` (module docstring) from nnslim's `[K, X, Y, Z]` probabilities, atomically."""
    array = np.ascontiguousarray(np.asarray(probabilities, dtype=np.float32).transpose(0, 3, 2, 1))
    pkl = npz.with_suffix(".pkl")
    with atomic_path(npz) as tmp:
        with open(tmp, "wb") as f:  # a file object: numpy would otherwise append .npz to the temporary's name
            np.savez_compressed(f, probabilities=array)
    with atomic_path(pkl) as tmp:
        with open(tmp, "wb") as f:
            pickle.dump(props, f, protocol=4)  # readable by every Python nnU-Net runs on
    return npz, pkl


def write_provenance(output: Path, model_folder: Path | None, arguments: dict[str, Any]) -> None:
    """`dataset.json`, `plans.json` (copied from the model folder) and `predict_from_raw_data_args.json`."""
    output.mkdir(parents=True, exist_ok=True)
    if model_folder is not None:
        for name in ("dataset.json", "plans.json"):
            data = json.loads((model_folder / name).read_text(encoding="utf-8"))
            with atomic_path(output / name) as tmp:
                tmp.write_text(json.dumps(data, indent=4), encoding="utf-8")
    with atomic_path(output / "predict_from_raw_data_args.json") as tmp:
        tmp.write_text(json.dumps(arguments, indent=4), encoding="utf-8")
