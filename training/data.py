"""Datasets, normalization, patch sampling and augmentation.

Two sources:
- a folder in nnU-Net's raw layout: `imagesTr/CASE_0000.nii.gz` (one file per channel),
  `labelsTr/CASE.nii.gz`, `dataset.json` with `channel_names` and `labels`;
- `mni-tissue`: the MNI ICBM152 2009c symmetric template shipped in the nilearn wheel, T1 ->
  background / grey matter / white matter (argmax of the template's tissue probabilities, with
  background = 1 - GM - WM).

Held-out protocol for mni-tissue. It is one subject, and the template is left-right symmetric,
so the other hemisphere is a mirror image of the training data, not a held-out one. Instead a
coronal band (array axis 1, slices 100..139, through the basal ganglia, thalamus and ventricles)
is held out: training sees the whole volume, but every label inside the band is replaced by
`IGNORE` (the loss skips those voxels and no patch is centred on them), so no label inside the band
is ever used. The band's image is visible as context, as it is to the deployed model; validation
and the reported Dice score the band only. (Until issue 20 training used two crops that stopped
8 slices before the band; both were narrower than a 96 patch, so every patch showed an artificial
edge.)

Normalization is the runtime's `nnslim_normalize` with `DEFAULT_NORMALIZATION` (statistics of the
nonzero voxels, zeros stay zero): air, the sampler's padding and the runtime's padding are one value.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

from nnslim.errors import NnslimError
from nnslim.files import atomic_path, write_text_atomic
from nnslim.compiler.runtime.preprocessing import DEFAULT_NORMALIZATION, nnslim_normalize  # the runtime's
from nnslim.training.losses import IGNORE  # the held-out band's label value in training

MNI_HOLDOUT_AXIS = 1
MNI_HOLDOUT = (100, 140)
MNI_LABELS = ("background", "grey_matter", "white_matter")


class DatasetError(NnslimError, ValueError):
    """A dataset folder or file that cannot be used for training."""


@dataclass
class Case:
    """One training or validation volume, channels first, already normalized."""

    name: str
    image: np.ndarray  # [C, X, Y, Z] float32
    label: np.ndarray  # [X, Y, Z] int16; IGNORE where the loss must not look
    score_mask: np.ndarray | None = None  # validation: score only these voxels (None: all)


@dataclass
class Dataset:
    name: str
    channel_names: tuple[str, ...]
    label_names: tuple[str, ...]
    spacing: tuple[float, float, float]
    train: list[Case]
    validation: list[Case]
    fingerprint: str
    holdout: str
    normalization: dict = field(default_factory=lambda: dict(DEFAULT_NORMALIZATION))

    def describe(self) -> dict:
        """JSON-able summary stored in checkpoints."""
        return {
            "name": self.name,
            "fingerprint": self.fingerprint,
            "channel_names": list(self.channel_names),
            "train_cases": [c.name for c in self.train],
            "validation_cases": [c.name for c in self.validation],
            "holdout": self.holdout,
        }


# ---------------------------------------------------------------------------------------------
# mni-tissue


def nilearn_data_dir() -> Path:
    """The data folder inside the installed nilearn wheel (found without importing nilearn)."""
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise DatasetError("the mni-tissue dataset needs the nilearn package: pip install nilearn")
    return Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data"


def mni_template_paths() -> dict[str, Path]:
    data = nilearn_data_dir()
    paths = {k: data / f"mni_icbm152_{k}_tal_nlin_sym_09a_converted.nii.gz" for k in ("t1", "gm", "wm")}
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        raise DatasetError(f"MNI template files missing from the nilearn wheel: {missing}")
    return paths


def mni_tissue_volumes() -> tuple[nib.Nifti1Image, np.ndarray, np.ndarray]:
    """(T1 image, label volume [X, Y, Z] uint8, holdout mask [X, Y, Z] uint8)."""
    paths = mni_template_paths()
    t1 = nib.load(paths["t1"])
    gm = np.asarray(nib.load(paths["gm"]).dataobj, dtype=np.float32) / 255.0
    wm = np.asarray(nib.load(paths["wm"]).dataobj, dtype=np.float32) / 255.0
    background = np.clip(1.0 - gm - wm, 0.0, 1.0)
    label = np.argmax(np.stack([background, gm, wm]), axis=0).astype(np.uint8)
    holdout = np.zeros(label.shape, dtype=np.uint8)
    band = [slice(None)] * 3
    band[MNI_HOLDOUT_AXIS] = slice(*MNI_HOLDOUT)
    holdout[tuple(band)] = 1
    return t1, label, holdout


def _file_digest(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.read_bytes())
    return digest.hexdigest()


def load_mni_tissue() -> Dataset:
    t1, label, holdout = mni_tissue_volumes()
    image = nnslim_normalize(np.asarray(t1.dataobj, dtype=np.float32)[None], DEFAULT_NORMALIZATION)
    band = holdout.astype(bool)
    train_label = label.astype(np.int16)
    train_label[band] = IGNORE  # the band's labels are never used for training
    # the band is scored in place, inside the whole volume, so it is predicted with the same
    # context the deployed model has
    validation = [Case("mni_holdout_band", image, label.astype(np.int16), score_mask=band)]
    lo, hi = MNI_HOLDOUT
    return Dataset(
        name="mni-tissue",
        channel_names=("T1",),
        label_names=MNI_LABELS,
        spacing=tuple(float(z) for z in t1.header.get_zooms()[:3]),
        train=[Case("mni_outside_band", image, train_label)],
        validation=validation,
        fingerprint=_file_digest(list(mni_template_paths().values())),
        holdout=(
            f"array axis {MNI_HOLDOUT_AXIS} slices [{lo}, {hi}) held out: their labels are ignored in training "
            "(the whole volume is trained on, the band's image is context only)"
        ),
    )


def write_mni_tissue_raw(out_dir: str | Path) -> Path:
    """Write mni-tissue in nnU-Net's raw layout, plus `holdout_mask.nii.gz` for evaluation."""
    out = Path(out_dir)
    (out / "imagesTr").mkdir(parents=True, exist_ok=True)
    (out / "labelsTr").mkdir(parents=True, exist_ok=True)
    t1, label, holdout = mni_tissue_volumes()
    _save_nifti_like(t1, np.asarray(t1.dataobj), out / "imagesTr" / "mni_0000.nii.gz")
    _save_nifti_like(t1, label, out / "labelsTr" / "mni.nii.gz")
    _save_nifti_like(t1, holdout, out / "holdout_mask.nii.gz")
    dataset_json = {
        "name": "mni-tissue",
        "description": "MNI ICBM152 2009c symmetric T1 with grey/white matter labels (nilearn)",
        "channel_names": {"0": "T1"},
        "labels": {name: i for i, name in enumerate(MNI_LABELS)},
        "numTraining": 1,
        "file_ending": ".nii.gz",
        "holdout": {"axis": MNI_HOLDOUT_AXIS, "slices": list(MNI_HOLDOUT)},
    }
    write_text_atomic(out / "dataset.json", json.dumps(dataset_json, indent=2))
    return out


