"""How an engine runs here: the build's recorded choice, the user's override, or a checked fallback.

An engine's manifest records the (backend, precision) its build chose and, for `--precision auto`
builds, every candidate that passed its parity gate, fastest first (`selection.candidates`). The
runtime takes the first of these that this machine can run; a fallback is logged with the reasons
the earlier choices were passed over.
"""

from __future__ import annotations

from dataclasses import dataclass

from nnslim.compiler.runtime.backends import BACKENDS, get_backend
from nnslim.compiler.runtime.manifest import EngineManifest
from nnslim.errors import EngineError, SettingsError


@dataclass(frozen=True)
class RuntimeChoice:
    """One way to run an engine that its build checked: backend, precision and the model file."""

    backend: str
    precision: str
    model: str
    checked: bool = True  # False: the user asked for a combination the build did not time or gate

    @property
    def label(self) -> str:
        return f"{self.backend} {self.precision}"


def runtime_choices(manifest: EngineManifest) -> list[RuntimeChoice]:
    """The engine's checked choices, best first: the build's passing candidates fastest first (engines
    built with `--precision auto`), or the one backend an older or explicit build recorded."""
    chosen = RuntimeChoice(manifest.backend, manifest.precision, manifest.runtime_model)
    candidates = manifest.selection.candidates if manifest.selection is not None else ()
    others = [RuntimeChoice(c.backend, c.precision, c.model) for c in candidates if c.passed]
    return [chosen, *[c for c in others if (c.backend, c.precision) != (chosen.backend, chosen.precision)]]


def on_device(choices: list[RuntimeChoice], device: str) -> list[RuntimeChoice]:
    """The choices that run on `device`: on "cuda", CPU backends are replaced by their GPU twins (the
    same graph on the GPU) and the rest dropped."""
    if device != "cuda":
        return choices
    moved = []
    for c in choices:
        entry = BACKENDS.get(c.backend)
        twin = entry.gpu_twin if entry is not None else None
        if twin is not None:
            moved.append(RuntimeChoice(twin, c.precision, c.model, c.checked))
        elif entry is None or entry.device == "cuda":
            moved.append(c)
    return moved


def resolve_runtime(manifest: EngineManifest, backend: str | None = None, precision: str | None = None,
                    device: str = "cpu") -> tuple[RuntimeChoice, str | None]:
    """Pick how to run an engine here: the recorded choice, the user's override, or the next checked
    choice that this machine can run. Returns the choice and a note when it is a fallback."""
    choices = on_device(runtime_choices(manifest), device)
    if device == "cuda" and backend is not None:
        backend = get_backend(backend).gpu_twin or backend
        if get_backend(backend).device != "cuda":  # it would quietly run on the CPU
            raise SettingsError(f"backend {backend!r} runs on the CPU only, so it cannot honour device 'cuda'; use "
                                f"device 'cpu' with it, or a GPU backend ({', '.join(gpu_backends())})")
    wanted = [c for c in choices if backend in (None, c.backend) and precision in (None, c.precision)]
    if not wanted and backend is not None and precision in (None, "fp32") and get_backend(backend).model == "onnx":
        fp32 = next((c for c in choices if c.precision == "fp32" and c.model.endswith(".onnx")), None)
        if fp32 is not None:  # the same fp32 graph on another ONNX backend: allowed, said to be unchecked
            wanted = [RuntimeChoice(backend, "fp32", fp32.model, checked=False)]
    if not wanted:
        raise EngineError(f"the engine was not built for {backend or 'any backend'} {precision or ''}; it offers "
                          f"{', '.join(c.label for c in choices)}; rebuild with --backend/--precision to add it")
    reasons = []
    for choice in wanted:
        entry = BACKENDS.get(choice.backend)
        if entry is None:  # recorded by a newer nnslim
            reasons.append(f"{choice.label}: backend unknown to this nnslim (a newer version built the engine)")
        elif not entry.available():
            reasons.append(f"{choice.label}: backend not available here")
        elif choice.precision not in entry.precisions():
            reasons.append(f"{choice.label}: this machine cannot run {choice.precision} on {choice.backend}")
        else:
            note = None
            if reasons:
                note = f"falling back to {choice.label} ({'; '.join(reasons)})"
            elif not choice.checked:
                note = f"running {choice.label}, which the build did not check against PyTorch"
            return choice, note
    if backend is None and precision in (None, "fp32"):
        other = _fp32_elsewhere(choices, device, {c.backend for c in wanted})
        if other is not None:  # e.g. an ONNX Runtime engine on an install that has OpenVINO only
            return other, (f"running the engine's fp32 graph on {other.backend}, which the build did not check against "
                           f"PyTorch ({'; '.join(reasons)})")
    raise EngineError("no recorded way of running this engine works here: " + "; ".join(reasons))


def _fp32_elsewhere(choices: list[RuntimeChoice], device: str, tried: set[str]) -> RuntimeChoice | None:
    """The engine's fp32 ONNX graph, recorded for a backend this nnslim knows (an unknown one's file may
    mean something else), on another backend available here that runs ONNX graphs in fp32."""
    fp32 = next((c for c in choices if c.precision == "fp32" and c.backend in BACKENDS
                 and BACKENDS[c.backend].kind.name == "onnx"), None)
    if fp32 is None:
        return None
    for entry in BACKENDS.values():
        if (entry.name not in tried and entry.kind.name == "onnx" and (entry.device == "cuda") == (device == "cuda")
                and entry.available() and "fp32" in entry.precisions()):
            return RuntimeChoice(entry.name, "fp32", fp32.model, checked=False)
    return None


def gpu_backends() -> list[str]:
    """Backends that run on the GPU, or have a GPU twin (`--device cuda` accepts them)."""
    return [name for name, b in BACKENDS.items() if b.device == "cuda" or b.gpu_twin]
