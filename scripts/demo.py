"""The main job, run through the real `nnslim` commands a user would type.

1. prepare-dataset mni-tissue      -> artifacts/data/mni-tissue (raw layout + holdout mask)
2. build-engine (bundled model)    -> artifacts/engines/mni-tissue-tiny (its 96^3 training patch;
                                      `--precision auto` times every CPU backend and precision on real
                                      tiles and keeps the fastest inside its parity gate)
3. infer with the engine           -> artifacts/demo/mni_seg_engine.nii.gz
4. infer with PyTorch (same window) -> artifacts/demo/mni_seg_torch.nii.gz
5. evaluate: Dice on the held-out band, on the whole volume, and engine-vs-PyTorch agreement
6. an ONNX Runtime fp32 engine with 160^3 tiles, for comparison: the model's Dice should not depend
   on the tile size (issue 20: within 0.01)

Prints a table and writes artifacts/demo/summary.json. Exits 1 when the held-out mean Dice is
below 0.90 or the engine agrees with PyTorch on fewer voxels than its precision's gate (fp32 99.9%,
bf16 99.5%, int8 99%).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from nnslim.files import write_json_atomic
from nnslim.compiler.runtime.precision import get_precision

ROOT = Path(__file__).resolve().parent.parent
NNSLIM = [str(ROOT / ".venv" / "bin" / "nnslim")]
MODEL = ROOT / "artifacts" / "models" / "mni-tissue-tiny.pt"
DATA = ROOT / "artifacts" / "data" / "mni-tissue"
ENGINE = ROOT / "artifacts" / "engines" / "mni-tissue-tiny"
ENGINE_LARGE_TILES = ROOT / "artifacts" / "engines" / "mni-tissue-tiny-p160"
LARGE_TILE = ("160", "160", "160")
OUT = ROOT / "artifacts" / "demo"
MIN_DICE = 0.90


def step(title: str, *args: str | Path) -> float:
    command = NNSLIM + [str(a) for a in args]
    shown = " ".join(["nnslim"] + [os.path.relpath(a, ROOT) if isinstance(a, Path) else a for a in args])
    print(f"\n$ {shown}", flush=True)
    started = time.perf_counter()
    subprocess.run(command, check=True, cwd=ROOT)
    seconds = time.perf_counter() - started
    print(f"[{title}: {seconds:.1f} s]", flush=True)
    return seconds


def main() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    image = DATA / "imagesTr" / "mni_0000.nii.gz"
    labels = DATA / "labelsTr" / "mni.nii.gz"
    seg_engine, seg_torch = OUT / "mni_seg_engine.nii.gz", OUT / "mni_seg_torch.nii.gz"
    times = {
        "prepare": step("prepare data", "prepare-dataset", "mni-tissue", DATA),
        "build": step("build engine", "build-engine", MODEL, "--out", ENGINE, "--parity-volume", image,
                      "--parity-tiles", "2"),
        "infer_engine": step("segment with the engine", "infer", ENGINE, image, "-o", seg_engine),
        "infer_torch": step("segment with PyTorch", "infer", ENGINE, image, "-o", seg_torch, "--torch-checkpoint", MODEL),
    }
    step("Dice on the held-out band", "evaluate", seg_engine, labels, "--mask", DATA / "holdout_mask.nii.gz",
         "--labels-from", ENGINE, "--json", OUT / "dice_holdout.json")
    step("Dice on the whole volume (mostly seen in training)", "evaluate", seg_engine, labels,
         "--labels-from", ENGINE, "--json", OUT / "dice_whole.json")
    step("engine vs PyTorch", "evaluate", seg_engine, seg_torch, "--labels-from", ENGINE, "--json", OUT / "parity.json")
    seg_p160 = OUT / "mni_seg_engine_p160.nii.gz"
    manifest = json.loads((ENGINE / "manifest.json").read_text())
    times["build_p160"] = step("build engine with 160^3 tiles", "build-engine", MODEL, "--out", ENGINE_LARGE_TILES,
                               "--patch", *LARGE_TILE, "--parity-volume", image, "--backend", "onnxruntime",
                               "--precision", "fp32")
    times["infer_p160"] = step("segment with 160^3 tiles", "infer", ENGINE_LARGE_TILES, image, "-o", seg_p160)
    step("Dice on the held-out band, 160^3 tiles", "evaluate", seg_p160, labels, "--mask", DATA / "holdout_mask.nii.gz",
         "--labels-from", ENGINE, "--json", OUT / "dice_holdout_p160.json")

    holdout = json.loads((OUT / "dice_holdout.json").read_text())
    whole = json.loads((OUT / "dice_whole.json").read_text())
    parity = json.loads((OUT / "parity.json").read_text())
    holdout_p160 = json.loads((OUT / "dice_holdout_p160.json").read_text())
    gate = get_precision(manifest["precision"]).min_agreement
    summary = {
        "model": str(MODEL.relative_to(ROOT)),
        "volume": "MNI ICBM152 2009c T1, 197x233x189 @ 1 mm",
        "holdout_dice": holdout["dice"],
        "holdout_mean_dice": holdout["mean_dice"],
        "tile": manifest["io"]["input"]["shape"][2:],
        "holdout_mean_dice_160_tiles": holdout_p160["mean_dice"],
        "whole_volume_mean_dice": whole["mean_dice"],
        "engine": {"backend": manifest["backend"], "precision": manifest["precision"],
                   "candidates": manifest.get("selection", {}).get("candidates", [])},
        "engine_vs_torch_voxel_agreement": parity["agreement"],
        "engine_vs_torch_gate": gate,
        "tile_parity": {k: manifest["parity"][k] for k in ("max_abs_logit_error", "max_rel_logit_error", "argmax_agreement", "tiles")},
        "seconds": {k: round(v, 1) for k, v in times.items()},
        "total_seconds": round(sum(times.values()), 1),
    }
    write_json_atomic(OUT / "summary.json", summary)

    rows = [
        ("held-out band: Dice grey matter", f"{holdout['dice']['grey_matter']:.4f}"),
        ("held-out band: Dice white matter", f"{holdout['dice']['white_matter']:.4f}"),
        ("held-out band: mean Dice", f"{holdout['mean_dice']:.4f}  (target >= {MIN_DICE}; tiles = training patch)"),
        ("held-out band: mean Dice, 160^3", f"{holdout_p160['mean_dice']:.4f}  (onnxruntime fp32; difference "
                                             f"{abs(holdout_p160['mean_dice'] - holdout['mean_dice']):.4f}, target <= 0.01)"),
        ("whole volume: mean Dice", f"{whole['mean_dice']:.4f}"),
        ("engine (chosen by --precision auto)", f"{manifest['backend']} {manifest['precision']}"),
        *[(f"  candidate {c['backend']} {c['precision']}",
           f"{c['speedup_vs_torch'] or 0:.2f}x PyTorch per tile batch, agreement {c['parity']['argmax_agreement']:.5f}"
           f"{'' if c['passed'] else ' (outside its gate)'}")
          for c in manifest.get("selection", {}).get("candidates", []) if c.get("parity")],
        ("engine vs PyTorch, whole volume", f"{parity['agreement']:.6f} voxel agreement (gate >= {gate})"),
        ("engine vs PyTorch, parity tiles", f"max |logit error| {manifest['parity']['max_abs_logit_error']:.2e} "
                                            f"({manifest['parity']['max_rel_logit_error']:.1e} of the largest logit), "
                                            f"argmax agreement {manifest['parity']['argmax_agreement']:.6f}"),
        ("build-engine", f"{times['build']:.1f} s"),
        (f"infer, {manifest['backend']} {manifest['precision']}", f"{times['infer_engine']:.1f} s (whole command)"),
        ("infer, PyTorch (CPU)", f"{times['infer_torch']:.1f} s (whole command)"),
        ("infer, onnxruntime fp32, 160^3 tiles", f"{times['infer_p160']:.1f} s (whole command)"),
    ]
    width = max(len(r[0]) for r in rows)
    print("\n== nnslim demo summary ==")
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")
    print(f"  written: {(OUT / 'summary.json').relative_to(ROOT)}")
    ok = holdout["mean_dice"] >= MIN_DICE and parity["agreement"] >= gate
    if not ok:
        print("demo targets NOT met", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
