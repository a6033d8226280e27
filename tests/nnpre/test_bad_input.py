"""Bad input to nnPre_export / nnPre_predict / nnPre_evaluate (issue 18): each case exits with status 2 and one
``error:`` line naming the file, and leaves the good files untouched."""
import errno
import json
import os
import stat
import time

import numpy as np
import pytest
import SimpleITK as sitk


def _img(arr, path, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0)):
    im = sitk.GetImageFromArray(arr)
    im.SetSpacing(spacing)
    im.SetOrigin(origin)
    sitk.WriteImage(im, str(path))
    return str(path)


def _digest(folder):
    out = {}
    for d, _, files in os.walk(folder):
        for n in files:
            p = os.path.join(d, n)
            out[p] = open(p, "rb").read()
    return out


def _fails(capsys, main, argv, *words):
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in argv])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2, err
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    for w in words:
        assert str(w) in err, (w, err)
    return err


# ------------------------------------------------------------------------------------------------ nnPre_export
def test_export_never_overwrites_its_input_or_an_existing_output(tmp_path, capsys):
    from nnpre.cli.export import main

    ck, other = tmp_path / "checkpoint_final.pth", tmp_path / "encoder.pth"
    ck.write_bytes(b"training checkpoint")
    other.write_bytes(b"an earlier export")
    _fails(capsys, main, [ck, "-o", ck], str(ck), "is the input file")
    _fails(capsys, main, [ck, "-o", ck, "--overwrite"], "is the input file")
    _fails(capsys, main, [ck, "-o", other], str(other), "already exists", "--overwrite")
    _fails(capsys, main, [ck, "-o", tmp_path], "is a folder")
    assert ck.read_bytes() == b"training checkpoint" and other.read_bytes() == b"an earlier export"


# ------------------------------------------------------------------------------------------------ nnPre_predict
def test_predict_refuses_a_2d_image_at_once(tmp_path, capsys):
    from nnpre.cli.predict import main

    inp = tmp_path / "in"
    inp.mkdir()
    _img(np.zeros((20, 24, 28), np.float32), inp / "a_0000.nii.gz")
    flat = _img(np.zeros((64, 64), np.float32), inp / "b_0000.nii.gz")
    t0 = time.perf_counter()
    _fails(capsys, main, ["-i", inp, "-o", tmp_path / "out", "-m", tmp_path / "no_model"], flat, "2-D image")
    assert time.perf_counter() - t0 < 10
    os.remove(flat)
    one = _img(np.zeros((1, 64, 64), np.float32), inp / "c_0000.nii.gz")
    _fails(capsys, main, ["-i", inp, "-o", tmp_path / "out", "-m", tmp_path / "no_model"], one, "single slice")


def test_predict_output_checks(tmp_path, capsys):
    from nnpre.cli.predict import main

    inp = tmp_path / "in"
    inp.mkdir()
    _img(np.zeros((20, 24, 28), np.float32), inp / "a_0000.nii.gz")
    _fails(capsys, main, ["-i", inp, "-o", inp, "-m", tmp_path], "is the input folder")
    (tmp_path / "file").write_text("x")
    _fails(capsys, main, ["-i", inp, "-o", tmp_path / "file", "-m", tmp_path], "is a file")


@pytest.mark.parametrize("bad,words", [("truncated", "truncated"), ("nan", "NaN"), ("2d", "2-D")])
def test_predict_reads_cases_through_the_checked_reader(tmp_path, bad, words):
    from nnpre.errors import NnPreError
    from nnpre_detection.inference import check_finite

    arr = np.random.default_rng(0).normal(size=(20, 24, 28)).astype(np.float32)
    if bad == "nan":
        arr[1, 2, 3] = np.nan
    p = _img(arr if bad != "2d" else arr[0], tmp_path / "a_0000.nii.gz")
    if bad == "truncated":
        data = open(p, "rb").read()
        open(p, "wb").write(data[: len(data) // 2])
    with pytest.raises(NnPreError, match=words):
        check_finite([p])


# ------------------------------------------------------------------------------------------------ nnPre_evaluate
@pytest.fixture
def seg_folders(tmp_path):
    gt, pred = tmp_path / "labelsTs", tmp_path / "seg"
    gt.mkdir(), pred.mkdir()
    for i, sp in enumerate([(1.0, 1.0, 2.0), (0.8, 0.8, 3.0)]):
        lab = np.zeros((8, 9, 10), np.uint8)
        lab[2:5, 2:5, 2:6] = 1
        _img(lab, gt / f"c{i}.nii.gz", spacing=sp, origin=(i * 10.0, 0, 0))
        _img(lab, pred / f"c{i}.nii.gz", spacing=sp, origin=(i * 10.0, 0, 0))
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "lesion": 1},
                                                       "file_ending": ".nii.gz", "channel_names": {"0": "CT"},
                                                       "numTraining": 2}))
    return gt, pred


