"""Ensembles of nnU-Net configurations: `nnslim-predict-nnunet -c A B` and `nnslim-ensemble-nnunet`
(nnUNetv2_ensemble's arguments), and the allow-listed reading of nnU-Net's `.pkl` properties.

In CI: the ensemble is the average of each configuration's own probabilities, labelled (checked
against the files each configuration writes alone), the two ways agree, and a `.pkl` that names
anything but numbers is refused without running it. With nnU-Net installed (`nnunet`),
nnUNetv2_ensemble and nnslim-ensemble-nnunet give the same labels on the same folders, nnU-Net's
own folders included.
"""

from __future__ import annotations

import io
import os
import pickle

import nibabel as nib
import numpy as np
import pytest

from nnslim.compiler.cli.ensemble_nnunet import main as ensemble_main
from nnslim.compiler.runtime.nnunet.ensemble import geometry, read_properties
from nnslim.errors import InputError
from tests.compiler.stages.nnunet_folder import write_model_folder
from tests.compiler.test_predict_nnunet import NNUNET_PYTHON, nnunet, predict, scan


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    root = tmp_path_factory.mktemp("ensemble")
    dataset = root / "results" / "Dataset999_Synthetic"
    write_model_folder(dataset / "nnUNetTrainer__nnUNetPlans__3d_fullres", folds=(0,), decisive=8.0)
    write_model_folder(dataset / "nnUNetTrainer__nnUNetPlans__2d", dims=2, folds=(0,), decisive=8.0)
    (root / "imagesTs").mkdir()
    for seed, name in enumerate(("a", "b")):
        scan(root / "imagesTs" / f"{name}_0000.nii.gz", seed)
    return root


@pytest.fixture
def env(two, monkeypatch):
    monkeypatch.setenv("nnUNet_results", str(two / "results"))
    monkeypatch.setenv("NNSLIM_CACHE", str(two / "cache"))
    return two


def run(env, out, *configurations, extra=()):
    return predict("-i", str(env / "imagesTs"), "-o", str(out), "-d", "999", "-c", *configurations,
                   "--precision", "fp32", *extra)


def ensemble(*args) -> int:
    with pytest.raises(SystemExit) as done:
        ensemble_main([*args, "--disable_progress_bar"])
    return done.value.code


def labels(path):
    return np.asarray(nib.load(path).dataobj)


def test_configurations_are_ensembled_as_nnunet_averages_them(env, tmp_path):
    assert run(env, tmp_path / "3d", "3d_fullres", extra=("--save_probabilities",)) == 0
    assert run(env, tmp_path / "2d", "2d", extra=("--save_probabilities",)) == 0
    assert run(env, tmp_path / "both", "3d_fullres", "2d", extra=("--save_probabilities",)) == 0
    assert ensemble("-i", str(tmp_path / "3d"), str(tmp_path / "2d"), "-o", str(tmp_path / "merged"), "--save_npz") == 0
    assert not [p for p in (tmp_path / "both").iterdir() if p.name.startswith(".nnslim-")]
    for case in ("a", "b"):
        average = (np.load(tmp_path / "3d" / f"{case}.npz")["probabilities"] +
                   np.load(tmp_path / "2d" / f"{case}.npz")["probabilities"]) / 2
        expected = average.argmax(0).transpose(2, 1, 0)  # nnU-Net's [Z, Y, X] -> the file's [X, Y, Z]
        both, merged = labels(tmp_path / "both" / f"{case}.nii.gz"), labels(tmp_path / "merged" / f"{case}.nii.gz")
        assert np.array_equal(both, expected) and np.array_equal(merged, expected)
        assert np.allclose(np.load(tmp_path / "merged" / f"{case}.npz")["probabilities"], average, atol=1e-6)
        assert np.mean(both != labels(tmp_path / "3d" / f"{case}.nii.gz")) > 0  # the 2d model had a say
        written, source = nib.load(tmp_path / "both" / f"{case}.nii.gz"), nib.load(env / "imagesTs" / f"{case}_0000.nii.gz")
        assert np.allclose(written.affine, source.affine) and written.shape == source.shape
    assert (tmp_path / "merged" / "dataset.json").is_file()


def test_the_folders_must_hold_the_same_cases(env, tmp_path, capsys):
    assert run(env, tmp_path / "3d", "3d_fullres", extra=("--save_probabilities",)) == 0
    (tmp_path / "other").mkdir()
    assert ensemble("-i", str(tmp_path / "3d"), str(tmp_path / "other"), "-o", str(tmp_path / "out")) == 1
    assert "the same cases" in capsys.readouterr().err
    assert ensemble("-i", str(tmp_path / "3d"), "-o", str(tmp_path / "3d")) == 1
    assert "one of the input folders" in capsys.readouterr().err


