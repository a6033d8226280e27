"""Cross-check against MONAI's port of nnDetection's matching and COCO code on random suites.

MONAI's box layout is xyzxyz; nnDetection's (and ours) is (x1, y1, x2, y2, z1, z2): columns [0, 1, 4, 2, 3, 5]
convert ours to MONAI's. Matching is compared with the same IoU function (MONAI's ``box_iou`` computes in
float32, nnDetection's in the input dtype), the IoU functions are compared separately.
"""
import logging
import warnings

import numpy as np
import pytest

monai_matching = pytest.importorskip("monai.apps.detection.metrics.matching")
monai_coco = pytest.importorskip("monai.apps.detection.metrics.coco")
monai_box_utils = pytest.importorskip("monai.data.box_utils")

from nnpre_detection.metrics.coco import coco_iou_thresholds, compute_coco  # noqa: E402
from nnpre_detection.metrics.iou import box_iou  # noqa: E402
from nnpre_detection.metrics.matching import match_cases, to_results_list  # noqa: E402

TO_MONAI = [0, 1, 4, 2, 3, 5]


def random_suite(seed, n_cases=25, n_classes=3):
    """Integer boxes (many exact IoU ties), quantised scores (many score ties), up to 130 predictions per case,
    empty cases and a class without any ground truth (class n_classes - 1 is never annotated)."""
    rng = np.random.default_rng(seed)
    pb, ps, pl, gb, gl = [], [], [], [], []
    for _ in range(n_cases):
        ng = int(rng.integers(0, 5))
        lo = rng.integers(0, 20, (ng, 3))
        ext = rng.integers(2, 8, (ng, 3))
        g = np.concatenate([lo[:, :2], lo[:, :2] + ext[:, :2], lo[:, 2:], lo[:, 2:] + ext[:, 2:]], 1).astype(float)
        nd = int(rng.choice([0, 5, 40, 130]))
        d = np.zeros((nd, 6))
        if nd:
            lo = rng.integers(0, 20, (nd, 3))
            ext = rng.integers(1, 8, (nd, 3))
            d = np.concatenate([lo[:, :2], lo[:, :2] + ext[:, :2], lo[:, 2:], lo[:, 2:] + ext[:, 2:]], 1).astype(float)
            if ng:
                k = min(nd, 3 * ng)
                d[:k] = g[rng.integers(0, ng, k)] + rng.integers(-1, 2, (k, 6))
                d[:, 2] = np.maximum(d[:, 2], d[:, 0])
                d[:, 3] = np.maximum(d[:, 3], d[:, 1])
                d[:, 5] = np.maximum(d[:, 5], d[:, 4])
        pb.append(d.astype(np.float32))
        ps.append((rng.integers(0, 25, nd) / 25).astype(np.float32))
        pl.append(rng.integers(0, n_classes, nd))
        gb.append(g)
        gl.append(rng.integers(0, n_classes - 1, ng))
    return pb, ps, pl, gb, gl


@pytest.fixture(autouse=True)
def quiet():
    logging.disable(logging.CRITICAL)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield
    logging.disable(logging.NOTSET)


def test_iou_equals_monai_box_iou():
    pb, _, _, gb, _ = random_suite(0)
    a, b = np.concatenate(pb).astype(np.float64), np.concatenate([g for g in gb if len(g)])
    ours = box_iou(a, b)
    ref = monai_box_utils.box_iou(a[:, TO_MONAI], b[:, TO_MONAI])
    np.testing.assert_allclose(ours, ref, atol=1e-6)


