"""Hand-computed FROC cases, including nnDetection's FP/scan rounding, NaN and edge-case rules."""
import numpy as np
import pytest

from nnpre_detection.metrics.froc import FPI_THRESHOLDS, compute_froc, froc_curve
from nnpre_detection.metrics.matching import match_cases

KEY = "FROC_score_IoU_0.10"


def cube(a0, s=10.0):
    return [a0, 0, a0 + s, s, 0, s]


def far(i):
    return cube(1000 + 20 * i)


def run(cases, num_classes=1, **kw):
    cols = list(zip(*cases))
    m = match_cases([np.array(b, float).reshape(-1, 6) for b in cols[0]], [np.array(s, float) for s in cols[1]],
                    [np.array(l_, int) for l_ in cols[2]], [np.array(b, float).reshape(-1, 6) for b in cols[3]],
                    [np.array(c, int) for c in cols[4]], (0.1, 0.5), num_classes=num_classes)
    return compute_froc(m, num_classes=num_classes, **kw)


def test_two_scans_hand_computed():
    # scores 0.9 TP, 0.8 FP, 0.7 TP, 0.6 FP; 2 GT, 2 scans
    # curve (FP/scan, sens): (0,0) (0,.5) (.5,.5) (.5,1) (1,1); repeated x -> np.interp takes the last value
    scores, curves = run([([cube(0), far(0)], [0.9, 0.8], [0, 0], [cube(0)], [0]),
                          ([cube(0), far(1)], [0.7, 0.6], [0, 0], [cube(0)], [0])])
    np.testing.assert_allclose(curves["FROC_curve_IoU_0.10"], [0.5, 0.5, 1, 1, 1, 1, 1])
    assert scores[KEY] == pytest.approx(6 / 7)
    full = curves["FROC_full_curve_IoU_0.10"]
    np.testing.assert_allclose(full["fp_per_scan"], [0, 0, 0.5, 0.5, 1])
    np.testing.assert_allclose(full["sensitivity"], [0, 0.5, 0.5, 1, 1])
    assert curves["FROC_num_images"] == 2 and curves["FROC_num_gt"] == 2


def test_fp_per_scan_rounding_moves_a_sample_point():
    # 7 scans, 2 GT, 25 FPs: TP, 7 FPs, TP, 18 FPs. After 7 FPs nnDetection's FP/scan is
    # (7/25)*25/7 = 1.0000000000000002 > 1, so the sample at 1 FP/scan still sees sensitivity 0.5 (an exact
    # 7/7 = 1 would pick the later point with sensitivity 1.0). Score = (4*0.5 + 3*1) / 7.
    det_scores = [0.99] + list(np.linspace(0.98, 0.92, 7)) + [0.91] + list(np.linspace(0.5, 0.1, 18))
    boxes = [cube(0)] + [far(i) for i in range(7)] + [cube(0)] + [far(10 + i) for i in range(18)]
    case_of = [0] * 8 + [1] * 19
    cases = []
    for c in range(7):
        idx = [i for i, k in enumerate(case_of) if k == c]
        cases.append(([boxes[i] for i in idx], [det_scores[i] for i in idx], [0] * len(idx),
                      [cube(0)] if c < 2 else [], [0] if c < 2 else []))
    scores, curves = run(cases)
    np.testing.assert_allclose(curves["FROC_curve_IoU_0.10"], [0.5, 0.5, 0.5, 0.5, 1, 1, 1])
    assert scores[KEY] == pytest.approx(5 / 7)
    assert ((7 / 25) * 25) / 7 > 1.0  # the float fact the quirk rests on


def test_no_true_positive_gives_nan():
    scores, curves = run([([far(0)], [0.9], [0], [cube(0)], [0])])
    assert np.isnan(scores[KEY]) and np.isnan(curves["FROC_curve_IoU_0.10"]).all()


def test_only_true_positives_give_final_sensitivity_everywhere():
    scores, curves = run([([cube(0)], [0.9], [0], [cube(0), cube(50)], [0, 0])])
    np.testing.assert_allclose(curves["FROC_curve_IoU_0.10"], [0.5] * 7)
    assert scores[KEY] == 0.5


def test_no_predictions_and_no_ground_truth():
    scores, curves = run([([], [], [], [cube(0)], [0])])
    assert scores[KEY] == 0.0 and np.all(curves["FROC_curve_IoU_0.10"] == 0)
    scores, _ = run([([far(0)], [0.9], [0], [], [])])  # no GT anywhere -> 0
    assert scores[KEY] == 0.0
    scores, _ = run([([], [], [], [], [])])  # nothing at all -> 0
    assert scores[KEY] == 0.0


