"""The real TensorRT Python bindings, importable without a GPU or TensorRT's libraries.

The `tensorrt-cu12-bindings` wheel holds `tensorrt_bindings/tensorrt.so`, a pybind11 module that
needs `libnvinfer.so.N`, `libnvonnxparser.so.N` and `libnvinfer_plugin.so.N` but imports only a
handful of C factory symbols from them (`createInferBuilder_INTERNAL`, ...). This module:

1. downloads the newest wheel of one TensorRT major version once, into `.venv/tensorrt-bindings/`
   (`pip download --no-deps`); a cached wheel is reused, delete the folder to take a newer one;
2. reads the symbols the extension leaves undefined (`nm -D --undefined-only`), keeps those this
   Python process cannot resolve (not Python's C API, not libc), and compiles stand-in libraries
   with gcc under the SONAMEs the extension NEEDS; every stand-in function returns NULL/0;
3. writes a `tensorrt.py` shim that makes `import tensorrt` return the real `tensorrt_bindings`.

`environment(major)` returns the variables for a subprocess (`PYTHONPATH`, `LD_LIBRARY_PATH`).
Every TensorRT class, method, property and enum member is then the real one; only creating a
Builder, Runtime or parser fails, exactly as it does when TensorRT cannot reach a GPU.
"""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CACHE = ROOT / ".venv" / "tensorrt-bindings"
PACKAGE = "tensorrt-cu12-bindings"
UNREACHABLE = re.compile(r"NewConnectionError|Max retries exceeded|Temporary failure in name resolution|"
                         r"Network is unreachable|ConnectionError|ProxyError|Name or service not known|timed out")


class IndexUnreachable(RuntimeError):
    """The package index could not be reached (the one reason the bindings test may skip)."""


def wheel(major: int) -> Path:
    """The cached bindings wheel of TensorRT `major`, downloaded on first use."""
    folder = CACHE / "wheels" / str(major)
    cached = sorted(folder.glob("*.whl"))
    if cached:
        return cached[-1]
    with tempfile.TemporaryDirectory() as tmp:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
                   "-d", tmp, f"{PACKAGE}=={major}.*"]
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=600)
        except subprocess.TimeoutExpired as exc:
            raise IndexUnreachable(f"pip download {PACKAGE}=={major}.* timed out") from exc
        if result.returncode != 0:
            if UNREACHABLE.search(result.stderr + result.stdout):
                raise IndexUnreachable(f"the package index cannot be reached: {result.stderr.strip()[-300:]}")
            raise RuntimeError(f"pip download {PACKAGE}=={major}.* failed:\n{result.stderr[-2000:]}")
        (downloaded,) = Path(tmp).glob("*.whl")
        folder.mkdir(parents=True, exist_ok=True)
        shutil.move(str(downloaded), folder / downloaded.name)
    return folder / downloaded.name


def _extract(wheel_path: Path) -> Path:
    target = CACHE / wheel_path.stem / "site"
    if not (target / "tensorrt_bindings").is_dir():
        staging = Path(tempfile.mkdtemp(dir=CACHE))
        with zipfile.ZipFile(wheel_path) as archive:
            archive.extractall(staging)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)
    return target


def _tool(command: list[str]) -> str:
    return subprocess.run(command, capture_output=True, text=True, check=True).stdout


def foreign_symbols(extension: Path) -> list[str]:
    """Undefined symbols of `extension` that neither Python nor libc provides (TensorRT's)."""
    this_process = ctypes.CDLL(None)
    names = []
    for line in _tool(["nm", "-D", "--undefined-only", str(extension)]).splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] == "U" and "@" not in parts[1] and not hasattr(this_process, parts[1]):
            names.append(parts[1])
    return sorted(names)


def needed_tensorrt_libraries(extension: Path) -> list[str]:
    """The NEEDED entries of `extension` that are TensorRT's (libnvinfer*.so.N, libnvonnxparser.so.N)."""
    needed = re.findall(r"\(NEEDED\).*\[(.+)\]", _tool(["readelf", "-d", str(extension)]))
    return [name for name in needed if name.startswith(("libnvinfer", "libnvonnxparser"))]


def _stand_ins(extension: Path, folder: Path) -> None:
    """Compile the stand-in libraries (all symbols go into the first; the loader searches every
    NEEDED library, so which one exports a symbol does not matter)."""
    if folder.is_dir():
        return
    staging = Path(tempfile.mkdtemp(dir=CACHE))
    source = staging / "stand_in.c"
    source.write_text("".join(f"void *{name}(void) {{ return 0; }}\n" for name in foreign_symbols(extension)))
    empty = staging / "empty.c"
    empty.write_text("int nnslim_tensorrt_stand_in;\n")
    for index, soname in enumerate(needed_tensorrt_libraries(extension)):
        subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(staging / soname), f"-Wl,-soname,{soname}",
                        str(source if index == 0 else empty)], check=True, capture_output=True)
    staging.rename(folder)


def environment(major: int) -> dict[str, str]:
    """Environment for a subprocess in which `import tensorrt` is the real bindings of `major`."""
    wheel_path = wheel(major)
    site = _extract(wheel_path)
    (extension,) = (site / "tensorrt_bindings").glob("tensorrt*.so")
    libraries = CACHE / wheel_path.stem / "stand-ins"
    _stand_ins(extension, libraries)
    shim = CACHE / wheel_path.stem / "shim"
    if not (shim / "tensorrt.py").is_file():
        shim.mkdir(parents=True, exist_ok=True)
        (shim / "tensorrt.py").write_text("import sys\n\nimport tensorrt_bindings\n\nsys.modules[__name__] = tensorrt_bindings\n")
    version = wheel_path.name.split("-")[1]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(site), str(shim), str(ROOT)])
    env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [str(libraries), env.get("LD_LIBRARY_PATH", "")]))
    env["NNSLIM_EXPECT_TENSORRT"] = f"{version}:{site}"
    return env


if __name__ == "__main__":  # pre-fetch: python -m tests.compiler.tensorrt_wheels
    for wanted in (10, 11):
        print(wheel(wanted))
