"""Volume input and output: NIfTI with nibabel; MetaImage, NRRD and DICOM series with SimpleITK
(the optional `io` extra, `sitk_io`).

A case is one file (3D, or a 4D NIfTI with channels on the last axis), one file per channel in
nnU-Net's naming (`CASE_0000.nii.gz`, `CASE_0001.nii.gz`, ...; also `.mha`, `.nrrd`, ...), or a
folder holding one DICOM series. Axis convention: a `Volume`'s data is `[C, X, Y, Z]`, the voxel
index order (i, j, k) of the file, as nibabel reads NIfTI; SimpleITK arrays (`[Z, Y, X]`) are
transposed to it, so both readers give the same array for the same NIfTI file. NIfTI is read with
nibabel unless SimpleITK is asked for (`reader="simpleitk"`): nibabel keeps the whole header
(qform and sform, units, description) for the output.

Labels are written in the input's format and geometry: NIfTI as `.nii.gz` (nibabel copies the
input header; SimpleITK writes it when the input was read with SimpleITK), `.mha`/`.nrrd` as
themselves, `.mhd`/`.nhdr` (header and data in two files) as the one-file `.mha`/`.nrrd`, and a
DICOM series as `.nii.gz`, which every tool here (and nibabel without the extra) reads back.
Outputs are written to a temporary file in the destination folder (`.NAME.PID.XXXXXXXX.nii.gz`),
flushed to disk and renamed, so an interrupted run never leaves a partial file that looks
complete; the next run removes temporaries whose process is gone.

Before reading voxels, the header is checked (dimensions, voxel sizes, and the memory the data
would take: a forged or gzip-bomb header is refused before allocating); SimpleITK headers are read
with `ImageFileReader.ReadImageInformation`. After reading, voxel values must be finite and small
enough that float32 normalization cannot overflow.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from nnslim.compiler.runtime import sitk_io
from nnslim.compiler.runtime.errors import InputError
from nnslim.compiler.runtime.files import atomic_path
from nnslim.compiler.runtime.safety import pid_alive, require_fits
from nnslim.compiler.runtime.sitk_io import SITK_SUFFIXES, SitkReference

logger = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii.gz", ".nii")
VOLUME_SUFFIXES = NIFTI_SUFFIXES + SITK_SUFFIXES
WRITE_SUFFIXES = (".nii.gz", ".nii", ".mha", ".nrrd")
_SAME_FORMAT = {".nii.gz": ".nii.gz", ".nii": ".nii.gz", ".mha": ".mha", ".mhd": ".mha", ".nrrd": ".nrrd",
                ".nhdr": ".nrrd"}
DICOM_OUTPUT_SUFFIX = ".nii.gz"
READERS = ("auto", "nibabel", "simpleitk")
_CHANNEL = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")
_TEMP = re.compile(r"^\.(?P<target>.+)\.(?P<pid>\d+)\.[a-z0-9_]{8}(?P<suffix>(\.[^.]+)*)$")
MAX_SPACING_MM = 1e4  # a voxel 10 m wide is a broken header, not a scan
FLOAT32_MAX = float(np.finfo(np.float32).max)


@dataclass
class Volume:
    """An input case: data `[C, X, Y, Z]` float32 (the file's voxel index order i, j, k; see the
    module docstring) and the reference whose geometry outputs copy: the nibabel image (NIfTI
    read with nibabel) or a `SitkReference` (read with SimpleITK)."""

    name: str
    data: np.ndarray
    reference: nib.Nifti1Image | SitkReference
    files: list[Path]

    @property
    def spacing(self) -> tuple[float, ...]:
        """Voxel size in mm along X, Y, Z (the data's axes 1..3)."""
        if isinstance(self.reference, SitkReference):
            return tuple(float(z) for z in self.reference.spacing[:3])
        return tuple(float(z) for z in self.reference.header.get_zooms()[:3])


@dataclass(frozen=True)
class VolumeHeader:
    """A file's (or DICOM series') header: shape `[X, Y, Z]`, voxel size along it, channels."""

    path: Path
    shape: tuple[int, ...]
    spacing: tuple[float, ...]
    channels: int


def _stem(path: Path) -> str:
    for suffix in VOLUME_SUFFIXES:
        if path.name.endswith(suffix):
            return path.name[: -len(suffix)]
    return path.name if path.is_dir() else path.stem


def _uses_nibabel(path: Path, reader: str) -> bool:
    """Which library reads `path`; refuses a file type neither reads, or an impossible choice."""
    if reader not in READERS:
        raise InputError(f"reader must be one of {READERS}, got {reader!r}")
    if path.is_dir():
        if reader == "nibabel":
            raise InputError(f"{path} is a folder (a DICOM series); nibabel reads NIfTI files only: use SimpleITK")
        return False
    nifti = path.name.endswith(NIFTI_SUFFIXES)
    if not nifti and not path.name.endswith(SITK_SUFFIXES):
        raise InputError(f"{path}: unsupported file type; nnslim reads {', '.join(VOLUME_SUFFIXES)} files and DICOM "
                         f"series folders (all but NIfTI through SimpleITK: {sitk_io.INSTALL}); convert the image "
                         "to one of these")
    if reader == "nibabel" and not nifti:
        raise InputError(f"{path} is not NIfTI; nibabel reads .nii and .nii.gz only: use SimpleITK")
    return nifti and reader != "simpleitk"


def read_header(path: Path, reader: str = "auto") -> VolumeHeader:
    """Read and check a volume's header without its voxels (see `check_dimensions`)."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"input volume not found: {path}")
    if _uses_nibabel(path, reader):
        image = _nifti_header(path)
        shape = tuple(int(s) for s in image.shape)
        return VolumeHeader(path, shape[:3], tuple(float(z) for z in image.header.get_zooms()[:3]),
                            shape[3] if len(shape) == 4 else 1)
    info = sitk_io.read_info(path)
    check_dimensions(info.shape, info.spacing, info.channels, path)
    return VolumeHeader(path, info.shape, info.spacing, info.channels)


def _nifti_header(path: Path) -> nib.Nifti1Image:
    if not path.is_file():
        raise InputError(f"input volume not found: {path}")
    try:
        image = nib.load(path)
    except Exception as exc:  # nibabel raises several types for corrupt or foreign files
        raise InputError(f"cannot read {path} as NIfTI ({type(exc).__name__}: {exc})") from exc
    check_header(image, path)
    return image


def check_header(image: nib.Nifti1Image, path: Path) -> None:
    """A nibabel image's header: see `check_dimensions` (voxel sizes as the file states them)."""
    shape = tuple(int(s) for s in image.shape)
    check_dimensions(shape, _raw_zooms(image), 1, path)


def check_dimensions(shape: tuple[int, ...], zooms, channels: int, path: Path) -> None:
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


def _raw_zooms(image: nib.Nifti1Image) -> list[float]:
    """Voxel sizes as the file states them: nibabel silently turns a 0 into 1 mm on load."""
    try:
        with image.file_map["image"].get_prepare_fileobj("rb") as f:
            header = type(image.header).from_fileobj(f, check=False)
        return [float(z) for z in header.get_zooms()[:3]]
    except Exception:  # not a single-file NIfTI (e.g. an img/hdr pair): take nibabel's reading
        return [float(z) for z in image.header.get_zooms()[:3]]


def _read_channels(path: Path, reader: str) -> tuple[list[np.ndarray], nib.Nifti1Image | SitkReference]:
    """Channel arrays `[X, Y, Z]` float32 of one file (or series) and its geometry, header checked first."""
    if not path.exists():
        raise InputError(f"input volume not found: {path}")
    if not _uses_nibabel(path, reader):
        read_header(path, reader)  # before any voxel is read
        channels, reference = sitk_io.read_image(path)
        check_dimensions(channels[0].shape, reference.spacing, len(channels), path)  # a series' real Z spacing
        return channels, reference
    image = _nifti_header(path)
    try:
        data = np.asarray(image.dataobj, dtype=np.float32)
    except Exception as exc:  # nibabel raises several types for corrupt or truncated files
        raise InputError(f"cannot read {path} as NIfTI ({type(exc).__name__}: {exc})") from exc
    if data.ndim == 4:
        return [data[..., c] for c in range(data.shape[-1])], image
    if data.ndim != 3:
        raise InputError(f"{path} has {data.ndim} dimensions {data.shape}; expected a 3D volume (or 4D with channels last)")
    return [data], image


def _check_values(data: np.ndarray, path: Path) -> None:
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


def load_volume(paths: list[Path] | Path, expected_channels: int, reader: str = "auto") -> Volume:
    """Read one case and check it is something a model can segment.

    Args:
        paths: one file or DICOM series folder, or one file per channel in channel order.
        expected_channels: the model's input channels.
        reader: "auto" (nibabel for NIfTI, SimpleITK for the rest), "nibabel" or "simpleitk".
    """
    paths = [Path(p) for p in (paths if isinstance(paths, list) else [paths])]
    channels, reference = [], None
    for path in paths:
        arrays, geometry = _read_channels(path, reader)
        reference = reference or geometry
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
    _check_values(data, paths[0])
    name = _CHANNEL.sub(r"\g<case>", _stem(paths[0]))
    return Volume(name=name, data=data, reference=reference, files=paths)


def volume_from_array(image: np.ndarray, spacing: tuple[float, ...], expected_channels: int,
                      name: str = "array") -> Volume:
    """An in-memory image as a `Volume` (the Python API's input): `[X, Y, Z]` or `[C, X, Y, Z]`,
    numpy or torch, with `spacing` in mm along the array axes; checked like a file's voxels."""
    data = np.asarray(image.detach().cpu().numpy() if hasattr(image, "detach") else image, dtype=np.float32)
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
    _check_values(data, Path(name))
    reference = nib.Nifti1Image(np.zeros((1, 1, 1), dtype=np.uint8), np.diag([*spacing, 1.0]))
    reference.header.set_zooms(spacing)
    return Volume(name=name, data=np.ascontiguousarray(data), reference=reference, files=[])


def find_cases(folder: Path) -> dict[str, list[Path]]:
    """Group a folder's volume files into cases (nnU-Net `_0000` channel suffixes); each subfolder
    holding a DICOM series is one case named after the subfolder."""
    cases: dict[str, list[tuple[int, Path]]] = {}
    series: dict[str, list[Path]] = {}
    for path in sorted(folder.iterdir()):
        if path.name.startswith("."):
            continue
        if path.is_dir():
            if sitk_io.is_dicom_series(path):
                series[path.name] = [path]
            continue
        if not path.name.endswith(VOLUME_SUFFIXES):
            continue
        match = _CHANNEL.match(_stem(path))
        case, channel = (match["case"], int(match["channel"])) if match else (_stem(path), 0)
        cases.setdefault(case, []).append((channel, path))
    if not cases and not series:
        raise InputError(f"no volumes in {folder}: nnslim reads {', '.join(VOLUME_SUFFIXES)} files and "
                         "subfolders holding one DICOM series each")
    grouped = _group_channels(cases, folder)
    clash = sorted(set(grouped) & set(series))
    if clash:
        raise InputError(f"{folder} has both files and a DICOM folder for case(s) {clash}; each case needs one "
                         "source: rename or move one of them")
    return dict(sorted({**grouped, **series}.items()))


def _group_channels(cases: dict[str, list[tuple[int, Path]]], folder: Path) -> dict[str, list[Path]]:
    grouped: dict[str, list[Path]] = {}
    for case, files in sorted(cases.items()):
        channels = sorted(channel for channel, _ in files)
        if len(set(channels)) < len(channels):  # a.mha beside a.nii.gz: which one is the scan?
            twice = [p.name for c, p in sorted(files) if channels.count(c) > 1]
            raise InputError(f"case {case!r} in {folder} has several files for one channel: {twice}; keep one "
                             "file per case and channel")
        if channels == list(range(len(channels))):
            grouped[case] = [p for _, p in sorted(files)]
        elif 0 not in channels:  # patient_0001.nii.gz, patient_0002.nii.gz: numbered cases, not channels
            grouped.update({_stem(p): [p] for _, p in files})
        else:
            missing = sorted(set(range(channels[-1] + 1)) - set(channels))
            raise InputError(f"case {case!r} in {folder} has channel files {[f'_{c:04d}' for c in channels]}; channels "
                             f"are _0000, _0001, ... without gaps (missing {[f'_{c:04d}' for c in missing]})")
    return grouped


def output_suffix(files: list[Path]) -> str:
    """The label file's suffix for a case read from `files`: the input's format (module docstring)."""
    first = Path(files[0])
    if first.is_dir():
        return DICOM_OUTPUT_SUFFIX
    return next((out for suffix, out in _SAME_FORMAT.items() if first.name.endswith(suffix)), DICOM_OUTPUT_SUFFIX)


def check_output_name(path: Path) -> None:
    """Refuse an output name whose format nnslim does not write."""
    if not Path(path).name.endswith(WRITE_SUFFIXES):
        raise InputError(f"output {path}: labels are written as {', '.join(WRITE_SUFFIXES)} (the format follows the "
                         "name); choose a name ending in one of these")


def save_segmentation(segmentation: np.ndarray, reference: nib.Nifti1Image | SitkReference, path: Path) -> Path:
    """Write a label volume `[X, Y, Z]` as uint8 with the reference's geometry, atomically.

    A NIfTI output of a nibabel reference copies its affine and header; anything else goes through
    SimpleITK with the reference's origin, spacing and direction (a nibabel affine converted to LPS).
    """
    path = Path(path)
    check_output_name(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(path.parent)
    if isinstance(reference, nib.Nifti1Image) and path.name.endswith(NIFTI_SUFFIXES):
        header = reference.header.copy()
        out = nib.Nifti1Image(segmentation.astype(np.uint8), reference.affine, header)
        out.set_data_dtype(np.uint8)
        out.header.set_slope_inter(1, 0)
        with atomic_path(path) as tmp:  # the temporary keeps the name's suffixes: nibabel compresses .gz
            nib.save(out, tmp)
        return path
    if isinstance(reference, nib.Nifti1Image):
        reference = SitkReference.from_affine(reference.affine)
    sitk_io.require_sitk(f"writing {path}")
    with atomic_path(path) as tmp:  # SimpleITK picks the format from the temporary's suffix
        sitk_io.write_labels(segmentation, reference, tmp)
    return path


def clean_stale_temps(folder: Path) -> list[Path]:
    """Remove `.NAME.PID.XXXXXXXX.nii.gz` (or `.mha`, `.nrrd`, ...) temporaries (`files.atomic_path`)
    left in `folder` by processes that are gone."""
    removed = []
    for path in Path(folder).glob(".*"):
        match = _TEMP.match(path.name)
        if (match and match["suffix"] and match["suffix"].endswith(WRITE_SUFFIXES)
                and match["target"].endswith(match["suffix"]) and path.is_file() and not path.is_symlink()
                and not pid_alive(int(match["pid"]))):
            path.unlink(missing_ok=True)
            logger.info("removed %s, a partial output of an interrupted run (process %s is gone)", path, match["pid"])
            removed.append(path)
    return removed
