"""nnpre.import_folder: a plain folder of images -> image-only nnU-Net raw dataset (pretraining pool)."""
import json
import os

import numpy as np
import pytest
import SimpleITK as sitk

from nnpre.errors import NnPreError
from nnpre.import_folder import import_image_folder


def _image(path, shape=(6, 8, 10), value=1.0, spacing=(1.0, 1.0, 2.0)):
    im = sitk.GetImageFromArray(np.full(shape, value, dtype=np.float32))
    im.SetSpacing(spacing)
    sitk.WriteImage(im, str(path))
    return str(path)


def test_single_channel_links_dataset_json_and_reimport(tmp_path):
    src = tmp_path / "my scans"
    src.mkdir()
    for n in ("b", "a"):
        _image(src / f"{n}.nii.gz")
    (src / "notes.txt").write_text("ignored")
    (src / ".hidden.nii.gz").write_text("ignored")
    raw = tmp_path / "raw"
    folder = import_image_folder(str(src), str(raw), 7)
    assert os.path.basename(folder) == "Dataset007_my_scans"
    assert sorted(os.listdir(os.path.join(folder, "imagesTr"))) == ["a_0000.nii.gz", "b_0000.nii.gz"]
    link = os.path.join(folder, "imagesTr", "a_0000.nii.gz")
    assert os.path.islink(link) and os.path.realpath(link) == os.path.realpath(src / "a.nii.gz")
    dj = json.loads(open(os.path.join(folder, "dataset.json")).read())
    assert dj["channel_names"] == {"0": "CT"} and dj["labels"] == {"background": 0}
    assert dj["numTraining"] == 2 and dj["file_ending"] == ".nii.gz" and dj["nnpre_unlabeled"] is True
    assert not [f for f in os.listdir(raw) if f.startswith(".tmp")]  # staging folder renamed away

    from nnpre.dataset_checks import check_raw_dataset

    info = check_raw_dataset(folder)  # the planner's own validation accepts it as image-only
    assert not info.labelled and sorted(info.cases) == ["a", "b"]

    # same import again: the existing folder is reused; other content under the same id: error
    assert import_image_folder(str(src), str(raw), 7) == folder
    _image(src / "c.nii.gz")
    with pytest.raises(NnPreError, match=r"dataset id 7 already exists as .*Dataset007_my_scans"):
        import_image_folder(str(src), str(raw), 7)
    with pytest.raises(NnPreError, match="dataset id 7 already exists"):
        import_image_folder(str(src), str(raw), 7, name="Other")


def test_copy_multichannel_and_conversion(tmp_path):
    src = tmp_path / "mri"
    src.mkdir()
    for case in ("p1", "p2"):
        _image(src / f"{case}_t1.mha", value=1)
        _image(src / f"{case}_t1ce.mha", value=2)
    folder = import_image_folder(str(src), str(tmp_path / "raw"), 8, name="Mri", channel_name=["T1", "T1CE"],
                                 channel_suffixes=["_t1", "_t1ce"], link=False)
    files = sorted(os.listdir(os.path.join(folder, "imagesTr")))
    assert files == ["p1_0000.mha", "p1_0001.mha", "p2_0000.mha", "p2_0001.mha"]
    assert not os.path.islink(os.path.join(folder, "imagesTr", files[0]))
    arr = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(folder, "imagesTr", "p2_0001.mha")))
    assert float(arr.mean()) == 2.0  # "_t1ce" matched the longer suffix, not "_t1"
    dj = json.loads(open(os.path.join(folder, "dataset.json")).read())
    assert dj["channel_names"] == {"0": "T1", "1": "T1CE"} and dj["file_ending"] == ".mha" and dj["numTraining"] == 2

    # .nii is converted to .nii.gz (nnU-Net would read .nii with nibabel), geometry preserved
    src2 = tmp_path / "nii"
    src2.mkdir()
    _image(src2 / "x.nii", spacing=(0.7, 0.7, 3.0))
    f2 = import_image_folder(str(src2), str(tmp_path / "raw"), 9)
    out = os.path.join(f2, "imagesTr", "x_0000.nii.gz")
    assert not os.path.islink(out) and np.allclose(sitk.ReadImage(out).GetSpacing(), (0.7, 0.7, 3.0))
    assert json.loads(open(os.path.join(f2, "dataset.json")).read())["file_ending"] == ".nii.gz"


