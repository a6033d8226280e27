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
        r = sitk.ImageFileReader()
        r.SetFileName(p)
        r.ReadImageInformation()
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


# ------------------------------------------------------------------ bad input that used to be planned (issue 18)
def _tree_digest(folder):
    """{relative path: bytes} of every file under ``folder`` (to show that good files were not touched)."""
    out = {}
    for d, _, files in os.walk(folder):
        for n in files:
            p = os.path.join(d, n)
            with open(p, "rb") as f:
                out[os.path.relpath(p, folder)] = f.read()
    return out


def _write(arr, path, spacing=(0.8, 0.8, 2.5)):
    im = sitk.GetImageFromArray(arr)
    im.SetSpacing(spacing)
    sitk.WriteImage(im, path)


def _truncate(path):
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])


def _image(d):
    return os.path.join(d, "imagesTr", "c001_0000.nii.gz")


def _label(d):
    return os.path.join(d, "labelsTr", "c001.nii.gz")


def _set_voxels(path, fn, dtype=None):
    im = sitk.ReadImage(path)
    a = sitk.GetArrayFromImage(im)
    a = a.astype(dtype) if dtype else a
    fn(a)
    out = sitk.GetImageFromArray(a)
    out.CopyInformation(im)
    sitk.WriteImage(out, path)


BAD_DATASETS = {
    # name: (mutation of the dataset folder d -> the file the error must name, expected words)
    "truncated image": (lambda d: (_truncate(_image(d)), _image(d))[1], "truncated"),
    "truncated label": (lambda d: (_truncate(_label(d)), _label(d))[1], "truncated"),
    "all-NaN image": (lambda d: (_set_voxels(_image(d), lambda a: a.fill(np.nan), np.float32), _image(d))[1],
                      "every voxel is NaN"),
    "partly NaN image": (lambda d: (_set_voxels(_image(d), lambda a: a.__setitem__((0, 0, 0), np.nan), np.float32),
                                    _image(d))[1], "1 of"),
    "Inf image": (lambda d: (_set_voxels(_image(d), lambda a: a.__setitem__((1, 2, 3), np.inf), np.float32),
                             _image(d))[1], "NaN or infinite"),
    "label not in dataset.json": (lambda d: (_set_voxels(_label(d), lambda a: a.__setitem__((0, 0, 0), 5)),
                                             _label(d))[1], "label value(s) [5] are not declared"),
    "fractional label": (lambda d: (_set_voxels(_label(d), lambda a: a.__setitem__((0, 0, 0), 0.5), np.float32),
                                    _label(d))[1], "fractional"),
    "negative label": (lambda d: (_set_voxels(_label(d), lambda a: a.__setitem__((0, 0, 0), -1), np.int16),
                                  _label(d))[1], "negative value -1"),
}


@pytest.mark.parametrize("case", sorted(BAD_DATASETS))
def test_bad_file_contents_stop_before_anything_is_written(capsys, nnunet_root, case):
    from nnpre_testdata import write_raw_dataset

    d = write_raw_dataset(nnunet_root, did=36, n_cases=2)
    mutate, words = BAD_DATASETS[case]
    bad = mutate(d)
    raw_before = _tree_digest(d)
    err = _run(capsys, "-d", "36", "--preset", "cpu-tiny", "-np", "1")
    assert bad in err and words in err, err
    assert _tree_digest(d) == raw_before  # the raw dataset is left alone
    assert not os.path.exists(os.path.join(os.environ["nnUNet_preprocessed"], "Dataset036_T"))


@pytest.mark.parametrize("argv,words", [
    (["--spacing", "1000"], "use a spacing of at most"),
    (["--spacing", "0.001"], "use a coarser spacing"),
    (["--patch", "100000"], "use at most [128, 128, 128] voxels"),
    (["-np", "-3"], "must be >= 1"),
])
def test_absurd_geometry_is_refused_before_writing(capsys, nnunet_root, argv, words):
    from nnpre_testdata import write_raw_dataset

    write_raw_dataset(nnunet_root, did=37, n_cases=2)
    pre = os.path.join(os.environ["nnUNet_preprocessed"], "Dataset037_T")
    assert main(["-d", "37", "--preset", "cpu-tiny", "--no-preprocess", "-np", "1"]) == 0
    before = _tree_digest(pre)
    capsys.readouterr()
    err = _run(capsys, "-d", "37", "--preset", "cpu-tiny", *argv)
    assert words in err and "sane range" in err or argv[0] in ("--patch", "-np"), err
    assert _tree_digest(pre) == before  # previous plans and fingerprint unchanged, no new folder


