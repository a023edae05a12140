"""Volume formats as data: the one table of readers, the suffixes each reads and writes.

A `Reader` names its adapter module (`header(path)`, `read(path)`, `write(labels, geometry, path)`,
`can_write(geometry)`),
the file suffixes it reads, whether it reads DICOM series folders, the suffixes it writes and the
format a label map of each input is written in (the input's own, or its one-file form). For a
file, the first reader in table order that reads its suffix is used (nibabel for NIfTI), unless
the caller names one; a label map is written by the first reader that writes its suffix and can
carry the input's geometry. Adding a format is its adapter module plus one entry here; `infer`,
`evaluate`, case grouping and the output names all read this table.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

from nnslim.errors import InputError

if TYPE_CHECKING:
    from nnslim.compiler.runtime.volumes.header import Geometry


@dataclass(frozen=True)
class Reader:
    """One library that reads (and writes) volumes.

    Attributes:
        name: as the `reader` option names it.
        module: the adapter module in this package.
        reads: file suffixes it reads.
        folders: whether it reads a folder holding one DICOM series.
        writes: the suffixes it writes (a label map's name picks its format).
        outputs: input suffix -> the suffix of the label map written for it (its own format, or the
            one-file form of a two-file format).
        install: what to install when its library is missing (empty: always there).
    """

    name: str
    module: str
    reads: tuple[str, ...]
    folders: bool = False
    writes: tuple[str, ...] = ()
    outputs: dict[str, str] = field(default_factory=dict)
    install: str = ""

    def adapter(self) -> ModuleType:
        return importlib.import_module(f"{__package__}.{self.module}")


READERS: dict[str, Reader] = {
    r.name: r
    for r in (
        Reader("nibabel", "nifti", (".nii.gz", ".nii"), writes=(".nii.gz", ".nii"),
               outputs={".nii.gz": ".nii.gz", ".nii": ".nii.gz"}),
        Reader("simpleitk", "sitk", (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd", ".nhdr"), folders=True,
               writes=(".nii.gz", ".nii", ".mha", ".nrrd"),
               outputs={".nii.gz": ".nii.gz", ".nii": ".nii.gz", ".mha": ".mha", ".mhd": ".mha", ".nrrd": ".nrrd",
                        ".nhdr": ".nrrd"},
               install="pip install 'nnslim[io]' (SimpleITK)"),
    )
}
AUTO = "auto"
READER_CHOICES = (AUTO, *READERS)
# every suffix some reader reads; labels are written in the formats some reader writes
VOLUME_SUFFIXES = tuple(dict.fromkeys(s for r in READERS.values() for s in r.reads))
WRITE_SUFFIXES = tuple(dict.fromkeys(s for r in READERS.values() for s in r.writes))
FOLDER_OUTPUT_SUFFIX = ".nii.gz"  # a DICOM series' labels: a format every tool here reads back


def suffix_of(path: Path) -> str | None:
    """The volume suffix `path` ends with (the longest: `.nii.gz` before `.nii`), or None."""
    return next((s for s in sorted(VOLUME_SUFFIXES, key=len, reverse=True) if path.name.endswith(s)), None)


def reader_for(path: Path, reader: str = AUTO) -> Reader:
    """The reader of a file or DICOM folder; refuses a file type no reader reads, or an impossible choice."""
    if reader != AUTO and reader not in READERS:
        raise InputError(f"reader must be one of {READER_CHOICES}, got {reader!r}")
    wanted = list(READERS.values()) if reader == AUTO else [READERS[reader]]
    if path.is_dir():
        found = next((r for r in wanted if r.folders), None)
        if found is None:
            raise InputError(f"{path} is a folder (a DICOM series); {reader} reads files only: use "
                             f"{', '.join(r.name for r in READERS.values() if r.folders)}")
        return found
    suffix = suffix_of(path)
    found = next((r for r in wanted if suffix in r.reads), None)
    if found is None and reader != AUTO and suffix is not None:
        raise InputError(f"{path} is not a {reader} format; {reader} reads {', '.join(READERS[reader].reads)}: "
                         f"use {', '.join(r.name for r in READERS.values() if suffix in r.reads)}")
    if found is None:
        raise InputError(f"{path}: unsupported file type; nnslim reads {', '.join(VOLUME_SUFFIXES)} files and DICOM "
                         f"series folders ({_installs()}); convert the image to one of these")
    return found


def output_suffix(first_input: Path) -> str:
    """The label map's suffix for a case read from `first_input`: its own format, or its one-file form."""
    if first_input.is_dir():
        return FOLDER_OUTPUT_SUFFIX
    suffix = suffix_of(first_input)
    return next((r.outputs[suffix] for r in READERS.values() if suffix in r.outputs), FOLDER_OUTPUT_SUFFIX)


def writer_for(path: Path, geometry: Geometry) -> Reader:
    """The first reader that writes `path`'s format and can carry `geometry`."""
    check_output_name(path)
    suffix = next(s for s in sorted(WRITE_SUFFIXES, key=len, reverse=True) if path.name.endswith(s))
    writers = [r for r in READERS.values() if suffix in r.writes]
    return next((r for r in writers if r.adapter().can_write(geometry)), writers[-1])


def check_output_name(path: Path) -> None:
    """Refuse an output name whose format nnslim does not write."""
    if not Path(path).name.endswith(WRITE_SUFFIXES):
        raise InputError(f"output {path}: labels are written as {', '.join(WRITE_SUFFIXES)} (the format follows the "
                         "name); choose a name ending in one of these")


def _installs() -> str:
    return "; ".join(f"{', '.join(r.reads)} through {r.name}: {r.install}" for r in READERS.values() if r.install)
