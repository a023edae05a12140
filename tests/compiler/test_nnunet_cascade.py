"""nnU-Net cascades (`3d_lowres` -> `3d_cascade_fullres`) in `nnslim-predict-nnunet`, `nnslim infer`
and `Engine.segment`.

In CI: the cascade reads `-prev_stage_predictions` as nnU-Net does, chains the low-resolution stage
itself without it (the same labels, its temporary folder gone), really uses the previous stage's
labels, and refuses what cannot work with one clear error. With nnU-Net installed (`nnunet`),
nnUNetv2_predict runs both stages on the same folder and nnslim's labels agree with its labels.
"""

from __future__ import annotations

import json
import os

import nibabel as nib
import numpy as np
import pytest

from tests.compiler.stages.nnunet_folder import write_cascade
from tests.compiler.test_predict_nnunet import NNUNET_PYTHON, nnunet, predict, scan


@pytest.fixture(scope="module")
def cascade(tmp_path_factory):
    root = tmp_path_factory.mktemp("cascade")
    folders = write_cascade(root / "results" / "Dataset999_Synthetic", folds=(0, 1))
    (root / "imagesTs").mkdir()
    for seed, name in enumerate(("a", "b")):
        scan(root / "imagesTs" / f"{name}_0000.nii.gz", seed, shape=(40, 44, 26))
    return {"root": root, "folders": folders}


@pytest.fixture
def env(cascade, monkeypatch):
    monkeypatch.setenv("nnUNet_results", str(cascade["root"] / "results"))
    monkeypatch.setenv("NNSLIM_CACHE", str(cascade["root"] / "cache"))
    return cascade


def labels(folder, case="a"):
    return np.asarray(nib.load(folder / f"{case}.nii.gz").dataobj)


def run(env, out, configuration, *extra):
    return predict("-i", str(env["root"] / "imagesTs"), "-o", str(out), "-d", "999", "-c", configuration,
                   "--precision", "fp32", *extra)


def test_the_cascade_reads_the_previous_stage_or_runs_it_itself(env, tmp_path):
    assert run(env, tmp_path / "lowres", "3d_lowres") == 0
    assert run(env, tmp_path / "given", "3d_cascade_fullres", "-prev_stage_predictions", str(tmp_path / "lowres")) == 0
    assert run(env, tmp_path / "chained", "3d_cascade_fullres") == 0
    for case in ("a", "b"):
        given, chained = labels(tmp_path / "given", case), labels(tmp_path / "chained", case)
        assert given.shape == (40, 44, 26) and np.array_equal(given, chained)
    assert sorted(p.name for p in (tmp_path / "chained").iterdir() if p.name.startswith(".nnslim-")) == []
    record = json.loads((tmp_path / "given" / "predict_from_raw_data_args.json").read_text())
    assert record["folder_with_segs_from_prev_stage"] == str(tmp_path / "lowres")
    # the previous stage's labels are an input: other labels give another segmentation
    (tmp_path / "other").mkdir()
    for case in ("a", "b"):
        lowres = nib.load(tmp_path / "lowres" / f"{case}.nii.gz")
        flipped = np.ascontiguousarray(np.asarray(lowres.dataobj)[::-1])
        nib.save(nib.Nifti1Image(flipped, lowres.affine), tmp_path / "other" / f"{case}.nii.gz")
    assert run(env, tmp_path / "other_out", "3d_cascade_fullres", "-prev_stage_predictions", str(tmp_path / "other")) == 0
    assert np.mean(labels(tmp_path / "other_out") != labels(tmp_path / "given")) > 0.001


def test_a_missing_previous_segmentation_fails_that_case_only(env, tmp_path, capsys):
    assert run(env, tmp_path / "lowres", "3d_lowres") == 0
    (tmp_path / "lowres" / "b.nii.gz").unlink()
    code = run(env, tmp_path / "out", "3d_cascade_fullres", "-prev_stage_predictions", str(tmp_path / "lowres"))
    assert code == 4 and (tmp_path / "out" / "a.nii.gz").is_file() and not (tmp_path / "out" / "b.nii.gz").exists()
    assert "previous stage's segmentation of this case is missing" in capsys.readouterr().err


def test_previous_predictions_for_a_model_that_is_not_a_cascade_are_refused(env, tmp_path, capsys):
    assert run(env, tmp_path / "out", "3d_lowres", "-prev_stage_predictions", str(tmp_path)) == 1
    assert "not a cascade stage" in capsys.readouterr().err


def test_a_case_the_first_stage_fails_is_reported_as_such(env, tmp_path, capsys):
    import shutil

    (tmp_path / "in").mkdir()
    shutil.copy(env["root"] / "imagesTs" / "a_0000.nii.gz", tmp_path / "in")
    (tmp_path / "in" / "c_0000.nii.gz").write_bytes(b"not a scan")
    code = predict("-i", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "-d", "999", "-c", "3d_cascade_fullres",
                   "--precision", "fp32")
    err = capsys.readouterr().err
    assert code == 4 and (tmp_path / "out" / "a.nii.gz").is_file()
    assert "c: the 3d_lowres stage FAILED" in err and "c: FAILED (its 3d_lowres stage failed, above)" in err


