"""The build's input: an nnslim checkpoint, an nnU-Net v2 model folder, a MONAI bundle
(`monai_bundle`), or (Python API) any PyTorch `nn.Module` with its metadata (`module_source`), read
into one `Source`.

`build-engine` and `infer --torch-checkpoint` (`reference_predictor`) both load models through
`load_source`, so a model folder means the same thing to both. It takes paths, not the build's
configuration.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from nnslim.compiler.stages.nnunet_import import is_model_folder, read_model_folder
from nnslim.compiler.runtime.backends.torch_module import TorchPredictor
from nnslim.errors import InputError, NnslimError
from nnslim.files import sha256_file
from nnslim.training.checkpoint import build_model, read_checkpoint

logger = logging.getLogger(__name__)


class SourceError(NnslimError):
    """The path is not a model nnslim reads (checkpoint, nnU-Net v2 model folder, MONAI bundle)."""


@dataclass
class Source:
    """The trained model and what the engine must know about it, whatever it was read from."""

    model: nn.Module  # trained form, eval mode
    architecture: dict[str, Any]  # recorded in the manifest
    metadata: dict[str, Any]  # patch_size, normalization, label_names, spacing, mirror_axes, dataset, training
    in_channels: int
    num_classes: int
    total_stride: tuple[int, int, int]
    files: list[Path]  # hashed into the manifest
    preprocessing: dict[str, Any]
    postprocessing: dict[str, Any]
    kind: str
    details: dict[str, Any]
    graph: bytes | None = None  # an ONNX source's graph, written as the export (`onnx_source`)


def load_source(path: str | Path, folds: tuple[str, ...] | None = None,
                checkpoint_name: str = "checkpoint_final.pth") -> Source:
    """Read an nnslim checkpoint, or import an nnU-Net v2 model folder (`nnslim.compiler.stages.nnunet_import`).

    Args:
        folds / checkpoint_name: nnU-Net model folders only: the folds to ensemble (None: every fold
            the folder has) and the file to read in each fold folder.
    """
    path = Path(path)
    if path.is_dir():
        from nnslim.compiler.stages.monai_bundle import is_bundle, read_bundle

        if is_bundle(path):
            return read_bundle(path)
        if not is_model_folder(path):
            raise SourceError(f"{path} is a folder but neither an nnU-Net v2 model folder (plans.json, dataset.json) "
                              "nor a MONAI bundle (configs/metadata.json, configs/inference.json)")
        imported = read_model_folder(path, folds, checkpoint_name)
        arch = imported.architecture
        return Source(
            model=imported.network(), architecture={"name": "nnunet-v2", "config": arch.to_dict(),
                                                   "folds": list(imported.folds)},
            metadata=imported.metadata(), in_channels=arch.in_channels, num_classes=arch.num_classes,
            total_stride=imported.total_stride, files=list(imported.checkpoint_files.values()),
            preprocessing=imported.preprocessing(), postprocessing=imported.labels.to_manifest(), kind="nnunet-v2",
            details={"configuration": imported.configuration_name, "trainer": imported.trainer,
                     "folds": list(imported.folds), "checkpoint_name": checkpoint_name,
                     "plans_name": imported.plans.get("plans_name"),
                     "spatial_dims": arch.spatial_dims},
        )
    payload = read_checkpoint(path)
    model = build_model(payload).eval()
    metadata = payload["metadata"]
    return Source(
        model=model, architecture=payload["architecture"], metadata=metadata,
        in_channels=model.config.in_channels, num_classes=model.config.num_classes,
        total_stride=model.config.total_stride, files=[path],
        preprocessing={
            "normalization": metadata["normalization"],
            "spacing": metadata.get("spacing"),
            "mirror_axes": metadata.get("mirror_axes", []),
            "axis_order": "array axes of the NIfTI data as nibabel reads them",
            "resample": bool(metadata.get("spacing")),  # scans of another spacing are resampled to it
        },
        postprocessing={"kind": "argmax"}, kind="nnslim-checkpoint", details={},
    )


def reference_predictor(engine: Any, checkpoint: str | Path) -> Any:
    """The PyTorch reference for an engine (`infer --torch-checkpoint`): `checkpoint` (an nnslim
    checkpoint, or the nnU-Net model folder the engine was built from, read with the folds and
    checkpoint name its manifest records) on the engine's device, refused when it cannot be the
    model the engine was built from (`check_same_model`)."""
    recorded = engine.manifest.source
    source = load_source(checkpoint, tuple(recorded["folds"]) if recorded.get("folds") else None,
                         recorded.get("checkpoint_name", "checkpoint_final.pth"))
    check_same_model(engine, source, checkpoint)
    return TorchPredictor(source.model, device=getattr(engine.predictor, "device", "cpu"))


# fields of an architecture record that name it rather than shape it
_NAMING_FIELDS = ("preset", "paper")


def check_same_model(engine: Any, source: Source, checkpoint: str | Path) -> None:
    """Refuse a reference model that is not the engine's: other input channels or classes, another
    architecture than the manifest records (`model.architecture`), other label names, or a stride
    the engine's patch does not fit. Only the weights' sha256 differing (a retrained or re-saved
    checkpoint of the same network) is a warning: the comparison is then between two models."""
    spec, manifest = engine.spec, engine.manifest
    fix = "pass the checkpoint the engine was built from"
    if (source.in_channels, source.num_classes) != (spec.in_channels, spec.num_classes):
        raise InputError(f"--torch-checkpoint {checkpoint} has {source.in_channels} input channel(s) and "
                         f"{source.num_classes} classes but the engine has {spec.in_channels} and {spec.num_classes}; "
                         f"{fix}")
    recorded = (manifest.model or {}).get("architecture")
    if isinstance(recorded, dict):
        differs = _architecture_differences(_plain(recorded), _plain(source.architecture))
        if differs:
            raise InputError(f"--torch-checkpoint {checkpoint} is another architecture than the engine's "
                             f"({'; '.join(differs[:3])}); {fix}")
    labels = source.metadata.get("label_names")
    if labels is not None and tuple(labels) != tuple(spec.label_names):
        raise InputError(f"--torch-checkpoint {checkpoint} labels {list(labels)} but the engine labels "
                         f"{list(spec.label_names)}: it was trained for another task; {fix}")
    if any(p % s for p, s in zip(spec.patch_size, source.total_stride)):
        raise InputError(f"the engine's patch {spec.patch_size} is not a multiple of {checkpoint}'s total stride "
                         f"{source.total_stride}; {fix}")
    expected = manifest.source.get("checkpoint_sha256")
    if expected is not None and _checkpoint_sha256(source, Path(checkpoint)) != expected:  # hashed only when recorded
        logger.warning("--torch-checkpoint %s has the engine's architecture and labels but other weights (sha256 "
                       "differs from the one the engine was built from): the comparison is with another training "
                       "of the same network", checkpoint)


def _checkpoint_sha256(source: Source, checkpoint: Path) -> str | dict[str, str]:
    """The checkpoint's sha256 as the manifest records it: one digest, or one per fold file of a model folder."""
    if source.kind in ("nnunet-v2", "monai-bundle"):
        return {f.resolve().relative_to(checkpoint.resolve()).as_posix(): sha256_file(f) for f in source.files}
    return sha256_file(source.files[0])