def _relabel(path, fn, dtype=None):
    im = sitk.ReadImage(str(path))
    a = sitk.GetArrayFromImage(im)
    a = a.astype(dtype) if dtype else a
    fn(a)
    out = sitk.GetImageFromArray(a)
    out.CopyInformation(im)
    sitk.WriteImage(out, str(path))


def _respace(path, spacing=None, origin=None):
    im = sitk.ReadImage(str(path))
    if spacing:
        im.SetSpacing(spacing)
    if origin:
        im.SetOrigin(origin)
    sitk.WriteImage(im, str(path))


def _halve(path):
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size // 2)


def _swap(a, b):
    tmp = str(a) + ".tmp.nii.gz"
    os.replace(a, tmp), os.replace(b, a), os.replace(tmp, b)


SEG_CASES = {
    "doubled spacing": (lambda gt, pred: _respace(pred / "c0.nii.gz", spacing=(2.0, 2.0, 4.0)), "c0.nii.gz",
                        "geometry differs", "spacing"),
    "shifted origin": (lambda gt, pred: _respace(pred / "c1.nii.gz", origin=(0.0, 5.0, 0.0)), "c1.nii.gz", "origin"),
    "swapped cases": (lambda gt, pred: _swap(pred / "c0.nii.gz", pred / "c1.nii.gz"), "c0.nii.gz", "geometry"),
    "other shape": (lambda gt, pred: _img(np.zeros((8, 9, 11), np.uint8), pred / "c1.nii.gz", (0.8, 0.8, 3.0),
                                          (10.0, 0, 0)), "c1.nii.gz", "shape"),
    "label not in dataset.json": (lambda gt, pred: _relabel(pred / "c0.nii.gz", lambda a: a.__setitem__(0, 5)),
                                  "c0.nii.gz", "[5] are not declared"),
    "negative reference label": (lambda gt, pred: _relabel(gt / "c1.nii.gz", lambda a: a.__setitem__(0, -1),
                                                           np.int16), "c1.nii.gz", "negative value -1"),
    "fractional prediction": (lambda gt, pred: _relabel(pred / "c1.nii.gz", lambda a: a.__setitem__(0, 0.5),
                                                        np.float32), "c1.nii.gz", "fractional"),
    "truncated prediction": (lambda gt, pred: _halve(pred / "c0.nii.gz"), "c0.nii.gz",
                             "truncated"),
}


@pytest.mark.parametrize("case", sorted(SEG_CASES))
def test_evaluate_seg_bad_input(seg_folders, tmp_path, capsys, case):
    from nnpre.cli.evaluate import main

    gt, pred = seg_folders
    out = tmp_path / "seg.json"
    assert main(["seg", "-p", str(pred), "-g", str(gt), "-o", str(out), "-np", "1"]) == 0
    report = out.read_bytes()
    mutate, name, *words = SEG_CASES[case]
    mutate(gt, pred)
    before = _digest(tmp_path)
    _fails(capsys, main, ["seg", "-p", pred, "-g", gt, "-o", out, "-np", "1"], name, *words)
    assert _digest(tmp_path) == before and out.read_bytes() == report  # nothing written, nothing replaced


def test_evaluate_seg_argument_errors(seg_folders, tmp_path, capsys):
    from nnpre.cli.evaluate import main

    gt, pred = seg_folders
    _fails(capsys, main, ["seg", "-p", pred, "-g", gt, "-o", tmp_path / "s.json", "-np", "-3"], "must be >= 1")
    _fails(capsys, main, ["seg", "-p", pred, "-g", gt, "-o", tmp_path], "is a folder")
    _fails(capsys, main, ["seg", "-p", pred, "-g", gt, "-o", tmp_path / "dataset.json"], "not an earlier evaluation")


@pytest.fixture
def det_folders(tmp_path):
    gt, pred = tmp_path / "gt", tmp_path / "pred"
    gt.mkdir(), pred.mkdir()
    for i in range(2):
        lab = np.zeros((10, 10, 10), np.uint8)
        lab[2:4, 2:4, 2:4] = 1
        _img(lab, gt / f"c{i}.nii.gz", spacing=(1.0, 1.0, 1.0 + i), origin=(5.0 * i, 0, 0))
        (pred / f"c{i}.json").write_text(json.dumps({
            "case": f"c{i}", "boxes": [[2, 2, 4, 4, 2, 4]], "scores": [0.9], "labels": [0],
            "spacing": [1.0, 1.0, 1.0 + i], "origin": [5.0 * i, 0, 0], "direction": [1, 0, 0, 0, 1, 0, 0, 0, 1],
            "shape": [10, 10, 10]}))
    return gt, pred


