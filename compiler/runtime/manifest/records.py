"""The engine manifest as records: what `build-engine` writes and every reader uses.

`EngineManifest` is the one form of a manifest in nnslim. The build assembles one and writes
`to_dict()` as `manifest.json`; the runtime, the Triton export, `inspect` and the CLI get one from
`load_manifest` (validated by `schema.parse_manifest`, verified by `verify.verify_files`).
Sections the runtime relies on are typed records (`io`, `parity`, `selection`, `tensorrt`,
`files`); the descriptive ones (`model`, `source`, `stages`, `tools`, `build`) stay plain JSON
objects. Keys this nnslim does not know are kept in `extra` and written back unchanged, so newer
builds can add records and older engines keep loading.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any

FORMAT = "nnslim.engine"
FORMAT_VERSION = 1  # what this nnslim writes
READABLE_VERSIONS = (1,)  # what it reads; version 1 is every manifest written so far
MANIFEST = "manifest.json"


def _plain(record: Any) -> dict[str, Any]:
    """A record's JSON object: its fields in order, nested records as objects, `extra` merged last."""
    out: dict[str, Any] = {}
    for f in fields(record):
        value = getattr(record, f.name)
        if f.name == "extra":
            out.update(value)
            continue
        if hasattr(value, "to_dict"):
            value = value.to_dict()
        elif isinstance(value, tuple) and value and hasattr(value[0], "to_dict"):
            value = [v.to_dict() for v in value]
        elif isinstance(value, tuple):
            value = list(value)
        out[f.name] = value
    return out


@dataclass(frozen=True)
class FileRecord:
    """One file of the engine directory: its sha256 and size, and for an ONNX model the external-data
    files it names (recorded by the build, so loading an engine needs no `onnx`; None: an engine
    built before this was recorded)."""

    sha256: str
    bytes: int
    external_data: tuple[str, ...] | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"sha256": self.sha256, "bytes": self.bytes}
        if self.external_data is not None:
            out["external_data"] = list(self.external_data)
        return out