def _plain(record: Any) -> Any:
    """A record as JSON data (tuples become lists), so a manifest's and a checkpoint's compare equal."""
    return json.loads(json.dumps(record, default=str))


def _architecture_differences(engine: dict[str, Any], reference: dict[str, Any]) -> list[str]:
    """`key: engine value vs reference value` for each shaping field of two architecture records."""
    if engine.get("name") != reference.get("name"):
        return [f"name: {engine.get('name')!r} vs {reference.get('name')!r}"]
    a, b = engine.get("config") or {}, reference.get("config") or {}
    keys = sorted((set(a) | set(b)) - set(_NAMING_FIELDS), key=str)
    return [f"{k}: {a.get(k)} vs {b.get(k)}" for k in keys if a.get(k) != b.get(k)]


MODULE_KEYS = ("patch_size", "label_names", "in_channels", "normalization", "spacing", "mirror_axes", "total_stride",
               "dataset", "axis_order", "output", "regions_class_order", "slice_axis")
DEFAULT_NORMALIZATION = {"scheme": "zscore", "mask": "nonzero", "outside": "zero"}
AXIS_ORDERS = ("nibabel", "reversed")  # the network's array axes: nibabel's [X, Y, Z], or SimpleITK's [Z, Y, X]
OUTPUT_KINDS = ("logits", "probabilities", "sigmoid")
TINY = 1e-6  # probabilities are clamped to [TINY, 1 - TINY] before their log (`AsLogits`)


class AsLogits(nn.Module):
    """A network whose output is not logits, seen as one that is: softmax probabilities become
    `log(p)` (argmax and softmax unchanged), sigmoid probabilities `log(p / (1 - p))` (the region rule's
    logit > 0 is p > 0.5); both clamped to [TINY, 1 - TINY]. The window then blends these logits."""

    def __init__(self, model: nn.Module, output: str) -> None:
        super().__init__()
        self.model, self.output = model, output

    def forward(self, x):  # noqa: ANN001 (a tensor)
        import torch

        y = self.model(x)
        if self.output == "probabilities":
            return torch.log(y.clamp(TINY, 1.0))
        if self.output == "sigmoid":
            return torch.logit(y, eps=TINY)
        return y


