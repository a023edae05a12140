"""Hostile-input rows from an independent review of issue 30's fixes (variants the first round missed).

Each was a silent wrong answer, lost data or a crash before its fix:
- a detached header's voxel file (`.mhd` -> `.raw`) is an input: `--out --overwrite` and
  `evaluate --json` may not replace it; `--json` may not land inside the `--labels-from` engine;
- `--log-jsonl` to a pipe, a device or a dangling link is refused before any work;
- `--device cuda` with a CPU-only backend, calibration options for a precision that is not
  calibrated: usage errors;
- control characters in `-o` or in label names cannot forge lines of output;
- an nnU-Net plan whose CT clip range is inverted (every voxel one value) is refused;
- export-triton may not write its repository into the engine directory;
- a sheared NIfTI's labels are not written as .mha (a direction its readers refuse), only as NIfTI.
"""

from __future__ import annotations

import os

import pytest

from tests.test_bad_input import Case, TINY_MODEL, labels, run_in_process, scan
from tests.test_bad_input_errors import _build_nnunet, _tiny_checkpoint

FAST = ["--patch", "32", "32", "32", "--parity-tiles", "1", "--precision", "fp32"]


def _mhd(folder, raw_folder, name="p"):
    """A MetaImage header in `folder` whose voxels live in `raw_folder/name.raw` (a detached data file)."""
    import numpy as np

    folder.mkdir(exist_ok=True)
    raw_folder.mkdir(exist_ok=True)
    data = np.random.default_rng(0).normal(100, 20, (24, 24, 24)).astype(np.float32)
    (raw_folder / f"{name}.raw").write_bytes(data.tobytes())
    relative = os.path.relpath(raw_folder / f"{name}.raw", folder)
    (folder / f"{name}.mhd").write_text("ObjectType = Image\nNDims = 3\nDimSize = 24 24 24\nElementSpacing = 1 1 1\n"
                                        f"ElementType = MET_FLOAT\nElementDataFile = {relative}\n")
    return folder / f"{name}.mhd"


def _labels_mhd(root):
    import numpy as np

    data = (np.arange(8 ** 3) % 3).astype(np.uint8)
    (root / "pm.raw").write_bytes(data.tobytes())
    (root / "pm.mhd").write_text("ObjectType = Image\nNDims = 3\nDimSize = 8 8 8\nElementSpacing = 1 1 1\n"
                                 "ElementType = MET_UCHAR\nElementDataFile = pm.raw\n")
    return root / "pm.mhd"


def _fifo(path):
    os.mkfifo(path)
    return path


def _dangling(link, target):
    link.symlink_to(target)
    return link


def _sheared(root):
    """A NIfTI scan whose affine is sheared (legal in NIfTI: gantry-tilted CT)."""
    import nibabel as nib
    import numpy as np

    affine = np.eye(4)
    affine[0, 1] = 0.5
    data = np.random.default_rng(0).normal(100, 20, (20, 20, 20)).astype(np.float32)
    nib.save(nib.Nifti1Image(data, affine), root / "shear.nii.gz")
    return root / "shear.nii.gz"


def _newline_labels(payload):
    payload["metadata"]["label_names"] = ["background", "grey\nmatter", "white"]


def _inverted_clip(plans):
    stats = plans["foreground_intensity_properties_per_channel"]["0"]
    stats["percentile_00_5"], stats["percentile_99_5"] = 300.0, -100.0
    plans["configurations"]["3d_fullres"]["normalization_schemes"] = ["CTNormalization"]


