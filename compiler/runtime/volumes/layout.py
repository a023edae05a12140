"""Folders of scans: which files make up a case, and what a case and its outputs are called.

A case is one file (3D, or a 4D NIfTI with channels on the last axis), one file per channel in
nnU-Net's naming (`CASE_0000.nii.gz`, `CASE_0001.nii.gz`, ...; any readable suffix), or a folder
holding one DICOM series. `case_stem` is the one way nnslim strips a volume suffix from a name.
"""

from __future__ import annotations

import re
from pathlib import Path

from nnslim.compiler.runtime.volumes.readers import VOLUME_SUFFIXES, suffix_of
from nnslim.compiler.runtime.volumes.sitk import is_dicom_series
from nnslim.errors import InputError

_CHANNEL = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")
_OTHER_SUFFIXES = (".npz", ".png")  # what nnslim writes beside a label map


def case_stem(path: Path) -> str:
    """`path`'s name without its volume suffix (`a.nii.gz` -> `a`); a folder keeps its name."""
    suffix = suffix_of(path) or next((s for s in _OTHER_SUFFIXES if path.name.endswith(s)), None)
    if suffix:
        return path.name[: -len(suffix)]
    return path.name if path.is_dir() else path.stem


def case_name(first_file: Path) -> str:
    """A case's name from its first file: the stem without nnU-Net's `_0000` channel suffix."""
    return _CHANNEL.sub(r"\g<case>", case_stem(first_file))


def beside(labels: Path, suffix: str) -> Path:
    """The file `CASE<suffix>` next to the label map `CASE.nii.gz` (probabilities, previews)."""
    return labels.with_name(case_stem(labels) + suffix)


def find_cases(folder: Path) -> dict[str, list[Path]]:
    """Group a folder's volume files into cases (nnU-Net `_0000` channel suffixes); each subfolder
    holding a DICOM series is one case named after the subfolder."""
    cases: dict[str, list[tuple[int, Path]]] = {}
    series: dict[str, list[Path]] = {}
    for path in sorted(folder.iterdir()):
        if path.name.startswith("."):
            continue
        if path.is_dir():
            if is_dicom_series(path):
                series[path.name] = [path]
            continue
        if suffix_of(path) is None:
            continue
        match = _CHANNEL.match(case_stem(path))
        case, channel = (match["case"], int(match["channel"])) if match else (case_stem(path), 0)
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
            grouped.update({case_stem(p): [p] for _, p in files})
        else:
            missing = sorted(set(range(channels[-1] + 1)) - set(channels))
            raise InputError(f"case {case!r} in {folder} has channel files {[f'_{c:04d}' for c in channels]}; channels "
                             f"are _0000, _0001, ... without gaps (missing {[f'_{c:04d}' for c in missing]})")
    return grouped
