"""Shared fixtures: a small random U-Net checkpoint, the MNI data in raw layout, a built engine,
and the demo model's graphs in every precision (for the backend and quantization tests).

The model is tiny (3 stages, 4..16 features) so every test runs in seconds on 2 cores; its
InstanceNorm affine parameters are randomized so parity checks exercise them.

Engines are built with an explicit `precision="fp32"`: the default ("auto") times several
(backend, precision) candidates and may pick any of them, which a test must not depend on.
"""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
import torch

from nnslim.training.checkpoint import save_checkpoint
from nnslim.training.config import UNetConfig
from nnslim.training.unet import UNet

PATCH = (16, 16, 16)
HEX = "0" * 64


def written(folder: Path) -> list[str]:
    """The names in an output folder besides nnslim's provenance (`run.json` / `run-partK.json`, `.nnslim/`)."""
    return sorted(p.name for p in Path(folder).iterdir()
                  if p.name != ".nnslim" and not re.fullmatch(r"run(-part\d+)?\.json", p.name))


def manifest_json(engine_dir: Path) -> dict:
    """An engine's `manifest.json` as written (the file format, read without the runtime's record)."""
    import json

    return json.loads((Path(engine_dir) / "manifest.json").read_text())


def manifest_record(**fields):
    """An `EngineManifest` parsed from a minimal format-1 manifest with `fields` on top (the runtime's
    tests of choices and exports need one without building an engine)."""
    from nnslim.compiler.runtime.manifest import parse_manifest

    raw = {
        "format": "nnslim.engine", "format_version": 1, "backend": "onnxruntime", "runtime_model": "model.opt.onnx",
        "io": {"input": {"name": "image", "dtype": "float32", "shape": ["batch", 1, 16, 16, 16]},
               "output": {"name": "logits", "dtype": "float32", "shape": ["batch", 3, 16, 16, 16]},
               "batch": {"min": 1, "opt": 2, "max": 2}},
        "preprocessing": {"normalization": {"scheme": "zscore", "mask": "nonzero"}},
        "labels": ["background", "grey", "white"], "files": {"model.opt.onnx": {"sha256": HEX, "bytes": 1}, "engine.plan": {"sha256": HEX, "bytes": 1}},
    }
    return parse_manifest({**raw, **fields})
DEMO_MODEL = Path(__file__).resolve().parents[1] / "artifacts" / "models" / "mni-tissue-tiny.pt"
DEMO_PATCH = (32, 32, 32)
LABELS = ["background", "grey_matter", "white_matter"]


def small_config(**overrides) -> UNetConfig:
    fields = dict(
        in_channels=1,
        num_classes=3,
        features_per_stage=(4, 8, 16),
        kernel_sizes=((3, 3, 3),) * 3,
        strides=((1, 1, 1), (2, 2, 2), (2, 2, 2)),
        convs_per_stage=(2, 2, 2),
        convs_per_decoder_stage=(1, 1),
    )
    fields.update(overrides)
    return UNetConfig(**fields)


def random_model(config: UNetConfig | None = None, seed: int = 0) -> UNet:
    torch.manual_seed(seed)
    model = UNet(config or small_config())
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.InstanceNorm3d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
    return model.eval()


def metadata(patch=PATCH) -> dict:
    return {
        "patch_size": list(patch),
        "spacing": [1.0, 1.0, 1.0],
        "normalization": {"scheme": "zscore", "mask": "nonzero"},
        "label_names": LABELS,
        "channel_names": ["T1"],
        "mirror_axes": [0, 1, 2],
    }


@pytest.fixture(scope="session")
def built_wheel(tmp_path_factory) -> Path:
    """nnslim's wheel, built from a copy of the sources (setuptools writes build/ beside them)."""
    import shutil
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    source = tmp_path_factory.mktemp("wheel-source")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(root / name, source / name)
    for folder in ("nnslim", "compiler", "training"):
        shutil.copytree(root / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__"))
    wheels = tmp_path_factory.mktemp("wheels")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "-w", str(wheels), str(source)], check=True, capture_output=True)
    (wheel,) = wheels.glob("nnslim-*.whl")
    return wheel


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory):
    """Point $NNSLIM_CACHE (OpenVINO's compiled models, TensorRT plans) at a temporary folder, so tests
    neither read a stale cache nor fill the user's ~/.cache/nnslim; a cache the caller set is kept."""
    import os

    if os.environ.get("NNSLIM_CACHE"):
        yield Path(os.environ["NNSLIM_CACHE"])
        return
    os.environ["NNSLIM_CACHE"] = str(tmp_path_factory.mktemp("nnslim-cache"))
    try:
        yield Path(os.environ["NNSLIM_CACHE"])
    finally:
        os.environ.pop("NNSLIM_CACHE", None)


@pytest.fixture(scope="session")
def checkpoint_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "small.pt"
    save_checkpoint(path, random_model(), metadata())
    return path


@pytest.fixture(scope="session")
def mni_raw(tmp_path_factory) -> Path:
    from nnslim.training.data import write_mni_tissue_raw

    return write_mni_tissue_raw(tmp_path_factory.mktemp("mni"))