@pytest.mark.parametrize("seed", range(6))
def test_matching_and_ap_equal_monai(seed):
    k = 3
    pb, ps, pl, gb, gl = random_suite(seed, n_classes=k)
    thr, _, _ = coco_iou_thresholds((0.1, 0.5))
    match = match_cases(pb, ps, pl, gb, gl, thr, num_classes=k)
    ours = to_results_list(match)
    ref = monai_matching.matching_batch(box_iou, thr, pb, pl, ps, gb, gl, max_detections=100)
    assert len(ours) == len(ref)
    for a, b in zip(ours, ref):
        assert sorted(a) == sorted(int(c) for c in b)
        for c in a:
            np.testing.assert_array_equal(a[c]["dtMatches"], b[c]["dtMatches"])
            np.testing.assert_array_equal(a[c]["gtMatches"], np.asarray(b[c]["gtMatches"]).reshape(len(thr), -1))
            np.testing.assert_array_equal(a[c]["dtScores"], b[c]["dtScores"])
    metric = monai_coco.COCOMetric(classes=[str(c) for c in range(k)], iou_list=(0.1, 0.5),
                                   iou_range=(0.1, 0.5, 0.05), max_detection=(100,), verbose=False)
    ref_ap = metric(ref)[0]
    same = compute_coco(match, k, float_mode="monai-numpy2")
    nndet = compute_coco(match, k)
    keys = [key for key in ref_ap if key in same]
    assert "AP_IoU_0.10_MaxDet_100" in keys and "mAP_IoU_0.10_0.50_0.05_MaxDet_100" in keys and len(keys) == 12
    assert ref_ap["2_AP_IoU_0.10_MaxDet_100"] == -1.0  # never-annotated class, both sides
    for key in keys:
        assert abs(same[key] - ref_ap[key]) <= 1e-12, key
        # released nnDetection keeps precision in float32: only rounding-level differences
        assert abs(nndet[key] - ref_ap[key]) <= 1e-7, key


def _pooled_froc_reference(results, iou_idx, num_images, fpi=(1 / 8, 1 / 4, 1 / 2, 1, 2, 4, 8)):
    """nnDetection's FROCMetric recipe on a MONAI results list: drop ignored detections, count regular GT."""
    from sklearn.metrics import roc_curve

    per_class = [r for case in results for r in case.values()]
    matches = np.concatenate([r["dtMatches"][iou_idx] for r in per_class])
    ignore = np.concatenate([r["dtIgnore"][iou_idx] for r in per_class]).astype(bool)
    scores = np.concatenate([r["dtScores"] for r in per_class])
    num_gt = int(np.count_nonzero(np.concatenate([r["gtIgnore"] for r in per_class]) == 0))
    matches, scores = matches[~ignore], scores[~ignore]
    fpr, tpr, _ = roc_curve(matches, scores)
    n_tp = matches.sum()
    fps = np.zeros(len(fpr)) if n_tp == len(matches) else (fpr * (len(matches) - n_tp)) / num_images
    return float(np.mean(np.interp(fpi, fps, (tpr * n_tp) / num_gt)))


def dense_suite(seed, n_cases=40, n_classes=3):
    """Crowded cases (2-8 heavily overlapping GT boxes, 0-4 detections): a detection often overlaps regular and
    ignored boxes at once, so the regular-first rule decides which box it takes."""
    rng = np.random.default_rng(seed)

    def boxes(n):
        lo, ext = rng.integers(0, 5, (n, 3)), rng.integers(3, 7, (n, 3))
        return np.concatenate([lo[:, :2], lo[:, :2] + ext[:, :2], lo[:, 2:], lo[:, 2:] + ext[:, 2:]], 1).astype(float)

    pb, ps, pl, gb, gl = [], [], [], [], []
    for _ in range(n_cases):
        ng, nd = int(rng.integers(2, 9)), int(rng.integers(0, 5))
        pb.append(boxes(nd).astype(np.float32))
        ps.append((rng.integers(0, 10, nd) / 10).astype(np.float32))
        pl.append(rng.integers(0, n_classes, nd))
        gb.append(boxes(ng))
        gl.append(rng.integers(0, n_classes - 1, ng))
    return pb, ps, pl, gb, gl


