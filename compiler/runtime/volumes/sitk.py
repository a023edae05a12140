"""Volumes through SimpleITK (the optional `io` extra): MetaImage, NRRD, DICOM series, and NIfTI
when asked for (`reader="simpleitk"`).

Axis convention. SimpleITK's `GetArrayFromImage` gives `[Z, Y, X]` (voxel index k, j, i); a
`Volume` holds `[C, X, Y, Z]` (index i, j, k: nibabel's order for NIfTI), so arrays are
transposed here and spacing is `GetSpacing()` as it is (along i, j, k). Engines imported from
nnU-Net reverse the axes in preprocessing (`axis_order: "reversed"`), so their network sees
exactly the array nnU-Net's SimpleITKIO reads, with spacing `GetSpacing()[::-1]`.

Geometry is kept in ITK's terms (`SitkReference`) and set unchanged on the label image; a
nibabel affine converts to it (`Geometry.as_itk`). Headers are read without voxels
(`ImageFileReader.ReadImageInformation`). A DICOM series is a folder holding one series (GDCM's
series ids); its slices are ordered by GDCM along the slice normal and read with `ImageSeriesReader`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from nnslim.compiler.runtime.volumes.header import (
    Geometry,
    SitkReference,
    VolumeHeader,
    check_dimensions,
    check_direction,
    check_real_dtype,
)
from nnslim.compiler.runtime.volumes.readers import VOLUME_SUFFIXES
from nnslim.errors import InputError
from nnslim.files import atomic_path

INSTALL = "install the io extra: pip install 'nnslim[io]' (SimpleITK)"


def require_sitk(what: str):
    """The SimpleITK module, or an error naming what needed it and the extra to install."""
    try:
        import SimpleITK as sitk
    except ImportError as exc:
        raise InputError(f"{what} needs SimpleITK, which is not installed; {INSTALL}") from exc
    return sitk


def sitk_available() -> bool:
    try:
        import SimpleITK  # noqa: F401
    except ImportError:
        return False
    return True


def is_dicom_series(folder: Path) -> bool:
    """A folder holding `.dcm` files, or (with SimpleITK, and no other volume files) one GDCM finds
    a series in. Subfolders are not searched."""
    folder = Path(folder)
    if not folder.is_dir():
        return False
    files = [p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")]
    if any(p.suffix.lower() == ".dcm" for p in files):
        return True
    if not files or any(p.name.endswith(VOLUME_SUFFIXES) for p in files):
        return False
    if not sitk_available():
        return False
    import SimpleITK as sitk

    return bool(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)))


def dicom_series_files(folder: Path) -> list[str]:
    """The slice files of the one DICOM series in `folder`, in GDCM's order along the slice normal."""
    sitk = require_sitk(f"reading the DICOM series in {folder}")
    ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    if not ids:
        raise InputError(f"{folder} holds no DICOM series that GDCM can read; a DICOM input is a folder "
                         "with the slice files of one series")
    if len(ids) > 1:
        raise InputError(f"{folder} holds {len(ids)} DICOM series ({', '.join(ids)}); a case is one series: "
                         "move each series into its own folder")
    return list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), ids[0]))


def header(path: Path) -> VolumeHeader:
    """Header only; for a DICOM series, the first slice's header with the number of slices as Z (its
    Z spacing is checked again once the series is read)."""
    path = Path(path)
    sitk = require_sitk(f"reading {path}")
    files = dicom_series_files(path) if path.is_dir() else [str(path)]
    reader = sitk.ImageFileReader()
    reader.SetFileName(files[0])
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise InputError(f"cannot read {files[0]} with SimpleITK ({_itk_message(exc)})") from exc
    size, spacing = list(reader.GetSize()), list(reader.GetSpacing())
    if path.is_dir():
        size = size[:2] + [len(files)]
        spacing = spacing[:2] + [spacing[2] if len(spacing) > 2 else 1.0]
    shape, channels = tuple(int(s) for s in size), int(reader.GetNumberOfComponents())
    check_dimensions(shape, spacing, channels, path)
    complex_types = {sitk.sitkComplexFloat32: np.complex64, sitk.sitkComplexFloat64: np.complex128}
    check_real_dtype(complex_types.get(reader.GetPixelID(), np.float32), path)
    check_direction(reader.GetDirection(), path)
    return VolumeHeader(path, shape, tuple(float(s) for s in spacing), channels)


def read(path: Path) -> tuple[list[np.ndarray], Geometry]:
    """All voxels of a file or DICOM series folder: channel arrays `[X, Y, Z]` float32 (one per
    pixel component) and the image's geometry; the header is checked before the voxels are read."""
    path = Path(path)
    header(path)
    sitk = require_sitk(f"reading {path}")
    try:
        if path.is_dir():
            reader = sitk.ImageSeriesReader()
            reader.SetFileNames(dicom_series_files(path))
            image = reader.Execute()
        else:
            image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise InputError(f"cannot read {path} with SimpleITK ({_itk_message(exc)})") from exc
    if image.GetDimension() != 3:
        raise InputError(f"{path} is a {image.GetDimension()}D image of size {image.GetSize()}; expected a 3D "
                         "volume (multi-channel: one file per channel, CASE_0000, CASE_0001, ...)")
    check_direction(image.GetDirection(), path)  # a DICOM series' direction comes from all its slices
    array = sitk.GetArrayViewFromImage(image)  # [Z, Y, X] or [Z, Y, X, components]
    check_real_dtype(array.dtype, path)
    if array.ndim == 3:
        array = array[..., None]
    channels = [np.ascontiguousarray(array[..., c].transpose(2, 1, 0), dtype=np.float32)
                for c in range(array.shape[-1])]
    reference = SitkReference(tuple(image.GetOrigin()), tuple(image.GetSpacing()), tuple(image.GetDirection()))
    check_dimensions(channels[0].shape, reference.spacing, len(channels), path)  # a series' real Z spacing
    return channels, Geometry(itk=reference)


def write(labels: np.ndarray, geometry: Geometry, path: Path) -> None:
    """Write `[X, Y, Z]` labels as uint8 with the geometry (format from the suffix, compressed), atomically."""
    sitk = require_sitk(f"writing {path}")
    reference = geometry.as_itk()
    try:  # a sheared NIfTI affine has no faithful ITK direction: a file its readers (nnslim's too) refuse
        check_direction(reference.direction, path)
    except InputError:
        raise InputError(f"the scan's geometry is sheared (its affine is not a rotation times voxel sizes), which "
                         f"{path.name}'s format cannot store faithfully; write the labels as .nii.gz or .nii, which keep "
                         "the affine as it is") from None
    image = sitk.GetImageFromArray(np.ascontiguousarray(labels.astype(np.uint8).transpose(2, 1, 0)))
    image.SetOrigin(reference.origin)
    image.SetSpacing(reference.spacing)
    image.SetDirection(reference.direction)
    with atomic_path(path) as tmp:  # SimpleITK picks the format from the temporary's suffix
        sitk.WriteImage(image, str(tmp), True)


def _itk_message(exc: Exception) -> str:
    """ITK's message without the C++ source location line that precedes it."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__


def can_write(geometry: Geometry) -> bool:
    """Any geometry: a NIfTI affine converts to ITK's origin, spacing and direction."""
    return True
