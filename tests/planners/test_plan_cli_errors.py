"""``nnPre_plan`` turns each kind of bad input into one clear line and exit status 2."""
import json
import os

import numpy as np
import pytest
import SimpleITK as sitk

from nnpre.cli.plan import main


def _run(capsys, *argv):
    with pytest.raises(SystemExit) as e:
        main(list(argv))
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    return err


def test_unset_environment(capsys, monkeypatch):
    for n in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.delenv(n, raising=False)
    assert "nnUNet_raw is not set" in _run(capsys, "-d", "1")


def test_unknown_dataset(capsys, nnunet_root):
    err = _run(capsys, "-d", "77")
    assert "no dataset with id 77" in err


def test_malformed_dataset_json(capsys, nnunet_root):
    from nnpre_testdata import write_raw_dataset

    d = write_raw_dataset(nnunet_root, did=31, n_cases=1)
    with open(os.path.join(d, "dataset.json"), "w") as f:
        f.write("{ not json")
    err = _run(capsys, "-d", "31")
    assert "dataset.json" in err and "not valid JSON" in err
    with open(os.path.join(d, "dataset.json"), "w") as f:
        json.dump({"labels": {"background": 0}, "numTraining": 1, "file_ending": ".nii.gz"}, f)
    assert "channel_names" in _run(capsys, "-d", "31")


def test_missing_channel_file(capsys, nnunet_root):
    from nnpre_testdata import write_raw_dataset

    d = write_raw_dataset(nnunet_root, did=32, n_cases=2, channels=2)
    missing = os.path.join(d, "imagesTr", "c001_0001.nii.gz")
    os.remove(missing)
    err = _run(capsys, "-d", "32")
    assert missing in err and "missing" in err


def test_mismatched_label_geometry(capsys, nnunet_root):
    from nnpre_testdata import write_raw_dataset

    d = write_raw_dataset(nnunet_root, did=33, n_cases=2)
    lab = os.path.join(d, "labelsTr", "c000.nii.gz")
    img = sitk.GetImageFromArray(np.zeros((10, 10, 10), np.uint8))
    sitk.WriteImage(img, lab)
    err = _run(capsys, "-d", "33")
    assert lab in err and "geometry" in err


@pytest.mark.parametrize("spacing,msg", [((0.8, 0.8, 500.0), "implausible spacing"),
                                         ((0.8, 0.8, -2.0), "non-positive spacing")])
def test_bad_spacing_in_header(capsys, nnunet_root, spacing, msg):
    import nibabel as nib
    from nnpre_testdata import write_raw_dataset

    d = write_raw_dataset(nnunet_root, did=34, n_cases=1, labelled=False)
    p = os.path.join(d, "imagesTr", "c000_0000.nii.gz")
    im = nib.load(p)
    hdr = im.header.copy()
    z = list(hdr["pixdim"])
    z[1:4] = spacing
    hdr["pixdim"] = z
    nib.save(nib.Nifti1Image(np.asarray(im.dataobj), None, hdr), p)
    if spacing[2] < 0:
        # nibabel/ITK may normalise negative pixdims; only assert when the header really is non-positive
        r = sitk.ImageFileReader(); r.SetFileName(p); r.ReadImageInformation()
        if min(r.GetSpacing()) > 0:
            pytest.skip("this ITK build rewrites negative pixdim to positive on read")
    assert msg in _run(capsys, "-d", "34")


def test_previous_plans_survive_a_failed_run(capsys, nnunet_root):
    from nnpre_testdata import write_raw_dataset

    write_raw_dataset(nnunet_root, did=35, n_cases=2)
    assert main(["-d", "35", "--preset", "cpu-tiny", "--no-preprocess", "-np", "1"]) == 0
    plans_file = os.path.join(os.environ["nnUNet_preprocessed"], "Dataset035_T", "nnPreResEncLPlans.json")
    before = open(plans_file).read()
    capsys.readouterr()
    os.remove(os.path.join(os.environ["nnUNet_raw"], "Dataset035_T", "imagesTr", "c001_0000.nii.gz"))
    _run(capsys, "-d", "35", "--preset", "cpu-tiny", "--patch", "64")
    assert open(plans_file).read() == before