class SliceWrapper(nn.Module):
    """A 2D network `[N, C, H, W]` driven with the engine's 3D tiles: one slice along `axis` (a spatial
    axis, 0..2) squeezed out before it and put back after."""

    def __init__(self, model: nn.Module, axis: int) -> None:
        super().__init__()
        self.model, self.axis = model, axis

    def forward(self, x):  # noqa: ANN001 (a tensor)
        return self.model(x.squeeze(2 + self.axis)).unsqueeze(2 + self.axis)


def _slice_layout(metadata: dict[str, Any], patch: tuple[int, ...]) -> tuple[int | None, tuple[int, ...], list[int],
                                                                           tuple[int, ...]]:
    """A 2D network's patch, mirror axes and stride in the engine's 3D terms: `(slice_axis, patch,
    mirror_axes, total_stride)`, 1 at the slice axis (default: Z, the last nibabel axis; the first
    with `axis_order` "reversed", as nnU-Net's 2D models). 3D networks pass through (slice axis None)."""
    mirror = [int(a) for a in metadata.get("mirror_axes", [])]
    stride = tuple(int(v) for v in metadata.get("total_stride", (1,) * len(patch)))
    if len(patch) != 2:
        if "slice_axis" in metadata:
            raise SourceError("slice_axis describes a 2D network (a patch_size of 2 ints); drop it for a 3D one")
        return None, patch, mirror, stride
    axis = metadata.get("slice_axis", 0 if metadata.get("axis_order") == "reversed" else 2)
    if axis not in (0, 1, 2) or len(stride) != 2 or any(a not in (0, 1) for a in mirror):
        raise SourceError(f"a 2D network needs slice_axis in 0..2 (got {axis!r}), a 2-int total_stride and mirror_axes "
                          f"among its own axes 0, 1 (got {metadata.get('total_stride')!r}, {mirror})")
    others = [a for a in range(3) if a != axis]

    def spread(values: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(1 if a == axis else values[others.index(a)] for a in range(3))

    return axis, spread(patch), [others[a] for a in mirror], spread(stride)


def _output_records(metadata: dict[str, Any], num_classes: int) -> tuple[str, dict[str, Any]]:
    """The network's output kind and the postprocessing record it implies (`module_metadata`)."""
    output = metadata.get("output", "logits")
    if output not in OUTPUT_KINDS:
        raise SourceError(f"output must be one of {OUTPUT_KINDS} (what the network's last layer gives), got {output!r}")
    order = metadata.get("regions_class_order")
    if order is not None and output != "sigmoid":
        raise SourceError("regions_class_order describes sigmoid region outputs; add \"output\": \"sigmoid\" or drop it")
    if output != "sigmoid":
        return output, {"kind": "argmax"}
    order = [int(v) for v in (order or range(1, num_classes + 1))]
    if len(order) != num_classes or min(order) < 1 or max(order) > 255:
        raise SourceError(f"regions_class_order must give one label value in 1..255 per output channel ({num_classes}), "
                          f"got {order}")
    return output, {"kind": "regions", "class_order": order, "threshold_logit": 0.0, "label_values": sorted(set(order))}


def module_metadata(metadata: dict[str, Any], needs: str = "a module needs metadata") -> dict[str, Any]:
    """`metadata` checked and completed (`module_source` says what each key is), with the
    preprocessing record the manifest keeps."""
    unknown = sorted(set(metadata) - set(MODULE_KEYS))
    if unknown:
        raise SourceError(f"metadata has unknown key(s) {unknown}; the keys are {', '.join(MODULE_KEYS)}")
    missing = [k for k in ("patch_size", "label_names") if k not in metadata]
    if missing:
        raise SourceError(f"{needs} {missing} (patch_size: the training tile, 3 ints; label_names: one name per "
                          "output channel, background first)")
    labels = [str(n) for n in metadata["label_names"]]
    in_channels = int(metadata.get("in_channels", 1))
    patch = tuple(int(v) for v in metadata["patch_size"])
    if len(patch) not in (2, 3) or min(patch) < 1 or len(labels) < 2 or in_channels < 1:
        raise SourceError(f"patch_size must be 3 positive ints (2 for a 2D network), label_names 2 or more names and "
                          f"in_channels >= 1; got {metadata['patch_size']!r}, {len(labels)} name(s), {in_channels}")
    slice_axis, patch, mirror, stride = _slice_layout(metadata, patch)
    spacing = metadata.get("spacing")
    if spacing is not None and (len(spacing) != 3 or not all(float(v) > 0 for v in spacing)):
        raise SourceError(f"spacing must be three positive voxel sizes in mm (or None: no resampling), got {spacing!r}")
    if len(stride) != 3 or min(stride) < 1:
        raise SourceError(f"total_stride must be three positive ints, got {metadata.get('total_stride')!r}")
    normalization = metadata.get("normalization", DEFAULT_NORMALIZATION)
    if not isinstance(normalization, dict) or "scheme" not in normalization:
        raise SourceError(f"normalization must be a dict with a 'scheme' (e.g. {DEFAULT_NORMALIZATION}), got "
                          f"{normalization!r}")
    axis_order = metadata.get("axis_order", "nibabel")
    if axis_order not in AXIS_ORDERS:
        raise SourceError(f"axis_order must be one of {AXIS_ORDERS} (nibabel's [X, Y, Z], or SimpleITK's [Z, Y, X] as "
                          f"nnU-Net and ITK-based tools use), got {axis_order!r}")
    output, post = _output_records(metadata, len(labels))
    return {"patch_size": patch, "label_names": labels, "in_channels": in_channels, "spacing": spacing,
            "total_stride": stride, "normalization": normalization, "mirror_axes": mirror,
            "dataset": metadata.get("dataset"), "output": output, "postprocessing": post, "slice_axis": slice_axis,
            "preprocessing": {"normalization": normalization, "spacing": spacing, "mirror_axes": mirror,
                              "axis_order": "reversed" if axis_order == "reversed" else
                              "array axes of the NIfTI data as nibabel reads them",
                              "resample": bool(spacing)}}


def module_source(model: nn.Module, metadata: dict[str, Any]) -> Source:
    """Any PyTorch segmentation network `[N, C, X, Y, Z] -> [N, K, X, Y, Z]` (logits) and what the
    runtime must know of it: `patch_size` (3 ints) and `label_names` (K names, background first) are
    required; `in_channels` (1), `normalization` (z-score over nonzero voxels), `spacing` (None: no
    resampling), `mirror_axes` (none: no TTA), `total_stride` (the patch must be a multiple of it;
    (1, 1, 1)), `dataset`, `axis_order` ("nibabel", or "reversed": the network takes SimpleITK's
    [Z, Y, X]; spacing and patch in the network's order), `output` ("logits"; "probabilities" of a
    softmax, "sigmoid" regions, turned into logits by `AsLogits`) and `regions_class_order` (sigmoid:
    the label value of each channel, painted in order; default 1..K) are optional. A copy of the
    module, on the CPU in fp32, is checked on one zero tile of the patch size. A 2D network
    `[N, C, H, W]` has a patch_size of 2 ints and `slice_axis` (`_slice_layout`); its mirror_axes and
    total_stride are its own 2 axes'."""
    import copy
    import hashlib

    import torch

    meta = module_metadata(metadata)
    patch, labels, in_channels = meta["patch_size"], meta["label_names"], meta["in_channels"]
    name = f"{type(model).__module__}.{type(model).__qualname__}"
    model = copy.deepcopy(model).cpu().float().eval()  # the caller's module is left as it was
    if meta["slice_axis"] is not None:
        model = SliceWrapper(model, meta["slice_axis"]).eval()
    if meta["output"] != "logits":
        model = AsLogits(model, meta["output"]).eval()
    try:
        with torch.no_grad():
            out = model(torch.zeros(1, in_channels, *patch))
    except Exception as exc:  # the user's module: any error it raises on a tile of the declared shape
        raise SourceError(f"the module fails on a zero tile [1, {in_channels}, {', '.join(map(str, patch))}]: "
                          f"{type(exc).__name__}: {exc}") from None
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (1, len(labels), *patch):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise SourceError(f"the module maps [1, {in_channels}, {', '.join(map(str, patch))}] to {shape}; nnslim needs "
                          f"[1, {len(labels)}, {', '.join(map(str, patch))}]: one logit channel per label name, the "
                          "tile's spatial size (a deep-supervision list or a tuple is not it)")
    digest = hashlib.sha256()
    for key, tensor in sorted(model.state_dict().items()):
        digest.update(key.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    full = {k: meta[k] for k in ("label_names", "normalization", "spacing", "mirror_axes", "dataset")}
    return Source(model=model, architecture={"name": "pytorch-module", "class": name},
                  metadata={**full, "patch_size": list(patch)}, in_channels=in_channels, num_classes=len(labels),
                  total_stride=meta["total_stride"], files=[], preprocessing=meta["preprocessing"],
                  postprocessing=meta["postprocessing"], kind="pytorch-module",
                  details={"class": name, "state_dict_sha256": digest.hexdigest(), "output": meta["output"]})