class Payload:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_properties_are_read_without_running_anything(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    props = {"nibabel_stuff": {"original_affine": np.diag([2.0, 1.0, 1.5, 1.0])}, "spacing": [1.5, 1.0, 2.0],
             "shape_before_cropping": (np.int64(20), 22, 24), "bbox_used_for_cropping": [[0, 20], [1, 21], [2, 22]]}
    (tmp_path / "case.pkl").write_bytes(pickle.dumps(props))
    read = read_properties(tmp_path / "case.pkl")
    assert np.array_equal(read["nibabel_stuff"]["original_affine"], props["nibabel_stuff"]["original_affine"])
    assert read["shape_before_cropping"] == (20, 22, 24) and type(read["shape_before_cropping"][0]) is int
    assert np.allclose(geometry(read, "case.pkl").nifti.affine, props["nibabel_stuff"]["original_affine"])
    (tmp_path / "bad.pkl").write_bytes(pickle.dumps({"sitk_stuff": Payload()}))
    with pytest.raises(InputError, match="posix.system|os.system"):
        read_properties(tmp_path / "bad.pkl")
    (tmp_path / "objects.pkl").write_bytes(pickle.dumps({"a": np.array([None, 1], dtype=object)}))
    with pytest.raises(InputError, match="type"):
        read_properties(tmp_path / "objects.pkl")
    assert not (tmp_path / "pwned").exists()
    (tmp_path / "protocol5.pkl").write_bytes(pickle.dumps(props, protocol=5))  # numpy's out-of-band form
    assert np.array_equal(read_properties(tmp_path / "protocol5.pkl")["nibabel_stuff"]["original_affine"],
                          props["nibabel_stuff"]["original_affine"])
    (tmp_path / "zero.pkl").symlink_to("/dev/zero")  # never read to the end
    with pytest.raises(InputError, match="not a regular file"):
        read_properties(tmp_path / "zero.pkl")
    (tmp_path / "set.pkl").write_bytes(pickle.dumps({"spacing": {1.0, 2.0}}))
    with pytest.raises(InputError, match="set"):
        read_properties(tmp_path / "set.pkl")


def with_properties(folder, **changes) -> None:
    """Case a's .pkl in `folder` with some properties changed."""
    props = read_properties(folder / "a.pkl")
    (folder / "a.pkl").write_bytes(pickle.dumps({**props, **changes}))


def npy(array: np.ndarray) -> bytes:
    """An .npy file's bytes (what a user might save under the .npz name)."""
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


@pytest.mark.parametrize("damage, says", [
    (lambda d: with_properties(d, sitk_stuff={"spacing": "abc"}), "finite numbers"),
    (lambda d: with_properties(d, shape_before_cropping=None), "shape_before_cropping is None"),
    (lambda d: d.joinpath("a.npz").write_bytes(npy(np.zeros((3, 4, 4, 4), np.float32))), "not nnU-Net's probabilities"),
    (lambda d: np.savez(d / "a.npz", probabilities=np.zeros((5, 4, 4, 4), np.float32)), "expected float [3"),
])
def test_damaged_prediction_files_are_one_clear_error(env, tmp_path, capsys, damage, says):
    import shutil

    assert run(env, tmp_path / "3d", "3d_fullres", extra=("--save_probabilities",)) == 0
    shutil.copytree(tmp_path / "3d", tmp_path / "damaged")
    damage(tmp_path / "damaged")
    assert ensemble("-i", str(tmp_path / "damaged"), str(tmp_path / "3d"), "-o", str(tmp_path / "out")) == 1
    assert says in capsys.readouterr().err.replace("\n", " ")


@pytest.mark.nnunet
@pytest.mark.skipif(not NNUNET_PYTHON, reason="set NNSLIM_NNUNET_PYTHON to a Python with nnunetv2 (a separate "
                                                "environment: torch==2.13.0 first, then nnunetv2)")
def test_nnunets_ensemble_gives_the_same_labels(env, tmp_path):
    environment = {**os.environ, "nnUNet_raw": str(tmp_path), "nnUNet_preprocessed": str(tmp_path)}
    for configuration in ("3d_fullres", "2d"):
        nnunet("nnunetv2.inference.predict_from_raw_data", "predict_entry_point", "-i", str(env / "imagesTs"), "-o",
               str(tmp_path / f"nnunet_{configuration}"), "-d", "999", "-c", configuration, "-f", "0",
               "--save_probabilities", "-device", "cpu", "-npp", "1", "-nps", "1", env=environment)
        assert run(env, tmp_path / configuration, configuration, extra=("--save_probabilities",)) == 0
    folders = {"nnslim": ("3d_fullres", "2d"), "nnunet": ("nnunet_3d_fullres", "nnunet_2d")}
    for who, (first, second) in folders.items():
        inputs = (str(tmp_path / first), str(tmp_path / second))
        nnunet("nnunetv2.ensembling.ensemble", "entry_point_ensemble_folders", "-i", *inputs, "-o",
               str(tmp_path / f"theirs_{who}"), "-np", "1", env=environment)
        assert ensemble("-i", *inputs, "-o", str(tmp_path / f"ours_{who}")) == 0
        for case in ("a", "b"):  # the same files in, the same labels out, whoever wrote the files
            ours, theirs = (labels(tmp_path / f"{side}_{who}" / f"{case}.nii.gz") for side in ("ours", "theirs"))
            assert np.array_equal(ours, theirs), (who, case, np.mean(ours != theirs))
