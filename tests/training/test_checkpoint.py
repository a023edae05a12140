import pytest
import torch

from tests.conftest import metadata, random_model
from nnslim.training.checkpoint import CheckpointError, load_model, read_checkpoint, save_checkpoint


def test_round_trip_is_exact_and_weights_only(tmp_path):
    model = random_model()
    path = save_checkpoint(tmp_path / "m.pt", model, {**metadata(), "version": torch.__version__})
    raw = torch.load(path, weights_only=True)  # plain data only, nothing pickled by class
    assert raw["format"] == "nnslim.checkpoint" and raw["architecture"]["name"] == "unet3d"
    loaded, meta = load_model(path)
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    assert meta["label_names"] == ["background", "grey_matter", "white_matter"]
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]  # atomic: no temp file left


def test_truncated_checkpoint(tmp_path, checkpoint_path):
    path = tmp_path / "cut.pt"
    path.write_bytes(checkpoint_path.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="truncated, corrupt"):
        read_checkpoint(path)


def test_arbitrary_pickle_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"format": "nnslim.checkpoint", "payload": torch.nn.ReLU()}, path)
    with pytest.raises(CheckpointError, match="Unsupported global"):
        read_checkpoint(path)


def test_foreign_and_missing_checkpoints(tmp_path):
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not an nnslim checkpoint"):
        read_checkpoint(tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not found"):
        read_checkpoint(tmp_path / "absent.pt")


def test_weights_that_do_not_match_the_architecture(tmp_path, checkpoint_path):
    payload = read_checkpoint(checkpoint_path)
    payload["architecture"]["config"]["features_per_stage"] = [4, 8, 32]
    torch.save(payload, tmp_path / "mismatch.pt")
    with pytest.raises(CheckpointError, match="do not match the architecture"):
        load_model(tmp_path / "mismatch.pt")