@pytest.fixture(scope="session")
def small_volume(mni_raw, tmp_path_factory) -> Path:
    """A 37x41x29 crop of the MNI T1 (odd sizes, real anatomy), with its affine."""
    t1 = nib.load(mni_raw / "imagesTr" / "mni_0000.nii.gz")
    crop = np.asarray(t1.dataobj)[80:117, 100:141, 80:109]
    path = tmp_path_factory.mktemp("vol") / "crop_0000.nii.gz"
    nib.save(nib.Nifti1Image(crop, t1.affine, t1.header), path)
    return path


@pytest.fixture(scope="session")
def engine_dir(checkpoint_path, small_volume, tmp_path_factory) -> Path:
    from nnslim.compiler.stages.pipeline import BuildConfig, build_engine

    out = tmp_path_factory.mktemp("engines") / "small"
    build_engine(BuildConfig(checkpoint=checkpoint_path, out_dir=out, batch_size=2, parity_volume=small_volume,
                             precision="fp32"))
    return out


@pytest.fixture(scope="session")
def demo_graphs(mni_raw, tmp_path_factory) -> SimpleNamespace:
    """The trained demo model at 32^3 tiles: its graphs per precision, real MNI tiles and PyTorch's logits.

    A trained model, not `random_model`: a random network's logits are near ties in most voxels, so
    int8 agreement on it measures the ties rather than the quantization (0.95 measured, under
    every recipe). Tiles 0-3 calibrate the int8 graphs, tiles 4-7 evaluate them.

    Attributes: model (PyTorch, eval), fp32 / fp16 (the build's optimized graphs), int8 (signed
    Q/DQ), int8_uint8 (unsigned activations, for CPUs without VNNI), each the best of the build's
    recipes on ONNX Runtime, scored on the evaluation tiles as `build-engine` scores them; tiles,
    expected (PyTorch fp32 logits of `tiles`), calibration / evaluation (index ranges of `tiles`).
    """
    import onnx

    from nnslim.compiler.stages.export import ExportSettings, export_onnx
    from nnslim.compiler.stages.parity import parity_crops
    from nnslim.compiler.stages.passes import PassManager, default_passes
    from nnslim.compiler.stages.quantize import DEFAULT_RECIPES, UINT8_RECIPES, choose_recipe
    from nnslim.compiler.runtime.backends.onnx_runtime import OnnxRuntimePredictor
    from nnslim.compiler.stages.source import load_source

    out = tmp_path_factory.mktemp("demo-graphs")
    source = load_source(DEMO_MODEL, ("0",), "checkpoint_final.pth")
    export_onnx(source.model, out / "model.onnx", ExportSettings(DEMO_PATCH, source.in_channels))
    exported = onnx.shape_inference.infer_shapes(onnx.load(str(out / "model.onnx")), strict_mode=True)
    graphs = {}
    for precision in ("fp32", "fp16"):
        optimized, _ = PassManager(default_passes(precision)).run(exported)
        graphs[precision] = out / f"model.{precision}.onnx"
        onnx.save(optimized, str(graphs[precision]))
    tiles, _, _ = parity_crops(DEMO_PATCH, source.in_channels, 8, mni_raw / "imagesTr" / "mni_0000.nii.gz",
                            source.preprocessing)
    with torch.no_grad():
        expected = source.model(tiles)
    calibration, evaluation = slice(0, 4), slice(4, 8)
    # each int8 graph is the best of the build's recipes on ONNX Runtime, as `build-engine` chooses it
    for name, recipes in (("int8", DEFAULT_RECIPES), ("int8_uint8", UINT8_RECIPES)):
        graphs[name] = out / f"model.{name}.onnx"
        choose_recipe(graphs["fp32"], graphs[name], tiles[calibration].numpy(), tiles[evaluation], expected[evaluation],
                      lambda graph: OnnxRuntimePredictor(graph, "image", "logits"), recipes=recipes)
    return SimpleNamespace(model=source.model, tiles=tiles, expected=expected, calibration=calibration,
                           evaluation=evaluation, **graphs)


def pytest_collection_modifyitems(config, items):
    """Skip `gpu` tests without CUDA and `tensorrt` tests without the TensorRT package."""
    has_cuda = torch.cuda.is_available()
    try:
        import tensorrt  # noqa: F401

        has_tensorrt = True
    except ImportError:
        has_tensorrt = False
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU; none on this machine"))
        if "tensorrt" in item.keywords and not has_tensorrt:
            item.add_marker(pytest.mark.skip(reason="needs TensorRT: pip install 'nnslim[tensorrt]' on a GPU machine"))


def demo_engine(out: Path, patch: int, *options: str) -> Path:
    """The bundled demo model built by the real CLI at `out` (one parity tile), or a skip without it."""
    if not DEMO_MODEL.is_file():
        pytest.skip(f"{DEMO_MODEL} is not in this checkout")
    from click.testing import CliRunner

    from nnslim.compiler.cli import cli

    result = CliRunner().invoke(cli, ["build-engine", str(DEMO_MODEL), "--out", str(out), "--patch", *[str(patch)] * 3,
                                      "--parity-tiles", "1", *options])
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="session")
def tiny_engine(tmp_path_factory) -> Path:
    """One real engine for the whole session (patch 32, one parity tile: about 15 s)."""
    return demo_engine(tmp_path_factory.mktemp("bad-input") / "engine", 32, "--precision", "fp32")
