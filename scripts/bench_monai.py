"""Benchmark: a MONAI bundle run by MONAI against the engines nnslim builds from it, on the MNI volume (CPU).

The bundle is spleen_ct_segmentation's network (MONAI UNet, channels 16..256, strides 2, two residual
units, batch norm; 4.8M parameters) with random weights and a scaled output layer, 96^3 windows,
MONAI's SlidingWindowInferer (overlap 0.25, Gaussian, sw_batch_size 4), and MRI preprocessing
(LoadImaged, EnsureChannelFirstd, Orientationd RAS, NormalizeIntensityd nonzero). Both sides segment
the same NIfTI file end to end in this process:
  monai    MONAI's own ConfigParser, transforms, inferer and the network in PyTorch eager, argmax
  nnslim   load_volume + Engine pipeline (the same transforms and window, reproduced) on engines
           built from the bundle folder with `nnslim build-engine BUNDLE`: fp32 on ONNX Runtime and on
           OpenVINO, and what --precision auto picks on this CPU
Rounds alternate the order; the table gives medians, speed-ups over MONAI, and each engine's voxel
agreement with MONAI's labels and its max logit error relative to the largest logit (fp32 engine).

Prints a table and writes artifacts/bench/monai.json.

    .venv/bin/python scripts/bench_monai.py                 # 3 rounds
    .venv/bin/python scripts/bench_monai.py --rounds 5
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
OUT = ROOT / "artifacts" / "bench" / "monai"

from scripts.bench_serve import cpu_name  # noqa: E402
from tests.compiler.stages.monai_bundles import write_bundle  # noqa: E402

SPLEEN_UNET = {"_target_": "UNet", "spatial_dims": 3, "in_channels": 1, "out_channels": 3,
               "channels": [16, 32, 64, 128, 256], "strides": [2, 2, 2, 2], "num_res_units": 2, "norm": "batch"}
INFERER = {"_target_": "SlidingWindowInferer", "roi_size": [96, 96, 96], "sw_batch_size": 4, "overlap": 0.25,
           "mode": "gaussian"}


class MonaiBundle:
    """The bundle as MONAI runs it: parsed by MONAI, network in eval mode with the bundle's weights."""

    def __init__(self, bundle: Path) -> None:
        from monai.bundle import ConfigParser

        self.parser = ConfigParser()
        self.parser.read_config(str(bundle / "configs" / "inference.json"))
        self.network = self.parser.get_parsed_content("network_def").eval()
        self.network.load_state_dict(torch.load(bundle / "models" / "model.pt", weights_only=True))
        self.preprocessing = self.parser.get_parsed_content("preprocessing")
        self.inferer = self.parser.get_parsed_content("inferer")

    def logits(self, path: Path) -> np.ndarray:
        image = self.preprocessing({"image": str(path)})["image"]
        with torch.no_grad():
            return np.asarray(self.inferer(image[None], self.network)[0])

    def segment(self, path: Path) -> np.ndarray:
        return self.logits(path).argmax(0).astype(np.uint8)


def to_ras(labels: np.ndarray, affine: np.ndarray) -> np.ndarray:
    from nibabel.orientations import apply_orientation, axcodes2ornt, io_orientation, ornt_transform

    return apply_orientation(labels, ornt_transform(io_orientation(affine), axcodes2ornt("RAS")))


# engine name -> build-engine options: fp32 on each CPU backend, and what --precision auto picks here
ENGINES = {"ort fp32": ["--backend", "onnxruntime", "--precision", "fp32"],
           "openvino fp32": ["--backend", "openvino", "--precision", "fp32"],
           "auto": ["--precision", "auto"]}


