"""NIfTI through nibabel: the default reader for `.nii` / `.nii.gz` (no extra needed).

nibabel keeps the whole header (qform and sform, units, description), so a label map written as
NIfTI copies the input's header and affine. Axis convention: the data is `[X, Y, Z]`, the voxel
index order (i, j, k) of the file; a 4D file holds channels on its last axis.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from nnslim.compiler.runtime.volumes.header import Geometry, VolumeHeader, check_dimensions, check_real_dtype
from nnslim.errors import InputError
from nnslim.files import atomic_path


def header(path: Path) -> VolumeHeader:
    """The header, checked (`check_dimensions`, with voxel sizes as the file states them)."""
    image = _load(path)
    shape = tuple(int(s) for s in image.shape)
    return VolumeHeader(path, shape[:3], tuple(float(z) for z in image.header.get_zooms()[:3]),
                        shape[3] if len(shape) == 4 else 1)


def read(path: Path) -> tuple[list[np.ndarray], Geometry]:
    """Channel arrays `[X, Y, Z]` float32 and the geometry, the header checked before the voxels."""
    image = _load(path)
    try:
        data = np.asarray(image.dataobj, dtype=np.float32)
    except Exception as exc:  # nibabel raises several types for corrupt or truncated files
        raise InputError(f"cannot read {path} as NIfTI ({type(exc).__name__}: {exc})") from exc
    if data.ndim == 4:
        return [data[..., c] for c in range(data.shape[-1])], Geometry(nifti=image)
    if data.ndim != 3:
        raise InputError(f"{path} has {data.ndim} dimensions {data.shape}; expected a 3D volume (or 4D with channels last)")
    return [data], Geometry(nifti=image)


def write(labels: np.ndarray, geometry: Geometry, path: Path) -> None:
    """uint8 labels with the input's NIfTI header and affine (`geometry.nifti`), atomically."""
    out = nib.Nifti1Image(labels.astype(np.uint8), geometry.nifti.affine, geometry.nifti.header.copy())
    out.set_data_dtype(np.uint8)
    out.header.set_slope_inter(1, 0)
    with atomic_path(path) as tmp:  # the temporary keeps the name's suffixes: nibabel compresses .gz
        nib.save(out, tmp)


def from_array_geometry(spacing: tuple[float, ...]) -> Geometry:
    """The geometry of an in-memory array: axis-aligned voxels of `spacing` at the origin."""
    reference = nib.Nifti1Image(np.zeros((1, 1, 1), dtype=np.uint8), np.diag([*spacing, 1.0]))
    reference.header.set_zooms(spacing)
    return Geometry(nifti=reference)


def _load(path: Path) -> nib.Nifti1Image:
    if not path.is_file():
        raise InputError(f"input volume not found: {path}")
    try:
        image = nib.load(path)
    except Exception as exc:  # nibabel raises several types for corrupt or foreign files
        raise InputError(f"cannot read {path} as NIfTI ({type(exc).__name__}: {exc})") from exc
    check_dimensions(tuple(int(s) for s in image.shape), _raw_zooms(image), 1, path)
    check_real_dtype(image.get_data_dtype(), path)
    return image


def _raw_zooms(image: nib.Nifti1Image) -> list[float]:
    """Voxel sizes as the file states them: nibabel silently turns a 0 into 1 mm on load."""
    try:
        with image.file_map["image"].get_prepare_fileobj("rb") as f:
            raw = type(image.header).from_fileobj(f, check=False)
        return [float(z) for z in raw.get_zooms()[:3]]
    except Exception:  # not a single-file NIfTI (e.g. an img/hdr pair): take nibabel's reading
        return [float(z) for z in image.header.get_zooms()[:3]]


def can_write(geometry: Geometry) -> bool:
    """nibabel writes a NIfTI header it read itself (the whole header is copied)."""
    return geometry.nifti is not None
