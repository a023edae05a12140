"""The CLI end to end on a small model: build an engine, segment real MNI crops, evaluate."""

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner

from nnslim.compiler.cli import cli

COMMANDS = ["prepare-dataset", "train", "build-engine", "infer", "evaluate", "inspect", "prune-sweep", "export-triton",
            "pseudo-label", "bench"]


def run(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    return result


@pytest.mark.parametrize("command", [[]] + [[c] for c in COMMANDS])
def test_help_shows_a_real_example(command):
    result = run(*command, "--help")
    assert result.exit_code == 0
    assert "nnslim " in result.output.split("Example")[-1]


def test_build_infer_evaluate(checkpoint_path, small_volume, tmp_path):
    engine = tmp_path / "engine"
    result = run("build-engine", checkpoint_path, "--out", engine, "--parity-volume", small_volume, "--batch", "3")
    assert result.exit_code == 0, result.output
    assert "argmax agreement" in result.output

    seg = tmp_path / "seg.nii.gz"
    result = run("infer", engine, small_volume, "-o", seg, "--no-progress")
    assert result.exit_code == 0, result.output
    written, source = nib.load(seg), nib.load(small_volume)
    assert written.shape == source.shape == (37, 41, 29)
    np.testing.assert_array_equal(written.affine, source.affine)
    assert set(np.unique(np.asarray(written.dataobj))) <= {0, 1, 2}

    seg_torch = tmp_path / "seg_torch.nii.gz"
    result = run("infer", engine, small_volume, "-o", seg_torch, "--torch-checkpoint", checkpoint_path, "--no-progress")
    assert result.exit_code == 0, result.output
    result = run("evaluate", seg, seg_torch, "--labels-from", engine, "--json", tmp_path / "parity.json")
    assert result.exit_code == 0, result.output
    import json

    figures = json.loads((tmp_path / "parity.json").read_text())
    assert figures["agreement"] >= 0.999  # ONNX Runtime engine vs PyTorch over the whole volume


def test_mirror_and_folder_input(engine_dir, small_volume, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    image = nib.load(small_volume)
    nib.save(image, folder / "a_0000.nii.gz")
    nib.save(nib.Nifti1Image(np.asarray(image.dataobj)[:10, :12, :8], image.affine), folder / "tiny_0000.nii.gz")
    result = run("infer", engine_dir, folder, "-o", tmp_path / "out", "--tta", "--no-progress")
    assert result.exit_code == 0, result.output
    assert nib.load(tmp_path / "out" / "a.nii.gz").shape == (37, 41, 29)
    assert nib.load(tmp_path / "out" / "tiny.nii.gz").shape == (10, 12, 8)  # smaller than the patch: padded


def test_bad_inputs_give_one_clear_error(engine_dir, checkpoint_path, tmp_path):
    nan = np.ones((20, 20, 20), dtype=np.float32)
    nan[3, 3, 3] = np.nan
    nib.save(nib.Nifti1Image(nan, np.eye(4)), tmp_path / "nan.nii.gz")
    result = run("infer", engine_dir, tmp_path / "nan.nii.gz", "-o", tmp_path / "o.nii.gz")
    assert result.exit_code == 1 and "NaN" in result.output
    assert not (tmp_path / "o.nii.gz").exists()

    nib.save(nib.Nifti1Image(np.ones((20, 20, 20, 2), np.float32), np.eye(4)), tmp_path / "two.nii.gz")
    result = run("infer", engine_dir, tmp_path / "two.nii.gz", "-o", tmp_path / "o.nii.gz")
    assert result.exit_code == 1 and "gives 2 channel(s) but the model expects 1" in result.output

    result = run("infer", engine_dir, tmp_path / "missing.nii.gz", "-o", tmp_path / "o.nii.gz")
    assert result.exit_code == 2 and "does not exist" in result.output

    truncated = tmp_path / "cut.pt"
    truncated.write_bytes(checkpoint_path.read_bytes()[:4096])
    result = run("build-engine", truncated, "--out", tmp_path / "e")
    assert result.exit_code == 1 and "truncated, corrupt" in result.output
    assert not (tmp_path / "e").exists()

    result = run("build-engine", checkpoint_path, "--out", tmp_path / "e", "--backend", "tensorrt")
    assert result.exit_code == 1 and "--backend onnxruntime" in result.output


def test_cli_preset_list_matches_the_presets():
    from nnslim.compiler.cli import PRESET_NAMES
    from nnslim.training.config import PRESETS

    assert sorted(PRESET_NAMES) == sorted(PRESETS)


def test_build_engine_prunes_after_fusing(checkpoint_path, small_volume, tmp_path):
    import json

    result = run("build-engine", checkpoint_path, "--out", tmp_path / "p", "--prune-sparsity", "0.7")
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "p" / "manifest.json").read_text())
    names = [s["name"] for s in manifest["stages"]]
    assert names.index("reparameterize") < names.index("prune") < names.index("export")
    assert manifest["model"]["conv_weight_sparsity"] == pytest.approx(0.7, abs=0.01)
    size = manifest["model"]["runtime_model_size"]
    assert size["compressed_bytes"] < 0.6 * size["bytes"]  # zeros compress
    assert "conv sparsity     70" in run("inspect", tmp_path / "p").output

    result = run("build-engine", checkpoint_path, "--out", tmp_path / "s", "--prune-structured", "0.5",
                 "--finetune-steps", "2", "--finetune-dataset", "mni-tissue")
    assert result.exit_code == 0, result.output
    pruning = json.loads((tmp_path / "s" / "manifest.json").read_text())["model"]["pruning"]
    assert pruning["structured"]["widths_after"]["encoder.stages.2.0.convs.1"] == 8
    assert pruning["finetune"]["steps"] == 2

    result = run("build-engine", checkpoint_path, "--out", tmp_path / "x", "--prune-sparsity", "0.5", "--prune-threshold", "0.1")
    assert result.exit_code == 2 and "alternatives" in result.output
    result = run("build-engine", checkpoint_path, "--out", tmp_path / "x", "--finetune-steps", "3")
    assert result.exit_code == 2 and "needs --prune-structured" in result.output


def test_prune_sweep_cli(checkpoint_path, small_volume, tmp_path):
    result = run("prune-sweep", checkpoint_path, "--volume", small_volume, "--sparsities", "0,0.5",
                 "--out", tmp_path / "sweep", "--no-progress")
    assert result.exit_code == 0, result.output
    assert "largest sparsity at proxy Dice >= 0.95" in result.output
    assert (tmp_path / "sweep" / "sweep.png").is_file()
    result = run("prune-sweep", checkpoint_path, "--volume", small_volume, "--sparsities", "a,b", "--out", tmp_path / "x")
    assert result.exit_code == 2 and "comma-separated" in result.output


def test_train_command_writes_a_checkpoint_build_engine_accepts(mni_raw, tmp_path):
    result = run("train", "--preset", "tiny", "--dataset", mni_raw, "--out", tmp_path / "run", "--epochs", "1",
                 "--iterations-per-epoch", "2", "--patch", "32", "32", "32", "--no-progress")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "run" / "checkpoint_final.pt").is_file() and (tmp_path / "run" / "history.json").is_file()
    result = run("train", "--preset", "nope", "--dataset", mni_raw, "--out", tmp_path / "x")
    assert result.exit_code == 2 and "nope" in result.output
    result = run("train", "--preset", "tiny", "--dataset", tmp_path / "missing", "--out", tmp_path / "x")
    assert result.exit_code == 1 and "no such folder" in result.output
