"""Ignore regions: LUNA16 excluded-findings CSV -> index-space boxes, <case>_ignore.json folders, and the effect on
AP / FROC end to end (hand-computed), through evaluate_detection and nnPre_evaluate."""
import json

import numpy as np
import pytest
import SimpleITK as sitk

from nnpre.cli.evaluate import main as evaluate_main
from nnpre.errors import NnPreError
from nnpre_detection.metrics.evaluate import evaluate_detection
from nnpre_detection.metrics.ignore import read_excluded_csv, read_ignore_dir, sphere_boxes

AP10, AP50 = "AP_IoU_0.10_MaxDet_100", "AP_IoU_0.50_MaxDet_100"
FROC10 = "FROC_score_IoU_0.10"
SPACING, ORIGIN, DIRECTION = (0.5, 1.0, 2.0), (-10.0, 5.0, 100.0), (1, 0, 0, 0, 1, 0, 0, 0, 1)


def test_csv_reading_and_luna_default_diameter(tmp_path):
    p = tmp_path / "annotations_excluded.csv"
    p.write_text("seriesuid,coordX,coordY,coordZ,diameter_mm\n1.2.3,-5,15,120,4.5\n1.2.3,0,0,0,-1\n9.9,1,2,3,6\n\n")
    rows = read_excluded_csv(str(p))
    assert sorted(rows) == ["1.2.3", "9.9"]
    np.testing.assert_array_equal(rows["1.2.3"], [[-5, 15, 120, 4.5], [0, 0, 0, 10.0]])  # -1 -> 10 mm (LUNA16)
    p.write_text("seriesuid,x,y,z,diameter_mm\n")
    with pytest.raises(NnPreError, match=r"lacks \['coordX', 'coordY', 'coordZ'\]"):
        read_excluded_csv(str(p))
    p.write_text("seriesuid,coordX,coordY,coordZ,diameter_mm\na,1,2,three,4\n")
    with pytest.raises(NnPreError, match="line 2: coordX, coordY, coordZ and diameter_mm must be numbers"):
        read_excluded_csv(str(p))


def test_sphere_box_by_hand():
    # centre at SimpleITK index (10, 10, 10): world = origin + spacing * 10 = (-5, 15, 120); diameter 4 mm ->
    # half extents x 2/0.5 = 4, y 2/1 = 2, z 2/2 = 1 voxels (+ margin); layout (z1, y1, z2, y2, x1, x2)
    f = np.array([[-5.0, 15.0, 120.0, 4.0]])
    np.testing.assert_allclose(sphere_boxes(f, SPACING, ORIGIN, DIRECTION, margin=0), [[9, 8, 11, 12, 6, 14]])
    np.testing.assert_allclose(sphere_boxes(f, SPACING, ORIGIN, DIRECTION), [[8, 7, 12, 13, 5, 15]])


def test_sphere_box_is_the_tight_index_box_for_an_oblique_image():
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    img = sitk.Image(8, 8, 8, sitk.sitkUInt8)
    img.SetSpacing((0.7, 1.3, 2.5)), img.SetOrigin((3.0, -4.0, 50.0)), img.SetDirection(q.ravel().tolist())
    centre, diameter = np.array([1.0, 2.0, 60.0]), 7.0
    box = sphere_boxes(np.r_[centre, diameter][None], img.GetSpacing(), img.GetOrigin(), img.GetDirection(), 0)[0]
    u = rng.normal(size=(20000, 3))
    surface = centre + 0.5 * diameter * u / np.linalg.norm(u, axis=1, keepdims=True)
    idx = np.array([img.TransformPhysicalPointToContinuousIndex(p.tolist()) for p in surface])  # (x, y, z) index
    c_idx = img.TransformPhysicalPointToContinuousIndex(centre.tolist())
    np.testing.assert_allclose([(box[0] + box[2]) / 2, (box[1] + box[3]) / 2, (box[4] + box[5]) / 2],
                               [c_idx[2], c_idx[1], c_idx[0]], atol=1e-9)
    lo = np.array([box[4], box[1], box[0]])  # SimpleITK index order x, y, z
    hi = np.array([box[5], box[3], box[2]])
    assert (idx >= lo - 1e-9).all() and (idx <= hi + 1e-9).all()  # holds the sphere
    np.testing.assert_allclose(idx.min(0), lo, atol=0.05)  # and is tight
    np.testing.assert_allclose(idx.max(0), hi, atol=0.05)


