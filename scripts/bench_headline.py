"""Headline benchmark: what nnslim buys, side by side, for three models, one run each.

1. the bundled demo model (`artifacts/models/mni-tissue-tiny.pt`) on the MNI T1 volume, 96^3 tiles,
   with Dice against the MNI tissue labels on the held-out band
2. faster-nnunet (FasterFusion nnU-Net, seed 000) with random weights (no trained one is bundled;
   agreement then measures what each stage changes, not accuracy) on a 128^3 crop, 96^3 tiles
3. nnunet-3d-fullres (nnU-Net v2's default network, 31M parameters) with random weights, the same
   crop and tiles, without the pruning side rows

Each runs `nnslim.compiler.workflows.bench.run_bench` (the rows are described there): report.md,
plots and bench.json under artifacts/bench/headline/<model>/, and the tables printed here.

    .venv/bin/python scripts/bench_headline.py [--repeats 3] [--only demo|faster-nnunet|nnunet-3d-fullres]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from nnslim.compiler.workflows.bench import BenchConfig, run_bench  # noqa: E402

OUT = ROOT / "artifacts" / "bench" / "headline"


def mni_volume(folder: Path, crop: int | None = None) -> Path:
    from nnslim.training.data import mni_tissue_volumes

    t1, _, _ = mni_tissue_volumes()
    data = np.asarray(t1.dataobj, dtype=np.float32)
    if crop:
        start = [(s - crop) // 2 for s in data.shape]
        data = data[tuple(slice(a, a + crop) for a in start)]
    path = folder / (f"mni_crop{crop}_0000.nii.gz" if crop else "mni_0000.nii.gz")
    nib.save(nib.Nifti1Image(data, t1.affine), path)
    return path


def random_model(folder: Path, preset: str) -> Path:
    from nnslim.training.checkpoint import save_checkpoint
    from nnslim.training.presets import get_preset
    from nnslim.training.unet import UNet

    torch.manual_seed(0)
    model = UNet(get_preset(preset).build(1, 3))
    with torch.no_grad():  # BatchNorm statistics as after training, so folding them is not trivial
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm3d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    path = folder / f"{preset}-random.pt"
    save_checkpoint(path, model.eval(), {
        "patch_size": [96, 96, 96], "spacing": [1.0, 1.0, 1.0], "normalization": {"scheme": "zscore", "mask": "nonzero"},
        "label_names": ["background", "grey_matter", "white_matter"], "mirror_axes": [0, 1, 2],
    })
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", choices=["demo", "faster-nnunet", "nnunet-3d-fullres"], default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        from nnslim.training.data import write_mni_tissue_raw

        raw = write_mni_tissue_raw(tmp / "mni")  # labels and the held-out band for the demo model's Dice
        fewer = max(1, args.repeats - 1)
        runs = {
            "demo": lambda: BenchConfig(ROOT / "artifacts" / "models" / "mni-tissue-tiny.pt", mni_volume(tmp), OUT / "demo",
                                        repeats=args.repeats, labels=raw / "labelsTr" / "mni.nii.gz",
                                        mask=raw / "holdout_mask.nii.gz"),
            "faster-nnunet": lambda: BenchConfig(random_model(tmp, "faster-nnunet"), mni_volume(tmp, crop=128),
                                                 OUT / "faster-nnunet", repeats=fewer),
            "nnunet-3d-fullres": lambda: BenchConfig(random_model(tmp, "nnunet-3d-fullres"), mni_volume(tmp, crop=128),
                                                     OUT / "nnunet-3d-fullres", repeats=fewer, side_rows=False),
        }
        for name, make in runs.items():
            if args.only and name != args.only:
                continue
            config = make()
            out = config.out_dir
            run_bench(replace(config, patch_size=(96, 96, 96), batch_size=4, prune_sparsity=0.5, structured_ratio=0.25,
                              skip="mask"), log=lambda m: print(m, flush=True))
            print(f"\n## {name}\n")
            print((out / "report.md").read_text())


if __name__ == "__main__":
    main()
