"""MONAI bundles in: `nnslim build-engine BUNDLE_DIR` builds an engine whose segmentation is MONAI's.

Parity is against MONAI itself, not a re-implementation: the bundle's config read by MONAI's own
`ConfigParser` (transforms, `SlidingWindowInferer`, network with the bundle's weights) segments the
same NIfTI file that `nnslim infer` segments. The scan is stored LPS-like (a negative affine on two
axes), so `Orientationd` flips it, and its size is not a multiple of the window, so MONAI's scan
interval and clamped last window matter (SwinUNETR's 64^3 window is larger than the scan on every
axis: MONAI's padding; its build takes about 90 s, so it is marked slow). The fp32 engine must agree on >= 99.9% of voxels, and its
logits, walked with the engine's recorded window rules over the same preprocessed image, must be
within the fp32 gate of MONAI's.
"""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

pytest.importorskip("monai", reason="monai is not installed (the dev set installs it: pip install monai)")
torch = pytest.importorskip("torch")

from click.testing import CliRunner  # noqa: E402

from nnslim.compiler.cli import cli  # noqa: E402
from nnslim.compiler.runtime.engine import load_engine  # noqa: E402
from nnslim.compiler.runtime.segmentation import InferenceOptions, prepare_volume, window_config  # noqa: E402
from nnslim.compiler.runtime.volumes.volume import load_volume  # noqa: E402
from nnslim.compiler.runtime.window.walk import sliding_window_inference  # noqa: E402
from nnslim.compiler.stages.monai_bundle import BundleError  # noqa: E402
from nnslim.compiler.stages.monai_transforms import TransformError  # noqa: E402
from nnslim.compiler.stages.source import load_source  # noqa: E402
from tests.compiler.stages.monai_bundles import write_bundle  # noqa: E402

AFFINE = np.diag([-1.2, -1.0, 1.5, 1.0])  # x and y run towards L and P: Orientationd("RAS") flips them


def scan(path, shape=(53, 47, 41)):
    rng = np.random.default_rng(3)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    body = (grid**2).sum(0) < 0.8
    data = (100 + 40 * np.sin(3 * grid[0]) * np.cos(2 * grid[1]) + 5 * rng.normal(size=shape)) * body
    nib.save(nib.Nifti1Image(data.astype(np.float32), AFFINE), path)
    return path


