"""Benchmark (seeds 002, 004): training memory of reversible U-Nets against their baselines.

For each preset (partially-reversible-unet, rev-mbconv-unet), d = 1..4 reversible blocks per level
and the training modes plain (the baseline: the same network with ordinary autograd), reversible
and checkpoint (torch.utils.checkpoint per block), batch 1, 4 input channels and classes:

  saved MB     bytes of activations autograd keeps for backward after one forward
               (`torch.autograd.graph.saved_tensors_hooks`, once per storage, weights excluded),
               counted on the "meta" device, so 128^3 costs no memory; the count is checked
               against a real CPU forward at --time-patch in every configuration
  s/step       forward + backward + SGD step at --time-patch, median of --repeats after a warm-up
  peak RSS MB  of a fresh process training at that patch (weights, gradients, saved and transient
               tensors, allocator caches); a patch whose predicted peak exceeds --ram-budget-gb is
               not run and says so
  in 8 GiB     the largest cubic patch (multiple of 16) whose training step peaks under 8 GiB
               (--search-budget-gib) of RSS, found by real runs (--search-depths; each probe is a
               fresh process)

Every configuration runs in its own spawned process: one process for everything grew until it
was killed (allocator caches of earlier configurations are never returned). On a CUDA GPU the
child reports `torch.cuda.max_memory_allocated` instead of RSS. seed 002's decoder is not
reversible, so for rev-mbconv-unet d counts the encoder's blocks and the decoder keeps 1.

Prints tables and writes artifacts/bench/reversible.json.

    .venv/bin/python scripts/bench_reversible.py                       # everything (45 min on 2 cores)
    .venv/bin/python scripts/bench_reversible.py --presets partially-reversible-unet --depths 1 4
    .venv/bin/python scripts/bench_reversible.py --rss-patches 64 --search-depths   # no search
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchlib import in_fresh_process, peak_rss_mb  # noqa: E402
from nnslim.files import write_json_atomic  # noqa: E402
from nnslim.training.presets import get_preset  # noqa: E402
from nnslim.training.losses import dice_ce_loss  # noqa: E402
from nnslim.training.reversible import SavedTensorMeter  # noqa: E402
from nnslim.training.revunet import RevUNet  # noqa: E402
from nnslim.parameters import count_parameters  # noqa: E402

OUT = ROOT / "artifacts" / "bench" / "reversible.json"
MODES = ("plain", "reversible", "checkpoint")
BASE_RSS_MB = 350  # python + torch before any tensor: the part of the peak that does not scale


def build(preset: str, depth: int, memory: str, device: str | torch.device = "cpu") -> RevUNet:
    torch.manual_seed(0)
    base = get_preset(preset)
    levels = len(base.widths)
    decoder = (depth,) * (levels - 1) if base.reversible_decoder else base.decoder_depths
    config = base.build(4, 4, memory=memory, encoder_depths=(depth,) * levels, decoder_depths=decoder)
    return RevUNet(config).to(device).train()


def saved_bytes(model: RevUNet, patch: int) -> int:
    """Saved-for-backward bytes of one forward at `patch`^3 on the model's device."""
    device = next(model.parameters()).device
    with SavedTensorMeter(model) as meter:
        out = model(torch.randn(1, 4, patch, patch, patch, device=device))
    del out
    return meter.bytes