@dataclass(frozen=True)
class TensorRecord:
    """A graph input or output: name, dtype and shape `["batch", channels, *patch]`."""

    name: str
    dtype: str
    shape: tuple[Any, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


@dataclass(frozen=True)
class IORecord:
    input: TensorRecord
    output: TensorRecord
    batch: tuple[int, int, int]  # min, opt, max

    @property
    def in_channels(self) -> int:
        return int(self.input.shape[1])

    @property
    def num_classes(self) -> int:
        return int(self.output.shape[1])

    @property
    def patch_size(self) -> tuple[int, ...]:
        return tuple(int(p) for p in self.input.shape[2:])

    def to_dict(self) -> dict[str, Any]:
        low, opt, high = self.batch
        return {"input": self.input.to_dict(), "output": self.output.to_dict(),
                "batch": {"min": low, "opt": opt, "max": high}}


@dataclass(frozen=True)
class Tolerance:
    """A parity gate: max |logit error| relative to the largest reference logit, min argmax agreement."""

    max_rel_logit_error: float = 1e-2
    min_argmax_agreement: float = 0.999

    def to_dict(self) -> dict[str, Any]:
        return {"max_rel_logit_error": self.max_rel_logit_error, "min_argmax_agreement": self.min_argmax_agreement}


@dataclass(frozen=True)
class ParityRecord:
    """How close an engine's logits are to PyTorch fp32's on the parity tiles."""

    source: str
    tiles: int
    voxels: int
    max_abs_logit_error: float
    mean_abs_logit_error: float
    max_abs_reference_logit: float
    argmax_agreement: float
    max_rel_logit_error: float
    tolerance: Tolerance | None = None
    figure: str | None = None  # the disagreement PNG beside report.md
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out = _plain(self)
        if self.tolerance is None:
            out.pop("tolerance")
        if self.figure is None:
            out.pop("figure")
        return out


@dataclass(frozen=True)
class CandidateRecord:
    """One (backend, precision) the build measured: its model file, parity, timing and verdict."""

    backend: str
    precision: str
    model: str
    passed: bool
    error: str | None = None
    seconds_per_batch: float | None = None
    speedup_vs_torch: float | None = None
    parity: ParityRecord | None = None
    tolerance: Tolerance | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"{self.backend} {self.precision}"

    def to_dict(self) -> dict[str, Any]:
        return _plain(self)


@dataclass(frozen=True)
class SelectionRecord:
    """How the build chose the engine's runtime: every candidate, fastest passing first."""

    backend: str
    precision: str
    batch: int
    candidates: tuple[CandidateRecord, ...] = ()
    skipped: tuple[str, ...] = ()
    requested: dict[str, Any] = field(default_factory=dict)
    reference_seconds_per_batch: float | None = None
    models: dict[str, str] = field(default_factory=dict)  # graph ("fp32", "int8", ...) -> file
    machine: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out = _plain(self)
        order = ("requested", "backend", "precision", "batch", "reference_seconds_per_batch", "candidates", "skipped",
                 "models", "machine")
        return {**{k: out.pop(k) for k in order}, **out}


@dataclass(frozen=True)
class TensorRTRecord:
    """The TensorRT plan: the version and GPU it runs on (only those), and how it was built."""

    version: str | None
    gpu: str | None
    compute_capability: tuple[int, ...]
    onnx_model: str | None = None
    cache_hit: bool | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # settings, cache_key, timing_cache

    def to_dict(self) -> dict[str, Any]:
        return _plain(self)


@dataclass(frozen=True)
class ModelSpec:
    """What the runtime needs to know about a model (a view of the manifest)."""

    in_channels: int
    num_classes: int
    patch_size: tuple[int, ...]
    max_batch: int
    normalization: dict
    label_names: tuple[str, ...]
    spacing: tuple[float, ...] | None
    mirror_axes: tuple[int, ...]
    input_name: str
    output_name: str
    preprocessing: dict = field(default_factory=dict)
    postprocessing: dict = field(default_factory=lambda: {"kind": "argmax"})
    tta_default: bool = False  # mirror TTA unless the user says otherwise (nnU-Net models: on)

    @property
    def previous_stage(self) -> dict | None:
        """A cascade stage's record (`{"configuration", "labels"}`): its input ends with one channel per
        foreground label of the previous stage's segmentation (`preprocessing.previous_labels`)."""
        stage = (self.preprocessing or {}).get("previous_stage")
        return stage if isinstance(stage, dict) else None

    @property
    def image_channels(self) -> int:
        """The channels a case's image files give: the network's, less a cascade's label channels."""
        stage = self.previous_stage
        return self.in_channels - len(stage.get("labels") or []) if stage else self.in_channels


@dataclass(frozen=True)
class EngineManifest:
    """`manifest.json` (module docstring). Build it, `to_dict()` it; read it with `load_manifest`."""

    backend: str
    runtime_model: str
    io: IORecord
    preprocessing: dict[str, Any]
    labels: tuple[str, ...]
    parity: ParityRecord
    precision: str = "fp32"
    postprocessing: dict[str, Any] = field(default_factory=lambda: {"kind": "argmax"})
    created: str | None = None
    model: dict[str, Any] = field(default_factory=dict)
    source: dict[str, Any] = field(default_factory=dict)
    stages: tuple[dict[str, Any], ...] = ()
    tools: dict[str, Any] = field(default_factory=dict)
    build: dict[str, Any] = field(default_factory=dict)
    tensorrt: TensorRTRecord | None = None
    selection: SelectionRecord | None = None
    files: dict[str, FileRecord] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def spacing(self) -> tuple[float, ...] | None:
        spacing = self.preprocessing.get("spacing")
        return tuple(float(s) for s in spacing) if spacing else None

    @property
    def mirror_axes(self) -> tuple[int, ...]:
        return tuple(int(a) for a in self.preprocessing.get("mirror_axes") or ())

    @property
    def spec(self) -> ModelSpec:
        return ModelSpec(
            in_channels=self.io.in_channels, num_classes=self.io.num_classes, patch_size=self.io.patch_size,
            max_batch=self.io.batch[2], normalization=dict(self.preprocessing["normalization"]),
            label_names=self.labels, spacing=self.spacing, mirror_axes=self.mirror_axes,
            input_name=self.io.input.name, output_name=self.io.output.name, preprocessing=dict(self.preprocessing),
            postprocessing=dict(self.postprocessing), tta_default=bool(self.preprocessing.get("tta_default", False)),
        )

    def rebuild_hint(self) -> str:
        return rebuild_hint(self.build.get("command"))

    def referenced_files(self) -> list[str]:
        """Every file the runtime may open, by the manifest's word (external data comes later)."""
        names = [self.runtime_model, *_runtime_model_names(self.extra.get("runtime_models"))]
        if self.selection is not None:  # the runtime may fall back to any passing candidate
            names += [c.model for c in self.selection.candidates if c.passed]
        return list(dict.fromkeys(names))

    def with_files(self, files: dict[str, FileRecord]) -> EngineManifest:
        return replace(self, files=files)

    def to_dict(self) -> dict[str, Any]:
        """The JSON object of `manifest.json`, in the order a reader expects."""
        out = {"format": FORMAT, "format_version": self.format_version, "created": self.created,
               "backend": self.backend, "runtime_model": self.runtime_model, "io": self.io.to_dict(),
               "preprocessing": self.preprocessing, "labels": list(self.labels), "postprocessing": self.postprocessing,
               "model": self.model, "source": self.source, "stages": list(self.stages), "parity": self.parity.to_dict(),
               "precision": self.precision, "tools": self.tools, "build": self.build,
               "tensorrt": None if self.tensorrt is None else self.tensorrt.to_dict()}
        if self.selection is not None:
            out["selection"] = self.selection.to_dict()
        out["files"] = {name: record.to_dict() for name, record in self.files.items()}
        return {**out, **self.extra}


def rebuild_hint(command: Any = None) -> str:
    """What to tell a user whose engine cannot be used: the recorded build command when there is one."""
    if isinstance(command, str):
        return f"rebuild it: {command}"
    return "rebuild it with `nnslim build-engine CHECKPOINT --out DIR`"


_PATH_KEYS = ("file", "path", "runtime_model", "model")  # where legacy `runtime_models` entries name files


def _runtime_model_names(entry: Any) -> list[str]:
    """File names in a legacy `runtime_models` record: {precision: name} or {precision: {"file": name}} or a list."""
    values = entry.values() if isinstance(entry, dict) else entry if isinstance(entry, list) else []
    names = []
    for value in values:
        if isinstance(value, str):
            names.append(value)
        elif isinstance(value, dict):
            names += [value[k] for k in _PATH_KEYS if isinstance(value.get(k), str)]
    return names