def test_engine_segment_takes_the_previous_stage_in_the_images_axis_order(env, tmp_path):
    from nnslim.compiler.runtime.engine import load_engine
    from nnslim.errors import InputError

    assert run(env, tmp_path / "lowres", "3d_lowres") == 0
    engine_dir = next(p for p in (env["root"] / "cache" / "engines").iterdir()
                      if p.is_dir() and "previous_stage" in (p / "manifest.json").read_text())
    image = nib.load(env["root"] / "imagesTs" / "a_0000.nii.gz")
    data, previous = np.asarray(image.dataobj), labels(tmp_path / "lowres")
    spacing = image.header.get_zooms()[:3]
    with load_engine(engine_dir, device="cpu") as engine:
        nibabel_order = engine.segment(data, spacing, previous_stage=previous)
        sitk_order = engine.segment(data.transpose(2, 1, 0), spacing[::-1], axis_order="sitk",
                                    previous_stage=previous.transpose(2, 1, 0))
        with pytest.raises(InputError, match="cascade stage: pass previous_stage"):
            engine.segment(data, spacing)
        with pytest.raises(InputError, match="shaped like the image"):
            engine.segment(data, spacing, previous_stage=previous[:-1])
        for wrong in (previous.astype(np.int64) + 65536, np.where(previous > 0, np.inf, 0.0)):
            with pytest.raises(InputError, match=r"whole numbers in \[0, 255\]"):
                engine.segment(data, spacing, previous_stage=wrong)
    assert np.array_equal(nibabel_order, sitk_order.transpose(2, 1, 0))
    assert run(env, tmp_path / "given", "3d_cascade_fullres", "-prev_stage_predictions", str(tmp_path / "lowres")) == 0
    assert np.mean(nibabel_order == labels(tmp_path / "given")) >= 0.999


@pytest.mark.nnunet
@pytest.mark.skipif(not NNUNET_PYTHON, reason="set NNSLIM_NNUNET_PYTHON to a Python with nnunetv2 (a separate "
                                                "environment: torch==2.13.0 first, then nnunetv2)")
def test_nnunets_cascade_agrees(env, tmp_path):
    environment = {**os.environ, "nnUNet_raw": str(tmp_path), "nnUNet_preprocessed": str(tmp_path)}
    inputs = str(env["root"] / "imagesTs")
    common = ("-d", "999", "-f", "0", "1", "-device", "cpu", "-npp", "1", "-nps", "1")
    entry = ("nnunetv2.inference.predict_from_raw_data", "predict_entry_point")
    nnunet(*entry, "-i", inputs, "-o", str(tmp_path / "nnunet_lowres"), "-c", "3d_lowres", *common, env=environment)
    nnunet(*entry, "-i", inputs, "-o", str(tmp_path / "nnunet"), "-c", "3d_cascade_fullres", "-prev_stage_predictions",
           str(tmp_path / "nnunet_lowres"), *common, env=environment)
    assert run(env, tmp_path / "lowres", "3d_lowres") == 0
    assert run(env, tmp_path / "nnslim", "3d_cascade_fullres") == 0  # chained: its own 3d_lowres stage first
    assert run(env, tmp_path / "given", "3d_cascade_fullres", "-prev_stage_predictions",
               str(tmp_path / "nnunet_lowres")) == 0  # the cascade stage alone, on nnU-Net's first stage
    for case in ("a", "b"):
        lowres = np.mean(labels(tmp_path / "lowres", case) == labels(tmp_path / "nnunet_lowres", case))
        stage = np.mean(labels(tmp_path / "given", case) == labels(tmp_path / "nnunet", case))
        chained = np.mean(labels(tmp_path / "nnslim", case) == labels(tmp_path / "nnunet", case))
        print(f"{case}: 3d_lowres agreement {lowres:.6f}, 3d_cascade_fullres on nnU-Net's 3d_lowres {stage:.6f}, "
              f"both stages nnslim's {chained:.6f}")
        # each stage agrees as a single-stage model does; chained, the first stage's few differing voxels
        # (near-ties) are inputs of the second and spread through its receptive field
        assert lowres >= 0.999 and stage >= 0.999 and chained >= 0.995


def test_nnslim_infer_takes_the_previous_stage_folder(env, tmp_path):
    from click.testing import CliRunner

    from nnslim.compiler.cli import cli
    from nnslim.compiler.stages.engine_cache import cached_engine

    assert run(env, tmp_path / "lowres", "3d_lowres") == 0
    assert run(env, tmp_path / "given", "3d_cascade_fullres", "-prev_stage_predictions", str(tmp_path / "lowres")) == 0
    folders = env["folders"]
    cascade = cached_engine(folders["3d_cascade_fullres"], None, "checkpoint_final.pth", precision="fp32")
    lowres = cached_engine(folders["3d_lowres"], None, "checkpoint_final.pth", precision="fp32")
    images, runner = str(env["root"] / "imagesTs"), CliRunner()
    ran = runner.invoke(cli, ["infer", str(cascade), images, "-o", str(tmp_path / "out"), "--previous-stage",
                              str(tmp_path / "lowres")])
    assert ran.exit_code == 0, ran.output
    assert np.array_equal(labels(tmp_path / "out"), labels(tmp_path / "given"))
    missing = runner.invoke(cli, ["infer", str(cascade), images, "-o", str(tmp_path / "out2")])
    assert missing.exit_code == 4 and "pass the folder of its previous stage's segmentations" in missing.output
    idle = runner.invoke(cli, ["infer", str(lowres), images, "-o", str(tmp_path / "out3"), "--previous-stage",
                               str(tmp_path / "lowres")])
    assert idle.exit_code == 1 and "not a cascade stage" in idle.output