def _edit_json(path, **kw):
    d = json.loads(path.read_text())
    d.update(kw)
    path.write_text(json.dumps(d))


DET_CASES = {
    "doubled spacing": (lambda gt, pred: _edit_json(pred / "c0.json", spacing=[2.0, 2.0, 2.0]), "c0.json",
                        "geometry differs", "spacing"),
    "other shape": (lambda gt, pred: _edit_json(pred / "c1.json", shape=[10, 10, 20]), "c1.json", "shape"),
    "swapped cases": (lambda gt, pred: (_edit_json(pred / "c0.json", spacing=[1.0, 1.0, 2.0], origin=[5.0, 0, 0]),
                                        _edit_json(pred / "c1.json", spacing=[1.0, 1.0, 1.0], origin=[0, 0, 0])),
                      "c0.json", "swapped case"),
    "label not in dataset.json": (lambda gt, pred: (
        (gt.parent / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "lesion": 1},
                                                            "file_ending": ".nii.gz"})),
        _relabel(gt / "c0.nii.gz", lambda a: a.__setitem__((7, 7, 7), 5))), "c0.nii.gz", "[5] are not declared"),
    "JSON list": (lambda gt, pred: (pred / "c1.json").write_text(json.dumps([{"boxes": []}])), "c1.json",
                  "JSON list"),
    "truncated ground truth": (lambda gt, pred: _halve(gt / "c1.nii.gz"), "c1.nii.gz",
                               "truncated"),
}


@pytest.mark.parametrize("case", sorted(DET_CASES))
def test_evaluate_det_bad_input(det_folders, tmp_path, capsys, case):
    from nnpre.cli.evaluate import main

    gt, pred = det_folders
    out = tmp_path / "det.json"
    assert main(["det", "-p", str(pred), "-g", str(gt), "-o", str(out), "--no-plots"]) == 0
    report = out.read_bytes()
    mutate, name, *words = DET_CASES[case]
    mutate(gt, pred)
    before = _digest(tmp_path)
    _fails(capsys, main, ["det", "-p", pred, "-g", gt, "-o", out, "--no-plots"], name, *words)
    assert _digest(tmp_path) == before and out.read_bytes() == report
    _fails(capsys, main, ["det", "-p", pred, "-g", gt, "-o", pred / "c0.json"], "not an earlier evaluation")


# ------------------------------------------------------------------------------------------------ OS errors
def test_os_errors_become_one_line(capsys):
    import argparse

    from nnpre.cli._common import cli_entry

    def parser():
        return argparse.ArgumentParser()

    for exc, words in [(PermissionError(errno.EACCES, "Permission denied", "/data/preprocessed/x.b2nd"),
                        "/data/preprocessed/x.b2nd: Permission denied; check the permissions"),
                       (FileExistsError(errno.EEXIST, "File exists", "/r/out"), "/r/out: File exists; remove it"),
                       (OSError(errno.EROFS, "Read-only file system", "/ro/plans.json"), "read-only")]:
        def boom(args, exc=exc):
            raise exc

        _fails(capsys, cli_entry(boom, parser), [], words)

    def bug(args):
        raise OSError(errno.EBADF, "Bad file descriptor")  # not a user error: the traceback stays

    with pytest.raises(OSError):
        cli_entry(bug, parser)([])


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_output_folder(det_folders, tmp_path, capsys):
    from nnpre.cli.evaluate import main

    gt, pred = det_folders
    ro = tmp_path / "ro"
    ro.mkdir()
    os.chmod(ro, stat.S_IRUSR | stat.S_IXUSR)
    try:
        _fails(capsys, main, ["det", "-p", pred, "-g", gt, "-o", ro / "det.json"], "not writable")
    finally:
        os.chmod(ro, stat.S_IRWXU)


# ------------------------------------------------------------------------------------------------ --pretrained
def test_pretrained_folder_names_the_checkpoint_inside(tmp_path):
    from nnpre.errors import NnPreError
    from nnpre_trainers.transfer_step import EncoderTransfer

    run = tmp_path / "nnPreTrainer_MAE__nnPreResEncLPlans__3d_fullres"
    (run / "fold_all").mkdir(parents=True)
    with pytest.raises(NnPreError, match="is a folder without any .pth checkpoint.*fold_X/checkpoint_final.pth"):
        EncoderTransfer(str(run))
    (run / "fold_all" / "checkpoint_latest.pth").write_bytes(b"x")
    (run / "fold_all" / "checkpoint_final.pth").write_bytes(b"x")
    with pytest.raises(NnPreError) as e:
        EncoderTransfer(str(run))
    assert f"e.g. {run / 'fold_all' / 'checkpoint_final.pth'} (or one of 1 other" in str(e.value)
