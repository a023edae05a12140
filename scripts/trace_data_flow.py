"""Follow the image of `Engine.segment` through nnslim's modules: which modules it stops in, in order.

The path is followed as a reader follows the code: each nnslim function that receives the image's
data (an array or tensor with at least a quarter of the volume's voxels: the scan, its normalized
copy, finished slabs of logits, labels; or a batch of the window's tiles) counts once, at its first
call, so the loops (every tile, every slab) read as one pass. Consecutive functions of one module
are one stop; a return is a stop in a module the image had already left. The target of the
architecture issue: at most 3 returns.

    .venv/bin/python scripts/trace_data_flow.py                 # modules the image stops in
    .venv/bin/python scripts/trace_data_flow.py --rooms         # the same, by room (volumes, window, ...)
    .venv/bin/python scripts/trace_data_flow.py --json artifacts/trace_data_flow.json

Builds a small fp32 engine from the bundled model (in a temporary folder) and segments a 64^3 crop
of the MNI T1 with it, on the CPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def _is_image(value, voxels: int) -> bool:
    size = getattr(value, "size", None)
    if callable(size):  # torch: size() is a method, numel() the count
        size = value.numel()
    shape = getattr(value, "shape", None)
    return isinstance(size, int) and shape is not None and len(shape) >= 3 and size >= voxels // 4 or (
        shape is not None and len(shape) >= 4 and isinstance(size, int) and size >= 32**3)


def trace(engine, image: np.ndarray, every_call: bool = False) -> list[str]:
    """The modules (collapsed) the image passes through during `engine.segment(image)`; with
    `every_call`, the modules of every nnslim function called (the control flow, first calls)."""
    voxels = int(image.size)
    stops: list[str] = []
    seen: set[object] = set()

    def profile(frame, event, arg):
        if event != "call":
            return
        module = frame.f_globals.get("__name__", "")
        if not module.startswith("nnslim.") or module.startswith("nnslim.compiler.runtime.engine"):
            return
        code = frame.f_code
        if code in seen:
            return
        arguments = [frame.f_locals.get(n) for n in code.co_varnames[: code.co_argcount + code.co_kwonlyargcount]]
        if every_call or any(_is_image(a, voxels) for a in arguments):
            seen.add(code)
            name = module.removeprefix("nnslim.compiler.runtime.")
            if not stops or stops[-1] != name:
                stops.append(name)

    sys.setprofile(profile)
    try:
        engine.segment(image, spacing=(1.0, 1.0, 1.0))
    finally:
        sys.setprofile(None)
    return stops


def room(module: str) -> str:
    """The room of a runtime module: its subpackage (the backends run inside the window), or itself."""
    first = module.split(".")[0]
    return "window" if first == "backends" else first


def collapse(stops: list[str]) -> list[str]:
    return [s for i, s in enumerate(stops) if i == 0 or stops[i - 1] != s]


def returns(stops: list[str]) -> list[str]:
    """Stops in a module the image had left before."""
    seen, back = set(), []
    for i, stop in enumerate(stops):
        if stop in seen:
            back.append(stop)
        if i:
            seen.add(stops[i - 1])
    return back


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, default=None, help="Also write the stops here.")
    parser.add_argument("--rooms", action="store_true",
                        help="Count rooms, not modules (window.* and the backend it drives are one room: the window).")
    parser.add_argument("--every-call", action="store_true",
                        help="Follow every nnslim function called (first calls), not only those given the image.")
    args = parser.parse_args()
    import nibabel as nib

    import nnslim
    from nnslim.compiler.stages.pipeline import BuildConfig, build_engine
    from nnslim.training.data import mni_template_paths

    t1 = np.asarray(nib.load(mni_template_paths()["t1"]).dataobj, dtype=np.float32)[70:134, 80:144, 60:124]
    with tempfile.TemporaryDirectory() as tmp:
        build_engine(BuildConfig(checkpoint=ROOT / "artifacts" / "models" / "mni-tissue-tiny.pt",
                                 out_dir=Path(tmp) / "engine", patch_size=(32, 32, 32), precision="fp32",
                                 parity_tiles=1, pass_parity=False))
        stops = trace(nnslim.load_engine(Path(tmp) / "engine"), t1, args.every_call)
    if args.rooms:
        stops = collapse([room(s) for s in stops])
    back = returns(stops)
    print(f"{len(stops)} stops in {len(set(stops))} modules, {len(back)} returns to a module left before")
    for i, stop in enumerate(stops, 1):
        print(f"  {i:>2}. {stop}{'   (return)' if stop in back and stops.index(stop) < i - 1 else ''}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"stops": stops, "returns": back}, indent=2) + "\n")


if __name__ == "__main__":
    main()
