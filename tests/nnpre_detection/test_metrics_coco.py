"""Hand-computed AP / mAP cases, including nnDetection's float32 recall and -1 quirks."""
import numpy as np
import pytest

from nnpre_detection.metrics.coco import RECALL_THRESHOLDS, coco_iou_thresholds, compute_coco, iou_list_full
from nnpre_detection.metrics.matching import match_cases

AP10 = "AP_IoU_0.10_MaxDet_100"
MAP = "mAP_IoU_0.10_0.50_0.05_MaxDet_100"
THR = coco_iou_thresholds()[0]


def cube(a0, s=10.0):
    return [a0, 0, a0 + s, s, 0, s]


def run(cases, num_classes=1, **kw):
    """cases: list of (pred boxes, scores, labels, gt boxes, gt classes)."""
    cols = list(zip(*cases))
    m = match_cases([np.array(b, float).reshape(-1, 6) for b in cols[0]], [np.array(s, float) for s in cols[1]],
                    [np.array(l_, int) for l_ in cols[2]], [np.array(b, float).reshape(-1, 6) for b in cols[3]],
                    [np.array(c, int) for c in cols[4]], THR, num_classes=num_classes)
    return compute_coco(m, num_classes, **kw)


def test_threshold_sets_are_nndetections():
    thr, list_idx, range_idx = coco_iou_thresholds()
    np.testing.assert_allclose(thr, np.arange(9) * 0.05 + 0.1)
    assert thr[list_idx].tolist() == [0.1, 0.5] and len(range_idx) == 9
    assert len(RECALL_THRESHOLDS) == 101 and RECALL_THRESHOLDS[12] == 0.12
    full, _, _ = coco_iou_thresholds(iou_list_full())
    # np.arange(0.1, 1.0, 0.1) and the linspace range share their float values (e.g. 0.30000000000000004)
    assert len(full) == 13 and set(iou_list_full().tolist()) <= set(full.tolist())


def test_perfect_detection_gives_ap_one():
    r = run([([cube(0)], [0.9], [0], [cube(0)], [0])])
    assert r[AP10] == 1.0 and r[MAP] == 1.0 and r["0_" + AP10] == 1.0


def test_pooled_two_cases_hand_computed():
    # pooled by score: 0.9 TP (case A), 0.8 FP (case A), 0.7 TP (case B); 2 GT
    # recall .5 .5 1 ; precision 1 .5 .667 -> envelope 1 .667 .667
    # recall points 0..0.50 (51) -> 1 ; 0.51..1.00 (50) -> 2/3 (as float32)
    r = run([([cube(0), cube(50)], [0.9, 0.8], [0, 0], [cube(0)], [0]),
             ([cube(0)], [0.7], [0], [cube(0)], [0])])
    expected = (51 * 1.0 + 50 * float(np.float32(2) / np.float32(3))) / 101
    assert r[AP10] == pytest.approx(expected, abs=1e-15)
    assert r[AP10] == pytest.approx((51 + 50 * 2 / 3) / 101, abs=1e-7)


def test_float32_recall_quirk_3_of_25():
    # 25 GT boxes, the 3 best detections are TPs: recall float32(3/25) = 0.11999999731 < 0.12, so the 0.12
    # recall point is not reached: AP = 12/101 (a float64 recall would give 13/101)
    gts = [cube(30 * i) for i in range(25)]
    r = run([([cube(0), cube(30), cube(60)], [0.9, 0.8, 0.7], [0, 0, 0], gts, [0] * 25)])
    assert r[AP10] == 12 / 101
    assert run([([cube(0), cube(30), cube(60)], [0.9, 0.8, 0.7], [0, 0, 0], gts, [0] * 25)],
               float_mode="monai-numpy2")[AP10] == 12 / 101


def test_class_without_ground_truth_enters_the_mean_as_minus_one():
    # class 0 perfect (AP 1), class 1 has a prediction but no GT -> precision -1 -> mean 0
    r = run([([cube(0), cube(50)], [0.9, 0.8], [0, 1], [cube(0)], [0])], num_classes=2)
    assert r["0_" + AP10] == 1.0 and r["1_" + AP10] == -1.0 and r[AP10] == 0.0
    assert r["1_" + MAP] == -1.0 and r[MAP] == 0.0
    # a class nobody predicted or annotated is treated the same way
    r3 = run([([cube(0)], [0.9], [0], [cube(0)], [0])], num_classes=3)
    assert r3[AP10] == pytest.approx((1 - 1 - 1) / 3)


