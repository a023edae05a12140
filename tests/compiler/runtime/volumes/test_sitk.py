"""Volumes through SimpleITK: round trips per format keep values and geometry, the SimpleITK path
hands the network the array nnU-Net's SimpleITKIO reads, DICOM series, folder grouping, the CLI
on .mha / .nrrd / DICOM inputs, clear errors, and nibabel alone when SimpleITK is absent."""

import locale
import sys
from contextlib import contextmanager

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner

from nnslim.compiler.cli import cli
from nnslim.errors import InputError
from nnslim.compiler.runtime.preprocessing import prepare
from nnslim.compiler.runtime.postprocessing import restore_geometry
from nnslim.compiler.runtime.volumes.volume import load_volume, save_segmentation
from nnslim.compiler.runtime.volumes.readers import check_output_name, output_suffix
from nnslim.compiler.runtime.volumes.layout import find_cases
from tests.conftest import written as label_files

# exact in float32 and in DICOM's decimal strings: a rotation about z by atan2(0.8, 0.6)
DIRECTION = (0.6, -0.8, 0.0, 0.8, 0.6, 0.0, 0.0, 0.0, 1.0)
SPACING = (0.75, 0.5, 2.5)
ORIGIN = (-120.5, 80.25, 33.0)


def sitk_image(array_xyz: np.ndarray, spacing=SPACING, origin=ORIGIN, direction=DIRECTION):
    """A SimpleITK image whose voxel (i, j, k) is `array_xyz[i, j, k]`."""
    sitk = pytest.importorskip("SimpleITK")
    image = sitk.GetImageFromArray(np.ascontiguousarray(array_xyz.transpose(2, 1, 0)))
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(direction)
    return image


def ct_like(shape=(9, 7, 5), seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(-1024, 2000, size=shape).astype(np.int16)


def assert_geometry(a, b, tol=1e-6):
    np.testing.assert_allclose(a.GetOrigin(), b.GetOrigin(), atol=tol)
    np.testing.assert_allclose(a.GetSpacing(), b.GetSpacing(), atol=tol)
    np.testing.assert_allclose(a.GetDirection(), b.GetDirection(), atol=tol)


def write_dicom_series(array_xyz: np.ndarray, folder, spacing=SPACING, origin=ORIGIN, direction=DIRECTION):
    """One int16 slice per file with the tags a series reader needs (position, orientation, UIDs)."""
    image = sitk_image(array_xyz, spacing, origin, direction)  # skips without SimpleITK
    folder.mkdir(parents=True)
    d = direction
    series_tags = {
        "0008|0060": "CT",
        "0008|0008": "DERIVED\\SECONDARY",
        "0020|000d": "1.2.826.0.1.3680043.2.1125.1.1",
        "0020|000e": "1.2.826.0.1.3680043.2.1125.1.2",
        "0020|0037": "\\".join(f"{v:g}" for v in (d[0], d[3], d[6], d[1], d[4], d[7])),
        "0018|0050": f"{spacing[2]:g}",
    }
    with keep_locale():
        _write_slices(image, folder, series_tags)
    return folder


@contextmanager
def keep_locale():
    """SimpleITK's DICOM (GDCM) writer leaves LC_CTYPE at "C"; later tests read sources as UTF-8."""
    saved = locale.setlocale(locale.LC_ALL)
    try:
        yield
    finally:
        locale.setlocale(locale.LC_ALL, saved)


def _write_slices(image, folder, series_tags):
    import SimpleITK as sitk

    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(image.GetSize()[2]):
        plane = image[:, :, k]
        for tag, value in series_tags.items():
            plane.SetMetaData(tag, value)
        plane.SetMetaData("0020|0032", "\\".join(f"{v:g}" for v in image.TransformIndexToPhysicalPoint((0, 0, k))))
        plane.SetMetaData("0020|0013", str(k + 1))
        plane.SetMetaData("0008|0018", f"1.2.826.0.1.3680043.2.1125.1.3.{k + 1}")
        writer.SetFileName(str(folder / f"slice{k:03d}.dcm"))
        writer.Execute(plane)


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz", ".mha", ".nrrd"])
@pytest.mark.parametrize("reader", ["auto", "simpleitk"])
def test_round_trip_keeps_values_and_geometry(suffix, reader, tmp_path):
    sitk = pytest.importorskip("SimpleITK")
    values = ct_like()
    source = tmp_path / f"ct{suffix}"
    sitk.WriteImage(sitk_image(values), str(source))
    volume = load_volume(source, 1, reader=reader)
    assert volume.data.shape == (1, 9, 7, 5)  # [C, X, Y, Z]
    np.testing.assert_array_equal(volume.data[0], values.astype(np.float32))
    np.testing.assert_allclose(volume.spacing, SPACING, atol=1e-6)

    labels = (values > 0).astype(np.uint8) + (values > 1000)
    out = save_segmentation(labels, volume.geometry, tmp_path / "out" / f"seg{output_suffix(source)}")
    assert out.name == ("seg.nii.gz" if suffix.startswith(".nii") else f"seg{suffix}")
    written, original = sitk.ReadImage(str(out)), sitk.ReadImage(str(source))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(written), labels.transpose(2, 1, 0))
    assert written.GetPixelID() == sitk.sitkUInt8
    assert_geometry(written, original)
    assert_geometry(written, sitk_image(values))  # the geometry we asked for, not only a consistent one
    assert [p.name for p in out.parent.iterdir()] == [out.name]  # no temporary left behind


