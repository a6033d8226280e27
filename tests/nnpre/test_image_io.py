"""``nnpre.image_io.read_image``: what SimpleITK reads silently (truncated NIfTI, NaN/Inf turned into 0) and bad
label values stop with one line naming the file."""
import gzip

import numpy as np
import pytest
import SimpleITK as sitk

from nnpre.errors import NnPreError
from nnpre.image_io import geometry, geometry_difference, read_image, scan_nifti


def _write(arr, path, spacing=(1.0, 1.0, 1.0)):
    im = sitk.GetImageFromArray(arr)
    im.SetSpacing(spacing)
    sitk.WriteImage(im, str(path))
    return str(path)


def _cut(path, keep=0.5):
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: int(len(data) * keep)])
    return path


@pytest.fixture
def img(tmp_path):
    rng = np.random.default_rng(0)
    return rng.normal(0, 1, (12, 16, 20)).astype(np.float32)


@pytest.mark.parametrize("ending", [".nii.gz", ".nii"])
def test_truncated_nifti_is_detected_although_simpleitk_reads_it(tmp_path, img, ending):
    p = _cut(_write(img, tmp_path / f"a{ending}"), 0.6)
    back = sitk.GetArrayFromImage(sitk.ReadImage(p))  # the silent failure this module exists for
    assert back.shape == img.shape and (back == 0).mean() > 0.3
    with pytest.raises(NnPreError, match="truncated") as e:
        read_image(p)
    assert p in str(e.value) and "\n" not in str(e.value)


def test_corrupt_gzip_crc_is_detected(tmp_path, img):
    p = _write(img, tmp_path / "a.nii.gz")
    raw = bytearray(open(p, "rb").read())
    raw[-6] ^= 0xFF  # the CRC-32 in the gzip trailer
    open(p, "wb").write(bytes(raw))
    with pytest.raises(NnPreError, match="gzip stream is truncated or corrupt"):
        read_image(p)


@pytest.mark.parametrize("ending", [".mha", ".nrrd"])
def test_truncated_other_formats_give_one_line(tmp_path, img, ending):
    p = _cut(_write(img, tmp_path / f"a{ending}"), 0.6)
    with pytest.raises(NnPreError) as e:
        read_image(p)
    assert p in str(e.value) and "\n" not in str(e.value) and "truncated" in str(e.value)


@pytest.mark.parametrize("ending", [".nii.gz", ".nii", ".mha", ".nrrd"])
@pytest.mark.parametrize("where,words", [("all", "every voxel is NaN"), ("one", "1 of 3840 voxels"),
                                         ("inf", "1 of 3840 voxels")])
def test_nan_and_inf_images(tmp_path, img, ending, where, words):
    if where == "all":
        img[:] = np.nan
    elif where == "one":
        img[3, 4, 5] = np.nan
    else:
        img[0, 0, 0] = -np.inf
    p = _write(img, tmp_path / f"a{ending}")
    with pytest.raises(NnPreError, match=words):
        read_image(p)


def test_good_files_pass_and_scan_counts(tmp_path, img):
    p = _write(img, tmp_path / "a.nii.gz")
    scan = scan_nifti(p)
    assert scan.voxels == img.size and scan.data_bytes == img.size * 4 and scan.nonfinite == 0
    assert np.array_equal(sitk.GetArrayFromImage(read_image(p)), img)
    with gzip.open(p) as f:  # the file really is a complete gzip stream
        assert len(f.read()) == 352 + img.size * 4


@pytest.mark.parametrize("values,allowed,words", [
    ([0, 1, 5], [0, 1], r"label value\(s\) \[5\] are not declared"),
    ([0, 0.5, 1], None, "fractional values"),
    ([0, -1, 1], None, "negative value -1"),
])
def test_bad_label_values(tmp_path, values, allowed, words):
    lab = np.zeros((4, 5, 6), np.float32 if 0.5 in values else np.int16)
    lab.flat[: len(values)] = values
    p = _write(lab, tmp_path / "l.nii.gz")
    with pytest.raises(NnPreError, match=words):
        read_image(p, kind="label", allowed_labels=allowed)