def monai_segmentation(bundle, image_path):
    """The bundle run by MONAI: its parser, transforms, inferer and network (weights from model.pt)."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    network = parser.get_parsed_content("network_def")
    network.load_state_dict(torch.load(bundle / "models" / "model.pt", weights_only=True))
    network.eval()
    data = parser.get_parsed_content("preprocessing")({"image": str(image_path)})["image"]
    with torch.no_grad():
        logits = parser.get_parsed_content("inferer")(data[None], network)[0]
    return np.asarray(logits), np.asarray(data)


def to_ras(labels):
    from nibabel.orientations import apply_orientation, axcodes2ornt, io_orientation, ornt_transform

    return apply_orientation(labels, ornt_transform(io_orientation(AFFINE), axcodes2ornt("RAS")))


@pytest.mark.parametrize("kind", ["unet", "segresnet", pytest.param("swinunetr", marks=pytest.mark.slow)])
def test_bundle_engine_segments_like_monai(tmp_path, kind):
    bundle = write_bundle(tmp_path / kind, kind)
    image = scan(tmp_path / "case.nii.gz")
    runner = CliRunner()
    built = runner.invoke(cli, ["build-engine", str(bundle), "--out", str(tmp_path / "engine"), "--backend",
                                "onnxruntime", "--precision", "fp32", "--parity-volume", str(image)])
    assert built.exit_code == 0, built.output
    manifest = json.loads((tmp_path / "engine" / "manifest.json").read_text())
    assert manifest["source"]["kind"] == "monai-bundle" and manifest["labels"] == ["background", "grey", "white"]
    assert manifest["preprocessing"]["window"] == {"rules": "monai", "step_fraction": 0.75, "blending": "gaussian",
                                                    "sigma_scale": 0.125, "pad_value": 0.0}
    assert manifest["preprocessing"]["orientation"] == "RAS"
    assert set(manifest["source"]["checkpoint_sha256"]) == {"configs/inference.json", "configs/metadata.json",
                                                             "models/model.pt"}
    ran = runner.invoke(cli, ["infer", str(tmp_path / "engine"), str(image), "-o", str(tmp_path / "seg.nii.gz")])
    assert ran.exit_code == 0, ran.output

    expected_logits, monai_image = monai_segmentation(bundle, image)
    ours = to_ras(np.asarray(nib.load(tmp_path / "seg.nii.gz").dataobj))
    expected = expected_logits.argmax(0)
    assert ours.shape == expected.shape
    agreement = float((ours == expected).mean())
    assert agreement >= 0.999, agreement
    counts = np.bincount(expected.ravel(), minlength=3) / expected.size
    assert (counts >= 0.01).sum() >= 2, counts  # more than one class predicted: the comparison means something

    engine = load_engine(tmp_path / "engine")
    prepared = prepare_volume(load_volume(image, 1), engine.spec)
    np.testing.assert_allclose(prepared.image, monai_image, rtol=1e-5, atol=1e-5)  # orientation and normalization
    logits = sliding_window_inference(prepared.image, engine.predictor, 3,
                                      window_config(engine.spec, InferenceOptions(progress=False)))
    error = float(np.abs(logits - expected_logits).max() / np.abs(expected_logits).max())
    assert error <= 1e-2, error  # the fp32 gate (relative to the largest logit); in practice about 1e-6


def test_bundle_reads_weights_only_and_runs_no_config_code(tmp_path):
    bundle = write_bundle(tmp_path / "b")
    source = load_source(bundle)
    assert source.kind == "monai-bundle" and source.num_classes == 3 and source.metadata["patch_size"] == [32, 32, 32]
    assert source.postprocessing == {"kind": "argmax"}
    marker = tmp_path / "ran"
    for definition, says in [
        ({"_target_": "UNet", "spatial_dims": f"$__import__('pathlib').Path('{marker}').touch() or 3"}, "expression"),
        ({"_target_": "monai.apps.utils.download_url", "url": "x"}, "MONAI's own networks"),
        ({"_target_": "torch.nn.Conv3d", "in_channels": 1}, "MONAI's own networks"),
        ({"_target_": "UNet", "act": {"_target_": "os.system", "command": "true"}}, "nested _target_"),
        ({"_target_": "UNet", "_requires_": "$print(1)"}, "_requires_"),
        # a literal that is itself an expression: MONAI's parser would evaluate it
        ({"_target_": "UNet", "num_res_units": f"$'$open(\"{marker}\", \"w\").write(\"x\") and 0'"}, "would evaluate"),
        ({"_target_": "UNet", "channels": "$['@network', 16]"}, "would evaluate"),
    ]:
        write_bundle(tmp_path / "bad", network_def=definition, hostile=True)
        with pytest.raises(BundleError, match=says):
            load_source(tmp_path / "bad")
    assert not marker.exists()

    class Payload:
        def __reduce__(self):
            return (print, ("unpickled",))

    torch.save({"weights": Payload()}, bundle / "models" / "model.pt")
    with pytest.raises(BundleError, match="weights only"):
        load_source(bundle)
    (bundle / "models" / "model.pt").rename(bundle / "models" / "model.ts")  # TorchScript runs code when loaded
    with pytest.raises(BundleError, match="only models/model.ts"):
        load_source(bundle)


def test_configs_that_expand_or_loop_are_refused(tmp_path):
    bundle = write_bundle(tmp_path / "b")
    config = json.loads((bundle / "configs" / "inference.json").read_text())
    config["level0"] = [1]
    for i in range(1, 40):  # each level holds the one below twice: 2**40 values if expanded
        config[f"level{i}"] = [f"@level{i - 1}", f"@level{i - 1}"]
    config["network_def"]["channels"] = "@level39"
    (bundle / "configs" / "inference.json").write_text(json.dumps(config))
    with pytest.raises(BundleError, match="more than|nest more than"):
        load_source(bundle)
    config["network_def"]["channels"] = "@loop"
    config["loop"] = "@loop"
    (bundle / "configs" / "inference.json").write_text(json.dumps(config))
    with pytest.raises(BundleError, match="nest more than"):
        load_source(bundle)
    config["network_def"]["channels"] = [8, 16, 32]
    config["network_def"]["strides"] = "abc"  # MONAI's constructor fails: one BundleError, not a traceback
    (bundle / "configs" / "inference.json").write_text(json.dumps(config))
    with pytest.raises(BundleError):
        load_source(bundle)


def test_bundle_refusals_name_what_cannot_be_reproduced(tmp_path):
    crop = [{"_target_": "LoadImaged", "keys": "image"}, {"_target_": "CropForegroundd", "keys": "image", "source_key": "image"},
            {"_target_": "RandFlipd", "keys": "image", "prob": 0.5}]
    with pytest.raises(TransformError, match=r"CropForegroundd\(source_key=.image.\); RandFlipd\(prob=0.5\)"):
        load_source(write_bundle(tmp_path / "a", preprocessing=crop))
    with pytest.raises(BundleError, match="SimpleInferer"):
        load_source(write_bundle(tmp_path / "b", inferer={"_target_": "SimpleInferer"}))
    with pytest.raises(BundleError, match="padding_mode is 'reflect'"):
        load_source(write_bundle(tmp_path / "c", inferer={"_target_": "SlidingWindowInferer", "roi_size": [32] * 3,
                                                          "padding_mode": "reflect"}))
    keep = [{"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
            {"_target_": "KeepLargestConnectedComponentd", "keys": "pred", "applied_labels": [1]}]
    with pytest.raises(TransformError, match="KeepLargestConnectedComponent"):
        load_source(write_bundle(tmp_path / "d", postprocessing=keep))


def test_sigmoid_threshold_becomes_regions(tmp_path):
    post = [{"_target_": "Activationsd", "keys": "pred", "sigmoid": True},
            {"_target_": "AsDiscreted", "keys": "pred", "threshold": 0.7}]
    source = load_source(write_bundle(tmp_path / "b", postprocessing=post))
    assert source.postprocessing["kind"] == "regions" and source.postprocessing["class_order"] == [1, 2, 3]
    assert source.postprocessing["threshold_logit"] == pytest.approx(np.log(0.7 / 0.3))
