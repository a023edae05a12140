"""What a scan is before its voxels are read: its header and its geometry, and the checks on both.

`VolumeHeader` is what a reader's `header` gives (shape `[X, Y, Z]`, voxel size along it,
channels); `check_dimensions` refuses shapes and voxel sizes a scan cannot have, and a header
whose voxels would not fit in memory as float32 (a forged or gzip-bomb header), before anything
is allocated. `Geometry` is where the voxels sit in the world, kept in the reader's own terms so
a label map written in the input's format copies it exactly: the nibabel image (NIfTI read with
nibabel, whole header) or a `SitkReference` (origin, spacing, direction as SimpleITK holds them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from nnslim.compiler.runtime.safety import MAX_SPACING_MM, require_fits
from nnslim.errors import InputError

FLOAT32_MAX = float(np.finfo(np.float32).max)
DIRECTION_TOLERANCE = 1e-3  # |D @ D.T - I|: directions stored as text keep about 6 digits
_LPS = np.diag([-1.0, -1.0, 1.0])  # RAS (nibabel) <-> LPS (ITK): x and y change sign


@dataclass(frozen=True)
class VolumeHeader:
    """A file's (or DICOM series') header: shape `[X, Y, Z]`, voxel size along it, channels."""

    path: Path
    shape: tuple[int, ...]
    spacing: tuple[float, ...]
    channels: int


@dataclass(frozen=True)
class SitkReference:
    """Geometry in ITK's terms: origin (LPS, mm), spacing along i, j, k (mm) and the 3x3 direction
    matrix, row-major, as SimpleITK stores them."""

    origin: tuple[float, ...]
    spacing: tuple[float, ...]
    direction: tuple[float, ...]

    @classmethod
    def from_affine(cls, affine: np.ndarray) -> SitkReference:
        """From a nibabel (RAS) voxel-to-world affine: `origin = F @ t`, `spacing = |column norms of A|`,
        `direction = F @ A / spacing`, `F = diag(-1, -1, 1)`."""
        linear = np.asarray(affine, dtype=np.float64)[:3, :3]
        spacing = np.linalg.norm(linear, axis=0)
        direction = _LPS @ (linear / spacing)
        origin = _LPS @ np.asarray(affine, dtype=np.float64)[:3, 3]
        return cls(tuple(map(float, origin)), tuple(map(float, spacing)), tuple(map(float, direction.ravel())))


@dataclass(frozen=True)
class Geometry:
    """Where a volume's voxels sit (module docstring): exactly one of `nifti` and `itk` is set.

    Attributes:
        nifti: the nibabel image whose header a NIfTI output copies.
        itk: origin, spacing and direction for SimpleITK's writers.
    """

    nifti: Any = None
    itk: SitkReference | None = None

    @property
    def spacing(self) -> tuple[float, ...]:
        """Voxel size in mm along the array axes X, Y, Z."""
        if self.itk is not None:
            return tuple(float(z) for z in self.itk.spacing[:3])
        return tuple(float(z) for z in self.nifti.header.get_zooms()[:3])

    def ras_axes(self) -> np.ndarray:
        """The 3x3 voxel-to-world matrix in RAS (nibabel's convention: column i is array axis i)."""
        if self.itk is not None:
            direction = np.asarray(self.itk.direction, dtype=np.float64).reshape(3, 3)
            return _LPS @ direction * np.asarray(self.itk.spacing[:3], dtype=np.float64)
        return np.asarray(self.nifti.affine, dtype=np.float64)[:3, :3]

    def as_itk(self) -> SitkReference:
        """The geometry in ITK's terms (a nibabel affine converted to LPS)."""
        return self.itk if self.itk is not None else SitkReference.from_affine(self.nifti.affine)


def check_dimensions(shape: tuple[int, ...], zooms: Any, channels: int, path: Path) -> None:
    """Dimensions and voxel sizes a scan can have, and voxels that fit in memory as float32."""
    if len(shape) not in (3, 4):
        raise InputError(f"{path} has {len(shape)} dimensions {shape}; expected a 3D volume (or 4D with channels last)")
    if min(shape) < 1:
        raise InputError(f"{path} has an empty axis: shape {shape}")
    zooms = [float(z) for z in zooms][:3]
    if len(zooms) < 3 or not all(math.isfinite(z) and 0 < z <= MAX_SPACING_MM for z in zooms):
        shown = ", ".join(f"{z:g}" for z in zooms)
        raise InputError(f"{path} has voxel size ({shown}) mm in its header; each must be a finite number in "
                         f"(0, {MAX_SPACING_MM:g}] mm; fix the header (pixdim, spacing) before inference")
    require_fits(math.prod(shape) * channels * 4.0, f"reading {path} (shape {shape}, {channels} channel(s), float32)",
                 "check that the header's dimensions are right")


def check_real_dtype(dtype: Any, path: Path) -> None:
    """Voxels a network can take: real numbers (integers, floats, booleans). Converting a complex
    image to float32 keeps its real part without a word (and an RGB or record type fails deep in
    numpy), so anything else is refused before the voxels are read."""
    dtype = np.dtype(dtype)
    if dtype.kind not in "biuf":
        kind = "complex" if dtype.kind == "c" else "non-scalar (e.g. RGB) or non-numeric"
        raise InputError(f"{path} holds {kind} voxels ({dtype}); nnslim segments real-valued intensities: convert "
                         "the image first (e.g. its magnitude, abs(), for complex MR data) and save it as float32")


def check_direction(direction: Any, path: Path, tolerance: float = DIRECTION_TOLERANCE) -> None:
    """An ITK direction matrix must be a rotation or reflection: unit axes at right angles. A scaled or
    sheared one puts voxels where the label map's readers will not (voxel size belongs in the spacing)."""
    values = [float(v) for v in direction]
    size = math.isqrt(len(values))
    matrix = np.asarray(values, dtype=np.float64).reshape(size, size)
    error = float(np.abs(matrix @ matrix.T - np.eye(size)).max()) if np.isfinite(matrix).all() else math.inf
    if not error <= tolerance:
        shown = "[" + ", ".join("[" + ", ".join(f"{v:.6g}" for v in row) + "]" for row in matrix) + "]"
        raise InputError(f"{path} has direction matrix {shown}, which is not orthonormal (D @ D.T differs from the "
                         f"identity by {error:.3g}, more than {tolerance:g}); fix the header's direction (TransformMatrix, "
                         "space directions) to unit axes at right angles, with the voxel size in the spacing")


def check_values(data: np.ndarray, path: Path) -> None:
    """Finite, and small enough that float32 sums of squares (z-score) cannot overflow to inf."""
    finite = np.isfinite(data)
    if not finite.all():
        raise InputError(
            f"{path} contains {int((~finite).sum())} NaN or infinite voxels; fix or mask them before inference"
        )
    del finite
    peak = max(float(data.max()), -float(data.min()))
    limit = math.sqrt(FLOAT32_MAX / data.size) / 4
    if peak > limit:
        raise InputError(
            f"{path} has intensities up to {peak:.3g}; above {limit:.3g} (for {data.size:,} voxels) normalization "
            "in float32 overflows to inf/NaN; rescale the image to its physical range before inference"
        )