def _save_nifti_like(reference: nib.Nifti1Image, data: np.ndarray, path: Path) -> None:
    image = nib.Nifti1Image(data, reference.affine, reference.header)
    image.set_data_dtype(data.dtype)
    with atomic_path(path) as tmp:  # the temporary keeps the .nii.gz suffix nibabel reads the format from
        nib.save(image, tmp)


# ---------------------------------------------------------------------------------------------
# nnU-Net raw layout


def load_raw_dataset(folder: str | Path, validation_every: int = 5) -> Dataset:
    """Load an nnU-Net raw-layout folder; every `validation_every`-th case (sorted) validates."""
    folder = Path(folder)
    meta_path = folder / "dataset.json"
    if not meta_path.is_file():
        raise DatasetError(f"{folder} has no dataset.json; expected nnU-Net's raw layout (imagesTr/, labelsTr/)")
    meta = json.loads(meta_path.read_text())
    try:
        channel_names = tuple(meta["channel_names"][k] for k in sorted(meta["channel_names"], key=int))
        labels = sorted(meta["labels"].items(), key=lambda kv: int(kv[1]))
    except (KeyError, ValueError, TypeError) as exc:
        raise DatasetError(f"{meta_path} needs 'channel_names' and integer 'labels': {exc}") from exc
    label_names = tuple(name for name, _ in labels)
    if [int(v) for _, v in labels] != list(range(len(labels))):
        raise DatasetError(f"labels in {meta_path} must be consecutive from 0, got {dict(labels)}")
    ending = meta.get("file_ending", ".nii.gz")
    label_files = sorted((folder / "labelsTr").glob(f"*{ending}"))
    if not label_files:
        raise DatasetError(f"no labels matching *{ending} in {folder / 'labelsTr'}")
    cases, files, spacing = [], [], None
    for label_file in label_files:
        name = label_file.name[: -len(ending)]
        channel_files = [folder / "imagesTr" / f"{name}_{c:04d}{ending}" for c in range(len(channel_names))]
        missing = [str(p) for p in channel_files if not p.is_file()]
        if missing:
            raise DatasetError(f"case {name}: missing image files {missing}")
        label_img = nib.load(label_file)
        channels = [np.asarray(nib.load(p).dataobj, dtype=np.float32) for p in channel_files]
        label = np.asarray(label_img.dataobj)
        for p, ch in zip(channel_files, channels):
            if ch.shape != label.shape:
                raise DatasetError(f"{p} has shape {ch.shape} but its label has {label.shape}")
        if label.min() < 0 or label.max() >= len(label_names):
            raise DatasetError(
                f"{label_file} holds values in [{label.min()}, {label.max()}] but dataset.json "
                f"declares {len(label_names)} labels"
            )
        spacing = spacing or tuple(float(z) for z in label_img.header.get_zooms()[:3])
        cases.append(Case(name, nnslim_normalize(np.stack(channels), DEFAULT_NORMALIZATION), label.astype(np.int16)))
        files += channel_files + [label_file]
    validation = [c for i, c in enumerate(cases) if len(cases) > 1 and i % validation_every == validation_every - 1]
    if len(cases) > 1 and not validation:
        validation = [cases[-1]]
    train = [c for c in cases if c not in validation]
    return Dataset(
        name=meta.get("name", folder.name),
        channel_names=channel_names,
        label_names=label_names,
        spacing=spacing,
        train=train,
        validation=validation,
        fingerprint=_file_digest(files),
        holdout=f"every {validation_every}th case (sorted by name) held out" if validation else "none (one case)",
    )