def test_class_with_ground_truth_but_no_predictions_is_zero():
    r = run([([cube(0)], [0.9], [0], [cube(0), cube(50)], [0, 1])], num_classes=2)
    assert r["1_" + AP10] == 0.0 and r["0_" + AP10] == 1.0 and r[AP10] == 0.5


def test_no_predictions_at_all():
    r = run([([], [], [], [cube(0)], [0]), ([], [], [], [], [])])
    assert r[AP10] == 0.0 and r[MAP] == 0.0


def test_score_ties_keep_case_order():
    # equal scores in two cases: FP (case 0) before TP (case 1) -> precision 0, .5 -> envelope .5 -> AP 0.5
    fp_first = run([([cube(50)], [0.6], [0], [], []), ([cube(0)], [0.6], [0], [cube(0)], [0])])
    tp_first = run([([cube(0)], [0.6], [0], [cube(0)], [0]), ([cube(50)], [0.6], [0], [], [])])
    assert fp_first[AP10] == 0.5 and tp_first[AP10] == 1.0


def test_mean_over_iou_range():
    # a detection with IoU 1/3 (shift 5 on a 10-cube: 5/15) counts at IoU 0.10..0.30 (5 of 9 thresholds)
    r = run([([cube(5)], [0.9], [0], [cube(0)], [0])])
    assert r[AP10] == 1.0 and r["AP_IoU_0.50_MaxDet_100"] == 0.0
    assert r[MAP] == pytest.approx(5 / 9)


def test_more_than_100_predictions_cut_per_case():
    # 101 FPs score above the only TP: the TP is rank 102 -> cut -> AP 0; split over 2 cases -> AP > 0
    fps = [cube(100 + 20 * i) for i in range(101)]
    scores = list(np.linspace(0.99, 0.5, 101))
    r = run([(fps + [cube(0)], scores + [0.1], [0] * 102, [cube(0)], [0])])
    assert r[AP10] == 0.0
    r2 = run([(fps[:50] + [cube(0)], scores[:50] + [0.1], [0] * 51, [cube(0)], [0]),
              (fps[50:], scores[50:], [0] * 51, [], [])])
    assert r2[AP10] == pytest.approx(float(np.float32(1) / np.float32(102)), rel=1e-6)


def test_curves_returned():
    r, curves = run([([cube(0), cube(50)], [0.9, 0.8], [0, 0], [cube(0)], [0])], return_curves=True)
    c = curves["pr_curve_IoU_0.10"]["0"]
    np.testing.assert_allclose(c["recall"], [1, 1])
    np.testing.assert_allclose(c["precision"], [1, 0.5])


def test_detection_on_ignored_box_is_neither_tp_nor_fp():
    # GT: regular cube(0), second box cube(100). Detections: 0.9 on cube(100), 0.8 on cube(0).
    pred, scores, gt = [[cube(100), cube(0)]], [[0.9, 0.8]], [cube(0), cube(100)]
    args = ([np.array(b, float) for b in pred], [np.array(s, float) for s in scores], [np.zeros(2, int)])

    def ap(gt_boxes, ignore=None):
        m = match_cases(*args, [np.array(gt_boxes, float).reshape(-1, 6)], [np.zeros(len(gt_boxes), int)], THR,
                        gt_ignore=ignore)
        return compute_coco(m, 1)

    dropped = ap(gt[:1])  # second box unknown: 0.9 is an FP -> precision 0.5 at every recall point
    assert dropped[AP10] == pytest.approx(0.5, abs=1e-7)
    ignored = ap(gt, [np.array([False, True])])  # 0.9 ignored: precision 1 (1 TP / 1 regular GT)
    assert ignored[AP10] == 1.0 and ignored[MAP] == 1.0
    only_ignored = ap(gt[1:], [np.array([True])])  # no regular GT -> class absent (-1), as COCOMetric
    assert only_ignored[AP10] == -1.0
