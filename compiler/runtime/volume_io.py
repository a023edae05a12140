"""NIfTI input and output with nibabel, keeping each volume's affine and header.

A case is one file (3D, or 4D with channels on the last axis) or, in nnU-Net's naming, one file
per channel: `CASE_0000.nii.gz`, `CASE_0001.nii.gz`, ... Outputs are written to a temporary
file in the destination folder (`.NAME.PID.XXXXXXXX.nii.gz`), flushed to disk and renamed, so an
interrupted run never leaves a partial file that looks complete; the next run removes temporaries
whose process is gone.

Before reading voxels, the header is checked (dimensions, voxel sizes, and the memory the data
would take: a forged or gzip-bomb header is refused before allocating). After reading, voxel
values must be finite and small enough that float32 normalization cannot overflow.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from nnslim.compiler.runtime.errors import InputError
from nnslim.compiler.runtime.files import atomic_path
from nnslim.compiler.runtime.safety import pid_alive, require_fits

logger = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii.gz", ".nii")
_CHANNEL = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")
_TEMP = re.compile(r"^\.(?P<target>.+)\.(?P<pid>\d+)\.[a-z0-9_]{8}(?P<suffix>(\.[^.]+)*)$")
MAX_SPACING_MM = 1e4  # a voxel 10 m wide is a broken header, not a scan
FLOAT32_MAX = float(np.finfo(np.float32).max)


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


def read_header(path: Path) -> nib.Nifti1Image:
    """Open a NIfTI file without reading its voxels, and check its header (see `check_header`)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"input volume not found: {path}")
    try:
        image = nib.load(path)
    except Exception as exc:  # nibabel raises several types for corrupt or foreign files
        raise InputError(f"cannot read {path} as NIfTI ({type(exc).__name__}: {exc})") from exc
    check_header(image, path)
    return image


def check_header(image: nib.Nifti1Image, path: Path) -> None:
    """Dimensions and voxel sizes a scan can have, and voxels that fit in memory as float32."""
    shape = tuple(int(s) for s in image.shape)
    if len(shape) not in (3, 4):
        raise InputError(f"{path} has {len(shape)} dimensions {shape}; expected a 3D volume (or 4D with channels last)")
    if min(shape) < 1:
        raise InputError(f"{path} has an empty axis: shape {shape}")
    zooms = _raw_zooms(image)
    if not all(math.isfinite(z) and 0 < z <= MAX_SPACING_MM for z in zooms):
        shown = ", ".join(f"{z:g}" for z in zooms)
        raise InputError(f"{path} has voxel size ({shown}) mm in its header; each must be a finite number in "
                         f"(0, {MAX_SPACING_MM:g}] mm; fix the header (pixdim) before inference")
    require_fits(math.prod(shape) * 4.0, f"reading {path} (shape {shape}, float32)",
                 "check that the header's dimensions are right")


def _raw_zooms(image: nib.Nifti1Image) -> list[float]:
    """Voxel sizes as the file states them: nibabel silently turns a 0 into 1 mm on load."""
    try:
        with image.file_map["image"].get_prepare_fileobj("rb") as f:
            header = type(image.header).from_fileobj(f, check=False)
        return [float(z) for z in header.get_zooms()[:3]]
    except Exception:  # not a single-file NIfTI (e.g. an img/hdr pair): take nibabel's reading
        return [float(z) for z in image.header.get_zooms()[:3]]


def _load_array(path: Path) -> tuple[nib.Nifti1Image, np.ndarray]:
    image = read_header(path)
    try:
        data = np.asarray(image.dataobj, dtype=np.float32)
    except Exception as exc:  # nibabel raises several types for corrupt or truncated files
        raise InputError(f"cannot read {path} as NIfTI ({type(exc).__name__}: {exc})") from exc
    return image, data


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
    grouped: dict[str, list[Path]] = {}
    for case, files in sorted(cases.items()):
        channels = sorted(channel for channel, _ in files)
        if channels == list(range(len(channels))):
            grouped[case] = [p for _, p in sorted(files)]
        elif 0 not in channels:  # patient_0001.nii.gz, patient_0002.nii.gz: numbered cases, not channels
            grouped.update({_stem(p): [p] for _, p in files})
        else:
            missing = sorted(set(range(channels[-1] + 1)) - set(channels))
            raise InputError(f"case {case!r} in {folder} has channel files {[f'_{c:04d}' for c in channels]}; channels "
                             f"are _0000, _0001, ... without gaps (missing {[f'_{c:04d}' for c in missing]})")
    return grouped


def save_segmentation(segmentation: np.ndarray, reference: nib.Nifti1Image, path: Path) -> Path:
    """Write a label volume with the reference's affine and header (uint8), atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = reference.header.copy()
    out = nib.Nifti1Image(segmentation.astype(np.uint8), reference.affine, header)
    out.set_data_dtype(np.uint8)
    out.header.set_slope_inter(1, 0)
    clean_stale_temps(path.parent)
    with atomic_path(path) as tmp:  # the temporary keeps the name's suffixes: nibabel compresses .gz
        nib.save(out, tmp)
    return path


def clean_stale_temps(folder: Path) -> list[Path]:
    """Remove `.NAME.PID.XXXXXXXX.nii[.gz]` temporaries (`files.atomic_path`) left in `folder` by
    processes that are gone."""
    removed = []
    for path in Path(folder).glob(".*.nii*"):
        match = _TEMP.match(path.name)
        if (match and match["target"].endswith(match["suffix"]) and path.is_file() and not path.is_symlink()
                and not pid_alive(int(match["pid"]))):
            path.unlink(missing_ok=True)
            logger.info("removed %s, a partial output of an interrupted run (process %s is gone)", path, match["pid"])
            removed.append(path)
    return removed