def test_dicom_series_round_trip(tmp_path):
    sitk = pytest.importorskip("SimpleITK")
    values = ct_like((12, 10, 6))
    series = write_dicom_series(values, tmp_path / "ct")
    volume = load_volume(series, 1)
    assert volume.name == "ct"
    np.testing.assert_array_equal(volume.data[0], values.astype(np.float32))
    np.testing.assert_allclose(volume.geometry.itk.origin, ORIGIN, atol=1e-6)
    np.testing.assert_allclose(volume.geometry.itk.spacing, SPACING, atol=1e-6)
    np.testing.assert_allclose(volume.geometry.itk.direction, DIRECTION, atol=1e-6)

    assert output_suffix(series) == ".nii.gz"
    out = save_segmentation((values > 0).astype(np.uint8), volume.geometry, tmp_path / "seg.nii.gz")
    written = sitk.ReadImage(str(out))
    assert_geometry(written, sitk_image(values))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(written), (values > 0).transpose(2, 1, 0))


def test_a_folder_with_two_series_is_refused(tmp_path):
    pytest.importorskip("SimpleITK")
    series = write_dicom_series(ct_like((6, 6, 3)), tmp_path / "a")
    other = write_dicom_series(ct_like((6, 6, 3)), tmp_path / "b")
    for path in other.iterdir():  # a second series (its own UID) in the same folder
        path.rename(series / f"b_{path.name}")
    import SimpleITK as sitk

    for path in sorted(series.glob("b_*.dcm")):
        image = sitk.ReadImage(str(path))
        image.SetMetaData("0020|000e", "1.2.826.0.1.3680043.2.1125.1.9")
        writer = sitk.ImageFileWriter()
        writer.KeepOriginalImageUIDOn()
        writer.SetFileName(str(path))
        with keep_locale():
            writer.Execute(image)
    with pytest.raises(InputError, match="2 DICOM series"):
        load_volume(series, 1)


def test_network_input_and_labels_match_nnunets_simpleitk_io(tmp_path):
    """A NIfTI with anisotropic spacing, a rotated direction and an offset origin: nibabel and
    SimpleITK readers give the same network input, equal to nnU-Net's SimpleITKIO array and
    spacing, and labels written back carry the input's geometry (as SimpleITKIO writes them)."""
    sitk = pytest.importorskip("SimpleITK")
    from scipy.spatial.transform import Rotation

    affine = np.eye(4)
    affine[:3, :3] = Rotation.from_euler("xyz", [20, -10, 35], degrees=True).as_matrix() * [0.7, 1.3, 2.5]
    affine[:3, 3] = [-12.5, 30.25, 7.0]
    data = np.random.default_rng(1).normal(size=(11, 8, 6)).astype(np.float32)
    path = tmp_path / "case.nii.gz"
    nib.save(nib.Nifti1Image(data, affine), path)

    # nnU-Net's SimpleITKIO: array [Z, Y, X] with a channel axis, spacing reversed
    itk = sitk.ReadImage(str(path))
    nnunet_array, nnunet_spacing = sitk.GetArrayFromImage(itk)[None].astype(np.float32), itk.GetSpacing()[::-1]
    pre = {"axis_order": "reversed", "normalization": {"scheme": "per-channel", "channels": [{"scheme": "none"}]}}
    seg_zyx = (nnunet_array[0] > 0.3).astype(np.uint8) + (nnunet_array[0] > 1.2)
    expected = tmp_path / "nnunet.nii.gz"  # what SimpleITKIO.write_seg writes
    reference_seg = sitk.GetImageFromArray(seg_zyx)
    reference_seg.CopyInformation(itk)
    sitk.WriteImage(reference_seg, str(expected), True)

    for reader in ("nibabel", "simpleitk"):
        volume = load_volume(path, 1, reader=reader)
        prepared = prepare(volume.data, volume.spacing, pre)
        np.testing.assert_array_equal(prepared.image, nnunet_array)
        np.testing.assert_allclose(prepared.spacing, nnunet_spacing, rtol=0, atol=1e-7)
        labels = restore_geometry(seg_zyx, prepared)  # the runtime's labels, in the Volume's [X, Y, Z]
        out = save_segmentation(labels, volume.geometry, tmp_path / reader / "case.nii.gz")
        written, want = sitk.ReadImage(str(out)), sitk.ReadImage(str(expected))
        np.testing.assert_array_equal(sitk.GetArrayFromImage(written), seg_zyx)
        assert_geometry(written, want)
        np.testing.assert_allclose(nib.load(out).affine, affine, atol=1e-5)