def _image(arr):
    img = sitk.GetImageFromArray(arr.astype(np.uint8))
    img.SetSpacing(SPACING), img.SetOrigin(ORIGIN), img.SetDirection(DIRECTION)
    return img


@pytest.fixture
def luna(tmp_path):
    """Two scans. s1: one nodule, nnDetection box (1, 1, 5, 5, 1, 5), found with 0.8; a 0.9 detection on an
    excluded finding (world (-5, 15, 120), 4 mm; its ignore box is (8, 7, 12, 13, 5, 15)). s2: no nodule, a 0.5 FP.
    """
    gt, pred = tmp_path / "gt", tmp_path / "pred"
    gt.mkdir(), pred.mkdir()
    inst = np.zeros((20, 20, 20))
    inst[2:5, 2:5, 2:5] = 1
    for case, arr, mapping in (("s1", inst, {"1": 0}), ("s2", np.zeros((20, 20, 20)), {})):
        sitk.WriteImage(_image(arr), str(gt / f"{case}.nii.gz"))
        (gt / f"{case}.json").write_text(json.dumps({"instances": mapping}))
    geo = {"spacing": list(SPACING), "origin": list(ORIGIN), "direction": list(DIRECTION), "shape": [20, 20, 20]}
    (pred / "s1.json").write_text(json.dumps({"boxes": [[8, 7, 12, 13, 5, 15], [1, 1, 5, 5, 1, 5]],
                                              "scores": [0.9, 0.8], "labels": [0, 0], **geo}))
    (pred / "s2.json").write_text(json.dumps({"boxes": [[10, 10, 14, 14, 10, 14]], "scores": [0.5], "labels": [0],
                                              **geo}))
    csv = tmp_path / "annotations_excluded.csv"
    csv.write_text("seriesuid,coordX,coordY,coordZ,diameter_mm\ns1,-5,15,120,4\nother,0,0,0,-1\n")
    return gt, pred, csv


def test_excluded_finding_is_no_longer_a_false_positive(luna, tmp_path):
    gt, pred, csv = luna
    off = evaluate_detection(str(pred), str(gt), plots=False)
    # default off = nnDetection: 0.9 FP, 0.8 TP, 0.5 FP. AP: precision envelope 0.5 at every recall point.
    # FROC (2 scans, 1 nodule): (FP/scan, sens) (0,0) (.5,0) (.5,1) (1,1) -> 0, 0, 1, 1, 1, 1, 1 -> 5/7
    assert off["metrics"][AP10] == pytest.approx(0.5, abs=1e-7) and off["metrics"][FROC10] == pytest.approx(5 / 7)
    assert "ignore" not in off["info"] and "num_gt_ignored" not in off["per_case"]["s1"]
    on = evaluate_detection(str(pred), str(gt), plots=False, ignore=str(csv))
    # 0.9 is ignored: TP then FP -> AP 1; FROC (0,0) (0,1) (.5,1) -> sensitivity 1 at every FP rate
    assert on["metrics"][AP10] == 1.0 and on["metrics"][AP50] == 1.0 and on["metrics"][FROC10] == 1.0
    ign = on["info"]["ignore"]
    assert ign["num_gt_ignored"] == 1 and ign["num_predictions_ignored"] == {"IoU_0.10": 1, "IoU_0.50": 1}
    assert ign["rows_used"] == 1 and ign["rows_other_series"] == 1 and ign["margin_voxels"] == 1.0
    assert on["info"]["num_gt"] == 1
    assert on["per_case"]["s1"] == {"num_gt": 1, "num_pred": 2, "tp_IoU_0.10": 1, "fp_IoU_0.10": 0,
                                    "fn_IoU_0.10": 0, "num_gt_ignored": 1, "ignored_pred_IoU_0.10": 1}
    # bare sphere box (margin 0) = (9, 8, 11, 12, 6, 14): IoU with the detection 64/240 = 0.27 -> ignored at
    # IoU 0.1 but an FP again at 0.5 (AP@0.5: FP, TP, FP -> 0.5)
    bare = evaluate_detection(str(pred), str(gt), plots=False, ignore=str(csv), ignore_margin=0)
    assert bare["info"]["ignore"]["num_predictions_ignored"] == {"IoU_0.10": 1, "IoU_0.50": 0}
    assert bare["metrics"][AP10] == 1.0 and bare["metrics"][AP50] == pytest.approx(0.5, abs=1e-7)


