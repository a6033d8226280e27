"""Hand-computed matching cases: greedy order, IoU ties, score ties, top-100 cut, classes, empty cases."""
import numpy as np
import pytest

from nnpre.errors import NnPreError
from nnpre_detection.metrics.iou import box_iou, box_iou_pairs
from nnpre_detection.metrics.matching import match_cases, to_results_list


def cube(a0, a1, a2, s=10.0):
    """Cube with lower corner (a0, a1, a2) and side s in layout (a0_1, a1_1, a0_2, a1_2, a2_1, a2_2)."""
    return [a0, a1, a0 + s, a1 + s, a2, a2 + s]


def arr(rows):
    return np.array(rows, dtype=np.float64).reshape(-1, 6)


def one_case(pred, scores, labels, gt, gt_cls, thr=(0.1, 0.5), **kw):
    return match_cases([arr(pred)], [np.array(scores, float)], [np.array(labels)], [arr(gt)], [np.array(gt_cls)],
                       thr, **kw)


def test_iou_of_shifted_cubes():
    # two 10-cubes shifted by d on one axis: IoU = (10 - d) / (10 + d)
    a = arr([cube(0, 0, 0)])
    for d, expected in ((0, 1.0), (2, 8 / 12), (5, 5 / 15), (8, 2 / 18)):
        for axis_offset in ([d, 0, 0], [0, d, 0], [0, 0, d]):
            b = arr([cube(*axis_offset)])
            assert box_iou(a, b)[0, 0] == pytest.approx(expected)
            assert box_iou_pairs(a, b)[0] == box_iou(a, b)[0, 0]
    assert box_iou(a, arr([cube(20, 0, 0)]))[0, 0] == 0.0


def test_highest_score_takes_the_box_and_the_rest_are_false_positives():
    m = one_case([cube(1, 0, 0), cube(0, 0, 0)], [0.4, 0.9], [0, 0], [cube(0, 0, 0)], [0])
    # order by score: det 1 (0.9, IoU 1) then det 0 (0.4, IoU 9/11)
    assert m.det_index.tolist() == [1, 0]
    assert m.det_matched.tolist() == [[True, False], [True, False]]
    assert m.gt_matched.tolist() == [[True], [True]]


def test_greedy_not_optimal_assignment():
    # det A (0.9): IoU 2/3 with G0 and 1/3 with G1 -> takes G0; det B (0.8) overlaps only G0 -> FP
    gt = [cube(0, 0, 0), cube(3, 0, 0)]
    a = cube(2, 0, 0)  # IoU(G0) = 8/12, IoU(G1) = 9/11 -> A takes G1
    b = cube(0, 0, 0)  # IoU(G0) = 1 -> free -> TP
    m = one_case([a, b], [0.9, 0.8], [0, 0], gt, [0, 0], thr=(0.1,))
    assert m.det_matched.tolist() == [[True, True]]
    # now make A prefer G0 so that B, overlapping only G0, is left without a partner
    a2 = cube(-1, 0, 0)  # IoU(G0) = 9/11, IoU(G1) = 6/14
    b2 = cube(-3, 0, 0)  # IoU(G0) = 7/13, IoU(G1) = 4/16 = 0.25 -> still >= 0.1 -> takes G1
    m = one_case([a2, b2], [0.9, 0.8], [0, 0], gt, [0, 0], thr=(0.1, 0.5))
    assert m.det_matched.tolist() == [[True, True], [True, False]]  # at 0.5 B's only option (G0) is taken
    assert m.gt_matched.tolist() == [[True, True], [True, False]]


def test_iou_tie_goes_to_the_later_ground_truth():
    gt = [cube(2, 0, 0), cube(-2, 0, 0)]  # both IoU 8/12 with the detection
    m = one_case([cube(0, 0, 0)], [0.5], [0], gt, [0, 0], thr=(0.1,))
    assert m.gt_matched.tolist() == [[False, True]]
    assert m.gt_index.tolist() == [0, 1]
    m = one_case([cube(0, 0, 0)], [0.5], [0], gt[::-1], [0, 0], thr=(0.1,))
    assert m.gt_matched.tolist() == [[False, True]]


