"""Pseudo-label bookkeeping (seed 003): uncertainty across rounds, selection, union datasets.

Seed 003 lets a big teacher predict the unlabeled scans, retrains it on labeled + pseudo-labeled
data, repeats for K rounds, and keeps the scans whose pseudo labels stayed stable:

    u = 1 / (K - 1) * sum_{i=2..K} SUM(y_i != y_{i-1}) / SUM(y_i > 0)        (eq. 1)

with `y_i` the label map of round i; cases with `u` under a threshold (0.1 in the paper) join the
labeled ones to train the small model. The loop itself (training and sliding-window prediction)
lives in `compiler.pseudo_label`, because prediction uses the runtime, which training must not
import.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import numpy as np

from nnslim.files import write_text_atomic
from nnslim.training.data import DatasetError


def uncertainty(rounds: list[np.ndarray]) -> float:
    """Eq. (1) for one case's label maps, round 1 first.

    A round with no foreground contributes 0 when nothing changed and infinity otherwise (the
    ratio's limit), so an empty-then-nonempty case is never selected.
    """
    if len(rounds) < 2:
        raise ValueError(f"eq. (1) needs at least two rounds, got {len(rounds)}")
    terms = []
    for previous, current in zip(rounds, rounds[1:]):
        if previous.shape != current.shape:
            raise ValueError(f"label maps of one case differ in shape: {previous.shape} vs {current.shape}")
        changed = int(np.count_nonzero(previous != current))
        foreground = int(np.count_nonzero(current > 0))
        terms.append(changed / foreground if foreground else (0.0 if changed == 0 else math.inf))
    return float(sum(terms) / len(terms))


def select_cases(uncertainties: dict[str, float], threshold: float) -> list[str]:
    """Cases whose uncertainty is below the threshold, sorted by name."""
    return sorted(name for name, u in uncertainties.items() if u < threshold)


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def write_union_dataset(labeled: Path, images: dict[str, list[Path]], labels: dict[str, Path], out: Path) -> Path:
    """A raw-layout folder with the labeled dataset plus pseudo-labeled cases.

    Args:
        labeled: the nnU-Net raw-layout folder (dataset.json, imagesTr/, labelsTr/).
        images: pseudo-labeled case name -> its channel files (CASE_0000.nii.gz, ...).
        labels: pseudo-labeled case name -> its pseudo label file.
        out: new folder (written under a temporary name, then renamed).
    """
    meta = json.loads((labeled / "dataset.json").read_text())
    ending = meta.get("file_ending", ".nii.gz")
    clashes = sorted(set(images) & {p.name[: -len(ending)] for p in (labeled / "labelsTr").glob(f"*{ending}")})
    if clashes:
        raise DatasetError(f"unlabeled cases {clashes} have the same names as labeled ones; rename them")
    staging = out.parent / f".{out.name}.writing"
    shutil.rmtree(staging, ignore_errors=True)
    (staging / "imagesTr").mkdir(parents=True)
    (staging / "labelsTr").mkdir()
    for path in sorted((labeled / "imagesTr").glob(f"*{ending}")):
        _link_or_copy(path, staging / "imagesTr" / path.name)
    for path in sorted((labeled / "labelsTr").glob(f"*{ending}")):
        _link_or_copy(path, staging / "labelsTr" / path.name)
    for name in sorted(labels):
        for channel, path in enumerate(images[name]):
            _link_or_copy(path, staging / "imagesTr" / f"{name}_{channel:04d}{ending}")
        _link_or_copy(labels[name], staging / "labelsTr" / f"{name}{ending}")
    meta = {**meta, "numTraining": len(list((staging / "labelsTr").iterdir())),
            "pseudo_labeled_cases": sorted(labels)}
    write_text_atomic(staging / "dataset.json", json.dumps(meta, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)
    return out