def _train_child(preset: str, depth: int, memory: str, patch: int, steps: int) -> dict:
    """In a fresh process: `steps` training steps at `patch`^3; saved bytes, times, peak memory."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build(preset, depth, memory, device)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    x = torch.randn(1, 4, patch, patch, patch, device=device)
    target = torch.randint(0, 4, (1, patch, patch, patch), device=device)
    times, saved = [], None
    for step in range(steps):
        started = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        with SavedTensorMeter(model) as meter:
            out = model(x)
        saved = saved if step else meter.bytes
        dice_ce_loss(out, target).backward()
        del out
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - started)
    result = {"patch": patch, "saved_bytes_cpu": saved, "seconds": times,
              "peak_rss_mb": peak_rss_mb()}
    if device.type == "cuda":
        result["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return result


def train_in_fresh_process(preset: str, depth: int, memory: str, patch: int, steps: int) -> dict:
    return in_fresh_process(_train_child, preset, depth, memory, patch, steps)


def peak_mb(result: dict) -> float:
    return result.get("cuda_max_allocated_mb", result["peak_rss_mb"])


def predicted_peak_mb(measured: list[dict], patch: int) -> float:
    """Peak memory at `patch`: a constant plus a part linear in voxels, through the two largest
    measured patches (through BASE_RSS_MB and one patch when only one is measured)."""
    points = sorted((m["patch"] ** 3, peak_mb(m)) for m in measured)[-2:]
    if len(points) == 1:
        points.insert(0, (0, BASE_RSS_MB))
    (v0, m0), (v1, m1) = points
    return m1 + (m1 - m0) / (v1 - v0) * (patch**3 - v1)


def largest_patch_under(preset: str, depth: int, memory: str, measured: list[dict], budget_mb: float) -> dict:
    """Largest multiple-of-16 cubic patch whose training step peaks under `budget_mb`, by real runs."""
    probes: dict[int, float] = {}
    patch = measured[-1]["patch"] // 16 * 16
    while patch > 16 and predicted_peak_mb(measured, patch) > budget_mb:
        patch -= 16
    while predicted_peak_mb(measured, patch + 16) <= budget_mb:
        patch += 16
    while len(probes) < 6:
        result = train_in_fresh_process(preset, depth, memory, patch, steps=1)
        probes[patch] = peak_mb(result)
        print(f"    probe {preset} d={depth} {memory} {patch}^3: peak {probes[patch]:.0f} MB", flush=True)
        fits = probes[patch] <= budget_mb
        if fits and patch + 16 in probes:
            return {"patch": patch, "probes": probes}
        if not fits and patch - 16 in probes and probes[patch - 16] <= budget_mb:
            return {"patch": patch - 16, "probes": probes}
        if not fits and patch == 16:
            return {"patch": None, "probes": probes}
        patch = patch + 16 if fits else patch - 16
    return {"patch": None, "probes": probes, "note": "not bracketed in 6 probes"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["partially-reversible-unet", "rev-mbconv-unet"])
    parser.add_argument("--depths", nargs="+", type=int, default=[1, 2, 3, 4])
    parser.add_argument("--patches", nargs="+", type=int, default=[64, 96, 128], help="for saved MB (meta device)")
    parser.add_argument("--rss-patches", nargs="+", type=int, default=[64, 96, 128], help="for peak RSS (real runs)")
    parser.add_argument("--time-patch", type=int, default=64, help="patch for s/step and the CPU check of saved MB")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--ram-budget-gb", type=float, default=12,
                        help="a real run predicted to peak above this is skipped (this machine's RAM is shared)")
    parser.add_argument("--search-depths", nargs="*", type=int, default=[1, 4],
                        help="depths for the largest-patch-in-8-GiB search (none: skip the search)")
    parser.add_argument("--search-budget-gib", type=float, default=8)
    parser.add_argument("--search-modes", nargs="+", default=["plain", "reversible"], choices=MODES)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    budget_mb = args.ram_budget_gb * 1024
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = []
    for preset in args.presets:
        for depth in args.depths:
            for memory in MODES:
                model = build(preset, depth, memory, "meta")
                parameters = count_parameters(build(preset, depth, memory))  # on CPU: meta storages all sit at 0
                row = {"preset": preset, "depth": depth, "memory": memory, "parameters": parameters,
                       "saved_bytes": {p: saved_bytes(model, p) for p in sorted({*args.patches, args.time_patch})}}
                timed = train_in_fresh_process(preset, depth, memory, args.time_patch, args.repeats + 1)
                if timed["saved_bytes_cpu"] != row["saved_bytes"][args.time_patch]:
                    raise SystemExit(f"{preset} d={depth} {memory}: saved bytes on meta "
                                     f"{row['saved_bytes'][args.time_patch]} != CPU {timed['saved_bytes_cpu']}")
                row["seconds_per_step"] = statistics.median(timed["seconds"][1:])
                row["peak_mb"], measured = {args.time_patch: peak_mb(timed)}, [timed]
                for patch in sorted(set(args.rss_patches) - {args.time_patch}):
                    predicted = predicted_peak_mb(measured, patch)
                    if predicted > budget_mb:
                        row["peak_mb"][patch] = None
                        row.setdefault("not_run", {})[patch] = f"predicted peak {predicted:.0f} MB > budget"
                        continue
                    measured.append(train_in_fresh_process(preset, depth, memory, patch, 1))
                    row["peak_mb"][patch] = peak_mb(measured[-1])
                if depth in args.search_depths and memory in args.search_modes:
                    row["in_budget"] = largest_patch_under(preset, depth, memory, measured,
                                                           args.search_budget_gib * 1024)
                rows.append(row)
                print(f"{preset} d={depth} {memory}: saved "
                      + ", ".join(f"{p}^3 {b / 2**20:.0f}" for p, b in row["saved_bytes"].items())
                      + " MB; peak " + ", ".join(f"{p}^3 {_mb(m)}" for p, m in row["peak_mb"].items())
                      + f" MB; {row['seconds_per_step']:.2f} s/step", flush=True)
    print_tables(rows, args, device)
    write_json_atomic(args.out, {"device": device, "time_patch": args.time_patch, "rows": rows})
    print(f"written {args.out}")


def _mb(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def print_tables(rows: list[dict], args: argparse.Namespace, device: str) -> None:
    largest = max(args.patches)
    memory_kind = "max_memory_allocated" if device == "cuda" else "peak RSS"
    print(f"\nBatch 1, {device}; saved = activations kept for backward; peak = {memory_kind} of a training step")
    header = f"{'preset':<26}{'d':>2}{'mode':>11}{'params':>8}"
    header += "".join(f"{f'saved {p}':>10}" for p in args.patches) + f"{'vs plain':>9}"
    header += "".join(f"{f'peak {p}':>9}" for p in sorted(set(args.rss_patches)))
    header += f"{'s/step':>8}{'vs plain':>9}{f'in {args.search_budget_gib:g} GiB':>11}"
    print(header)
    for r in rows:
        plain = next(p for p in rows if (p["preset"], p["depth"], p["memory"]) == (r["preset"], r["depth"], "plain"))
        line = f"{r['preset']:<26}{r['depth']:>2}{r['memory']:>11}{r['parameters'] / 1e6:>7.2f}M"
        line += "".join(f"{r['saved_bytes'][p] / 2**20:>10.0f}" for p in args.patches)
        line += f"{r['saved_bytes'][largest] / plain['saved_bytes'][largest]:>8.2f}x"
        line += "".join(f"{_mb(r['peak_mb'].get(p)):>9}" for p in sorted(set(args.rss_patches)))
        line += f"{r['seconds_per_step']:>8.2f}{r['seconds_per_step'] / plain['seconds_per_step']:>8.2f}x"
        found = r.get("in_budget", {}).get("patch")
        line += f"{'' if 'in_budget' not in r else ('none' if found is None else f'{found}^3'):>11}"
        print(line)
    print(f"\nGrowth of saved activations from d=1 to d=4 ({largest}^3):")
    for preset in args.presets:
        for memory in MODES:
            by_depth = {r["depth"]: r["saved_bytes"][largest] for r in rows
                        if r["preset"] == preset and r["memory"] == memory}
            if 1 in by_depth and 4 in by_depth:
                print(f"  {preset:<26}{memory:>11}: {by_depth[4] / by_depth[1] - 1:+.1%}")
    print(f"\nLargest patch training in {args.search_budget_gib:g} GiB (measured probes), voxels vs plain:")
    for r in rows:
        if "in_budget" not in r:
            continue
        plain = next((p for p in rows if (p["preset"], p["depth"], p["memory"]) == (r["preset"], r["depth"], "plain")
                      and "in_budget" in p), None)
        found, base = r["in_budget"]["patch"], plain and plain["in_budget"]["patch"]
        ratio = f"{(found / base) ** 3:.2f}x" if found and base else "-"
        probes = ", ".join(f"{p}^3 {m:.0f} MB" for p, m in sorted(r["in_budget"]["probes"].items()))
        print(f"  {r['preset']:<26} d={r['depth']} {r['memory']:>11}: {found}^3  {ratio:>6}  ({probes})")
    for r in rows:
        for patch, why in r.get("not_run", {}).items():
            print(f"  {r['preset']} d={r['depth']} {r['memory']} peak at {patch}^3 not run: {why}")


if __name__ == "__main__":
    main()