def test_geometry_limits_follow_the_data():
    from nnpre.dataset_checks import RawDatasetInfo, check_target_geometry
    from nnpre.errors import NnPreError

    # one case of 100 x 200 x 300 mm (SimpleITK order x, y, z; array order z, y, x = 300, 200, 100 mm)
    info = RawDatasetInfo("d", {}, {"a": {}}, 1, True, spacings=[(1.0, 2.0, 3.0)], sizes=[(100, 100, 100)],
                          case_ids=["a"])
    check_target_geometry(info, (75.0, 50.0, 25.0), (128, 128, 128))  # exactly 4 voxels per axis: allowed
    with pytest.raises(NnPreError, match=r"3 voxel\(s\) along axis 2; use a spacing of at most \(75, 50, 25\)"):
        check_target_geometry(info, (1.0, 1.0, 29.0), (4, 4, 4))  # 100 mm / 29 mm -> 3 voxels
    check_target_geometry(info, (0.2, 0.2, 0.2), (128, 128, 128))  # 1500 x 1000 x 500 = 7.5e8 voxels: allowed
    with pytest.raises(NnPreError, match="limit 2.15e"):
        check_target_geometry(info, (0.1, 0.1, 0.1), (128, 128, 128))  # 3000 x 2000 x 1000 = 6e9 voxels
    check_target_geometry(info, (1.0, 1.0, 1.0), (600, 128, 128))  # 2 x 300 voxels along axis 0
    with pytest.raises(NnPreError, match="along axis 0"):
        check_target_geometry(info, (1.0, 1.0, 1.0), (601, 128, 128))


def test_interrupted_preprocessing_leaves_no_partial_case_set(capsys, nnunet_root, monkeypatch):
    from nnpre_testdata import write_raw_dataset

    import planners.image_only as image_only
    from nnpre.dataset_checks import marker_path, verify_preprocessed
    from nnpre.errors import NnPreError

    write_raw_dataset(nnunet_root, did=38, n_cases=3)
    pre = os.path.join(os.environ["nnUNet_preprocessed"], "Dataset038_T")
    data = os.path.join(pre, "nnPreResEncLPlans_3d_fullres")
    assert main(["-d", "38", "--preset", "cpu-tiny", "-np", "1"]) == 0
    assert verify_preprocessed(data, 38) == ["c000", "c001", "c002"]
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

    infer_dataset_class(data)  # the folder holds nnU-Net's files only: stock nnU-Net still reads it
    complete = _tree_digest(data)
    # a stale split from an earlier, smaller case set
    with open(os.path.join(pre, "splits_final.json"), "w") as f:
        json.dump([{"train": ["c000"], "val": ["c001"]}], f)
    from nnpre.dataset_checks import _splits_mismatch

    assert "leaves out 1 preprocessed case" in _splits_mismatch(os.path.join(pre, "splits_final.json"),
                                                                {"c000", "c001", "c002"})

    # a re-plan killed after the first case: the complete folder stays as it was
    real = image_only._preprocess_case
    calls = []

    def dies_on_second_case(args):
        calls.append(args[0])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(args)

    monkeypatch.setattr(image_only, "_preprocess_case", dies_on_second_case)
    with pytest.raises(SystemExit):
        main(["-d", "38", "--preset", "cpu-tiny", "-np", "1"])
    assert _tree_digest(data) == complete
    monkeypatch.setattr(image_only, "_preprocess_case", real)

    # a partial folder behind the real name (e.g. stock preprocessing killed) is refused before training
    os.remove(os.path.join(data, "c002.pkl"))
    with pytest.raises(NnPreError, match="incomplete: 1 of 3"):
        verify_preprocessed(data, 38)
    from nnpre_trainers.run import make_trainer

    with pytest.raises(NnPreError, match="re-run nnPre_plan -d 38"):  # checked when any trainer is built
        make_trainer(object, 38, "nnPreResEncLPlans", fold=0)
    os.remove(marker_path(data))
    with pytest.raises(NnPreError, match="numTraining 3"):
        verify_preprocessed(data, 38)

    # a full re-plan repairs it and retires the stale split
    capsys.readouterr()
    assert main(["-d", "38", "--preset", "cpu-tiny", "-np", "1"]) == 0
    assert "moved it to" in capsys.readouterr().out
    assert not os.path.exists(os.path.join(pre, "splits_final.json"))
    assert os.path.isfile(os.path.join(pre, "splits_final.json.stale"))
    assert verify_preprocessed(data, 38) == ["c000", "c001", "c002"]


def test_replan_without_preprocessing_makes_old_data_stale(nnunet_root):
    from nnpre_testdata import write_raw_dataset

    from nnpre.dataset_checks import verify_preprocessed
    from nnpre.errors import NnPreError

    write_raw_dataset(nnunet_root, did=39, n_cases=2)
    pre = os.path.join(os.environ["nnUNet_preprocessed"], "Dataset039_T")
    data = os.path.join(pre, "nnPreResEncLPlans_3d_fullres")
    assert main(["-d", "39", "--preset", "cpu-tiny", "-np", "1"]) == 0
    plans = json.load(open(os.path.join(pre, "nnPreResEncLPlans.json")))
    verify_preprocessed(data, 39, plans=plans)
    assert main(["-d", "39", "--preset", "cpu-tiny", "--spacing", "3", "--no-preprocess", "-np", "1"]) == 0
    plans = json.load(open(os.path.join(pre, "nnPreResEncLPlans.json")))
    with pytest.raises(NnPreError, match="preprocessed with other plans"):
        verify_preprocessed(data, 39, plans=plans)
