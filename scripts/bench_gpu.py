"""GPU benchmark: one checkpoint, five ways to run it, per tile and per volume, in one run.

Rows: PyTorch fp32, PyTorch autocast (fp16), ONNX Runtime CUDA EP (I/O binding), TensorRT fp32,
TensorRT fp16. Per tile: median latency of one batch of tiles (after warm-up, CUDA-synchronized).
Per volume: the whole sliding window (accumulators on the GPU) over the given volume, median of
`--repeats`, plus voxel agreement with PyTorch fp32.

Without a CUDA GPU it measures nothing, says so and exits 0 (no GPU figure is ever invented).
TensorRT rows need `pip install 'nnslim[tensorrt]'` (or `[tensorrt-cu12]`). A row that cannot
be built or run (TensorRT missing, a failed build, ONNX Runtime without its CUDA provider, out of
memory) is listed as skipped with the reason; the other rows are still measured.

    .venv/bin/python scripts/bench_gpu.py --checkpoint artifacts/models/mni-tissue-tiny.pt \\
        --volume artifacts/data/mni-tissue/imagesTr/mni_0000.nii.gz --patch 96 96 96 --batch 2
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from nnslim.errors import NnslimError
from nnslim.files import write_json_atomic

OUT = Path("artifacts/bench/gpu.json")
# What one row may fail with without stopping the others: nnslim's own errors (missing backend,
# failed build, refused session) and torch's / TensorRT's RuntimeError (CUDA out of memory, ...).
ROW_ERRORS = (NnslimError, RuntimeError)


def try_row(name: str, make, runners: dict, skipped: dict[str, str]) -> None:
    """`runners[name] = make()`, or `skipped[name] = the reason` when it fails."""
    try:
        runners[name] = make()
    except ROW_ERRORS as exc:
        skipped[name] = f"{type(exc).__name__}: {exc}"


def _cuda_time(fn, repeats: int) -> float:
    fn()  # warm-up (autotuning, lazy allocation)
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def _measure(predictor, tiles, image, classes, window, reference, repeats) -> dict:
    """Per-tile and per-volume median times and voxel agreement with PyTorch fp32 for one runner."""
    from nnslim.compiler.runtime.window.walk import sliding_window_inference

    per_tile = _cuda_time(lambda: predictor(tiles), repeats)
    per_volume = _cuda_time(lambda: sliding_window_inference(image, predictor, classes, window), max(3, repeats // 3))
    labels = sliding_window_inference(image, predictor, classes, window).argmax(0)
    return {"tile_ms": per_tile * 1e3, "volume_s": per_volume,
            "agreement_vs_fp32": float((labels == reference).float().mean())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=Path("artifacts/models/mni-tissue-tiny.pt"))
    parser.add_argument("--volume", type=Path, default=None, help="NIfTI volume (default: random 160^3)")
    parser.add_argument("--patch", type=int, nargs=3, default=None)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA GPU visible: nothing measured (this benchmark only reports figures it measured on a GPU)")
        return

    from nnslim.compiler.stages.pipeline import BuildConfig, build_engine
    from nnslim.compiler.runtime.engine import load_engine
    from nnslim.compiler.runtime.backends.onnx_runtime import OnnxRuntimeGpuPredictor
    from nnslim.compiler.runtime.backends.torch_module import TorchPredictor
    from nnslim.compiler.runtime.preprocessing import normalize
    from nnslim.compiler.runtime.window.config import SlidingWindowConfig
    from nnslim.compiler.runtime.window.walk import sliding_window_inference
    from nnslim.compiler.runtime.volumes.volume import load_volume
    from nnslim.training.checkpoint import load_model

    model, metadata = load_model(args.checkpoint)
    patch = tuple(args.patch or metadata["patch_size"])
    channels, classes = model.config.in_channels, model.config.num_classes
    if args.volume:
        image = torch.from_numpy(normalize(load_volume(args.volume, channels).data, metadata["normalization"]))
    else:
        image = torch.randn(channels, 160, 160, 160, generator=torch.Generator().manual_seed(0))
    tiles = torch.randn(args.batch, channels, *patch, device="cuda")
    window = SlidingWindowConfig(patch_size=patch, batch_size=args.batch)

    runners: dict[str, object] = {}
    torch_fp32 = TorchPredictor(model, device="cuda")
    runners["PyTorch fp32"] = torch_fp32

    def autocast(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cuda", dtype=torch.float16):
            return torch_fp32(x).float()

    autocast.device = torch.device("cuda")  # type: ignore[attr-defined]
    runners["PyTorch autocast fp16"] = autocast
    skipped: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        def onnxruntime_cuda():
            engine = Path(tmp) / "ort"
            build_engine(BuildConfig(checkpoint=args.checkpoint, out_dir=engine, patch_size=patch,
                                     batch_size=args.batch, backend="onnxruntime", precision="fp32"))
            return OnnxRuntimeGpuPredictor(engine / "model.opt.onnx")

        def tensorrt(precision: str):
            out = Path(tmp) / f"trt-{precision}"
            build_engine(BuildConfig(checkpoint=args.checkpoint, out_dir=out, patch_size=patch,
                                     batch_size=args.batch, backend="tensorrt", precision=precision))
            return load_engine(out).predictor

        try_row("ONNX Runtime CUDA", onnxruntime_cuda, runners, skipped)
        for precision in ("fp32", "fp16"):
            try_row(f"TensorRT {precision}", lambda p=precision: tensorrt(p), runners, skipped)

        rows = []
        reference = sliding_window_inference(image, torch_fp32, classes, window).argmax(0)
        for name, predictor in runners.items():
            measured: dict = {}
            try_row(name, lambda p=predictor: _measure(p, tiles, image, classes, window, reference, args.repeats),
                    measured, skipped)
            if name in measured:
                rows.append({"runner": name, **measured[name]})

    if not rows or rows[0]["runner"] != "PyTorch fp32":
        print(f"PyTorch fp32, the baseline, could not be measured: {skipped.get('PyTorch fp32')}")
        return
    base = rows[0]
    print(f"\nGPU: {torch.cuda.get_device_name()} | patch {patch}, batch {args.batch}, volume {tuple(image.shape[1:])}")
    print(f"{'runner':<24}{'tile ms':>10}{'x':>7}{'volume s':>10}{'x':>7}{'agreement':>11}")
    for r in rows:
        print(f"{r['runner']:<24}{r['tile_ms']:>10.2f}{base['tile_ms'] / r['tile_ms']:>6.2f}x"
              f"{r['volume_s']:>10.2f}{base['volume_s'] / r['volume_s']:>6.2f}x{r['agreement_vs_fp32']:>11.6f}")
    for name, reason in skipped.items():
        print(f"{name:<24} skipped: {reason}")
    write_json_atomic(args.out, {"gpu": torch.cuda.get_device_name(), "patch": list(patch), "batch": args.batch,
                                 "rows": rows, "skipped": skipped})
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
