"""Numerical parity between a PyTorch model and an ONNX model on the same tiles.

Reported: max and mean absolute logit error, and argmax agreement (fraction of voxels whose
predicted class is the same). Tiles are random crops of a real volume when one is given
(normalized as the runtime would), else seeded Gaussian noise (recorded as "synthetic").
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from nnslim.errors import NnslimError
from nnslim.compiler.runtime.manifest import ParityRecord, Tolerance
from nnslim.compiler.runtime.preprocessing import cascade_labels, prepare
from nnslim.compiler.runtime.window.grid import pad_to_patch
from nnslim.compiler.runtime.volumes.volume import load_volume
from nnslim.compiler.runtime.window.arrays import to_numpy
from nnslim.compiler.stages.engine_manifest import shipped_name


class ParityError(NnslimError):
    """The built model disagrees with PyTorch beyond the tolerance."""


@dataclass(frozen=True)
class ParityReport(ParityRecord):
    """The manifest's parity figures (`ParityRecord`) plus where the argmaxes differ, for the report's
    figure: `disagreement`, `[tiles, *patch]` bool (never written to the manifest)."""

    disagreement: np.ndarray | None = field(default=None, repr=False, compare=False)

    def within(self, tolerance: Tolerance) -> bool:
        return (
            self.max_rel_logit_error <= tolerance.max_rel_logit_error
            and self.argmax_agreement >= tolerance.min_argmax_agreement
        )

    def record(self, tolerance: Tolerance | None = None, figure: str | None = None) -> ParityRecord:
        """The manifest's form (without the disagreement mask)."""
        values = {f.name: getattr(self, f.name) for f in fields(ParityRecord)}
        return ParityRecord(**{**values, "tolerance": tolerance, "figure": figure})

    def to_dict(self) -> dict:
        return self.record().to_dict()


@dataclass(frozen=True)
class TileLayout:
    """Where parity tiles were cut: the padded model-space volume (first channel) and each tile's start."""

    image: np.ndarray  # [*padded shape], normalized as the engine sees it
    region: tuple[slice, ...]  # the unpadded volume inside `image`
    starts: tuple[tuple[int, int, int], ...]
    spacing: tuple[float, float, float]  # model-space voxel size


