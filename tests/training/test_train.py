import nibabel as nib
import numpy as np
import pytest
import torch

from nnslim.training.checkpoint import load_model, read_checkpoint
from nnslim.training.train import FINAL, LATEST, TrainConfig, train


@pytest.fixture(scope="module")
def raw_dataset(tmp_path_factory):
    """A 3-case raw-layout dataset of bright spheres in noise (label 1) on a darker shell (label 2)."""
    import json

    root = tmp_path_factory.mktemp("raw")
    (root / "imagesTr").mkdir()
    (root / "labelsTr").mkdir()
    rng = np.random.default_rng(0)
    grid = np.indices((24, 24, 24)).transpose(1, 2, 3, 0)
    for i in range(3):
        centre = rng.uniform(9, 15, 3)
        distance = np.linalg.norm(grid - centre, axis=-1)
        label = np.where(distance < 5, 1, np.where(distance < 8, 2, 0)).astype(np.uint8)
        image = (label * 50.0 + 20 + rng.normal(0, 5, label.shape)).astype(np.float32)
        nib.save(nib.Nifti1Image(image, np.eye(4)), root / "imagesTr" / f"case{i}_0000.nii.gz")
        nib.save(nib.Nifti1Image(label, np.eye(4)), root / "labelsTr" / f"case{i}.nii.gz")
    (root / "dataset.json").write_text(json.dumps(
        {"channel_names": {"0": "MR"}, "labels": {"background": 0, "core": 1, "shell": 2}, "file_ending": ".nii.gz"}))
    return root


def _config(raw_dataset, out, **overrides):
    fields = dict(preset="tiny", dataset=str(raw_dataset), out_dir=str(out), epochs=2, iterations_per_epoch=2,
                  batch_size=2, patch_size=(16, 16, 16), validate_every=1)
    fields.update(overrides)
    return TrainConfig(**fields)


def test_training_writes_a_loadable_checkpoint_with_validation(raw_dataset, tmp_path):
    result = train(_config(raw_dataset, tmp_path))
    assert result.checkpoint == tmp_path / FINAL
    model, meta = load_model(result.checkpoint)
    assert model.config.deep_supervision is False
    assert meta["label_names"] == ["background", "core", "shell"]
    assert meta["training"]["epochs_done"] == 2
    assert 0.0 <= result.final_validation_dice <= 1.0
    assert model(torch.zeros(1, 1, 16, 16, 16)).shape == (1, 3, 16, 16, 16)


class Interrupt(Exception):
    pass


def test_resume_after_an_interruption_gives_the_same_weights(raw_dataset, tmp_path):
    straight = train(_config(raw_dataset, tmp_path / "straight"))

    def stop_in_second_epoch(event):
        if event["epoch"] == 1:
            raise Interrupt

    interrupted = tmp_path / "interrupted"
    with pytest.raises(Interrupt):
        train(_config(raw_dataset, interrupted), on_iteration=stop_in_second_epoch)
    assert (interrupted / LATEST).is_file() and not (interrupted / FINAL).exists()
    resumed = train(_config(raw_dataset, interrupted, resume=True))
    a = read_checkpoint(straight.checkpoint)["state_dict"]
    b = read_checkpoint(resumed.checkpoint)["state_dict"]
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [h["epoch"] for h in resumed.history] == [0, 1]
