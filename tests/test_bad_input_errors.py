"""Hostile-input rows, round 3: clear errors for checkpoints, nnU-Net plans and manifests, the
blocked-global message, class_order, unrelated reference models and `Engine.segment`'s size checks.

The rows run through the same in-process runner and properties as `tests/test_bad_input.py`
(exit code, one line `error: ...`, nothing changed on a refusal); each class also has a Python
API counterpart that asserts the nnslim error class and its message.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from nnslim.compiler.cli import cli
from tests.compiler.stages.nnunet_folder import write_model_folder
from tests.conftest import metadata, random_model
from tests.test_bad_input import Case, TINY_MODEL, edit_manifest, run_in_process, scan

# ---- inputs -------------------------------------------------------------------------------------


def _json_edit(path: Path, change) -> None:
    value = json.loads(path.read_text())
    change(value)
    path.write_text(json.dumps(value))


def _kwargs(plans: dict) -> dict:
    return plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]


def _configuration(plans: dict) -> dict:
    return plans["configurations"]["3d_fullres"]


def _nnunet_folder(root: Path, plans=None, plans_bytes: bytes | None = None, dataset=None, checkpoint=None) -> Path:
    """A small nnU-Net v2 model folder with one thing changed: plans.json, dataset.json or fold 0's checkpoint."""
    folder = root / "Trainer__Plans__3d_fullres"
    write_model_folder(folder)
    if plans is not None:
        _json_edit(folder / "plans.json", plans)
    if plans_bytes is not None:
        (folder / "plans.json").write_bytes(plans_bytes)
    if dataset is not None:
        _json_edit(folder / "dataset.json", dataset)
    if checkpoint is not None:
        path = folder / "fold_0" / "checkpoint_final.pth"
        payload = torch.load(path, weights_only=False)  # our own file, written a line above
        checkpoint(payload)
        torch.save(payload, path)
    return folder


def _build_nnunet(**changes):
    return lambda root, engine: ["build-engine", _nnunet_folder(root, **changes), "--out", root / "e2"]


def _tiny_checkpoint(root: Path, change) -> Path:
    """The bundled model's checkpoint with one thing changed."""
    payload = torch.load(TINY_MODEL, weights_only=True)
    change(payload)
    torch.save(payload, root / "edited.pt")
    return root / "edited.pt"


def _build_checkpoint(change):
    return lambda root, engine: ["build-engine", _tiny_checkpoint(root, change), "--out", root / "e2"]


def _config(payload: dict) -> dict:
    return payload["architecture"]["config"]