def test_errors_name_the_file(tmp_path):
    raw = str(tmp_path / "raw")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("x")
    with pytest.raises(NnPreError, match="empty holds no images"):
        import_image_folder(str(empty), raw, 1)
    with pytest.raises(NnPreError, match="does not exist"):
        import_image_folder(str(tmp_path / "nope"), raw, 1)

    mixed = tmp_path / "mixed"
    mixed.mkdir()
    _image(mixed / "a.nii.gz")
    _image(mixed / "b.mha")
    with pytest.raises(NnPreError, match=r"mixes image types \(.mha, .nii.gz, e.g. a.nii.gz\)"):
        import_image_folder(str(mixed), raw, 1)

    broken = tmp_path / "broken"
    broken.mkdir()
    _image(broken / "a.nii.gz")
    (broken / "b.nii.gz").write_bytes(b"not an image")
    with pytest.raises(NnPreError, match=r"cannot read .*broken.b\.nii\.gz"):
        import_image_folder(str(broken), raw, 1)

    flat = tmp_path / "flat"
    flat.mkdir()
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((8, 8), np.float32)), str(flat / "a.nii.gz"))
    with pytest.raises(NnPreError, match=r"a\.nii\.gz has 2 dimensions"):
        import_image_folder(str(flat), raw, 1)

    chans = tmp_path / "chans"
    chans.mkdir()
    _image(chans / "p1_t1.nii.gz")
    _image(chans / "p1_t2.nii.gz", shape=(6, 8, 9))
    _image(chans / "p2_t1.nii.gz")
    with pytest.raises(NnPreError, match=r"case 'p2' lacks channel 1: .*p2_t2\.nii\.gz is missing"):
        import_image_folder(str(chans), raw, 1, channel_name=["T1", "T2"], channel_suffixes=["_t1", "_t2"])
    _image(chans / "p2_t2.nii.gz")
    with pytest.raises(NnPreError, match=r"case 'p1': channel images differ in size"):
        import_image_folder(str(chans), raw, 1, channel_name=["T1", "T2"], channel_suffixes=["_t1", "_t2"])
    with pytest.raises(NnPreError, match="1 channel name"):
        import_image_folder(str(chans), raw, 1, channel_suffixes=["_t1", "_t2"])
    _image(chans / "p3_flair.nii.gz")
    with pytest.raises(NnPreError, match=r"p3_flair\.nii\.gz does not end with any channel suffix"):
        import_image_folder(str(chans), raw, 1, channel_name=["T1", "T2"], channel_suffixes=["_t1", "_t2"])

    ok = tmp_path / "ok"
    ok.mkdir()
    _image(ok / "a.nii.gz")
    with pytest.raises(NnPreError, match="between 1 and 999"):
        import_image_folder(str(ok), raw, 1000)
    with pytest.raises(NnPreError, match="dataset name 'a b'"):
        import_image_folder(str(ok), raw, 2, name="a b")
    assert not os.path.isdir(raw) or not os.listdir(raw)  # nothing was written by the failed imports


def test_truncated_nii_is_not_converted_into_a_complete_file(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    _image(src / "a.nii", value=3.0)
    p = _image(src / "b.nii", value=3.0)
    data = open(p, "rb").read()
    open(p, "wb").write(data[: len(data) // 2])  # SimpleITK reads the missing half as zeros
    raw = tmp_path / "raw"
    with pytest.raises(NnPreError, match=r"b\.nii: truncated NIfTI file"):
        import_image_folder(str(src), str(raw), 3)
    assert not raw.exists() or not any(raw.iterdir())