def test_empty_scans_count_in_the_denominator():
    # issue #272: an extra scan with one FP lowers FROC; an extra empty scan also changes FP/scan
    base = [([cube(0), far(0)], [0.9, 0.8], [0, 0], [cube(0)], [0]), ([], [], [], [cube(0)], [0])]
    s1, _ = run(base)
    s2, _ = run(base + [([], [], [], [], [])])
    s3, _ = run(base + [([far(1)], [0.95], [0], [], [])])
    assert s1[KEY] == pytest.approx(0.5)
    assert s2[KEY] == pytest.approx(0.5)  # sensitivity is 0.5 at every FP/scan here
    assert s3[KEY] < s1[KEY]


def test_classes_are_pooled_and_per_class_option():
    cases = [([cube(0), cube(0)], [0.9, 0.8], [0, 1], [cube(0)], [0]),  # class 1 det has no class-1 GT -> FP
             ([cube(0)], [0.7], [1], [cube(0)], [1])]
    scores, curves = run(cases, num_classes=3, per_class=True)
    # pooled: 0.9 TP, 0.8 FP, 0.7 TP over 2 scans, 2 GT -> (0,.5) (.5,.5) (.5,1)
    np.testing.assert_allclose(curves["FROC_curve_IoU_0.10"], [0.5, 0.5, 1, 1, 1, 1, 1])
    assert scores["0_" + KEY] == 1.0
    # class 1: 0.8 FP, 0.7 TP: (0,0) (.5,0) (.5,1) -> [0, 0, 1, ...]
    np.testing.assert_allclose(curves["1_FROC_curve_IoU_0.10"], [0, 0, 1, 1, 1, 1, 1])
    assert scores["2_" + KEY] == 0.0
    assert scores["mc_" + KEY] == pytest.approx((1.0 + scores["1_" + KEY] + 0.0) / 3)


def test_froc_curve_function_edge_cases():
    fps, sens, thr = froc_curve(np.zeros(0), np.zeros(0), 3, 2)
    assert fps.tolist() == [0, 0] and sens.tolist() == [0, 0]
    fps, sens, thr = froc_curve(np.array([1, 0, 0]), np.array([0.9, 0.5, 0.5]), 4, 1)
    np.testing.assert_allclose(fps, [0, 0, 0.5])  # the tied FPs form one point
    assert np.isinf(thr[0]) and len(FPI_THRESHOLDS) == 7


def test_detection_on_ignored_box_leaves_the_curve():
    # scan A: regular GT cube(0) and a second box at cube(100); detections 0.9 on cube(100), 0.8 on cube(0),
    # 0.3 far away. Scan B: no GT, one FP 0.5.
    def froc(gt_a, ignore=None):
        m = match_cases([np.array([cube(100), cube(0), far(0)], float), np.array([far(1)], float)],
                        [np.array([0.9, 0.8, 0.3]), np.array([0.5])], [np.zeros(3, int), np.zeros(1, int)],
                        [np.array(gt_a, float).reshape(-1, 6), np.zeros((0, 6))], [np.zeros(len(gt_a), int),
                                                                                   np.zeros(0, int)],
                        (0.1, 0.5), gt_ignore=ignore)
        return compute_froc(m, num_classes=1, per_class=True)

    # box unknown: FP, TP, FP, FP -> (FP/scan, sens) (0,0) (.5,0) (.5,1) (1,1) (1.5,1): 0, 0, 1, ... = 5/7
    scores, _ = froc([cube(0)])
    assert scores[KEY] == pytest.approx(5 / 7)
    # box ignored: the 0.9 detection is removed -> (0,0) (0,1) (.5,1) (1,1): sensitivity 1 everywhere
    scores, curves = froc([cube(0), cube(100)], [np.array([False, True]), np.zeros(0, bool)])
    assert scores[KEY] == 1.0 and scores["0_" + KEY] == 1.0 and scores["mc_" + KEY] == 1.0
    assert curves["FROC_num_gt"] == 1
    np.testing.assert_allclose(curves["FROC_full_curve_IoU_0.10"]["sensitivity"][:2], [0, 1])
    # only ignored ground truth: no positives -> 0 (our rule for num_gt = 0)
    scores, _ = froc([cube(100)], [np.array([True]), np.zeros(0, bool)])
    assert scores[KEY] == 0.0