def test_score_tie_keeps_input_order():
    # two equal-score detections compete for one box: the first in input order wins
    dets = [cube(1, 0, 0), cube(0, 0, 0)]
    m = one_case(dets, [0.7, 0.7], [0, 0], [cube(0, 0, 0)], [0], thr=(0.1,))
    assert m.det_index.tolist() == [0, 1] and m.det_matched.tolist() == [[True, False]]


def test_threshold_is_inclusive():
    # IoU exactly 0.5 (10-cube shifted by 10/3 is not exact; use halves): cubes of side 4 shifted by 4/3 -> 0.5
    a, b = [0, 0, 4, 4, 0, 4], [4 / 3, 0, 4 + 4 / 3, 4, 0, 4]
    iou = box_iou(arr([a]), arr([b]))[0, 0]
    m = one_case([b], [0.5], [0], [a], [0], thr=(iou, np.nextafter(iou, 1)))
    assert m.det_matched.tolist() == [[True], [False]]


def test_top_100_per_case_and_class_before_matching():
    n = 150
    dets = [cube(50 + 20 * i, 0, 0) for i in range(n)]  # all far from the GT
    scores = np.linspace(0.99, 0.01, n)
    dets[120] = cube(0, 0, 0)  # the only true hit is ranked 121st -> cut
    labels = np.zeros(n, int)
    m = match_cases([arr(dets)], [scores], [labels], [arr([cube(0, 0, 0)])], [np.array([0])], (0.1,))
    assert len(m.det_case) == 100 and m.det_rank.max() == 99
    assert not m.det_matched.any() and not m.gt_matched.any()
    # the cut is per class: 150 predictions split over two classes are all kept
    labels2 = np.arange(n) % 2
    labels2[120] = 0
    m2 = match_cases([arr(dets)], [scores], [labels2], [arr([cube(0, 0, 0)])], [np.array([0])], (0.1,))
    assert len(m2.det_case) == 150 and m2.gt_matched.all()


def test_classes_are_matched_separately_and_empty_cases():
    pred = [[cube(0, 0, 0)], [], [cube(0, 0, 0)]]
    m = match_cases([arr(p) for p in pred], [np.array([0.9]), np.zeros(0), np.array([0.3])],
                    [np.array([1]), np.zeros(0, int), np.array([0])],
                    [arr([cube(0, 0, 0)]), arr([cube(0, 0, 0)]), arr([])],
                    [np.array([0]), np.array([0]), np.zeros(0, int)], (0.1,))
    # case 0: class-1 detection on a class-0 box -> FP and FN; case 1: no predictions -> FN; case 2: no GT -> FP
    assert m.num_cases == 3
    assert m.det_case.tolist() == [0, 2] and not m.det_matched.any()
    assert m.gt_case.tolist() == [0, 1] and not m.gt_matched.any()
    res = to_results_list(m)
    assert sorted(res[0]) == [0, 1] and res[0][0]["dtMatches"].shape == (1, 0)
    assert res[1][0]["gtMatches"].shape == (1, 1) and list(res[2]) == [0]


