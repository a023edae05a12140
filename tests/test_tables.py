"""Every name lives in one table: the CLI's choices are the tables, and a backend or a precision
registered in its table is accepted end to end with no other edit.

The toy backend ("toyrt") is a real ONNX Runtime CPU session behind a new name; the toy precision
("toy16") has its own graph, made by its own producer from the optimized fp32 graph (here: the
same graph, recorded under a new file name). Registering both in the tables (and nothing else) is
enough for `build-engine` to check, time and choose the candidate, for the manifest to record and
verify it, for `infer` to run it, and for `export-triton` to package it.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from nnslim.compiler.cli import cli
from nnslim.compiler.cli.options import TableChoice
from nnslim.compiler.runtime.backends import BACKENDS, Backend, OpenRequest
from nnslim.compiler.runtime.backends.devices import DEVICE_CHOICES
from nnslim.compiler.runtime.precision import PRECISIONS, Precision
from nnslim.compiler.runtime.volumes.readers import READERS
from nnslim.compiler.runtime.window.blending import BLENDING_MODES
from nnslim.compiler.runtime.window.selection import SKIP_MODES


def _choices(command: str, option: str) -> tuple[str, ...]:
    param = next(p for p in cli.commands[command].params if f"--{option}" in p.opts)
    assert isinstance(param.type, TableChoice), f"{command} --{option} is not read from its table"
    return tuple(param.type.choices)


def test_every_cli_choice_list_is_its_table():
    named = tuple(n for n in BACKENDS if n not in {b.gpu_twin for b in BACKENDS.values()})  # twins: --device cuda
    assert _choices("build-engine", "backend") == ("auto", *named)
    assert _choices("build-engine", "precision") == ("auto", *PRECISIONS)
    assert _choices("infer", "backend") == named
    assert _choices("infer", "precision") == tuple(PRECISIONS)
    assert _choices("infer", "skip") == tuple(SKIP_MODES)
    assert _choices("infer", "device") == DEVICE_CHOICES
    assert _choices("infer", "blending") == BLENDING_MODES
    assert _choices("bench", "skip") == tuple(m for m in SKIP_MODES if m != "none")


def test_no_plain_choice_spells_out_a_table_name():
    """A `click.Choice` written out by hand would drift from the table it copies."""
    names = {*BACKENDS, *PRECISIONS, *SKIP_MODES, *DEVICE_CHOICES, *BLENDING_MODES, *READERS}
    for command in cli.commands.values():
        for param in command.params:
            if isinstance(param.type, click.Choice) and not isinstance(param.type, TableChoice):
                copied = set(param.type.choices) & names
                assert not copied, f"{command.name} {param.opts}: {sorted(copied)} come from a table"


def _open_toy(request: OpenRequest):
    from nnslim.compiler.runtime.backends.onnx_runtime import OnnxRuntimePredictor

    return OnnxRuntimePredictor(request.model_path, request.input_name, request.output_name, threads=request.threads)


def toy_graph(job):
    """The toy precision's producer: its graph is the fp32 graph under its own name."""
    out = job.staging / "model.toy16.onnx"
    shutil.copyfile(job.fp32, out)
    return out, {"made_from": job.fp32.name}


TOY_BACKEND = Backend("toyrt", "cpu", "onnx", lambda: True, lambda: ("fp32", "toy16"), _open_toy)
TOY_PRECISION = Precision("toy16", "toy16", 1e-2, 0.999, None, "the toy graph", producer=f"{__name__}:toy_graph")


@pytest.fixture
def toy_tables(monkeypatch):
    monkeypatch.setitem(BACKENDS, "toyrt", TOY_BACKEND)
    monkeypatch.setitem(PRECISIONS, "toy16", TOY_PRECISION)


def test_a_toy_backend_and_precision_go_through_build_infer_and_triton(toy_tables, checkpoint_path, small_volume,
                                                                        tmp_path):
    from nnslim.compiler.stages.candidates import Candidate, plan_candidates

    assert Candidate("toyrt", "toy16") in plan_candidates("auto", "auto", calibrated=False)[0]  # candidate selection
    engine = tmp_path / "engine"
    built = CliRunner().invoke(cli, ["build-engine", str(checkpoint_path), "--out", str(engine), "--backend", "toyrt",
                                     "--precision", "toy16", "--parity-volume", str(small_volume)])
    assert built.exit_code == 0, built.output
    manifest = json.loads((engine / "manifest.json").read_text())
    assert (manifest["backend"], manifest["precision"], manifest["runtime_model"]) == ("toyrt", "toy16",
                                                                                        "model.toy16.onnx")
    assert manifest["selection"]["models"] == {"fp32": "model.opt.onnx", "toy16": "model.toy16.onnx"}
    assert "model.toy16.onnx" in manifest["files"]
    assert next(s for s in manifest["stages"] if s["name"] == "toy16")["made_from"] == "model.opt.onnx"

    seg = tmp_path / "seg.nii.gz"
    ran = CliRunner().invoke(cli, ["infer", str(engine), str(small_volume), "-o", str(seg), "--no-progress",
                                   "--device", "cpu"])
    assert ran.exit_code == 0 and "toyrt toy16 engine on cpu" in ran.output, ran.output
    assert seg.is_file()

    exported = CliRunner().invoke(cli, ["export-triton", str(engine), str(tmp_path / "repo"), "--kind", "KIND_CPU"])
    assert exported.exit_code == 0, exported.output
    config = (tmp_path / "repo" / "engine" / "config.pbtxt").read_text()
    assert 'platform: "onnxruntime_onnx"' in config  # from the toy backend's model kind
    assert (tmp_path / "repo" / "engine" / "1" / "model.onnx").read_bytes() == (engine / "model.toy16.onnx").read_bytes()


def test_without_the_table_entries_the_same_engine_is_refused_cleanly(checkpoint_path, tmp_path, monkeypatch):
    """The toy is real: the names are unknown until registered (and nothing else knows them)."""
    refused = CliRunner().invoke(cli, ["build-engine", str(checkpoint_path), "--out", str(tmp_path / "e"),
                                       "--backend", "toyrt"])
    assert refused.exit_code == 2 and "'toyrt' is not one of" in refused.output
    monkeypatch.setitem(BACKENDS, "toyrt", dataclasses.replace(TOY_BACKEND, available=lambda: False))
    unavailable = CliRunner().invoke(cli, ["build-engine", str(checkpoint_path), "--out", str(tmp_path / "e"),
                                           "--backend", "toyrt", "--precision", "fp32"])
    assert unavailable.exit_code == 1 and "toyrt: not installed here" in unavailable.output
    assert not Path(tmp_path / "e").exists()
