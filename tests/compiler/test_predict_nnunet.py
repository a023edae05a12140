"""`nnslim-predict-nnunet`: nnUNetv2_predict's command line on an nnslim engine.

In CI (no nnunetv2): the arguments parse as nnU-Net's (single-dash long flags), the model folder is
found from $nnUNet_results by dataset id or name, every fold is used by default, the engine is built
once into the cache and reused, and the output folder holds what nnUNetv2_predict writes (the
segmentations, dataset.json, plans.json, predict_from_raw_data_args.json, and nnU-Net's .npz / .pkl
with --save_probabilities) with labels that agree with nnU-Net's predictor re-implemented in
`nnunet_folder.reference_predict`. With nnU-Net installed (`nnunet` tests), nnUNetv2_predict itself
runs on the same folder and nnUNetv2_ensemble reads nnslim's probabilities.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from nnslim.compiler.cli.predict_nnunet import main, parser
from tests.compiler.stages.nnunet_folder import reference_predict, write_model_folder

NNUNET_PYTHON = os.environ.get("NNSLIM_NNUNET_PYTHON")  # a Python with nnunetv2 (its own environment)


def scan(path: Path, seed: int, shape=(30, 36, 28)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    body = (grid**2).sum(0) < 0.9
    data = ((60 + 80 * np.sin(4 * grid[0]) * grid[1] + 10 * rng.normal(size=shape)) * body - 1000 * ~body)
    nib.save(nib.Nifti1Image(data.astype(np.float32), np.diag([1.0, 1.0, 2.0, 1.0])), path)
    return data.astype(np.float32)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("nnunet")
    model = root / "results" / "Dataset999_Synthetic" / "nnUNetTrainer__nnUNetPlans__3d_fullres"
    info = write_model_folder(model, folds=(0, 1), decisive=8.0)
    (root / "imagesTs").mkdir()
    images = {name: scan(root / "imagesTs" / f"{name}_0000.nii.gz", seed) for seed, name in enumerate(("a", "b"))}
    return {"root": root, "model": model, "info": info, "images": images}


@pytest.fixture
def env(results, tmp_path, monkeypatch):
    monkeypatch.setenv("nnUNet_results", str(results["root"] / "results"))
    monkeypatch.setenv("NNSLIM_CACHE", str(results["root"] / "cache"))
    return results


def predict(*args: str) -> int:
    with pytest.raises(SystemExit) as done:
        main([*args, "-device", "cpu", "--disable_progress_bar"])
    return done.value.code


def test_arguments_are_nnunets():
    args = parser().parse_args(["-i", "in", "-o", "out", "-d", "3", "-c", "3d_fullres", "-f", "0", "all", "-chk",
                                "checkpoint_best.pth", "-step_size", "0.6", "--disable_tta", "-npp", "2", "-nps", "1",
                                "-num_parts", "2", "-part_id", "1", "--save_probabilities", "--continue_prediction"])
    assert (args.f, args.chk, args.step_size, args.disable_tta, args.num_parts, args.part_id) == \
        (["0", "all"], "checkpoint_best.pth", 0.6, True, 2, 1)
    assert (args.tr, args.p, args.device) == ("nnUNetTrainer", "nnUNetPlans", "cuda")


def test_drop_in_writes_nnunets_folder_and_reuses_its_engine(env, tmp_path, capsys):
    out = tmp_path / "predictions"
    assert predict("-i", str(env["root"] / "imagesTs"), "-o", str(out), "-d", "999", "-c", "3d_fullres",
                   "--save_probabilities") == 0
    assert "folds 0 1" in capsys.readouterr().err  # every fold of the model folder, said
    names = {p.name for p in out.iterdir()}
    assert {"a.nii.gz", "b.nii.gz", "a.npz", "a.pkl", "b.npz", "b.pkl", "dataset.json", "plans.json",
            "predict_from_raw_data_args.json"} <= names
    assert json.loads((out / "plans.json").read_text()) == json.loads((env["model"] / "plans.json").read_text())
    args = json.loads((out / "predict_from_raw_data_args.json").read_text())
    assert args["save_probabilities"] is True and args["num_parts"] == 1
    for name, image in env["images"].items():
        labels = np.asarray(nib.load(out / f"{name}.nii.gz").dataobj)
        probabilities = np.load(out / f"{name}.npz")["probabilities"]
        assert probabilities.dtype == np.float32 and probabilities.shape == (3, *image.shape[::-1])  # [K, Z, Y, X]
        assert np.mean(probabilities.argmax(0) == labels.transpose(2, 1, 0)) >= 0.999
        np.testing.assert_allclose(probabilities.sum(0), 1.0, atol=2e-3)
        with open(out / f"{name}.pkl", "rb") as f:
            props = pickle.load(f)  # the test's own output file
        assert props["sitk_stuff"]["spacing"] == (1.0, 1.0, 2.0) and props["spacing"] == [2.0, 1.0, 1.0]
        assert len(props["sitk_stuff"]["direction"]) == 9 and props["shape_before_cropping"] == image.shape[::-1]
    engines = [p for p in (env["root"] / "cache" / "engines").iterdir() if p.is_dir()]
    assert len(engines) == 1
    manifest = json.loads((engines[0] / "manifest.json").read_text())
    assert manifest["source"]["folds"] == ["0", "1"]
    # again, resuming: nothing to segment, the engine is reused (still one)
    stamp = (engines[0] / "manifest.json").stat().st_mtime_ns
    assert predict("-i", str(env["root"] / "imagesTs"), "-o", str(out), "-d", "Dataset999_Synthetic", "-c",
                   "3d_fullres", "--continue_prediction") == 0
    assert (engines[0] / "manifest.json").stat().st_mtime_ns == stamp
    assert len([p for p in (env["root"] / "cache" / "engines").iterdir() if p.is_dir()]) == 1


def test_labels_agree_with_nnunets_predictor(env, tmp_path):
    out = tmp_path / "fold0"
    assert predict("-i", str(env["root"] / "imagesTs"), "-o", str(out), "-d", "999", "-c", "3d_fullres",
                   "-f", "0", "--precision", "fp32") == 0
    info = dict(env["info"], weights={0: env["info"]["weights"][0]})
    for name, image in env["images"].items():
        expected = reference_predict(image, info, use_tta=True)
        labels = np.asarray(nib.load(out / f"{name}.nii.gz").dataobj)
        assert np.mean(labels == expected) >= 0.9999


@pytest.mark.parametrize("args, says", [
    (["-d", "5"], "no folder named Dataset005_"),
    (["-d", "../results/Dataset999_Synthetic"], "not a path"),
    (["-d", "999", "-tr", "OtherTrainer"], "no trained model at"),
    (["-d", "999", "-chk", "../fold_0/checkpoint_final.pth"], "must be a file name"),
    (["-d", "999", "-prev_stage_predictions", "lowres"], "not a cascade stage"),
    (["-d", "999", "-num_parts", "2", "-part_id", "2"], "-part_id 2"),
])
def test_bad_arguments_are_one_clear_error(env, tmp_path, capsys, args, says):
    code = predict("-i", str(env["root"] / "imagesTs"), "-o", str(tmp_path / "o"), "-c", "3d_fullres", *args)
    assert code == 1
    assert says in capsys.readouterr().err


def test_results_folder_must_be_set(monkeypatch, tmp_path, capsys):
    monkeypatch.delenv("nnUNet_results", raising=False)
    assert predict("-i", str(tmp_path), "-o", str(tmp_path / "o"), "-d", "1", "-c", "3d_fullres") == 1
    assert "$nnUNet_results is not set" in capsys.readouterr().err


def nnunet(*args: str, env: dict) -> None:
    """An nnU-Net console script run by the Python that has nnunetv2."""
    code = f"import sys; from {args[0]} import {args[1]} as f; sys.argv = ['nnunet', *sys.argv[1:]]; f()"
    subprocess.run([NNUNET_PYTHON, "-c", code, *args[2:]], check=True, env=env, capture_output=True, timeout=900)


@pytest.mark.nnunet
@pytest.mark.skipif(not NNUNET_PYTHON, reason="set NNSLIM_NNUNET_PYTHON to a Python with nnunetv2 (a separate "
                                                "environment: torch==2.13.0 first, then nnunetv2)")
def test_nnunet_itself_agrees_and_ensembles_nnslims_probabilities(env, tmp_path):
    inputs = tmp_path / "imagesTs"  # a case of realistic proportions: edges are a small part of it
    inputs.mkdir()
    scan(inputs / "big_0000.nii.gz", 7, shape=(96, 104, 80))
    environment = {**os.environ, "nnUNet_raw": str(tmp_path), "nnUNet_preprocessed": str(tmp_path)}
    nnunet("nnunetv2.inference.predict_from_raw_data", "predict_entry_point", "-i", str(inputs), "-o",
           str(tmp_path / "nnunet"), "-d", "999", "-c", "3d_fullres", "-f", "0", "1", "--save_probabilities",
           "-device", "cpu", "-npp", "1", "-nps", "1", env=environment)
    assert predict("-i", str(inputs), "-o", str(tmp_path / "nnslim"), "-d", "999", "-c", "3d_fullres",
                   "--save_probabilities", "--precision", "fp32") == 0
    ours = np.asarray(nib.load(tmp_path / "nnslim" / "big.nii.gz").dataobj)
    theirs = np.asarray(nib.load(tmp_path / "nnunet" / "big.nii.gz").dataobj)
    p_ours = np.load(tmp_path / "nnslim" / "big.npz")["probabilities"]
    p_theirs = np.load(tmp_path / "nnunet" / "big.npz")["probabilities"]
    error = np.abs(p_ours - p_theirs).max(0)
    differ = (ours != theirs).transpose(2, 1, 0)  # in nnU-Net's [Z, Y, X], as the probabilities
    top = np.sort(p_theirs, axis=0)
    print(f"agreement {1 - differ.mean():.6f} ({differ.sum()} voxels; nnU-Net's probability margin there at most "
          f"{(top[-1] - top[-2])[differ].max() if differ.any() else 0:.1e}), probabilities: max error "
          f"{error.max():.2e}, 99th percentile {np.percentile(error, 99):.2e}, inside 2 voxels from the edges "
          f"{error[2:-2, 2:-2, 2:-2].max():.2e}")
    # nnU-Net's predictor accumulates logits in fp16: where two classes tie within its rounding it picks
    # either; every voxel where the labels differ is such a tie, and there are few
    assert 1 - differ.mean() >= 0.9995 and (top[-1] - top[-2])[differ].max(initial=0) <= 5e-3
    # at a volume's edges, covered only by windows' far corners, nnU-Net's fp16 Gaussian weights are
    # subnormal and its logits rounding noise; inside, the probabilities agree within fp16's resolution
    assert p_ours.shape == p_theirs.shape and np.percentile(error, 99) <= 1e-3
    assert error[2:-2, 2:-2, 2:-2].max() <= 2.5e-3
    nnunet("nnunetv2.ensembling.ensemble", "entry_point_ensemble_folders", "-i", str(tmp_path / "nnslim"),
           str(tmp_path / "nnunet"), "-o", str(tmp_path / "ensemble"), "-np", "1", env=environment)
    ensembled = np.asarray(nib.load(tmp_path / "ensemble" / "big.nii.gz").dataobj)
    assert ensembled.shape == ours.shape and np.mean(ensembled == theirs) >= 0.999


def test_infer_writes_nnunets_probabilities_on_request(env, tmp_path):
    from click.testing import CliRunner

    from nnslim.compiler.cli import cli
    from nnslim.compiler.stages.engine_cache import cached_engine

    engine = cached_engine(env["model"], ("0", "1"), "checkpoint_final.pth", env["root"] / "imagesTs")
    runner = CliRunner()
    idle = runner.invoke(cli, ["infer", str(engine), str(env["root"] / "imagesTs"), "-o", str(tmp_path / "x"),
                               "--probabilities-format", "nnunet"])
    assert idle.exit_code == 2 and "without --save-probabilities" in idle.output
    ran = runner.invoke(cli, ["infer", str(engine), str(env["root"] / "imagesTs" / "a_0000.nii.gz"), "-o",
                              str(tmp_path / "a.nii.gz"), "--save-probabilities", "--probabilities-format", "nnunet"])
    assert ran.exit_code == 0, ran.output
    probabilities = np.load(tmp_path / "a.npz")["probabilities"]
    assert probabilities.dtype == np.float32 and probabilities.shape == (3, *env["images"]["a"].shape[::-1])
    assert (tmp_path / "a.pkl").is_file()


def test_postprocessing_pkl_is_applied_to_the_segmentations(env, tmp_path):
    from scipy.ndimage import label

    from tests.compiler.runtime.test_nnunet_postprocessing import nnunet_pickle

    nnunet_pickle(tmp_path / "postprocessing.pkl", [{"labels_or_regions": [1, 2]}])
    out = tmp_path / "pp"
    assert predict("-i", str(env["root"] / "imagesTs"), "-o", str(out), "-d", "999", "-c", "3d_fullres",
                   "-pp_pkl_file", str(tmp_path / "postprocessing.pkl")) == 0
    for name in env["images"]:
        labels = np.asarray(nib.load(out / f"{name}.nii.gz").dataobj)
        _, components = label(labels > 0, structure=np.ones((3, 3, 3)))
        assert components == 1 and labels.any()


def test_an_engine_built_with_postprocessing_applies_it(env, tmp_path):
    """`build-engine --postprocessing postprocessing.pkl`: the manifest records the steps, and every
    label map the engine makes (`infer`, `Engine.segment`) has them applied; a garbled record is refused."""
    from click.testing import CliRunner
    from scipy.ndimage import label

    import nnslim
    from nnslim.compiler.cli import cli
    from nnslim.errors import EngineError
    from tests.compiler.runtime.test_nnunet_postprocessing import nnunet_pickle

    nnunet_pickle(tmp_path / "postprocessing.pkl", [{"labels_or_regions": [1, 2]}])
    runner, engine = CliRunner(), tmp_path / "engine"
    built = runner.invoke(cli, ["build-engine", str(env["model"]), "--out", str(engine), "--precision", "fp32",
                                "--postprocessing", str(tmp_path / "postprocessing.pkl")])
    assert built.exit_code == 0, built.output
    manifest = json.loads((engine / "manifest.json").read_text())
    assert manifest["postprocessing"]["steps"] == [
        {"function": "remove_all_but_largest_component", "regions": [[1], [2]], "background_label": 0}]
    ran = runner.invoke(cli, ["infer", str(engine), str(env["root"] / "imagesTs"), "-o", str(tmp_path / "out")])
    assert ran.exit_code == 0, ran.output
    scan = nib.load(env["root"] / "imagesTs" / "a_0000.nii.gz")
    in_memory = nnslim.load_engine(engine).segment(np.asarray(scan.dataobj), scan.header.get_zooms()[:3])
    for labels in (np.asarray(nib.load(tmp_path / "out" / "a.nii.gz").dataobj), in_memory):
        _, components = label(labels > 0, structure=np.ones((3, 3, 3)))
        assert components == 1 and labels.any()
    manifest["postprocessing"]["steps"][0]["regions"] = "everything"
    (engine / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(EngineError, match="postprocessing.steps"):
        nnslim.load_engine(engine)


def test_the_engines_spacing_by_name_is_in_the_images_axis_order(env):
    """An nnU-Net engine records its spacing in the network's axes ([2, 1, 1]: SimpleITK's order);
    spacing="engine" is nibabel's (1, 1, 2) for a nibabel array, and (2, 1, 1) for axis_order="sitk"."""
    from nnslim.compiler.runtime.engine import load_engine
    from nnslim.compiler.stages.engine_cache import cached_engine

    engine = load_engine(cached_engine(env["model"], ("0", "1"), "checkpoint_final.pth", env["root"] / "imagesTs"))
    image = env["images"]["a"]
    assert engine._spacing("engine", reverse=False) == (1.0, 1.0, 2.0)
    assert np.array_equal(engine.segment(image, "engine"), engine.segment(image, (1.0, 1.0, 2.0)))
    assert np.array_equal(engine.segment(image.transpose(2, 1, 0), "engine", axis_order="sitk"),
                          engine.segment(image, (1.0, 1.0, 2.0)).transpose(2, 1, 0))