def test_bad_inputs_are_clear_errors():
    good = dict(pred_boxes=[arr([cube(0, 0, 0)])], pred_scores=[np.array([0.5])], pred_classes=[np.array([0])],
                gt_boxes=[arr([cube(0, 0, 0)])], gt_classes=[np.array([0])], iou_thresholds=(0.1,))
    match_cases(**good)
    with pytest.raises(NnPreError, match="negative extent"):
        match_cases(**{**good, "pred_boxes": [arr([[0, 0, -1, 2, 0, 2]])]})
    with pytest.raises(NnPreError, match="finite probability"):
        match_cases(**{**good, "pred_scores": [np.array([np.nan])]})
    with pytest.raises(NnPreError, match="finite probability"):
        match_cases(**{**good, "pred_scores": [np.array([1.5])]})
    with pytest.raises(NnPreError, match="unknown class id 3"):
        match_cases(**{**good, "pred_classes": [np.array([3])]}, num_classes=2)
    with pytest.raises(NnPreError, match="zero volume"):
        match_cases(**{**good, "gt_boxes": [arr([[0, 0, 0, 2, 0, 2]])]})
    with pytest.raises(NnPreError, match="1 boxes but 2"):
        match_cases(**{**good, "pred_scores": [np.array([0.5, 0.4])]})
    with pytest.raises(NnPreError, match=r"shape \(N, 6\)"):
        match_cases(**{**good, "pred_boxes": [np.zeros((1, 4))]})


# ---------------------------------------------------------------------------------------------- ignored GT
def test_regular_ground_truth_beats_a_better_ignored_box():
    # G0 regular (IoU 8/12 with the detection), G1 ignored (IoU 1): COCO takes the regular box
    m = one_case([cube(2, 0, 0)], [0.9], [0], [cube(0, 0, 0), cube(2, 0, 0)], [0, 0], thr=(0.1, 0.7),
                 gt_ignore=[np.array([False, True])])
    assert m.det_matched.tolist() == [[True], [True]]
    assert m.det_ignored.tolist() == [[False], [True]]  # at 0.7 only the ignored box is close enough
    assert m.gt_matched.tolist() == [[True, False], [False, True]]
    assert m.gt_ignored.tolist() == [False, True]
    assert m.det_true_positive.tolist() == [[True], [False]] and not m.det_false_positive.any()


def test_ignored_box_absorbs_one_detection_per_threshold():
    # two detections on one ignored box, a third on the regular box taken first by the best score
    m = one_case([cube(0, 0, 0), cube(1, 0, 0), cube(40, 0, 0)], [0.8, 0.7, 0.9], [0, 0, 0],
                 [cube(0, 0, 0), cube(40, 0, 0)], [0, 0], thr=(0.1,), gt_ignore=[np.array([True, False])])
    assert m.det_index.tolist() == [2, 0, 1]
    assert m.det_matched.tolist() == [[True, True, False]]
    assert m.det_ignored.tolist() == [[False, True, False]]
    assert m.det_false_positive.tolist() == [[False, False, True]]  # duplicate on an ignored box stays an FP


def test_taken_regular_box_sends_the_next_detection_to_the_ignored_one():
    # both detections overlap both boxes; the first takes the regular box, the second the ignored one
    m = one_case([cube(0, 0, 0), cube(1, 0, 0)], [0.9, 0.8], [0, 0], [cube(1, 0, 0), cube(0, 0, 0)], [0, 0],
                 thr=(0.1,), gt_ignore=[np.array([True, False])])
    assert m.det_matched.tolist() == [[True, True]] and m.det_ignored.tolist() == [[False, True]]
    res = to_results_list(m)[0][0]
    assert res["gtIgnore"].tolist() == [0.0, 1.0]  # MONAI's order: regular boxes first
    assert res["dtIgnore"].tolist() == [[0.0, 1.0]]


def test_ignore_flags_are_checked():
    with pytest.raises(NnPreError, match="1 boxes but 2 ignore flags"):
        one_case([], [], [], [cube(0, 0, 0)], [0], gt_ignore=[np.array([True, False])])
    with pytest.raises(NnPreError, match="ignore flags must be booleans"):
        one_case([], [], [], [cube(0, 0, 0)], [0], gt_ignore=[np.array([2])])
    with pytest.raises(ValueError, match="one entry per case"):
        one_case([], [], [], [cube(0, 0, 0)], [0], gt_ignore=[])
