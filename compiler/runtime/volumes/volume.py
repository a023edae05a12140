"""Reading a case into a `Volume` and writing its label map, through the reader table (`readers`).

Axis convention: a `Volume`'s data is `[C, X, Y, Z]`, the voxel index order (i, j, k) of the
file, as nibabel reads NIfTI; SimpleITK arrays (`[Z, Y, X]`) are transposed to it, so both
readers give the same array for the same NIfTI file.

Before reading voxels, the header is checked (dimensions, voxel sizes, and the memory the data
would take: a forged or gzip-bomb header is refused before allocating). After reading, voxel
values must be finite and small enough that float32 normalization cannot overflow.

Labels are written in the input's format and geometry (`readers.output_suffix`), to a temporary
file in the destination folder (`.NAME.PID.XXXXXXXX.nii.gz`), flushed to disk and renamed, so an
interrupted run never leaves a partial file that looks complete; the next run removes
temporaries whose process is gone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nnslim.compiler.runtime.volumes.header import Geometry, VolumeHeader, check_real_dtype, check_values
from nnslim.compiler.runtime.volumes.layout import case_name
from nnslim.compiler.runtime.volumes.readers import AUTO, reader_for, writer_for
from nnslim.errors import InputError
from nnslim.files import sweep_leftovers

@dataclass
class Volume:
    """An input case: data `[C, X, Y, Z]` float32 (the file's voxel index order i, j, k; see the
    module docstring) and the geometry its outputs copy."""

    name: str
    data: np.ndarray
    geometry: Geometry
    files: list[Path]
    previous_stage: np.ndarray | None = None  # a cascade's previous-stage labels [X, Y, Z], or None

    @property
    def spacing(self) -> tuple[float, ...]:
        """Voxel size in mm along X, Y, Z (the data's axes 1..3)."""
        return self.geometry.spacing


def read_header(path: Path, reader: str = AUTO) -> VolumeHeader:
    """Read and check a volume's header without its voxels (`header.check_dimensions`)."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"input volume not found: {path}")
    return reader_for(path, reader).adapter().header(path)


def load_volume(paths: list[Path] | Path, expected_channels: int, reader: str = AUTO) -> Volume:
    """Read one case and check it is something a model can segment.

    Args:
        paths: one file or DICOM series folder, or one file per channel in channel order.
        expected_channels: the model's input channels.
        reader: "auto" (the table's first reader for the suffix), or a reader's name.
    """
    paths = [Path(p) for p in (paths if isinstance(paths, list) else [paths])]
    channels, geometry = [], None
    for path in paths:
        if not path.exists():
            raise InputError(f"input volume not found: {path}")
        arrays, read_geometry = reader_for(path, reader).adapter().read(path)
        geometry = geometry or read_geometry
        channels += arrays
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
    del channels
    if min(data.shape[1:]) < 1:
        raise InputError(f"{paths[0]} has an empty axis: shape {data.shape[1:]}")
    check_values(data, paths[0])
    return Volume(name=case_name(paths[0]), data=data, geometry=geometry, files=paths)


def load_labels(path: Path, reader: str = AUTO) -> np.ndarray:
    """A label map (any format a reader reads) as int64 `[X, Y, Z]`; refuses non-integer values."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"label volume not found: {path}")
    arrays, _ = reader_for(path, reader).adapter().read(path)
    if len(arrays) != 1:
        raise InputError(f"{path} has {len(arrays)} channels; a label map has one")
    data = arrays[0]
    if not np.all(np.equal(np.mod(data, 1), 0)):
        raise InputError(f"{path} holds non-integer values; expected a label volume")
    return data.astype(np.int64)


def previous_stage_labels(path: Path, shape: tuple[int, ...]) -> np.ndarray:
    """A cascade's previous-stage segmentation as int16 `[X, Y, Z]` (`load_labels`), checked: the
    case's shape, values in [0, 255] (`label_map`)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path.name}: the previous stage's segmentation of this case is missing (looked for "
                         f"{path}); segment the case with the previous stage first, or point at the folder it wrote")
    data = load_labels(path)
    if tuple(data.shape) != tuple(shape):
        raise InputError(f"{path.name}: the previous stage's segmentation has shape {tuple(data.shape)}, the image "
                         f"{tuple(shape)}; use the segmentation written for this case")
    return label_map(data, f"{path.name}: the previous stage's segmentation")


def label_map(data: np.ndarray, what: str) -> np.ndarray:
    """`data` as an int16 label map, or an error: finite whole numbers in [0, 255] (nnslim's and
    nnU-Net's label maps; a cascade's previous stage, from a file or the Python API)."""
    if data.size and not (np.all(np.isfinite(data)) and data.min() >= 0 and data.max() <= 255
                          and np.array_equal(data, np.round(data))):
        seen = f"{float(np.nanmin(data)):g} .. {float(np.nanmax(data)):g}"
        raise InputError(f"{what} holds values other than whole numbers in [0, 255] (seen {seen}); it is not a "
                         "label map")
    return data.astype(np.int16)


def volume_from_array(image: np.ndarray, spacing: tuple[float, ...], expected_channels: int,
                      name: str = "array") -> Volume:
    """An in-memory image as a `Volume` (the Python API's input): `[X, Y, Z]` or `[C, X, Y, Z]`,
    numpy or torch, with `spacing` in mm along the array axes; checked like a file's voxels."""
    from nnslim.compiler.runtime.volumes.nifti import from_array_geometry

    data = np.asarray(image.detach().cpu().numpy() if hasattr(image, "detach") else image)
    check_real_dtype(data.dtype, Path(name))
    data = data.astype(np.float32, copy=False)
    if data.ndim == 3:
        data = data[None]
    if data.ndim != 4 or data.shape[0] != expected_channels:
        raise InputError(f"image has shape {data.shape}; the model expects [X, Y, Z] with one channel or "
                         f"[{expected_channels}, X, Y, Z]")
    spacing = tuple(float(v) for v in spacing)
    if len(spacing) != 3 or not all(math.isfinite(v) and v > 0 for v in spacing):
        raise InputError(f"spacing must be three positive voxel sizes in mm, got {spacing}")
    if min(data.shape[1:]) < 1:
        raise InputError(f"image has an empty axis: shape {data.shape[1:]}")
    check_values(data, Path(name))
    return Volume(name=name, data=np.ascontiguousarray(data), geometry=from_array_geometry(spacing), files=[])


def save_segmentation(segmentation: np.ndarray, geometry: Geometry, path: Path) -> Path:
    """Write a label volume `[X, Y, Z]` as uint8 with the input's geometry, atomically, in the format
    the name's suffix says (`readers.writer_for`)."""
    path = Path(path)
    writer = writer_for(path, geometry)
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep_leftovers(path.parent)  # temporaries of killed runs, by nnslim's marker (nnslim.files)
    writer.adapter().write(segmentation, geometry, path)
    return path