CASES = [
    Case("build --overwrite, --out holds the .raw of the parity .mhd",
         lambda r, e: ["build-engine", TINY_MODEL, "--out", r / "work", "--overwrite", *FAST, "--parity-volume",
                       _mhd(r / "mhd", r / "work")], 1, "contains"),
    Case("evaluate --json is the prediction's .raw",
         lambda r, e: ["evaluate", _labels_mhd(r), labels(r / "gt.nii.gz"), "--json", r / "pm.raw"], 1,
         "voxel data (pm.raw) of the prediction"),
    Case("evaluate --json inside the --labels-from engine",
         lambda r, e: ["evaluate", labels(r / "seg.nii.gz"), labels(r / "gt.nii.gz"), "--labels-from", e, "--json",
                       e / "manifest.json"], 1, "inside the engine directory"),
    Case("--log-jsonl is a FIFO", lambda r, e: ["infer", e, scan(r / "s.nii.gz"), "-o", r / "seg.nii.gz",
                                                "--log-jsonl", _fifo(r / "log.fifo")], 1, "not a regular file"),
    Case("--log-jsonl is /dev/null", lambda r, e: ["infer", e, scan(r / "s.nii.gz"), "-o", r / "seg.nii.gz",
                                                   "--log-jsonl", "/dev/null"], 1, "not a regular file"),
    Case("--log-jsonl is a dangling link", lambda r, e: ["infer", e, scan(r / "s.nii.gz"), "-o", r / "seg.nii.gz",
                                                         "--log-jsonl", _dangling(r / "l.jsonl", r / "scans/x.nii.gz")],
         1, "which does not exist"),
    Case("--device cuda --backend openvino", lambda r, e: ["infer", e, scan(r / "s.nii.gz"), "-o", r / "seg.nii.gz",
                                                           "--device", "cuda", "--backend", "openvino"], 2,
         "runs on the CPU only"),
    Case("--calibration with --precision fp32",
         lambda r, e: ["build-engine", TINY_MODEL, "--out", r / "e2", *FAST, "--calibration", scan(r / "c.nii.gz")], 2,
         "is not calibrated"),
    Case("-o with a newline", lambda r, e: ["infer", e, scan(r / "s.nii.gz"), "-o",
                                            r / "z\nc9: forged.nii.gz shape OK.nii.gz"], 1, "control characters"),
    Case("label name with a newline", lambda r, e: ["build-engine", _tiny_checkpoint(r, _newline_labels), "--out",
                                                    r / "e2", *FAST], 1, "without control characters"),
    Case("nnunet CT clip range inverted", _build_nnunet(plans=_inverted_clip), 1, "must not exceed the upper one"),
    Case("sheared NIfTI written as .mha", lambda r, e: ["infer", e, _sheared(r), "-o", r / "seg.mha"], 1,
         "geometry is sheared"),
    Case("ok: sheared NIfTI written as .nii.gz", lambda r, e: ["infer", e, _sheared(r), "-o", r / "seg.nii.gz"], 0,
         "seg.nii.gz", outputs=("seg.nii.gz",)),
    Case("export-triton into the engine", lambda r, e: ["export-triton", e, e / "repo"], 1, "inside the engine"),
    Case("export-triton onto the engine", lambda r, e: ["export-triton", e, e], 1, "inside the engine"),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_input_in_process(case, tiny_engine, tmp_path, monkeypatch):
    run_in_process(case, tiny_engine, tmp_path, monkeypatch)


def test_api_detached_data_files_are_inputs(tmp_path):
    from nnslim.compiler.runtime.safety import detached_data_files, refuse_input_as_output
    from nnslim.errors import InputError

    header = _mhd(tmp_path / "h", tmp_path / "d")
    assert detached_data_files(header) == [tmp_path / "h" / ".." / "d" / "p.raw"]
    with pytest.raises(InputError, match=r"voxel data \(p.raw\) of the scan"):
        refuse_input_as_output(tmp_path / "d" / "p.raw", {"scan": header}, "--json")


def test_api_cuda_with_a_cpu_backend_is_a_settings_error(tiny_engine):
    from nnslim.compiler.runtime.engine import load_engine
    from nnslim.errors import SettingsError

    with pytest.raises(SettingsError, match="runs on the CPU only"):
        load_engine(tiny_engine, device="cuda", backend="openvino")
