"""Segmentation metrics: per-label Dice and voxel agreement between two label volumes."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nnslim.compiler.runtime.volumes.volume import load_labels
from nnslim.errors import InputError


@dataclass
class Evaluation:
    dice: dict[str, float]
    agreement: float
    voxels: int

    @property
    def mean_dice(self) -> float:
        values = [v for v in self.dice.values() if not np.isnan(v)]
        return float(np.mean(values)) if values else float("nan")

    def to_dict(self) -> dict:
        return {"dice": self.dice, "mean_dice": self.mean_dice, "agreement": self.agreement, "voxels": self.voxels}


def dice_scores(prediction: np.ndarray, reference: np.ndarray, labels: list[int]) -> list[float]:
    """Dice of each label (NaN when the label is absent from both)."""
    scores = []
    for label in labels:
        p, r = prediction == label, reference == label
        denominator = int(p.sum()) + int(r.sum())
        scores.append(float("nan") if denominator == 0 else 2.0 * int((p & r).sum()) / denominator)
    return scores


def mean_dice(prediction: np.ndarray, reference: np.ndarray, num_classes: int) -> float:
    """Mean Dice over the foreground labels 1..K-1; labels absent from both are skipped (1.0 when all are)."""
    scores = [s for s in dice_scores(prediction, reference, list(range(1, num_classes))) if s == s]
    return float(np.mean(scores)) if scores else 1.0


def evaluate_arrays(
    prediction: np.ndarray,
    reference: np.ndarray,
    label_names: list[str] | None = None,
    mask: np.ndarray | None = None,
) -> Evaluation:
    """Foreground Dice per label and overall agreement, optionally inside a mask."""
    if prediction.shape != reference.shape:
        raise InputError(f"prediction shape {prediction.shape} differs from reference shape {reference.shape}")
    if mask is not None:
        if mask.shape != prediction.shape:
            raise InputError(f"mask shape {mask.shape} differs from the volumes' {prediction.shape}")
        region = mask != 0
        prediction, reference = prediction[region], reference[region]
    num = int(max(prediction.max(initial=0), reference.max(initial=0))) + 1
    names = list(label_names) if label_names else [f"label_{i}" for i in range(num)]
    if len(names) < num:
        raise InputError(f"volumes hold labels up to {num - 1} but only {len(names)} label names were given")
    labels = list(range(1, len(names)))
    dice = dict(zip(names[1:], dice_scores(prediction, reference, labels)))
    agreement = float((prediction == reference).mean()) if prediction.size else float("nan")
    return Evaluation(dice=dice, agreement=agreement, voxels=int(prediction.size))


def evaluate_files(
    prediction: Path, reference: Path, mask: Path | None = None, label_names: list[str] | None = None
) -> Evaluation:
    """`evaluate_arrays` of two label maps (and a mask) in any format a reader reads (`volumes.readers`)."""
    return evaluate_arrays(load_labels(prediction), load_labels(reference), label_names,
                           load_labels(mask) if mask else None)
