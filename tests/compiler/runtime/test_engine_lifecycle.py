"""One engine shared by threads, closed, and handed to another process (issue 28, part 1).

- Every CPU backend x precision: 4 threads calling one predictor at once get exactly the logits
  one thread gets (OpenVINO used to fail with "Infer Request is busy": one request per engine).
- A whole engine: 4 threads x 2 volumes each on one `Engine` give the single-threaded labels.
- `close()` and `with load_engine(...)`: a closed engine refuses clearly.
- Pickling: the engine travels as its directory plus options and is verified again when opened;
  a real second process (multiprocessing, spawn) segments with it.
"""

from __future__ import annotations

import multiprocessing
import pickle
import shutil
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from nnslim.compiler.runtime.backends import OpenRequest, open_predictor, runs
from nnslim.compiler.runtime.engine import load_engine
from nnslim.errors import EngineError

CPU_PAIRS = [(b, p) for b in ("onnxruntime", "openvino") for p in ("fp32", "fp16", "bf16", "int8")]


@pytest.mark.parametrize("backend, precision", CPU_PAIRS, ids=[f"{b}-{p}" for b, p in CPU_PAIRS])
def test_four_threads_on_one_predictor_get_the_single_threaded_logits(demo_graphs, backend, precision):
    if not runs(backend, precision):
        pytest.skip(f"{backend} does not run {precision} on this machine")
    graph = {"fp16": demo_graphs.fp16, "int8": demo_graphs.int8}.get(precision, demo_graphs.fp32)
    predict = open_predictor(backend, OpenRequest(graph, precision=precision, threads=1))
    tiles = [demo_graphs.tiles[i:i + 1] for i in range(8)]
    alone = [predict(t) for t in tiles]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(predict, tiles * 2))
    for i, logits in enumerate(together):
        np.testing.assert_array_equal(logits, alone[i % 8])


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_four_threads_two_volumes_each_on_one_engine(tiny_engine, backend):
    rng = np.random.default_rng(0)
    volumes = [rng.normal(100, 20, (40 + 4 * i, 36, 44)).astype(np.float32) for i in range(8)]
    with load_engine(tiny_engine, backend=backend, precision="fp32") as engine:
        alone = [engine.segment(v, "engine") for v in volumes]
        with ThreadPoolExecutor(4) as pool:
            together = list(pool.map(lambda v: engine.segment(v, "engine"), volumes))
    for a, b in zip(alone, together):
        np.testing.assert_array_equal(a, b)


def test_a_closed_engine_refuses_clearly(tiny_engine):
    with load_engine(tiny_engine, backend="openvino") as engine:
        assert engine.segment(np.ones((20, 20, 20), np.float32), "engine").shape == (20, 20, 20)
    assert engine.closed
    with pytest.raises(EngineError, match="was closed; open it again with load_engine"):
        engine.segment(np.ones((20, 20, 20), np.float32), "engine")
    engine.close()  # twice is fine


def test_an_engine_pickles_as_its_directory_and_options_and_is_verified_again(tiny_engine, tmp_path):
    copy = tmp_path / "engine"
    shutil.copytree(tiny_engine, copy)
    engine = load_engine(copy, backend="openvino", threads=1)
    data = pickle.dumps(engine)
    assert len(data) < 4096 and b"model.opt.onnx" not in data  # options, not the model
    again = pickle.loads(data)
    assert again.runtime == engine.runtime and again.opened_with == engine.opened_with
    volume = np.random.default_rng(1).normal(100, 20, (24, 24, 24)).astype(np.float32)
    np.testing.assert_array_equal(again.segment(volume, "engine"), engine.segment(volume, "engine"))
    model = copy / engine.manifest.runtime_model
    model.write_bytes(model.read_bytes()[:-8] + b"\0" * 8)
    from nnslim.compiler.runtime.manifest import TamperedEngineError

    with pytest.raises(TamperedEngineError):
        pickle.loads(data)


def _segment_in_child(engine, volume):
    return engine.segment(volume, "engine")


def test_another_process_segments_with_a_pickled_engine(tiny_engine):
    engine = load_engine(tiny_engine, backend="onnxruntime", threads=1)
    volume = np.random.default_rng(2).normal(100, 20, (24, 24, 24)).astype(np.float32)
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        labels = pool.apply(_segment_in_child, (engine, volume))
    np.testing.assert_array_equal(labels, engine.segment(volume, "engine"))


def test_a_hand_assembled_engine_says_why_it_cannot_be_pickled(tiny_engine):
    from nnslim.compiler.runtime.engine import Engine

    engine = load_engine(tiny_engine, backend="onnxruntime")
    manual = Engine(engine.directory, engine.manifest, engine.spec, engine.predictor)
    with pytest.raises(EngineError, match="cannot be pickled"):
        pickle.dumps(manual)
