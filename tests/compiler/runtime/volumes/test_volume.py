import gzip

import nibabel as nib
import numpy as np
import pytest

from nnslim.errors import InputError
from nnslim.compiler.runtime.volumes.header import Geometry
from nnslim.compiler.runtime.volumes.volume import load_volume, save_segmentation
from nnslim.compiler.runtime.volumes.layout import find_cases


def _save(path, data, affine=None):
    nib.save(nib.Nifti1Image(data, np.diag([1.5, 2.0, 2.5, 1.0]) if affine is None else affine), path)
    return path


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match="not found"):
        load_volume(tmp_path / "nope.nii.gz", 1)


def test_nan_volume_is_refused(tmp_path):
    data = np.ones((8, 8, 8), dtype=np.float32)
    data[1, 2, 3] = np.nan
    with pytest.raises(InputError, match="1 NaN or infinite"):
        load_volume(_save(tmp_path / "nan.nii.gz", data), 1)


def test_wrong_channel_count(tmp_path):
    path = _save(tmp_path / "two.nii.gz", np.ones((8, 8, 8, 2), dtype=np.float32))
    with pytest.raises(InputError, match="gives 2 channel"):
        load_volume(path, 1)
    assert load_volume(path, 2).data.shape == (2, 8, 8, 8)


def test_two_dimensional_file(tmp_path):
    with pytest.raises(InputError, match="2 dimensions"):
        load_volume(_save(tmp_path / "flat.nii.gz", np.ones((8, 8), dtype=np.float32)), 1)


def test_corrupt_file(tmp_path):
    path = tmp_path / "broken.nii.gz"
    path.write_bytes(gzip.compress(b"not a nifti header at all"))
    with pytest.raises(InputError, match="cannot read"):
        load_volume(path, 1)


def test_channel_files_are_grouped_into_cases(tmp_path):
    for name in ("b_0001", "b_0000", "a_0000", "single"):
        _save(tmp_path / f"{name}.nii.gz", np.zeros((4, 4, 4), dtype=np.float32))
    (tmp_path / "notes.txt").write_text("ignored")
    cases = find_cases(tmp_path)
    assert list(cases) == ["a", "b", "single"]
    assert [p.name for p in cases["b"]] == ["b_0000.nii.gz", "b_0001.nii.gz"]
    assert load_volume(cases["b"], 2).name == "b"


def test_segmentation_keeps_affine_and_writes_atomically(tmp_path):
    affine = np.array([[0, -1.5, 0, 10], [2, 0, 0, -4], [0, 0, 2.5, 7], [0, 0, 0, 1]], dtype=float)
    source = nib.load(_save(tmp_path / "in.nii.gz", np.zeros((5, 6, 7), dtype=np.float32), affine))
    labels = np.random.default_rng(0).integers(0, 3, (5, 6, 7))
    out = save_segmentation(labels, Geometry(nifti=source), tmp_path / "out" / "seg.nii.gz")
    written = nib.load(out)
    np.testing.assert_array_equal(written.affine, affine)
    np.testing.assert_array_equal(np.asarray(written.dataobj), labels)
    assert written.get_data_dtype() == np.uint8
    assert [p.name for p in out.parent.iterdir()] == ["seg.nii.gz"]  # no temp file left behind


def forged_header(path, shape, zooms=(1.0, 1.0, 1.0), payload=b"\0" * 64):
    """A NIfTI file whose header claims `shape` but holds only `payload` (a gzip bomb's header)."""
    header = nib.Nifti1Header()
    header.set_data_dtype(np.uint8)
    header.set_data_shape(shape)
    header.set_zooms(zooms)
    header["vox_offset"] = 352
    raw = header.binaryblock + b"\0" * 4 + payload
    path.write_bytes(gzip.compress(raw) if path.name.endswith(".gz") else raw)
    return path


