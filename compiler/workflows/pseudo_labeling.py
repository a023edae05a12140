"""`nnslim pseudo-label`: seed 003's iterative pseudo labeling on an nnU-Net raw-layout dataset.

    round 1:    train the teacher on the labeled cases; predict every unlabeled scan
    round i>1:  retrain the teacher on labeled + round i-1 pseudo labels; predict again
    select:     per scan, eq. (1) across the K rounds' label maps; keep u < threshold
    student:    train the (small) student on labeled + selected scans (last round's labels)

Everything lands under OUT: `round_i/teacher/` checkpoints, `round_i/labels/CASE.nii.gz`, the
union datasets, `student/checkpoint_final.pt` and `pseudo_label.json` (uncertainties, selection,
checkpoints). Prediction uses the runtime's sliding window with the teacher in PyTorch.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from nnslim.compiler.runtime.engine import InferenceOptions, ModelSpec
from nnslim.compiler.runtime.segmentation import segment_volume
from nnslim.errors import SettingsError
from nnslim.files import write_json_atomic
from nnslim.compiler.runtime.backends.torch_module import TorchPredictor
from nnslim.compiler.runtime.volumes.volume import load_volume, save_segmentation
from nnslim.compiler.runtime.volumes.layout import find_cases
from nnslim.training.checkpoint import load_model
from nnslim.training.pseudo_label_selection import select_cases, uncertainty, write_union_dataset
from nnslim.training.train import TrainConfig, train

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PseudoLabelConfig:
    labeled: Path  # nnU-Net raw layout: dataset.json, imagesTr/, labelsTr/
    unlabeled: Path  # imagesTs-style folder: CASE_0000.nii.gz, ...
    out_dir: Path
    teacher_preset: str = "nnunet-3d-fullres"
    student_preset: str = "flare22-small"
    rounds: int = 3
    threshold: float = 0.1
    teacher_epochs: int = 50
    student_epochs: int = 50
    iterations_per_epoch: int = 50
    patch_size: tuple[int, int, int] | None = None
    seed: int = 0

    def validate(self) -> None:
        if self.rounds < 2:
            raise SettingsError(f"eq. (1) compares rounds, so --rounds must be >= 2, got {self.rounds}")
        if not (self.labeled / "dataset.json").is_file():
            raise SettingsError(f"{self.labeled} is not an nnU-Net raw-layout dataset (no dataset.json)")
        if not self.unlabeled.is_dir():
            raise SettingsError(f"unlabeled folder not found: {self.unlabeled}")


def _spec(metadata: dict[str, Any], in_channels: int, num_classes: int) -> ModelSpec:
    return ModelSpec(
        in_channels=in_channels, num_classes=num_classes, patch_size=tuple(metadata["patch_size"]), max_batch=2,
        normalization=metadata["normalization"], label_names=tuple(metadata["label_names"]), spacing=None,
        mirror_axes=(), input_name="image", output_name="logits",
        preprocessing={"normalization": metadata["normalization"]},
    )


def _train(config: PseudoLabelConfig, preset: str, dataset: Path, out: Path, epochs: int) -> Path:
    result = train(TrainConfig(
        preset=preset, dataset=str(dataset), out_dir=str(out), epochs=epochs,
        iterations_per_epoch=config.iterations_per_epoch, patch_size=config.patch_size, seed=config.seed,
        validate_every=max(epochs, 1),
    ))
    return result.checkpoint


def _predict(checkpoint: Path, cases: dict[str, list[Path]], out: Path) -> dict[str, Path]:
    model, metadata = load_model(checkpoint)
    spec = _spec(metadata, model.config.in_channels, model.config.num_classes)
    predictor = TorchPredictor(model)
    written = {}
    for name, files in cases.items():
        volume = load_volume(files, spec.in_channels)
        labels, _ = segment_volume(volume, predictor, spec, InferenceOptions(progress=False))
        written[name] = save_segmentation(labels, volume.geometry, out / f"{name}.nii.gz")
    return written


def run_pseudo_labeling(config: PseudoLabelConfig) -> dict[str, Any]:
    """The whole loop (module docstring); returns what `pseudo_label.json` records."""
    config.validate()
    out = config.out_dir
    unlabeled = find_cases(config.unlabeled)
    rounds: list[dict[str, Path]] = []
    teachers: list[Path] = []
    dataset = config.labeled
    for i in range(1, config.rounds + 1):
        logger.info("pseudo-label round %d/%d: training the teacher on %s", i, config.rounds, dataset)
        teachers.append(_train(config, config.teacher_preset, dataset, out / f"round_{i}" / "teacher",
                               config.teacher_epochs))
        rounds.append(_predict(teachers[-1], unlabeled, out / f"round_{i}" / "labels"))
        if i < config.rounds:
            dataset = write_union_dataset(config.labeled, unlabeled, rounds[-1], out / f"round_{i}" / "union")
    uncertainties = {
        name: uncertainty([np.asarray(nib.load(r[name]).dataobj) for r in rounds]) for name in unlabeled
    }
    selected = select_cases(uncertainties, config.threshold)
    logger.info("selected %d of %d pseudo-labeled scans (u < %s)", len(selected), len(unlabeled), config.threshold)
    student_data = write_union_dataset(config.labeled, unlabeled, {n: rounds[-1][n] for n in selected},
                                       out / "student_dataset")
    student = _train(config, config.student_preset, student_data, out / "student", config.student_epochs)
    record = {
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(config).items()},
        "uncertainty": {n: (u if np.isfinite(u) else None) for n, u in uncertainties.items()},  # null: infinite
        "selected": selected,
        "rejected": sorted(set(unlabeled) - set(selected)),
        "teachers": [str(t) for t in teachers],
        "student": str(student),
        "equation": "u = 1/(K-1) * sum_{i=2..K} SUM(y_i != y_{i-1}) / SUM(y_i > 0)  (seed 003, eq. 1)",
    }
    write_json_atomic(out / "pseudo_label.json", record)
    return record
