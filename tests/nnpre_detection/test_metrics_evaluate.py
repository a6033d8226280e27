"""Folder-level detection evaluation: prediction files, ground-truth layouts, class sets and input rules."""
import json

import numpy as np
import pytest
import SimpleITK as sitk

from nnpre.errors import NnPreError
from nnpre_detection.metrics.classes import classes_from_dataset_json
from nnpre_detection.metrics.evaluate import evaluate_boxes, evaluate_detection, to_json_ready
from nnpre_detection.metrics.io import load_predictions

AP10 = "AP_IoU_0.10_MaxDet_100"


def _strict_load(path):
    def no_constants(name):
        raise ValueError(f"non-strict JSON constant {name}")

    with open(path) as f:
        return json.load(f, parse_constant=no_constants)


def write_case(gt_dir, pred_dir, case, inst, mapping, boxes, scores, labels):
    sitk.WriteImage(sitk.GetImageFromArray(inst.astype(np.uint8)), str(gt_dir / f"{case}.nii.gz"))
    (gt_dir / f"{case}.json").write_text(json.dumps({"instances": {str(k): v for k, v in mapping.items()}}))
    if pred_dir is not None:
        (pred_dir / f"{case}.json").write_text(json.dumps(
            {"case": case, "boxes": boxes, "scores": scores, "labels": labels, "spacing": [1, 1, 1]}))


@pytest.fixture
def folders(tmp_path):
    gt, pred = tmp_path / "gt", tmp_path / "pred"
    gt.mkdir(), pred.mkdir()
    inst = np.zeros((12, 12, 12))
    inst[2:5, 2:5, 2:5] = 1  # nnDetection box (1, 1, 5, 5, 1, 5)
    inst[8:11, 8:11, 8:11] = 2  # (7, 7, 11, 11, 7, 11)
    # case a: class-0 object found, class-1 object found with a lower score, plus a class-1 FP
    write_case(gt, pred, "a", inst, {1: 0, 2: 1}, [[1, 1, 5, 5, 1, 5], [7, 7, 11, 11, 7, 11], [0, 0, 2, 2, 0, 2]],
               [0.9, 0.4, 0.6], [0, 1, 1])
    # case b: no objects, one class-0 FP
    write_case(gt, pred, "b", np.zeros((12, 12, 12)), {}, [[0, 0, 3, 3, 0, 3]], [0.5], [0])
    return gt, pred


