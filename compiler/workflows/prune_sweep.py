"""`nnslim prune-sweep`: seed 001's experiment on one volume.

The model is fused first (pruning acts on the deploy form), the whole volume is segmented with
the unpruned model, then once per pruning level (global magnitude threshold or target sparsity,
no retraining). Proxy Dice is the Dice of the pruned prediction against the unpruned one (per
label and mean); true Dice is reported where reference labels are given. The answer is the
largest sparsity whose proxy mean Dice stays >= `min_proxy_dice` (seed 001: 0.95), with a
per-layer table and a plot of weights and sparsity across encoder / bottleneck / decoder.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from nnslim.compiler.stages.prune import (
    apply_masks,
    global_sparsity,
    layer_sparsity,
    magnitude_masks,
    region_sparsity,
    threshold_for_sparsity,
)
from nnslim.errors import SettingsError
from nnslim.files import write_json_atomic
from nnslim.compiler.runtime.metrics import dice_scores
from nnslim.compiler.runtime.backends.torch_module import TorchPredictor
from nnslim.compiler.runtime.preprocessing import normalize
from nnslim.compiler.runtime.window.config import SlidingWindowConfig
from nnslim.compiler.runtime.window.walk import sliding_window_inference
from nnslim.compiler.runtime.volumes.volume import load_volume
from nnslim.training.checkpoint import load_model
from nnslim.training.fusion import reparameterize_model

logger = logging.getLogger(__name__)

DEFAULT_SPARSITIES = (0.0, 0.5, 0.7, 0.8, 0.85, 0.9, 0.95)


@dataclass(frozen=True)
class SweepConfig:
    checkpoint: Path
    volume: Path
    out_dir: Path
    labels: Path | None = None
    mask: Path | None = None
    sparsities: tuple[float, ...] | None = DEFAULT_SPARSITIES
    thresholds: tuple[float, ...] | None = None
    patch_size: tuple[int, int, int] | None = None
    step_fraction: float = 0.5
    batch_size: int = 2
    min_proxy_dice: float = 0.95
    progress: bool = True


def run_sweep(config: SweepConfig) -> dict[str, Any]:
    """Run the sweep; write `sweep.json` and `sweep.png` into `config.out_dir`; return the JSON."""
    if (config.sparsities is None) == (config.thresholds is None):
        raise SettingsError("give either sparsities or thresholds")
    model, metadata = load_model(config.checkpoint)
    model = reparameterize_model(model)
    labels = list(metadata["label_names"])
    patch = tuple(config.patch_size or metadata["patch_size"])
    volume = load_volume(Path(config.volume), model.config.in_channels)
    image = normalize(volume.data, metadata["normalization"])
    region = _load_labels(config.mask) != 0 if config.mask else np.ones(volume.data.shape[1:], dtype=bool)
    reference = _load_labels(config.labels)[region] if config.labels else None
    window = SlidingWindowConfig(patch_size=patch, step_fraction=config.step_fraction, batch_size=config.batch_size)

    def segment(net: torch.nn.Module) -> np.ndarray:
        logits = sliding_window_inference(image, TorchPredictor(net), len(labels), window)
        return logits.argmax(0)

    levels = ([("sparsity", s) for s in config.sparsities] if config.sparsities is not None
              else [("threshold", t) for t in config.thresholds])
    started = time.perf_counter()
    baseline = segment(model)
    rows = []
    for kind, value in tqdm(levels, desc="prune-sweep", unit="level", disable=None if config.progress else True):
        pruned = copy.deepcopy(model)
        apply_masks(pruned, magnitude_masks(pruned, **{kind: value}))
        row = {kind: value, "threshold": value if kind == "threshold" else threshold_for_sparsity(model, value),
               **_scores(pruned, segment(pruned)[region], baseline[region], reference, labels)}
        rows.append(row)
        logger.info("sparsity %.3f: proxy Dice %.4f", row["sparsity"], row["proxy_mean_dice"])
    best, layers = _best_level(model, rows, config.min_proxy_dice)
    result = {
        "checkpoint": str(config.checkpoint),
        "volume": str(config.volume),
        "labels": str(config.labels) if config.labels else None,
        "mask": str(config.mask) if config.mask else None,
        "patch_size": list(patch),
        "min_proxy_dice": config.min_proxy_dice,
        "levels": rows,
        "largest_sparsity_at_min_proxy_dice": best["sparsity"] if best else None,
        "best_level": best,
        "layers_at_best_level": layers,
        "seconds": round(time.perf_counter() - started, 1),
    }
    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plot_sweep(result, out / "sweep.png")
    write_json_atomic(out / "sweep.json", result)
    return result


def _scores(pruned: torch.nn.Module, segmentation: np.ndarray, baseline: np.ndarray, reference: np.ndarray | None,
            labels: list[str]) -> dict[str, Any]:
    """A level's figures: sparsity overall and by region, proxy Dice against the unpruned
    segmentation, and true Dice against the reference labels if given (voxels of the scored region)."""
    foreground = list(range(1, len(labels)))
    proxy = dice_scores(segmentation, baseline, foreground)
    row = {
        "sparsity": global_sparsity(pruned),
        "region_sparsity": region_sparsity(layer_sparsity(pruned)),
        "proxy_dice": dict(zip(labels[1:], proxy)),
        "proxy_mean_dice": float(np.nanmean(proxy)),
    }
    if reference is not None:
        true = dice_scores(segmentation, reference, foreground)
        row["true_dice"] = dict(zip(labels[1:], true))
        row["true_mean_dice"] = float(np.nanmean(true))
    return row


def _best_level(model: torch.nn.Module, rows: list[dict], min_proxy_dice: float) -> tuple[dict | None, list[dict]]:
    """The sparsest level with proxy Dice >= the floor (None if none passes), and per layer its
    sparsity there with the mean |w| before pruning."""
    passing = [r for r in rows if r["proxy_mean_dice"] >= min_proxy_dice]
    best = max(passing, key=lambda r: r["sparsity"]) if passing else None
    best_model = copy.deepcopy(model)
    if best is not None:
        apply_masks(best_model, magnitude_masks(best_model, threshold=best["threshold"]))
    layers = [
        {**after.to_dict(), "mean_abs_unpruned": before.mean_abs}
        for before, after in zip(layer_sparsity(model), layer_sparsity(best_model))
    ]
    return best, layers


def _load_labels(path: Path) -> np.ndarray:
    import nibabel as nib

    return np.asarray(nib.load(path).dataobj).astype(np.int64)


REGION_COLOURS = {"encoder": "tab:blue", "bottleneck": "tab:red", "decoder": "tab:green", "head": "tab:gray"}


def plot_sweep(result: dict, path: Path) -> None:
    """Left: proxy (and true) Dice against sparsity. Right: per layer, mean |w| before pruning
    and sparsity at the chosen level, coloured by region (seed 001, Fig. 2b)."""
    from nnslim.compiler.stages.report import import_pyplot

    plt = import_pyplot()

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.5))
    sparsity = [r["sparsity"] for r in result["levels"]]
    left.plot(sparsity, [r["proxy_mean_dice"] for r in result["levels"]], "o-", label="proxy Dice (vs unpruned)")
    if result["levels"] and "true_mean_dice" in result["levels"][0]:
        left.plot(sparsity, [r["true_mean_dice"] for r in result["levels"]], "s--", label="true Dice (vs labels)")
    left.axhline(result["min_proxy_dice"], color="k", lw=0.8, ls=":")
    left.set_xlabel("fraction of conv weights pruned")
    left.set_ylabel("mean foreground Dice")
    left.set_title("global magnitude pruning, no retraining")
    left.legend()
    layers = result["layers_at_best_level"]
    x = np.arange(len(layers))
    colours = [REGION_COLOURS.get(layer["region"], "k") for layer in layers]
    right.bar(x, [layer["sparsity"] for layer in layers], color=colours, alpha=0.6)
    right.set_ylabel("sparsity at the chosen level")
    right.set_ylim(0, 1)
    right.set_xlabel("layer (network order)")
    twin = right.twinx()
    twin.plot(x, [layer["mean_abs_unpruned"] for layer in layers], "k.-", lw=0.8)
    twin.set_ylabel("mean |w| before pruning")
    best = result["largest_sparsity_at_min_proxy_dice"]
    right.set_title(f"per layer at sparsity {best:.0%}" if best is not None else "per layer (no level passed)")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c, alpha=0.6) for c in REGION_COLOURS.values()]
    right.legend(handles, list(REGION_COLOURS), loc="upper left", fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