def load_dataset(spec: str) -> Dataset:
    """`mni-tissue` or a path to an nnU-Net raw-layout folder."""
    if spec == "mni-tissue":
        return load_mni_tissue()
    path = Path(spec)
    if not path.exists():
        raise DatasetError(f"unknown dataset {spec!r}: not 'mni-tissue' and no such folder")
    return load_raw_dataset(path)


# ---------------------------------------------------------------------------------------------
# Patch sampling and augmentation


class PatchSampler:
    """Random patches with nnU-Net's foreground oversampling, over a zero-padded field of view.

    The last `round(batch_size * oversample)` items of each batch are centred on a voxel of a
    randomly chosen foreground class present in the case; the others are uniform over the volume
    widened by `edge_extension` voxels on every side (a fraction of the patch), so patches show the
    volume's edges and the air around it, padded as the runtime pads (0 after normalization,
    label 0). A uniform item is pure padding with probability `air_probability`: a constant tile,
    which InstanceNorm cannot tell from a flat region, must still come out background.
    """

    def __init__(self, cases: list[Case], patch_size: tuple[int, int, int], oversample_foreground: float = 0.33,
                 edge_extension: float = 0.5, air_probability: float = 0.05):
        if not cases:
            raise DatasetError("no training cases")
        self.cases = cases
        self.patch = tuple(patch_size)
        self.oversample = oversample_foreground
        self.extension = [int(p * edge_extension) for p in self.patch]
        self.air_probability = air_probability
        # voxel coordinates per foreground class, subsampled like nnU-Net (at most 10k per class);
        # IGNORE voxels are never a centre
        rng = np.random.default_rng(0)
        self.class_locations = []
        for case in cases:
            locations = {}
            for cls in np.unique(case.label):
                if cls <= 0:
                    continue
                coords = np.argwhere(case.label == cls)
                if len(coords) > 10_000:
                    coords = coords[rng.choice(len(coords), 10_000, replace=False)]
                locations[int(cls)] = coords
            self.class_locations.append(locations)

    def sample(self, batch_size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        channels = self.cases[0].image.shape[0]
        images = np.zeros((batch_size, channels, *self.patch), dtype=np.float32)
        labels = np.zeros((batch_size, *self.patch), dtype=np.int64)
        n_forced = int(round(batch_size * self.oversample))
        for i in range(batch_size):
            k = int(rng.integers(len(self.cases)))
            case, locations = self.cases[k], self.class_locations[k]
            shape = case.label.shape
            lo = [min(0, s - p) - e for s, p, e in zip(shape, self.patch, self.extension)]
            hi = [max(0, s - p) + e for s, p, e in zip(shape, self.patch, self.extension)]
            if i >= batch_size - n_forced and locations:
                cls = list(locations)[int(rng.integers(len(locations)))]
                voxel = locations[cls][int(rng.integers(len(locations[cls])))]
                start = [int(np.clip(v - p // 2, a, b)) for v, p, a, b in zip(voxel, self.patch, lo, hi)]
            elif rng.random() < self.air_probability:
                continue  # pure padding: the zeros images[i] / labels[i] already hold
            else:
                start = [int(rng.integers(a, b + 1)) for a, b in zip(lo, hi)]
            _crop_into(case.image, case.label, start, images[i], labels[i])
        return images, labels


def _crop_into(image: np.ndarray, label: np.ndarray, start: list[int], out_image: np.ndarray, out_label: np.ndarray) -> None:
    src, dst = [], []
    for s, size, p in zip(start, label.shape, out_label.shape):
        a, b = max(s, 0), min(s + p, size)
        src.append(slice(a, b))
        dst.append(slice(a - s, b - s))
    out_image[(slice(None), *dst)] = image[(slice(None), *src)]
    out_label[tuple(dst)] = label[tuple(src)]


def augment(images: np.ndarray, labels: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Flips on every axis (p=0.5 each) and nnU-Net's intensity transforms, per sample.

    Intensity: multiplicative brightness U(0.75, 1.25) p=0.15; contrast U(0.75, 1.25) around the
    mean p=0.15; gamma U(0.7, 1.5) on the min-max rescaled patch p=0.3; Gaussian noise with
    variance U(0, 0.1) p=0.1.
    """
    images, labels = images.copy(), labels.copy()
    for b in range(images.shape[0]):
        for axis in range(3):
            if rng.random() < 0.5:
                images[b] = np.flip(images[b], axis=axis + 1)
                labels[b] = np.flip(labels[b], axis=axis)
        x = images[b]
        if rng.random() < 0.15:
            x *= rng.uniform(0.75, 1.25)
        if rng.random() < 0.15:
            mean = x.mean()
            x[:] = (x - mean) * rng.uniform(0.75, 1.25) + mean
        if rng.random() < 0.3:
            lo, hi = x.min(), x.max()
            if hi > lo:
                x[:] = ((x - lo) / (hi - lo)) ** rng.uniform(0.7, 1.5) * (hi - lo) + lo
        if rng.random() < 0.1:
            x += rng.normal(0.0, np.sqrt(rng.uniform(0.0, 0.1)), size=x.shape).astype(np.float32)
    return np.ascontiguousarray(images), np.ascontiguousarray(labels)
