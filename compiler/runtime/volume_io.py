"""NIfTI input and output with nibabel, keeping each volume's affine and header.

A case is one file (3D, or 4D with channels on the last axis) or, in nnU-Net's naming, one file
per channel: `CASE_0000.nii.gz`, `CASE_0001.nii.gz`, ... Outputs are written to a temporary
file in the destination folder and renamed, so an interrupted run never leaves a partial file.
"""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from nnslim.compiler.runtime.errors import InputError
from nnslim.compiler.runtime.files import chmod_default

NIFTI_SUFFIXES = (".nii.gz", ".nii")
_CHANNEL = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


@dataclass
class Volume:
    """An input case: data `[C, X, Y, Z]` float32 and the image whose geometry outputs copy."""

    name: str
    data: np.ndarray
    reference: nib.Nifti1Image
    files: list[Path]

    @property
    def spacing(self) -> tuple[float, ...]:
        return tuple(float(z) for z in self.reference.header.get_zooms()[:3])


def _stem(path: Path) -> str:
    for suffix in NIFTI_SUFFIXES:
        if path.name.endswith(suffix):
            return path.name[: -len(suffix)]
    return path.stem


def _load_array(path: Path) -> tuple[nib.Nifti1Image, np.ndarray]:
    if not path.is_file():
        raise InputError(f"input volume not found: {path}")
    try:
        image = nib.load(path)
        data = np.asarray(image.dataobj, dtype=np.float32)
    except Exception as exc:  # nibabel raises several types for corrupt or foreign files
        raise InputError(f"cannot read {path} as NIfTI ({type(exc).__name__}: {exc})") from exc
    return image, data


def load_volume(paths: list[Path] | Path, expected_channels: int) -> Volume:
    """Read one case and check it is something a model can segment.

    Args:
        paths: one file, or one file per channel in channel order.
        expected_channels: the model's input channels.
    """
    paths = [Path(p) for p in (paths if isinstance(paths, list) else [paths])]
    channels, reference = [], None
    for path in paths:
        image, data = _load_array(path)
        reference = reference or image
        if data.ndim == 4:
            channels += [data[..., c] for c in range(data.shape[-1])]
        elif data.ndim == 3:
            channels.append(data)
        else:
            raise InputError(f"{path} has {data.ndim} dimensions {data.shape}; expected a 3D volume (or 4D with channels last)")
    if len(channels) != expected_channels:
        raise InputError(
            f"{', '.join(map(str, paths))} gives {len(channels)} channel(s) but the model expects "
            f"{expected_channels}; pass one file per channel (CASE_0000.nii.gz, CASE_0001.nii.gz, ...) "
            "or a 4D file with channels on the last axis"
        )
    shapes = {c.shape for c in channels}
    if len(shapes) != 1:
        raise InputError(f"channel files of {paths[0]} differ in shape: {sorted(shapes)}")
    data = np.stack(channels)
    if min(data.shape[1:]) < 1:
        raise InputError(f"{paths[0]} has an empty axis: shape {data.shape[1:]}")
    finite = np.isfinite(data)
    if not finite.all():
        raise InputError(
            f"{paths[0]} contains {int((~finite).sum())} NaN or infinite voxels; fix or mask them before inference"
        )
    name = _CHANNEL.sub(r"\g<case>", _stem(paths[0]))
    return Volume(name=name, data=data, reference=reference, files=paths)


def find_cases(folder: Path) -> dict[str, list[Path]]:
    """Group the NIfTI files of a folder into cases (nnU-Net `_0000` channel suffixes)."""
    cases: dict[str, list[tuple[int, Path]]] = {}
    for path in sorted(folder.iterdir()):
        if not path.name.endswith(NIFTI_SUFFIXES) or path.name.startswith("."):
            continue
        match = _CHANNEL.match(_stem(path))
        case, channel = (match["case"], int(match["channel"])) if match else (_stem(path), 0)
        cases.setdefault(case, []).append((channel, path))
    if not cases:
        raise InputError(f"no .nii or .nii.gz files in {folder}")
    return {case: [p for _, p in sorted(files)] for case, files in cases.items()}


def save_segmentation(segmentation: np.ndarray, reference: nib.Nifti1Image, path: Path) -> Path:
    """Write a label volume with the reference's affine and header (uint8), atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = reference.header.copy()
    out = nib.Nifti1Image(segmentation.astype(np.uint8), reference.affine, header)
    out.set_data_dtype(np.uint8)
    out.header.set_slope_inter(1, 0)
    suffix = ".nii.gz" if path.name.endswith(".nii.gz") else ".nii"
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        nib.save(out, tmp)
        chmod_default(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