def test_folder_evaluation_writes_report_and_plots(folders, tmp_path):
    gt, pred = folders
    out = tmp_path / "out" / "det.json"
    report = evaluate_detection(str(pred), str(gt), str(out), per_class_froc=True)
    saved = _strict_load(out)
    assert saved["metrics"] == report["metrics"]
    m = saved["metrics"]
    assert list(m)[:3] == [AP10, "mAP_IoU_0.10_0.50_0.05_MaxDet_100", "FROC_score_IoU_0.10"]
    # class 0: 0.9 TP then 0.5 FP (case b) -> AP 1 ; class 1: 0.6 FP then 0.4 TP -> precision .5 everywhere
    assert m["0_" + AP10] == 1.0 and m["1_" + AP10] == pytest.approx(0.5, abs=1e-7)
    assert m[AP10] == pytest.approx(0.75, abs=1e-7)
    assert saved["info"]["num_cases"] == 2 and saved["info"]["num_gt"] == 2
    assert saved["per_case"]["a"]["tp_IoU_0.10"] == 2 and saved["per_case"]["b"]["fp_IoU_0.10"] == 1
    assert len(saved["froc"]["FROC_curve_IoU_0.10"]) == 7 and "mc_FROC_score_IoU_0.10" in m
    for png in saved["plots"]:
        with open(png, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_missing_prediction_rules(folders):
    gt, pred = folders
    (pred / "b.json").unlink()
    with pytest.raises(NnPreError, match=r"no prediction for 1 ground-truth case\(s\): \['b'\]"):
        evaluate_detection(str(pred), str(gt))
    r = evaluate_detection(str(pred), str(gt), missing_predictions="empty")
    assert r["info"]["num_cases"] == 2 and r["info"]["cases_without_prediction_file"] == ["b"]
    assert r["metrics"]["0_" + AP10] == 1.0  # case b's FP is gone
    (pred / "z.json").write_text(json.dumps({"boxes": [], "scores": [], "labels": []}))
    with pytest.raises(NnPreError, match="without ground truth"):
        evaluate_detection(str(pred), str(gt), missing_predictions="empty")


@pytest.mark.parametrize("field,value,message", [
    ("boxes", [[5, 1, 1, 5, 1, 5]], "negative extent"),
    ("scores", [1.5], "finite probability"),
    ("labels", [7], "unknown class id 7"),
    ("labels", [0.5], "integer class ids"),
])
def test_bad_prediction_files(folders, field, value, message):
    gt, pred = folders
    data = {"case": "b", "boxes": [[0, 0, 3, 3, 0, 3]], "scores": [0.5], "labels": [0]}
    data[field] = value
    (pred / "b.json").write_text(json.dumps(data))
    with pytest.raises(NnPreError, match=message) as e:
        evaluate_detection(str(pred), str(gt))
    assert "b.json" in str(e.value)


def test_nan_score_and_malformed_files(folders):
    gt, pred = folders
    (pred / "b.json").write_text('{"boxes": [[0, 0, 3, 3, 0, 3]], "scores": [NaN], "labels": [0]}')
    with pytest.raises(NnPreError, match="finite probability"):
        evaluate_detection(str(pred), str(gt))
    (pred / "b.json").write_text('{"boxes": [[0, 0, 3, 3, 0, 3]], "labels": [0]}')
    with pytest.raises(NnPreError, match=r"lacks \['scores'\]"):
        load_predictions(str(pred))
    (pred / "b.json").write_text('{"case": "c", "boxes": [], "scores": [], "labels": []}')
    with pytest.raises(NnPreError, match="file name says case 'b'"):
        load_predictions(str(pred))
    (pred / "b.json").write_text('{"boxes": [], "scores": [], "labels": []}')
    (pred / "summary.json").write_text('{"n_cases": 2}')  # not a prediction file: skipped
    assert sorted(load_predictions(str(pred))) == ["a", "b"]


def test_class_sets(folders, tmp_path):
    gt, pred = folders
    # explicit 3 classes: class 2 has no GT -> -1 enters the mean (nnDetection quirk)
    r = evaluate_detection(str(pred), str(gt), num_classes=3)
    assert r["metrics"]["2_" + AP10] == -1.0
    assert r["metrics"][AP10] == pytest.approx((1.0 + 0.5 - 1.0) / 3, abs=1e-7)
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"labels": {"0": "nodule", "1": "mass"}}))
    r = evaluate_detection(str(pred), str(gt), dataset_json=str(ds))
    assert r["info"]["class_names"] == {"0": "nodule", "1": "mass"} and r["info"]["num_classes"] == 2
    nnunet = tmp_path / "nnunet.json"
    nnunet.write_text(json.dumps({"labels": {"background": 0, "a": 1, "b": 2, "ignore": 3}}))
    c = classes_from_dataset_json(str(nnunet))
    assert c.num_classes == 2 and c.names == ("a", "b") and c.semantic_labels == (1, 2)
    with pytest.raises(NnPreError, match="unknown class id 1"):
        evaluate_detection(str(pred), str(gt), num_classes=1)


def test_semantic_ground_truth(tmp_path):
    gt, pred = tmp_path / "gt", tmp_path / "pred"
    gt.mkdir(), pred.mkdir()
    seg = np.zeros((10, 10, 10), np.uint8)
    seg[1:3, 1:3, 1:3] = 1
    seg[6:8, 6:8, 6:8] = 1  # two components of label 1 -> two class-0 objects
    sitk.WriteImage(sitk.GetImageFromArray(seg), str(gt / "s.nii.gz"))
    (pred / "s.json").write_text(json.dumps({"boxes": [[0, 0, 3, 3, 0, 3]], "scores": [0.8], "labels": [0]}))
    r = evaluate_detection(str(pred), str(gt))
    assert r["info"]["num_gt"] == 2
    # one of two found with precision 1: recall points 0..0.5 -> 1 (51 of 101)
    assert r["metrics"][AP10] == pytest.approx(51 / 101)


def test_evaluate_boxes_in_memory_and_json_ready():
    preds = {"x": {"boxes": np.array([[0, 0, 2, 2, 0, 2]], np.float32), "scores": np.array([0.3], np.float32),
                   "labels": np.array([0])}}
    gt = {"x": {"boxes": np.array([[10, 10, 12, 12, 10, 12]]), "classes": np.array([0])}}
    r = evaluate_boxes(preds, gt, classes=1)
    assert r["metrics"][AP10] == 0.0 and np.isnan(r["metrics"]["FROC_score_IoU_0.10"])
    ready = to_json_ready(r)
    assert ready["metrics"]["FROC_score_IoU_0.10"] is None
    json.dumps(ready, allow_nan=False)
