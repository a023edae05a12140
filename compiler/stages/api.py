"""`nnslim.build_engine(source, out, ...)`: the build from Python, for any of its inputs.

    nnslim.build_engine("model.pt", "engines/brain")                       # an nnslim checkpoint
    nnslim.build_engine("nnUNet_results/Dataset003_Liver/...", "engines/liver", folds=("0", "1"))
    nnslim.build_engine(my_net, "engines/mine", metadata={"patch_size": (96, 96, 96),
                        "label_names": ["background", "tumour"], "spacing": (1.0, 1.0, 1.0)})
    nnslim.build_engine("exported.onnx", "engines/theirs", metadata={"label_names": [...], ...})
    nnslim.build_engine("spleen_ct_segmentation", "engines/spleen")       # a MONAI bundle folder
    nnslim.build_engine("exported.pt2", "engines/program", metadata={"label_names": [...]})  # torch.export

The keyword options are `plan.BuildConfig`'s fields (patch_size, precision, backend, parity_volume,
...); the same parity gates, candidate selection, manifest, report and engine directory as
`nnslim build-engine`. An `nn.Module` source is any network `[N, C, X, Y, Z] -> [N, K, X, Y, Z]`
of logits, described by `metadata` (`source.module_source`); its parity reference is the module.
An ONNX file is such a graph with the same metadata (`onnx_source`); its reference is ONNX Runtime.
A MONAI bundle carries its own metadata (`monai_bundle`); its reference is the bundle's network.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from nnslim.errors import SettingsError


def build_engine(source: Any, out: str | Path, *, metadata: dict[str, Any] | None = None, **options: Any) -> Any:
    """Build an engine directory at `out` from a checkpoint path, an nnU-Net v2 model folder, a MONAI
    bundle folder, an ONNX file or an `nn.Module` (with `metadata` for the last two); returns the `pipeline.BuildResult` (out_dir, manifest, parity)."""
    from torch import nn

    from nnslim.compiler.stages.pipeline import build_engine as run_build
    from nnslim.compiler.stages.plan import BuildConfig
    from nnslim.compiler.stages.source import module_source

    fields = {f.name for f in dataclasses.fields(BuildConfig)} - {"checkpoint", "out_dir", "module"}
    unknown = sorted(set(options) - fields)
    if unknown:
        raise SettingsError(f"unknown build option(s) {unknown}; the options are {', '.join(sorted(fields))}")
    if isinstance(source, nn.Module):
        return run_build(BuildConfig(checkpoint=None, out_dir=Path(out), module=module_source(source, metadata or {}),
                                     **options))
    if not isinstance(source, (str, Path)):
        raise SettingsError(f"source must be a checkpoint path, an nnU-Net v2 model folder, a MONAI bundle folder, an "
                            f"ONNX file or an nn.Module, got {type(source).__name__}")
    if Path(source).suffix.lower() in (".onnx", ".pt2"):
        from nnslim.compiler.stages.onnx_source import onnx_source
        from nnslim.compiler.stages.program_source import program_source

        read = onnx_source if Path(source).suffix.lower() == ".onnx" else program_source
        return run_build(BuildConfig(checkpoint=Path(source), out_dir=Path(out), module=read(source, metadata or {}),
                                     **options))
    if metadata is not None:
        raise SettingsError("metadata describes an nn.Module or ONNX source; a checkpoint, an nnU-Net model folder or a "
                            "MONAI bundle carries its own")
    return run_build(BuildConfig(checkpoint=Path(source), out_dir=Path(out), **options))