def build(bundle: Path, out: Path, options: list[str], parity_volume: Path) -> None:
    if not (out / "manifest.json").is_file():
        subprocess.run([sys.executable, "-m", "nnslim", "build-engine", str(bundle), "--out", str(out), *options,
                        "--parity-volume", str(parity_volume), "--batch", "4"], check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "artifacts" / "bench" / "monai.json")
    args = parser.parse_args()
    from nnslim.compiler.runtime.engine import load_engine
    from nnslim.compiler.runtime.segmentation import InferenceOptions, prepare_volume, segment_volume, window_config
    from nnslim.compiler.runtime.volumes.volume import load_volume
    from nnslim.compiler.runtime.window.walk import sliding_window_inference
    from nnslim.training.data import write_mni_tissue_raw

    OUT.mkdir(parents=True, exist_ok=True)
    data = write_mni_tissue_raw(OUT / "mni") if not (OUT / "mni" / "imagesTr").is_dir() else OUT / "mni"
    scan = data / "imagesTr" / "mni_0000.nii.gz"
    affine = nib.load(scan).affine
    bundle = OUT / "bundle"
    if not (bundle / "models" / "model.pt").is_file():
        write_bundle(bundle, network_def=SPLEEN_UNET, inferer=INFERER, scale=5.0)
    engines = {name: OUT / f"engine-{name.replace(' ', '-')}" for name in ENGINES}
    for name, folder in engines.items():
        build(bundle, folder, ENGINES[name], scan)
    monai = MonaiBundle(bundle)
    loaded = {name: load_engine(folder) for name, folder in engines.items()}
    options = InferenceOptions(progress=False)

    def nnslim(engine):
        def run() -> np.ndarray:
            labels, _ = segment_volume(load_volume(scan, 1), engine.predictor, engine.spec, options)
            return to_ras(labels, affine)
        return run

    runs = {"monai": lambda: monai.segment(scan), **{f"nnslim {n}": nnslim(e) for n, e in loaded.items()}}
    reference_logits = monai.logits(scan)
    reference = reference_logits.argmax(0)
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    agreement: dict[str, float] = {}
    for round_ in range(args.rounds):
        order = list(runs) if round_ % 2 == 0 else list(runs)[::-1]
        for name in order:
            start = time.perf_counter()
            labels = runs[name]()
            seconds[name].append(time.perf_counter() - start)
            agreement[name] = float((labels == reference).mean())
            print(f"[{round_ + 1}/{args.rounds}] {name}: {seconds[name][-1]:.2f} s, agreement {agreement[name]:.6f}",
                  file=sys.stderr)
    fp32 = loaded["ort fp32"]
    prepared = prepare_volume(load_volume(scan, 1), fp32.spec)
    logits = sliding_window_inference(prepared.image, fp32.predictor, fp32.spec.num_classes,
                                      window_config(fp32.spec, options))
    logit_error = float(np.abs(logits - reference_logits).max() / np.abs(reference_logits).max())
    base = statistics.median(seconds["monai"])
    rows = []
    for name in runs:
        engine = loaded.get(name.removeprefix("nnslim "))
        rows.append({"run": name, "engine": engine.runtime.label if engine else "PyTorch eager",
                     "median_seconds": statistics.median(seconds[name]), "seconds": seconds[name],
                     "speedup_vs_monai": base / statistics.median(seconds[name]), "voxel_agreement": agreement[name]})
    print(f"\n{'run':<22}{'engine':<26}{'median s':>10}{'vs MONAI':>10}{'agreement':>11}")
    for row in rows:
        print(f"{row['run']:<22}{row['engine']:<26}{row['median_seconds']:>10.2f}{row['speedup_vs_monai']:>9.2f}x"
              f"{row['voxel_agreement']:>11.6f}")
    print(f"fp32 engine vs MONAI: max |logit error| / max |logit| = {logit_error:.2e}; volume {list(prepared.image.shape)}; "
          f"CPU: {cpu_name()} ({os.cpu_count()} cores); torch threads {torch.get_num_threads()}")
    record = {"cpu": {"name": cpu_name(), "cores": os.cpu_count()}, "machine": platform.machine(),
              "torch_threads": torch.get_num_threads(), "bundle": {"network": SPLEEN_UNET, "inferer": INFERER},
              "volume_shape": list(prepared.image.shape), "rounds": args.rounds, "fp32_max_rel_logit_error": logit_error,
              "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
