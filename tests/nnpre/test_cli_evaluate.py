"""``nnPre_evaluate det|seg`` end to end on tiny hand-made files."""
import json

import numpy as np
import pytest
import SimpleITK as sitk

from nnpre.cli.evaluate import main


def _img(arr, path, spacing=(1.0, 1.0, 1.0)):
    im = sitk.GetImageFromArray(arr.astype(np.uint8))
    im.SetSpacing(spacing)
    sitk.WriteImage(im, str(path))


@pytest.fixture
def det_data(tmp_path):
    gt, pred = tmp_path / "gt", tmp_path / "pred"
    gt.mkdir(), pred.mkdir()
    for i in range(3):
        inst = np.zeros((10, 10, 10))
        inst[2:4, 2:4, 2:4] = 1  # box (1, 1, 4, 4, 1, 4)
        _img(inst, gt / f"c{i}.nii.gz")
        (gt / f"c{i}.json").write_text(json.dumps({"instances": {"1": 0}}))
        boxes = [[1, 1, 4, 4, 1, 4]] if i < 2 else [[6, 6, 9, 9, 6, 9]]  # case 2: a miss + an FP
        (pred / f"c{i}.json").write_text(json.dumps({"case": f"c{i}", "boxes": boxes, "scores": [0.9 - 0.1 * i],
                                                     "labels": [0]}))
    return gt, pred


def test_det_cli_writes_metrics_and_plots(det_data, tmp_path, capsys):
    gt, pred = det_data
    out = tmp_path / "res" / "det.json"
    assert main(["det", "-p", str(pred), "-g", str(gt), "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "AP_IoU_0.10_MaxDet_100" in printed and "FROC_score_IoU_0.10" in printed
    report = json.loads(out.read_text())
    # 2 of 3 objects found by the two best detections, then an FP: AP = recall points 0..2/3 at precision 1
    assert report["metrics"]["AP_IoU_0.10_MaxDet_100"] == pytest.approx(67 / 101)
    assert (tmp_path / "res" / "det_froc.png").is_file() and (tmp_path / "res" / "det_pr.png").is_file()


def test_det_cli_bad_input_exits_2(det_data, tmp_path, capsys):
    gt, pred = det_data
    (pred / "c1.json").write_text(json.dumps({"boxes": [[1, 1, 4, 4, 1, 4]], "scores": [float("nan")],
                                              "labels": [0]}))
    with pytest.raises(SystemExit) as e:
        main(["det", "-p", str(pred), "-g", str(gt), "-o", str(tmp_path / "x.json"), "--no-plots"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "c1.json" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x.json").exists()
    (pred / "c1.json").unlink()
    with pytest.raises(SystemExit):
        main(["det", "-p", str(pred), "-g", str(gt), "-o", str(tmp_path / "x.json")])
    assert "--missing-as-empty" in capsys.readouterr().err
    assert main(["det", "-p", str(pred), "-g", str(gt), "-o", str(tmp_path / "x.json"), "--missing-as-empty",
                 "--no-plots"]) == 0
    assert not (tmp_path / "x_froc.png").exists()


def test_seg_cli_uses_nnunet_dice(tmp_path, capsys):
    gt, pred = tmp_path / "labels", tmp_path / "seg"
    gt.mkdir(), pred.mkdir()
    ref = np.zeros((8, 8, 8))
    ref[2:6, 2:6, 2:6] = 1  # 64 voxels
    ref[0, 0, 0:2] = 2
    prd = ref.copy()
    prd[2:6, 2:6, 2:4] = 0  # label 1: 32 of 64 predicted -> Dice 2*32/(64+32) = 2/3
    _img(ref, gt / "a.nii.gz")
    _img(prd, pred / "a.nii.gz")
    out = tmp_path / "seg.json"
    assert main(["seg", "-p", str(pred), "-g", str(gt), "-o", str(out), "-np", "1"]) == 0
    summary = json.loads(out.read_text())
    assert summary["mean"]["1"]["Dice"] == pytest.approx(2 / 3)
    assert summary["mean"]["2"]["Dice"] == pytest.approx(1.0)
    assert summary["foreground_mean"]["Dice"] == pytest.approx((2 / 3 + 1) / 2)
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "organ": 1, "dot": 2},
                                                       "file_ending": ".nii.gz", "channel_names": {"0": "CT"},
                                                       "numTraining": 1}))
    _img(ref, gt / "b.nii.gz")  # b has no prediction -> clear error
    with pytest.raises(SystemExit) as e:
        main(["seg", "-p", str(pred), "-g", str(gt), "-o", str(out)])
    assert e.value.code == 2 and "no prediction for 1 reference case" in capsys.readouterr().err