class System:
    """A pickle that calls os.system when unpickled (a harmless command): must never run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _evil_system(root: Path) -> Path:
    torch.save({"format": "nnslim.checkpoint", "payload": System(root / "pwned")}, root / "evil.pt")
    return root / "evil.pt"


def _evil_nnunet(payload: dict) -> None:
    payload["logging"]["callback"] = System(Path("/nonexistent/pwned"))


def _deep_manifest(root, engine):
    (engine / "manifest.json").write_text("[" * 200_000)
    return ["infer", engine, scan(root / "scan.nii.gz"), "-o", root / "seg.nii.gz"]


def _regions(order):
    def setup(root, engine):
        edit_manifest(engine, lambda m: m.update(postprocessing={"kind": "regions", "class_order": order}))
        return ["infer", engine, scan(root / "scan.nii.gz"), "-o", root / "seg.nii.gz"]
    return setup


def _unrelated_checkpoint(root: Path) -> Path:
    """A 3-class, 1-channel nnslim checkpoint of another (smaller) network: same labels, other model."""
    from nnslim.training.checkpoint import save_checkpoint

    return save_checkpoint(root / "unrelated.pt", random_model(), metadata())


def _other_labels(root: Path) -> Path:
    return _tiny_checkpoint(root, lambda p: p["metadata"].update(label_names=["background", "liver", "tumour"]))


def _dataset_list(folder: Path) -> Path:
    (folder / "dataset.json").write_text("[1]")
    return folder


def _with_reference(make):
    return lambda root, engine: ["infer", engine, scan(root / "scan.nii.gz"), "-o", root / "seg.nii.gz",
                                 "--torch-checkpoint", make(root)]


# ---- the table ----------------------------------------------------------------------------------

CASES = [
    # nnU-Net plans.json / dataset.json / checkpoint shapes
    Case("nnunet features negative", _build_nnunet(plans=lambda p: _kwargs(p).update(features_per_stage=[-8, 16, 24])),
         1, "features_per_stage[0] is -8"),
    Case("nnunet features not numbers", _build_nnunet(plans=lambda p: _kwargs(p).update(features_per_stage=["a", 16, 24])),
         1, "features_per_stage[0] is 'a'"),
    Case("nnunet features 10**9", _build_nnunet(plans=lambda p: _kwargs(p).update(features_per_stage=[10**9, 16, 24])),
         1, "expected an integer in [1, 4096]"),
    Case("nnunet n_stages not a number", _build_nnunet(plans=lambda p: _kwargs(p).update(n_stages="x")), 1,
         "n_stages is 'x'"),
    Case("nnunet convs 10**7", _build_nnunet(plans=lambda p: _kwargs(p).update(n_conv_per_stage=[10**7, 2, 2])), 1,
         "convs_per_stage[0] is 10000000"),
    Case("nnunet arch_kwargs a list", _build_nnunet(plans=lambda p: _configuration(p)["architecture"].update(
        arch_kwargs=[1])), 1, "architecture.arch_kwargs"),
    Case("nnunet no patch_size", _build_nnunet(plans=lambda p: _configuration(p).pop("patch_size")), 1,
         "lacks `patch_size`"),
    Case("nnunet patch_size text", _build_nnunet(plans=lambda p: _configuration(p).update(patch_size="abc")), 1,
         "patch_size` is 'abc'"),
    Case("nnunet no normalization", _build_nnunet(plans=lambda p: _configuration(p).pop("normalization_schemes")), 1,
         "lacks `normalization_schemes`"),
    Case("nnunet no spacing", _build_nnunet(plans=lambda p: _configuration(p).pop("spacing")), 1, "lacks `spacing`"),
    Case("nnunet CT statistics without mean", _build_nnunet(
        plans=lambda p: p["foreground_intensity_properties_per_channel"]["0"].pop("mean")), 1, "expected numbers for"),
    Case("nnunet transpose not an order", _build_nnunet(plans=lambda p: p.update(transpose_forward=[0, 0, 5])), 1,
         "`transpose_forward` is [0, 0, 5]"),
    Case("nnunet configuration a string", _build_nnunet(plans=lambda p: p["configurations"].update(
        {"3d_fullres": "x"})), 1, "`configurations.3d_fullres` is 'x'"),
    Case("nnunet plans not UTF-8", _build_nnunet(plans_bytes=b"\xff\xfe{\x00"), 1, "is not UTF-8 text"),
    Case("nnunet plans a list", _build_nnunet(plans_bytes=b"[1, 2]"), 1, "holds a JSON list, not an object"),
    Case("nnunet plans 200,000 deep", _build_nnunet(plans_bytes=b"[" * 200_000), 1, "levels deep"),
    Case("nnunet dataset a list", lambda r, e: ["build-engine", _dataset_list(_nnunet_folder(r)), "--out", r / "e2"],
         1, "holds a JSON list"),
    Case("nnunet label value text", _build_nnunet(dataset=lambda d: d["labels"].update(organ="x")), 1,
         "label 'organ' is 'x'"),
    Case("nnunet 300 labels", _build_nnunet(dataset=lambda d: d.update(labels={f"l{i}": i for i in range(300)})), 1,
         "expected a label value in [0, 255]"),
    Case("nnunet init_args None", _build_nnunet(checkpoint=lambda c: c.update(init_args=None)), 1,
         "`init_args` is None"),
    Case("nnunet configuration None", _build_nnunet(checkpoint=lambda c: c["init_args"].update(configuration=None)),
         1, "`init_args.configuration` is None"),
    Case("nnunet weights None", _build_nnunet(checkpoint=lambda c: c.update(network_weights=None)), 1,
         "`network_weights` is None"),
    Case("nnunet mirror axes text", _build_nnunet(checkpoint=lambda c: c.update(inference_allowed_mirroring_axes="ab")),
         1, "`inference_allowed_mirroring_axes` is 'ab'"),
    # nnslim checkpoint shapes
    Case("checkpoint features negative", _build_checkpoint(lambda p: _config(p).update(features_per_stage=[-4, 8, 16, 32])),
         1, "features_per_stage[0] is -4"),
    Case("checkpoint features text", _build_checkpoint(lambda p: _config(p).update(features_per_stage=["x", 8, 16, 32])),
         1, "features_per_stage[0] is 'x'"),
    Case("checkpoint classes 10**7", _build_checkpoint(lambda p: _config(p).update(num_classes=10**7)), 1,
         "num_classes is 10000000"),
    Case("checkpoint architecture None", _build_checkpoint(lambda p: p.update(architecture=None)), 1,
         "`architecture` is None"),
    Case("checkpoint state_dict None", _build_checkpoint(lambda p: p.update(state_dict=None)), 1,
         "`state_dict` is None"),
    Case("checkpoint metadata None", _build_checkpoint(lambda p: p.update(metadata=None)), 1, "`metadata` is None"),
    Case("checkpoint without normalization", _build_checkpoint(lambda p: p["metadata"].pop("normalization")), 1,
         "lacks `normalization`"),
    Case("checkpoint without patch_size", _build_checkpoint(lambda p: p["metadata"].pop("patch_size")), 1,
         "lacks `patch_size`"),
    # manifests
    Case("manifest 200,000 deep", _deep_manifest, 1, "levels deep"),
    Case("manifest class_order not a label", _regions([1, 2, 200]), 1, "class_order[]` is 200"),
    Case("manifest class_order repeats", _regions([1, 1, 2]), 1, "distinct label values"),
    # blocked globals are named, never the advice to unpickle unsafely
    Case("pickle calling os.system", lambda r, e: ["build-engine", _evil_system(r), "--out", r / "e2"], 1,
         "Unsupported global posix.system"),
    Case("nnunet pickle calling os.system", _build_nnunet(checkpoint=_evil_nnunet), 1,
         "posix.system in its pickle. nnslim will not unpickle it"),
    # a reference model that is not the engine's
    Case("--torch-checkpoint unrelated model", _with_reference(_unrelated_checkpoint), 1, "another architecture"),
    Case("--torch-checkpoint other labels", _with_reference(_other_labels), 1, "trained for another task"),
]
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_input_in_process(case, tiny_engine, tmp_path, monkeypatch):
    output = run_in_process(case, tiny_engine, tmp_path, monkeypatch)
    assert "weights_only" not in output  # never torch's advice to unpickle unsafely


# ---- the Python API: the same classes, the same errors ---------------------------------------------

@pytest.mark.parametrize("change, message", [
    (dict(plans=lambda p: _kwargs(p).update(features_per_stage=[-8, 16, 24])), "features_per_stage[0] is -8"),
    (dict(plans=lambda p: _configuration(p).pop("patch_size")), "lacks `patch_size`"),
    (dict(plans_bytes=b"[" * 200_000), "levels deep"),
    (dict(plans_bytes=b"\xff\xfe"), "is not UTF-8 text"),
    (dict(checkpoint=lambda c: c.update(init_args=None)), "`init_args` is None"),
    (dict(checkpoint=_evil_nnunet), "Unsupported global posix.system"),
], ids=["features", "patch", "deep", "utf8", "init_args", "pickle"])
def test_api_nnunet_folder_shapes(tmp_path, change, message):
    from nnslim.compiler.stages.nnunet_import import NnUNetImportError, read_model_folder
    from nnslim.compiler.stages.source import load_source

    folder = _nnunet_folder(tmp_path, **change)
    with pytest.raises(NnUNetImportError) as caught:
        load_source(folder)
    assert message in str(caught.value) and "weights_only" not in str(caught.value)
    with pytest.raises(NnUNetImportError, match=message.replace("[", r"\[").replace("]", r"\]")):
        read_model_folder(folder)


@pytest.mark.parametrize("change, error, message", [
    (lambda p: _config(p).update(num_classes=10**7), "CheckpointError", "num_classes is 10000000"),
    (lambda p: p["metadata"].pop("normalization"), "CheckpointError", "lacks `normalization`"),
    (lambda p: p.update(architecture=None), "CheckpointError", "`architecture` is None"),
], ids=["classes", "normalization", "architecture"])
def test_api_checkpoint_shapes(tmp_path, change, error, message):
    from nnslim.training import checkpoint as module

    path = _tiny_checkpoint(tmp_path, change)
    with pytest.raises(getattr(module, error)) as caught:
        module.load_model(path)
    assert message in str(caught.value)


def test_api_absurd_architecture_is_refused_before_allocating():
    from nnslim.training.config import ConfigError, RevUNetConfig, UNetConfig

    small = dict(in_channels=1, num_classes=3, kernel_sizes=((3, 3, 3),) * 3, strides=((1, 1, 1), (2, 2, 2), (2, 2, 2)),
                 convs_per_stage=(2, 2, 2), convs_per_decoder_stage=(1, 1))
    with pytest.raises(ConfigError, match=r"features_per_stage\[0\] is 1000000000"):
        UNetConfig(features_per_stage=(10**9, 8, 16), **small)
    with pytest.raises(ConfigError, match="conv weights"):
        UNetConfig(features_per_stage=(4096, 4096, 4096), **{**small, "convs_per_stage": (32, 32, 32)})
    with pytest.raises(ConfigError, match=r"features_per_stage\[1\] is 8.5"):
        UNetConfig.from_dict({**UNetConfig(features_per_stage=(4, 8, 16), **small).to_dict(),
                              "features_per_stage": [4, 8.5, 16]})
    with pytest.raises(ConfigError, match="widths"):
        RevUNetConfig(in_channels=1, num_classes=3, widths=(-2, 4), encoder_depths=(1, 1), decoder_depths=(1,))
    assert UNetConfig(features_per_stage=(4.0, 8, 16), **small).features_per_stage == (4, 8, 16)  # integral floats


def test_api_blocked_global_is_named_not_torch_advice(tmp_path):
    from nnslim.training.checkpoint import CheckpointError, read_checkpoint

    with pytest.raises(CheckpointError) as caught:
        read_checkpoint(_evil_system(tmp_path))
    text = str(caught.value)
    assert "posix.system" in text and "will not unpickle" in text and "weights_only" not in text
    assert not (tmp_path / "pwned").exists()


def test_api_deep_manifest(tiny_engine, tmp_path):
    import shutil

    from nnslim.compiler.runtime.engine import load_engine
    from nnslim.compiler.runtime.manifest import ManifestError, load_manifest

    engine = Path(shutil.copytree(tiny_engine, tmp_path / "engine"))
    (engine / "manifest.json").write_text('{"a": ' + "[" * 100_000)
    with pytest.raises(ManifestError, match="levels deep"):
        load_manifest(engine)
    with pytest.raises(ManifestError, match="levels deep"):
        load_engine(engine)


def test_api_class_order_outside_the_labels(tiny_engine):
    from nnslim.compiler.runtime.manifest import ManifestError, parse_manifest

    raw = json.loads((tiny_engine / "manifest.json").read_text())
    for order, message in (([1, 2, 200], "class_order[]` is 200"), ([2, 2, 3], "distinct label values")):
        with pytest.raises(ManifestError, match=message.replace("[", r"\[").replace("]", r"\]")):
            parse_manifest({**raw, "postprocessing": {"kind": "regions", "class_order": order}})
    recorded = {"kind": "regions", "class_order": [3, 5, 4], "label_values": [3, 4, 5]}  # as an nnU-Net build records
    assert parse_manifest({**raw, "postprocessing": recorded}).postprocessing["class_order"] == [3, 5, 4]
    with pytest.raises(ManifestError, match=r"label values \[3, 4, 5\]"):
        parse_manifest({**raw, "postprocessing": {**recorded, "class_order": [3, 5, 6]}})


def test_api_reference_model_must_be_the_engines(tiny_engine, tmp_path, caplog):
    from nnslim.compiler.runtime.engine import load_engine
    from nnslim.compiler.stages.source import reference_predictor
    from nnslim.errors import InputError

    engine = load_engine(tiny_engine, threads=1)
    with pytest.raises(InputError, match="another architecture than the engine's"):
        reference_predictor(engine, _unrelated_checkpoint(tmp_path))
    with pytest.raises(InputError, match="trained for another task"):
        reference_predictor(engine, _other_labels(tmp_path))
    resaved = _tiny_checkpoint(tmp_path, lambda p: p["metadata"].update(note="re-saved"))  # other bytes, same model
    with caplog.at_level(logging.WARNING):
        predictor = reference_predictor(engine, resaved)
    assert predictor is not None and "other weights" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        reference_predictor(engine, TINY_MODEL)
    assert "other weights" not in caplog.text


def test_api_segment_refuses_what_the_cli_refuses(tiny_engine, tmp_path):
    from nnslim.compiler.runtime.engine import load_engine
    from nnslim.errors import InputError

    engine = load_engine(tiny_engine, threads=1)
    image = np.random.default_rng(0).normal(100, 20, (20, 20, 20)).astype(np.float32)
    with pytest.raises(InputError) as api:
        engine.segment(image, spacing=(1e4, 1e4, 1e4))
    result = CliRunner().invoke(cli, ["infer", str(tiny_engine), str(scan(tmp_path / "s.nii.gz", zooms=(1e4, 1e4, 1e4))),
                                      "-o", str(tmp_path / "seg.nii.gz")])
    assert result.exit_code == 1, result.output
    for text in (str(api.value), result.output):
        assert "would need about" in text and "GB of memory but this machine has" in text
    with pytest.raises(InputError, match=r"each must be a finite number in \(0, 10000\] mm"):
        engine.segment(image, spacing=(1e5, 1, 1))
    with pytest.raises(InputError, match="resamples to 0 voxels"):
        engine.segment(image, spacing=(1e-3, 1, 1))
    assert engine.segment(image, spacing=(1.0, 1.0, 1.0)).shape == (20, 20, 20)


def test_region_engines_record_their_label_values(tmp_path):
    from nnslim.compiler.stages.nnunet_import import LabelScheme, NnUNetImportError

    dataset = {"labels": {"background": 0, "whole": [1, 2, 3], "core": [2, 3], "enhancing": 3},
               "regions_class_order": [1, 2, 3]}
    assert LabelScheme.from_dataset(copy.deepcopy(dataset)).to_manifest()["label_values"] == [1, 2, 3]
    with pytest.raises(NnUNetImportError, match="regions_class_order"):
        LabelScheme.from_dataset({**dataset, "regions_class_order": [1, 2, 9]})