def test_a_damaged_cached_engine_is_built_again(env, tmp_path, caplog):
    from nnslim.compiler.stages.engine_cache import cached_engine

    engine = cached_engine(env["model"], ("0",), "checkpoint_final.pth", env["root"] / "imagesTs")
    with open(engine / "model.opt.onnx", "ab") as f:
        f.write(b"tampered")
    assert predict("-i", str(env["root"] / "imagesTs"), "-o", str(tmp_path / "o"), "-d", "999", "-c", "3d_fullres",
                   "-f", "0") == 0
    assert "failed its check" in caplog.text and (tmp_path / "o" / "a.nii.gz").is_file()
    assert b"tampered" not in (engine / "model.opt.onnx").read_bytes()[-8:]


@pytest.mark.nnunet
@pytest.mark.skipif(not NNUNET_PYTHON, reason="set NNSLIM_NNUNET_PYTHON to a Python with nnunetv2 (a separate "
                                                "environment: torch==2.13.0 first, then nnunetv2)")
def test_a_postprocessing_pkl_nnunet_wrote_does_what_nnunets_own_tool_does(env, tmp_path):
    """nnunetv2 pickles its own function; -pp_pkl_file applies it as nnUNetv2_apply_postprocessing does."""
    write = ("import pickle, sys; from nnunetv2.postprocessing.remove_connected_components import "
             "remove_all_but_largest_component_from_segmentation as f; "
             "pickle.dump(([f, f], [{'labels_or_regions': [1, 2]}, {'labels_or_regions': 2}]), open(sys.argv[1], 'wb'))")
    subprocess.run([NNUNET_PYTHON, "-c", write, str(tmp_path / "postprocessing.pkl")], check=True, timeout=300)
    args = ("-i", str(env["root"] / "imagesTs"), "-d", "999", "-c", "3d_fullres", "--precision", "fp32")
    assert predict(*args, "-o", str(tmp_path / "plain")) == 0
    assert predict(*args, "-o", str(tmp_path / "ours"), "-pp_pkl_file", str(tmp_path / "postprocessing.pkl")) == 0
    environment = {**os.environ, "nnUNet_raw": str(tmp_path), "nnUNet_preprocessed": str(tmp_path)}
    nnunet("nnunetv2.postprocessing.remove_connected_components", "entry_point_apply_postprocessing", "-i",
           str(tmp_path / "plain"), "-o", str(tmp_path / "theirs"), "-pp_pkl_file", str(tmp_path / "postprocessing.pkl"),
           "-np", "1", env=environment)
    for name in env["images"]:
        ours, theirs, plain = (np.asarray(nib.load(tmp_path / d / f"{name}.nii.gz").dataobj)
                               for d in ("ours", "theirs", "plain"))
        assert np.array_equal(ours, theirs) and not np.array_equal(ours, plain)