def test_integer_labels_pass(tmp_path):
    lab = np.zeros((4, 5, 6), np.uint8)
    lab[1, 1, 1] = 2
    p = _write(lab, tmp_path / "l.nii.gz")
    read_image(p, kind="label", allowed_labels=[0, 1, 2])
    read_image(p, kind="label")


def test_2d_image_is_refused(tmp_path):
    p = str(tmp_path / "slice.nii.gz")
    sitk.WriteImage(sitk.GetImageFromArray(np.ones((16, 16), np.float32)), p)
    with pytest.raises(NnPreError, match="2-D image"):
        read_image(p)
    assert read_image(p, ndim=None).GetDimension() == 2


def test_geometry_difference():
    a = sitk.Image(4, 5, 6, sitk.sitkUInt8)
    b = sitk.Image(4, 5, 6, sitk.sitkUInt8)
    assert geometry_difference(geometry(a), geometry(b)) is None
    b.SetSpacing((1.0, 1.0, 2.0))
    assert geometry_difference(geometry(a), geometry(b)).startswith("spacing")
    c = sitk.Image(4, 5, 7, sitk.sitkUInt8)
    assert geometry_difference(geometry(a), geometry(c)).startswith("shape")
    b.SetSpacing((1.0, 1.0, 1.0))
    b.SetOrigin((0.0, 0.0, 0.5))
    assert geometry_difference(geometry(a), geometry(b)).startswith("origin")


@pytest.mark.parametrize("ending", [".nii.gz", ".nii", ".mha"])
@pytest.mark.parametrize("values,dtype,allowed,words", [
    ([0, 1, 5], np.uint8, [0, 1], r"label value\(s\) \[5\] are not declared"),
    ([0, 1, 70000], np.int32, [0, 1], r"\[70000\] are not declared"),
    ([0, 0.5, 1], np.float32, None, "fractional values"),
    ([0, -1, 1], np.int16, None, "negative value -1"),
    ([0, np.nan, 1], np.float32, None, "NaN"),
    ([0, 1, 2], np.float32, [0, 1, 2], None),
    ([0, 1, 2], np.uint16, [0, 1, 2], None),
])
def test_check_file_agrees_with_read_image(tmp_path, ending, values, dtype, allowed, words):
    from nnpre.image_io import check_file

    lab = np.zeros((4, 5, 6), dtype)
    lab.flat[: len(values)] = values
    p = _write(lab, tmp_path / f"l{ending}")
    for fn in (check_file, read_image):
        if words is None:
            fn(p, kind="label", allowed_labels=allowed)
        else:
            with pytest.raises(NnPreError, match=words):
                fn(p, kind="label", allowed_labels=allowed)


def test_check_file_on_scaled_nifti_uses_the_scaled_values(tmp_path):
    import nibabel as nib

    from nnpre.image_io import check_file

    raw = np.zeros((4, 5, 6), np.int16)
    raw[1, 1, 1] = 1
    plain = str(tmp_path / "plain.nii")
    nib.save(nib.Nifti1Image(raw, np.eye(4)), plain)
    data = bytearray(open(plain, "rb").read())
    data[112:120] = np.array([0.5, 0.0], "<f4").tobytes()  # scl_slope, scl_inter: stored 1 means 0.5
    p = str(tmp_path / "scaled.nii.gz")
    with gzip.open(p, "wb") as f:
        f.write(bytes(data))
    assert sitk.GetArrayFromImage(sitk.ReadImage(p)).max() == 0.5  # what ITK (and nnU-Net) read
    assert scan_nifti(p, values=True).scaled
    with pytest.raises(NnPreError, match="fractional"):
        check_file(p, kind="label")