def test_a_nifti_read_with_nibabel_writes_mha_in_itk_geometry(tmp_path):
    """nibabel's RAS affine converts to ITK's LPS origin and direction (x and y change sign)."""
    sitk = pytest.importorskip("SimpleITK")
    affine = np.array([[0.0, -0.5, 0.0, 10.0], [0.75, 0.0, 0.0, -20.5], [0.0, 0.0, 2.5, 3.0], [0, 0, 0, 1]])
    data = ct_like((6, 5, 4))
    nib.save(nib.Nifti1Image(data, affine), tmp_path / "a.nii.gz")
    volume = load_volume(tmp_path / "a.nii.gz", 1)
    assert volume.geometry.nifti is not None
    out = save_segmentation((data > 0).astype(np.uint8), volume.geometry, tmp_path / "seg.mha")
    written = sitk.ReadImage(str(out))
    assert_geometry(written, sitk.ReadImage(str(tmp_path / "a.nii.gz")))
    np.testing.assert_allclose(written.GetOrigin(), (-10.0, 20.5, 3.0))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(written), (data > 0).transpose(2, 1, 0))


def test_find_cases_groups_mha_channels_and_dicom_folders(tmp_path):
    sitk = pytest.importorskip("SimpleITK")
    for name in ("ct_0000.mha", "ct_0001.mha", "mr_0000.nrrd", "head.nii.gz", "notes.txt", "old.mhd.raw"):
        (tmp_path / name).write_bytes(b"")
    write_dicom_series(ct_like((6, 6, 3)), tmp_path / "series1")
    (tmp_path / "empty").mkdir()
    sitk.WriteImage(sitk_image(ct_like((4, 4, 4))), str(tmp_path / "brain.mhd"))
    cases = {k: [p.name for p in v] for k, v in find_cases(tmp_path).items()}
    assert cases == {"brain": ["brain.mhd"], "ct": ["ct_0000.mha", "ct_0001.mha"], "head": ["head.nii.gz"],
                     "mr": ["mr_0000.nrrd"], "series1": ["series1"]}
    assert output_suffix(tmp_path / "brain.mhd") == ".mha"  # one file: no .raw beside a renamed header
    (tmp_path / "head.mha").write_bytes(b"")
    with pytest.raises(InputError, match=r"case 'head' .* several files for one channel: \['head.mha', 'head.nii.gz'\]"):
        find_cases(tmp_path)


@pytest.mark.parametrize("dims, spacing, message", [
    ("4096 4096 4096", "1 1 1", r"shape \(4096, 4096, 4096\), 1 channel\(s\), float32\) would need about 256.0 GB"),
    ("4 4 4", "0 1 1", r"voxel size \(0, 1, 1\) mm in its header"),
])
def test_a_forged_metaimage_header_is_refused_before_reading_voxels(dims, spacing, message, tmp_path):
    """The header promises voxels the file does not hold: only ReadImageInformation can have run."""
    pytest.importorskip("SimpleITK")
    path = tmp_path / "forged.mha"
    path.write_text(f"ObjectType = Image\nNDims = 3\nDimSize = {dims}\nElementSpacing = {spacing}\n"
                    "ElementType = MET_FLOAT\nElementDataFile = LOCAL\n")
    with pytest.raises(InputError, match=message):
        load_volume(path, 1)


def test_partial_mha_outputs_of_dead_processes_are_removed_and_user_files_kept(tmp_path):
    from tests.nnslim.test_files import killed_writer

    sitk = pytest.importorskip("SimpleITK")
    killed_writer(tmp_path, "seg.mha")
    (stale,) = tmp_path.iterdir()
    user = [tmp_path / ".hidden.mha", tmp_path / ".seg.mha.4194301.abcd1234.mha"]  # the old temporaries' names
    for path in user:
        path.write_bytes(b"partial")
    source = tmp_path / "in.mha"
    sitk.WriteImage(sitk_image(ct_like((3, 3, 3))), str(source))
    save_segmentation(np.zeros((3, 3, 3), dtype=np.uint8), load_volume(source, 1).geometry, tmp_path / "seg.mha")
    assert not stale.exists() and all(p.exists() for p in user)


