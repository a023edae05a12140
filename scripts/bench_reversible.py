"""Benchmark (seeds 002, 004): activation memory of reversible U-Nets against their baselines.

For each preset (partially-reversible-unet, rev-mbconv-unet), blocks per level 1..4 (encoder and
decoder), patch sizes and training modes plain (the baseline: same network, ordinary autograd),
reversible and checkpoint (torch.utils.checkpoint per block), batch 1:

  saved MB      bytes of activations autograd keeps for backward after one forward
                (`torch.autograd.graph.saved_tensors_hooks`, once per storage, weights excluded)
  s/step        forward + backward + SGD step, median of --repeats (one process, interleaved)
  peak RSS MB   of a fresh process doing one training step (only with --rss; slow)

Then, per mode, the largest cubic patch whose saved activations fit in 8 GB, from the measured
bytes per voxel (saved bytes are linear in the voxel count; the table shows it across patches).
On a CUDA GPU the same script reports `torch.cuda.max_memory_allocated` per step as well.

Prints tables and writes artifacts/bench/reversible.json.

    .venv/bin/python scripts/bench_reversible.py                    # 64^3 and 96^3
    .venv/bin/python scripts/bench_reversible.py --patches 64 96 128 --rss
"""

from __future__ import annotations

import argparse
import multiprocessing
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from compiler.runtime.files import write_json_atomic  # noqa: E402
from training.config import get_preset  # noqa: E402
from training.losses import dice_ce_loss  # noqa: E402
from training.reversible import SavedTensorMeter  # noqa: E402
from training.revunet import RevUNet  # noqa: E402
from training.unet import count_parameters  # noqa: E402

OUT = ROOT / "artifacts" / "bench" / "reversible.json"
MODES = ("plain", "reversible", "checkpoint")
BUDGET = 8 * 2**30


def build(preset: str, depth: int, memory: str, device: torch.device) -> RevUNet:
    torch.manual_seed(0)
    base = get_preset(preset)
    levels = len(base.widths)
    config = base.build(4, 4, memory=memory, encoder_depths=(depth,) * levels, decoder_depths=(depth,) * (levels - 1))
    return RevUNet(config).to(device).train()


def saved_bytes(model: RevUNet, patch: int, device: torch.device) -> int:
    x = torch.randn(1, 4, patch, patch, patch, device=device, requires_grad=False)
    with SavedTensorMeter(model) as meter:
        out = model(x)
    del out
    return meter.bytes


def step_seconds(model: RevUNet, patch: int, device: torch.device, repeats: int) -> tuple[float, int | None]:
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    x = torch.randn(1, 4, patch, patch, patch, device=device)
    target = torch.randint(0, 4, (1, patch, patch, patch), device=device)
    times = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(repeats + 1):  # the first is a warm-up
        started = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        dice_ce_loss(model(x), target).backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - started)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return statistics.median(times[1:]), peak


def _rss_child(preset: str, depth: int, memory: str, patch: int) -> float:
    device = torch.device("cpu")
    model = build(preset, depth, memory, device)
    step_seconds(model, patch, device, 1)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_rss_mb(preset: str, depth: int, memory: str, patch: int) -> float:
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(_rss_child, (preset, depth, memory, patch))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["partially-reversible-unet", "rev-mbconv-unet"])
    parser.add_argument("--depths", nargs="+", type=int, default=[1, 2, 3, 4])
    parser.add_argument("--patches", nargs="+", type=int, default=[64, 96])
    parser.add_argument("--time-patch", type=int, default=64, help="patch for the s/step column")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--rss", action="store_true", help="also peak RSS of a fresh process per configuration")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--memory-limit-gb", type=float, default=16,
                        help="address-space cap for this process: a configuration over it is reported, not OOM-killed")
    args = parser.parse_args()
    limit = int(args.memory_limit_gb * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows, failed = [], []
    for preset in args.presets:
        for depth in args.depths:
            for memory in MODES:
                model = build(preset, depth, memory, device)
                row = {"preset": preset, "depth": depth, "memory": memory, "parameters": count_parameters(model)}
                try:
                    row["saved_bytes"] = {p: saved_bytes(model, p, device) for p in args.patches}
                    row["seconds_per_step"], row["cuda_max_allocated"] = step_seconds(
                        model, args.time_patch, device, args.repeats)
                except (MemoryError, RuntimeError) as exc:  # over the cap: say so and go on
                    print(f"{preset} depth {depth} {memory}: failed ({type(exc).__name__}: {str(exc)[:120]})")
                    failed.append({**row, "error": f"{type(exc).__name__}: {str(exc)[:300]}"})
                    continue
                if args.rss:
                    row["peak_rss_mb"] = {p: peak_rss_mb(preset, depth, memory, p) for p in args.patches}
                largest = max(args.patches)
                per_voxel = row["saved_bytes"][largest] / largest**3
                side = int((BUDGET / per_voxel) ** (1 / 3)) // 16 * 16
                row["bytes_per_voxel"], row["largest_patch_in_8GB"] = per_voxel, side
                rows.append(row)
                print(f"{preset} depth {depth} {memory}: "
                      + ", ".join(f"{p}^3 {b / 2**20:.0f} MB" for p, b in row["saved_bytes"].items())
                      + f", {row['seconds_per_step']:.2f} s/step", flush=True)

    print(f"\nSaved activations for backward, batch 1 (device: {device})")
    header = f"{'preset':<28}{'depth':>6}{'mode':>12}{'params':>9}"
    header += "".join(f"{f'{p}^3 MB':>11}" for p in args.patches)
    header += f"{'vs plain':>10}{'s/step':>9}{'vs plain':>10}{'max patch 8GB':>15}"
    print(header)
    for r in rows:
        plain = next((p for p in rows if p["preset"] == r["preset"] and p["depth"] == r["depth"]
                      and p["memory"] == "plain"), None)
        if plain is None:
            continue
        largest = max(args.patches)
        line = f"{r['preset']:<28}{r['depth']:>6}{r['memory']:>12}{r['parameters'] / 1e6:>8.2f}M"
        line += "".join(f"{r['saved_bytes'][p] / 2**20:>11.0f}" for p in args.patches)
        line += f"{r['saved_bytes'][largest] / plain['saved_bytes'][largest]:>9.2f}x"
        line += f"{r['seconds_per_step']:>9.2f}{r['seconds_per_step'] / plain['seconds_per_step']:>9.2f}x"
        line += f"{r['largest_patch_in_8GB']:>12}^3"
        print(line)
    print("\nGrowth of saved activations from depth 1 to depth 4 (largest patch):")
    for preset in args.presets:
        for memory in MODES:
            by_depth = {r["depth"]: r["saved_bytes"][max(args.patches)] for r in rows
                        if r["preset"] == preset and r["memory"] == memory}
            if 1 in by_depth and 4 in by_depth:
                print(f"  {preset:<28}{memory:>12}: {by_depth[4] / by_depth[1] - 1:+.1%}")
    for f in failed:
        print(f"  {f['preset']} depth {f['depth']} {f['memory']}: not measured, {f['error'][:100]}")
    write_json_atomic(args.out, {"device": str(device), "patches": args.patches, "rows": rows, "failed": failed})
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
