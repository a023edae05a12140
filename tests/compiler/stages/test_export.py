from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from nnslim.compiler.stages.export import ExportError, ExportSettings, export_onnx
from tests.conftest import random_model


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = random_model()
    model.set_deep_supervision(True)  # export must drop the training-only heads
    path = tmp_path_factory.mktemp("export") / "m.onnx"
    proto = export_onnx(model, path, ExportSettings(patch_size=(16, 16, 16), in_channels=1))
    model.set_deep_supervision(False)
    return model, path, proto


def test_graph_io_and_ops(exported):
    _, _, proto = exported
    onnx.checker.check_model(proto, full_check=True)
    assert proto.ir_version <= 10
    assert [i.name for i in proto.graph.input] == ["image"]
    assert [o.name for o in proto.graph.output] == ["logits"]  # one output: no deep-supervision heads
    dims = [d.dim_param or d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
    assert isinstance(dims[0], str) and dims[1:] == [1, 16, 16, 16]
    ops = Counter(n.op_type for n in proto.graph.node)
    # 3 stages x 2 convs + 2 decoder convs + 1 head; one norm per conv unit
    assert ops["Conv"] == 9 and ops["ConvTranspose"] == 2 and ops["InstanceNormalization"] == 8
    assert "BatchNormalization" not in ops


@pytest.mark.parametrize("batch", [1, 3])
def test_onnx_runtime_matches_pytorch_for_any_batch(exported, batch):
    model, path, _ = exported
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.randn(batch, 1, 16, 16, 16)
    with torch.no_grad():
        expected = model(x).numpy()
    (got,) = session.run(None, {"image": x.numpy()})
    assert got.shape == (batch, 3, 16, 16, 16)
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4)


def test_old_opset_is_refused(tmp_path):
    with pytest.raises(ExportError, match="opset 13 is too old"):
        export_onnx(random_model(), tmp_path / "m.onnx", ExportSettings((16, 16, 16), 1, opset=13))