def test_geometry_from_the_ground_truth_image_and_ignore_dir(luna, tmp_path):
    gt, pred, csv = luna
    for case in ("s1", "s2"):  # predictions without geometry: the CSV is placed with the label image's header
        d = json.loads((pred / f"{case}.json").read_text())
        (pred / f"{case}.json").write_text(json.dumps({k: d[k] for k in ("boxes", "scores", "labels")}))
    via_header = evaluate_detection(str(pred), str(gt), plots=False, ignore=str(csv))
    ign_dir = tmp_path / "ignore"
    ign_dir.mkdir()
    (ign_dir / "s1_ignore.json").write_text(json.dumps({"boxes": [[8, 7, 12, 13, 5, 15]]}))
    via_dir = evaluate_detection(str(pred), str(gt), plots=False, ignore=str(ign_dir))
    assert via_header["metrics"] == via_dir["metrics"] and via_dir["metrics"][AP10] == 1.0
    assert via_dir["info"]["ignore"]["files_used"] == 1
    boxes, _ = read_ignore_dir(str(ign_dir), ["s1", "s2"])
    assert boxes["s1"]["classes"].tolist() == [0]


def test_cli_flags(luna, tmp_path, capsys):
    gt, pred, csv = luna
    out = tmp_path / "eval.json"
    assert evaluate_main(["det", "-p", str(pred), "-g", str(gt), "-o", str(out), "--no-plots",
                          "--ignore-csv", str(csv)]) == 0
    report = json.loads(out.read_text())
    assert report["metrics"][AP10] == 1.0 and report["info"]["ignore"]["num_gt_ignored"] == 1
    assert "ignored: 1 regions" in capsys.readouterr().out
    with pytest.raises(SystemExit):  # one source at a time
        evaluate_main(["det", "-p", str(pred), "-g", str(gt), "-o", str(out), "--ignore-csv", str(csv),
                       "--ignore-dir", str(tmp_path)])


def test_refusals(luna, tmp_path):
    gt, pred, csv = luna
    csv.write_text("seriesuid,coordX,coordY,coordZ,diameter_mm\n1.3.6.1,0,0,0,5\n")
    with pytest.raises(NnPreError, match="no seriesuid matches an evaluated case"):
        evaluate_detection(str(pred), str(gt), plots=False, ignore=str(csv))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(NnPreError, match="no <case>_ignore.json files"):
        evaluate_detection(str(pred), str(gt), plots=False, ignore=str(empty))
    (empty / "s1_ignore.json").write_text(json.dumps({"boxes": [[8, 7, 8, 13, 5, 15]]}))
    with pytest.raises(NnPreError, match="zero volume"):
        evaluate_detection(str(pred), str(gt), plots=False, ignore=str(empty))
    (empty / "s1_ignore.json").write_text(json.dumps({"boxes": [[8, 7, 12, 13, 5, 15]], "classes": [3]}))
    with pytest.raises(NnPreError, match="class id 3 but the evaluation has classes 0..0"):
        evaluate_detection(str(pred), str(gt), plots=False, ignore=str(empty))
    with pytest.raises(NnPreError, match="does not exist"):
        evaluate_detection(str(pred), str(gt), plots=False, ignore=str(tmp_path / "nope.csv"))


def test_csv_needs_a_geometry(tmp_path):
    gt, pred = tmp_path / "gt", tmp_path / "pred"
    gt.mkdir(), pred.mkdir()
    np.savez(gt / "s1_boxes_gt.npz", boxes=np.array([[1, 1, 5, 5, 1, 5]], float), classes=np.array([0]))
    (pred / "s1.json").write_text(json.dumps({"boxes": [[1, 1, 5, 5, 1, 5]], "scores": [0.8], "labels": [0]}))
    csv = tmp_path / "x.csv"
    csv.write_text("seriesuid,coordX,coordY,coordZ,diameter_mm\ns1,0,0,0,5\n")
    with pytest.raises(NnPreError, match="case s1 has excluded findings but no image geometry"):
        evaluate_detection(str(pred), str(gt), plots=False, ignore=str(csv))