@pytest.mark.parametrize("suite,seed", [("sparse", s) for s in range(4)] + [("dense", s) for s in range(4)])
def test_ignored_ground_truth_equals_monai(suite, seed):
    """Random gt_ignore flags: matching (incl. dtIgnore/gtIgnore, GT reordered ignored-last) and AP equal MONAI's
    matching_batch + COCOMetric; FROC equals nnDetection's FROCMetric recipe applied to MONAI's matching."""
    from nnpre_detection.metrics.froc import compute_froc

    k = 3
    pb, ps, pl, gb, gl = (random_suite if suite == "sparse" else dense_suite)(seed, n_classes=k)
    rng = np.random.default_rng(100 + seed)
    ign = [rng.random(len(g)) < 0.4 for g in gb]
    assert sum(int(i.sum()) for i in ign) > 5
    thr, _, _ = coco_iou_thresholds((0.1, 0.5))
    match = match_cases(pb, ps, pl, gb, gl, thr, num_classes=k, gt_ignore=ign)
    assert match.det_ignored.any() and not (match.det_ignored & ~match.det_matched).any()
    if suite == "dense":  # the flags change which boxes are taken, not only how matches count
        assert (match.gt_matched != match_cases(pb, ps, pl, gb, gl, thr, num_classes=k).gt_matched).any()
    ours = to_results_list(match)
    ref = monai_matching.matching_batch(box_iou, thr, pb, pl, ps, gb, gl, gt_ignore=ign, max_detections=100)
    for a, b in zip(ours, ref):
        assert sorted(a) == sorted(int(c) for c in b)
        for c in a:
            for key in ("dtMatches", "dtIgnore", "dtScores"):
                np.testing.assert_array_equal(a[c][key], np.asarray(b[c][key]).reshape(a[c][key].shape), key)
            np.testing.assert_array_equal(a[c]["gtMatches"], np.asarray(b[c]["gtMatches"]).reshape(len(thr), -1))
            ref_ign = np.asarray(b[c]["gtIgnore"], dtype=float)
            if a[c]["dtScores"].size == 0:  # MONAI's _matching_no_pred keeps the input order (all unmatched)
                ref_ign = np.sort(ref_ign)
            np.testing.assert_array_equal(a[c]["gtIgnore"], ref_ign)
    metric = monai_coco.COCOMetric(classes=[str(c) for c in range(k)], iou_list=(0.1, 0.5),
                                   iou_range=(0.1, 0.5, 0.05), max_detection=(100,), verbose=False)
    ref_ap = metric(ref)[0]
    same = compute_coco(match, k, float_mode="monai-numpy2")
    plain = compute_coco(match_cases(pb, ps, pl, gb, gl, thr, num_classes=k), k, float_mode="monai-numpy2")
    keys = [key for key in ref_ap if key in same]
    assert len(keys) == 12
    for key in keys:
        assert abs(same[key] - ref_ap[key]) <= 1e-12, key
    assert any(same[key] != plain[key] for key in keys)  # the flags changed the numbers
    froc, _ = compute_froc(match, iou_thresholds=(0.1, 0.5))
    for iou in (0.1, 0.5):
        ref_froc = _pooled_froc_reference(ref, int(np.flatnonzero(thr == iou)[0]), len(pb))
        assert froc[f"FROC_score_IoU_{iou:.2f}"] == pytest.approx(ref_froc, abs=1e-12, nan_ok=True)


@pytest.mark.parametrize("seed", range(3))
def test_all_false_ignore_is_bit_identical(seed):
    from nnpre_detection.metrics.froc import compute_froc

    k = 3
    pb, ps, pl, gb, gl = random_suite(seed, n_classes=k)
    thr, _, _ = coco_iou_thresholds((0.1, 0.5))
    a = match_cases(pb, ps, pl, gb, gl, thr, num_classes=k)
    b = match_cases(pb, ps, pl, gb, gl, thr, num_classes=k, gt_ignore=[np.zeros(len(g), bool) for g in gb])
    for field in a.__dataclass_fields__:
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field), field)
    assert not b.det_ignored.any() and not b.gt_ignored.any()
    assert compute_coco(a, k) == compute_coco(b, k)
    assert compute_froc(a, per_class=True, num_classes=k)[0] == compute_froc(b, per_class=True, num_classes=k)[0]
