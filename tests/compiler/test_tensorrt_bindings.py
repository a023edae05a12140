"""nnslim's TensorRT code against the REAL TensorRT Python bindings of 10.x and 11.x, without a GPU.

For each major version the newest `tensorrt-cu12-bindings` wheel is downloaded once into
`.venv/tensorrt-bindings/` and imported against stand-in C libraries (`tensorrt_wheels.py`);
`tensorrt_bindings_checks.py` then runs in that subprocess. It proves that every TensorRT name
nnslim uses exists in that version with a signature the call fits, and that nnslim's control flow
(build, plan loading, the predictor's stream ordering, error mapping) drives the real classes
correctly. It does not run a kernel: numerics and speed need a GPU (the `gpu` tier).

Skips only when the package index cannot be reached and no wheel is cached.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.compiler import tensorrt_wheels

CHECKS = Path(__file__).with_name("tensorrt_bindings_checks.py")


@pytest.mark.parametrize("major", [10, 11])
def test_nnslim_against_the_real_tensorrt_bindings(major):
    try:
        env = tensorrt_wheels.environment(major)
    except tensorrt_wheels.IndexUnreachable as exc:
        pytest.skip(f"cannot fetch tensorrt-cu12-bindings=={major}.*: {exc}")
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", str(CHECKS)],
                            env=env, cwd=tensorrt_wheels.ROOT, capture_output=True, text=True, timeout=300)
    report = result.stdout[-6000:] + result.stderr[-2000:]
    assert result.returncode == 0, f"TensorRT {major}.x checks failed:\n{report}"
    assert "skipped" not in result.stdout.splitlines()[-1], f"a check skipped against the real bindings:\n{report}"
    passed = re.search(r"(\d+) passed", result.stdout)
    assert passed and int(passed.group(1)) >= 8, report


def test_stand_ins_cover_exactly_the_symbols_the_bindings_import():
    try:
        env = tensorrt_wheels.environment(11)
    except tensorrt_wheels.IndexUnreachable as exc:
        pytest.skip(f"cannot fetch the bindings wheel: {exc}")
    site = Path(env["PYTHONPATH"].split(":")[0])
    (extension,) = (site / "tensorrt_bindings").glob("tensorrt*.so")
    symbols = tensorrt_wheels.foreign_symbols(extension)
    assert "createInferBuilder_INTERNAL" in symbols and "createNvOnnxParser_INTERNAL" in symbols
    assert not [s for s in symbols if s.startswith(("Py", "_Py", "pthread", "dl"))], symbols
    assert sorted(tensorrt_wheels.needed_tensorrt_libraries(extension)) == [
        "libnvinfer.so.11", "libnvinfer_plugin.so.11", "libnvonnxparser.so.11"]