@pytest.mark.parametrize("zooms, message", [
    ((1.0, 0.0, 1.0), "voxel size"),
    ((1.0, float("nan"), 1.0), "voxel size"),
    ((1.0, 1e30, 1.0), "voxel size"),
])
def test_impossible_voxel_sizes_are_refused_from_the_header(tmp_path, zooms, message):
    with pytest.raises(InputError, match=message):
        load_volume(forged_header(tmp_path / "v.nii", (4, 4, 4), zooms), 1)


def test_a_header_larger_than_the_machine_is_refused_before_reading(tmp_path):
    path = forged_header(tmp_path / "bomb.nii.gz", (4096, 4096, 4096))
    with pytest.raises(InputError, match=r"would need about 256\.0 GB of memory but this machine has"):
        load_volume(path, 1)


def test_a_truncated_file_is_a_read_error_not_a_crash(tmp_path):
    with pytest.raises(InputError, match="cannot read"):
        load_volume(forged_header(tmp_path / "short.nii.gz", (64, 64, 64)), 1)


def test_intensities_that_overflow_float32_arithmetic_are_refused(tmp_path):
    data = np.ones((8, 8, 8), dtype=np.float32)
    data[0, 0, 0] = 3e38
    with pytest.raises(InputError, match="intensities up to 3e\\+38.*overflows"):
        load_volume(_save(tmp_path / "hot.nii.gz", data), 1)
    data[0, 0, 0] = 1e6  # large but real (e.g. unscaled MRI): fine
    assert load_volume(_save(tmp_path / "ok.nii.gz", data), 1).data.max() == 1e6


def test_partial_outputs_of_dead_processes_are_removed_by_the_next_write(tmp_path):
    """By nnslim's marker: a killed writer's temporary goes; a user's files named like one stay."""
    from nnslim.files import marked_folder
    from tests.nnslim.test_files import killed_writer

    killed_writer(tmp_path, "seg.nii.gz")
    (stale,) = tmp_path.iterdir()
    user = [tmp_path / ".hidden.nii.gz", tmp_path / ".seg.nii.gz.4194301.abcd1234.nii.gz"]
    for path in user:
        path.write_bytes(b"partial")
    source = nib.load(_save(tmp_path / "in.nii.gz", np.zeros((3, 3, 3), dtype=np.float32)))
    with marked_folder(tmp_path, ".seg.nii.gz.nnslim") as live:  # this process's, still writing
        save_segmentation(np.zeros((3, 3, 3), dtype=np.uint8), Geometry(nifti=source), tmp_path / "seg.nii.gz")
        assert not stale.exists() and live.exists() and all(p.exists() for p in user)


def test_channel_files_group_only_when_they_start_at_0000_and_are_consecutive(tmp_path):
    import nibabel as nib
    import numpy as np
    import pytest

    from nnslim.errors import InputError
    from nnslim.compiler.runtime.volumes.layout import find_cases

    def write(folder, *names):
        folder.mkdir()
        for name in names:
            nib.save(nib.Nifti1Image(np.zeros((2, 2, 2), np.float32), np.eye(4)), folder / name)
        return folder

    numbered = write(tmp_path / "numbered", "patient_0001.nii.gz", "patient_0002.nii.gz", "patient_0003.nii.gz")
    assert {k: len(v) for k, v in find_cases(numbered).items()} == {"patient_0001": 1, "patient_0002": 1, "patient_0003": 1}
    channels = write(tmp_path / "channels", "ct_0000.nii.gz", "ct_0001.nii.gz", "mr_0000.nii.gz")
    assert {k: [p.name for p in v] for k, v in find_cases(channels).items()} == {
        "ct": ["ct_0000.nii.gz", "ct_0001.nii.gz"], "mr": ["mr_0000.nii.gz"]}
    gap = write(tmp_path / "gap", "ct_0000.nii.gz", "ct_0002.nii.gz")
    with pytest.raises(InputError, match=r"missing \['_0001'\]"):
        find_cases(gap)