def test_unsupported_extension_is_a_clear_error(tmp_path):
    scan = tmp_path / "scan.png"
    scan.write_bytes(b"\x89PNG")
    with pytest.raises(InputError, match=r"scan.png: unsupported file type; nnslim reads .nii.gz, .nii, .mha"):
        load_volume(scan, 1)
    with pytest.raises(InputError, match="labels are written as .nii.gz, .nii, .mha, .nrrd"):
        check_output_name(tmp_path / "seg.png")
    (tmp_path / "scan.mha").write_bytes(b"")
    with pytest.raises(InputError, match=r"not a nibabel format; nibabel reads .nii.gz, .nii: use simpleitk"):
        load_volume(tmp_path / "scan.mha", 1, reader="nibabel")


def test_without_simpleitk_nifti_still_works_and_the_rest_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "SimpleITK", None)  # `import SimpleITK` now raises ImportError
    data = np.arange(60, dtype=np.float32).reshape(3, 4, 5)
    nib.save(nib.Nifti1Image(data, np.diag([1.5, 2.0, 2.5, 1.0])), tmp_path / "a.nii.gz")
    volume = load_volume(tmp_path / "a.nii.gz", 1)
    np.testing.assert_array_equal(volume.data[0], data)
    out = save_segmentation((data > 20).astype(np.uint8), volume.geometry, tmp_path / "seg.nii.gz")
    assert nib.load(out).header.get_zooms() == (1.5, 2.0, 2.5)
    (tmp_path / "b.mha").write_bytes(b"ObjectType = Image\n")
    with pytest.raises(InputError, match=r"needs SimpleITK, which is not installed; install the io extra: "
                                         r"pip install 'nnslim\[io\]'"):
        load_volume(tmp_path / "b.mha", 1)
    with pytest.raises(InputError, match=r"nnslim\[io\]"):
        save_segmentation((data > 20).astype(np.uint8), volume.geometry, tmp_path / "seg.mha")
    (tmp_path / "dicom").mkdir()
    (tmp_path / "dicom" / "1.dcm").write_bytes(b"")
    assert list(find_cases(tmp_path)) == ["a", "b", "dicom", "seg"]
    with pytest.raises(InputError, match=r"nnslim\[io\]"):
        load_volume(tmp_path / "dicom", 1)


def test_infer_writes_mha_nrrd_and_dicom_outputs_with_the_input_geometry(engine_dir, small_volume, tmp_path):
    sitk = pytest.importorskip("SimpleITK")
    t1 = np.asarray(nib.load(small_volume).dataobj).astype(np.int16)
    geometry = {"spacing": (1.0, 1.0, 1.0), "origin": (-10.5, 20.0, 3.25), "direction": DIRECTION}
    cases = tmp_path / "cases"
    cases.mkdir()
    sitk.WriteImage(sitk_image(t1, **geometry), str(cases / "a_0000.mha"))
    sitk.WriteImage(sitk_image(t1, **geometry), str(cases / "b.nrrd"))
    write_dicom_series(t1, cases / "c", **geometry)
    nib.save(nib.Nifti1Image(t1, np.eye(4)), tmp_path / "plain.nii.gz")

    def infer(source, output):
        result = CliRunner().invoke(cli, ["infer", str(engine_dir), str(source), "-o", str(output), "--no-progress"])
        assert result.exit_code == 0, result.output

    infer(cases / "a_0000.mha", tmp_path / "single.mha")
    infer(cases, tmp_path / "out")
    infer(tmp_path / "plain.nii.gz", tmp_path / "plain_seg.nii.gz")
    infer(cases / "c", tmp_path / "dicom_seg.nii.gz")  # a series folder given alone is one case
    assert label_files(tmp_path / "out") == ["a.mha", "b.nrrd", "c.nii.gz"]
    plain = np.asarray(nib.load(tmp_path / "plain_seg.nii.gz").dataobj)
    for out in [tmp_path / "single.mha", tmp_path / "dicom_seg.nii.gz", *(tmp_path / "out" / n for n in label_files(tmp_path / "out"))]:
        written = sitk.ReadImage(str(out))
        assert_geometry(written, sitk_image(t1, **geometry))
        # the same voxels in any format: the labels equal those of the NIfTI run
        np.testing.assert_array_equal(sitk.GetArrayFromImage(written).transpose(2, 1, 0), plain, err_msg=out.name)


def test_infer_refuses_an_unsupported_input_and_output(engine_dir, small_volume, tmp_path):
    (tmp_path / "scan.png").write_bytes(b"\x89PNG")
    result = CliRunner().invoke(cli, ["infer", str(engine_dir), str(tmp_path / "scan.png"), "-o",
                                      str(tmp_path / "seg.nii.gz")])
    assert result.exit_code == 1 and "unsupported file type" in result.output
    result = CliRunner().invoke(cli, ["infer", str(engine_dir), str(small_volume), "-o", str(tmp_path / "seg.png")])
    assert result.exit_code == 1 and "labels are written as" in result.output
    assert not (tmp_path / "seg.png").exists()