def parity_crops(
    patch_size: tuple[int, int, int],
    in_channels: int,
    count: int,
    volume: Path | None,
    preprocessing: dict,
    seed: int = 0,
) -> tuple[torch.Tensor, str, TileLayout | None]:
    """`count` tiles `[count, C, *patch]`, a description of where they came from, and their layout.

    A real volume goes through the runtime's preprocessing (`preprocessing` is the manifest's
    entry), so the tiles are what the engine will see. Synthetic tiles have no layout (None).
    """
    rng = np.random.default_rng(seed)
    if volume is None:
        tiles = rng.standard_normal((count, in_channels, *patch_size), dtype=np.float32)
        return torch.from_numpy(tiles), f"synthetic (standard normal, seed {seed})", None
    labels = cascade_labels(preprocessing)  # a cascade's previous-stage labels, or None
    channels = in_channels - len(labels or [])
    loaded = load_volume(Path(volume), channels)
    previous = None if labels is None else stand_in_labels(loaded.data.shape[1:], labels)
    prepared = prepare(loaded.data, loaded.spacing, preprocessing, previous=previous)
    unnormalized = {**preprocessing, "previous_stage": None,
                    "normalization": {"scheme": "per-channel", "channels": [{"scheme": "none"}] * channels}}
    raw = prepare(loaded.data, loaded.spacing, unnormalized).image  # same geometry, raw intensities
    padded, region = pad_to_patch(prepared.image, patch_size)
    # centre each crop on a random nonzero voxel, so tiles show anatomy rather than air
    nonzero = np.argwhere(raw.any(axis=0)) if raw.any() else np.argwhere(np.ones(raw.shape[1:], dtype=bool))
    offsets = [r.start for r in region[1:]]
    starts = []
    for _ in range(count):
        centre = nonzero[int(rng.integers(len(nonzero)))]
        starts.append(tuple(
            int(np.clip(c + o - p // 2, 0, s - p))
            for c, o, p, s in zip(centre, offsets, patch_size, padded.shape[1:])
        ))
    tiles = np.stack([padded[(slice(None), *(slice(a, a + p) for a, p in zip(st, patch_size)))] for st in starts])
    spacing = tuple(float(v) for v in (prepared.target_spacing or prepared.spacing))
    layout = TileLayout(padded[0], tuple(region[1:]), tuple(starts), spacing)
    tiles = torch.from_numpy(tiles)
    # the description goes into the manifest and report: the volume's name, never its folders
    return tiles, f"{count} crops of {shipped_name(volume)} centred on random nonzero voxels (seed {seed})", layout


def stand_in_labels(shape: tuple[int, ...], labels: list[int], block: int = 12) -> np.ndarray:
    """A cascade's previous-stage input for the parity volume, which has none: blocks of `block`
    voxels cycling through background and every foreground label, so each label channel is used."""
    values = np.array([0, *labels], dtype=np.int16)
    index = np.zeros(shape, dtype=np.int16)  # built axis by axis: no full-size int64 index arrays
    for axis, size in enumerate(shape):
        index += ((np.arange(size) // block) % len(values)).astype(np.int16).reshape(
            [-1 if a == axis else 1 for a in range(len(shape))])
    return values[index % len(values)]


def disagreement_view(layout: TileLayout | None, tiles: torch.Tensor,
                      disagreement: np.ndarray) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float], str]:
    """(image, marks, spacing, what is shown) for the report's figure; marks: 0 not compared, 1 agree, 2 differ.

    With a layout the tiles' disagreement is put back in the parity volume (overlapping tiles: a
    voxel differs if it differs in any tile); synthetic tiles show the tile with the most.
    """
    if layout is None:
        worst = int(disagreement.reshape(len(disagreement), -1).sum(axis=1).argmax())
        marks = np.where(disagreement[worst], 2, 1).astype(np.uint8)
        return tiles[worst, 0].numpy(), marks, (1.0, 1.0, 1.0), f"synthetic parity tile {worst} (tile voxels)"
    marks = np.zeros(layout.image.shape, dtype=np.uint8)
    for start, differs in zip(layout.starts, disagreement):
        box = tuple(slice(a, a + n) for a, n in zip(start, differs.shape))
        marks[box] = np.maximum(marks[box], np.where(differs, 2, 1).astype(np.uint8))
    return layout.image[layout.region], marks[layout.region], layout.spacing, "the parity volume (model-space axes)"


def compare(reference: torch.Tensor, candidate: torch.Tensor, source: str) -> ParityReport:
    diff = (reference.double() - candidate.double()).abs()
    disagreement = reference.argmax(1) != candidate.argmax(1)
    max_abs, max_reference = float(diff.max()), float(reference.abs().max())
    return ParityReport(
        source=source,
        tiles=reference.shape[0],
        voxels=int(reference[:, 0].numel()),
        max_abs_logit_error=max_abs,
        mean_abs_logit_error=float(diff.mean()),
        max_abs_reference_logit=max_reference,
        argmax_agreement=float((~disagreement).double().mean()),
        max_rel_logit_error=max_abs / max(max_reference, 1e-12),
        disagreement=disagreement.numpy(),
    )


def compare_predictors(reference_predictor: Callable[[torch.Tensor], torch.Tensor],
                       candidate_predictor: Callable[[torch.Tensor], torch.Tensor],
                       tiles: torch.Tensor, source: str, batch_size: int) -> ParityReport:
    """Run both predictors on `tiles` in batches of `batch_size` and compare the logits (on the CPU)."""
    return compare(run_batched(reference_predictor, tiles, batch_size), run_batched(candidate_predictor, tiles, batch_size),
                   source)


def run_batched(predict: Callable, tiles: torch.Tensor, batch_size: int) -> torch.Tensor:
    """A predictor's float32 logits for `tiles` on the host, in batches of `batch_size`; the tiles go
    in as numpy arrays to CPU predictors and as tensors to GPU ones, whichever the predictor returns."""
    host = str(getattr(predict, "device", "cpu")) == "cpu"
    batches = (tiles[i : i + batch_size] for i in range(0, len(tiles), batch_size))
    return torch.cat([torch.as_tensor(to_numpy(predict(b.numpy() if host else b))).float() for b in batches])


@torch.no_grad()
def torch_agreement(reference: nn.Module, candidate: nn.Module, tiles: torch.Tensor) -> float:
    """Argmax agreement of two PyTorch models on the tiles (e.g. pruned vs unpruned)."""
    return float((reference.eval()(tiles).argmax(1) == candidate.eval()(tiles).argmax(1)).double().mean())
