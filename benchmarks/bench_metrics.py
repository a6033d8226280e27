"""Benchmark: nnpre's vectorised detection metrics vs MONAI's port of nnDetection's matching/AP code.

Synthetic suite (seeded): 500 cases, 1-5 ground-truth boxes each, ~50 predictions per case (jittered copies of
ground truth plus displaced false positives), 2 classes, float32 predictions. Both sides compute the same
quantities: matching at the 9 COCO IoU thresholds (0.10..0.50) with max 100 detections per case and class,
then AP@0.1, AP@0.5 and mAP@0.1:0.5.

Reference: ``monai.apps.detection.metrics.matching.matching_batch`` + ``monai.apps.detection.metrics.coco.COCOMetric``
with ``monai.data.box_utils.box_iou`` on the same boxes converted to MONAI's xyzxyz layout.

Prints best-of-N wall times, the speed ratio (goal >= 10x) and the AP difference (our ``float_mode="monai-numpy2"``
must equal MONAI's numbers; the default ``"nndet"`` mode differs only by float32 precision rounding).

Usage::

    python benchmarks/bench_metrics.py [--cases 500] [--preds 50] [--repeats 3] [--seed 0]
"""
from __future__ import annotations

import argparse
import logging
import time
import warnings

import numpy as np


def make_suite(rng: np.random.Generator, n_cases: int, n_preds: int, n_classes: int = 2):
    """Per-case lists (pred boxes, scores, labels, gt boxes, gt classes); boxes in nnDetection layout."""
    pb, ps, pl, gb, gl = [], [], [], [], []
    for _ in range(n_cases):
        ng = int(rng.integers(1, 6))
        lo = rng.uniform(0, 100, (ng, 3))
        ext = rng.uniform(3, 15, (ng, 3))
        g = np.round(np.stack([lo[:, 0], lo[:, 1], lo[:, 0] + ext[:, 0], lo[:, 1] + ext[:, 1],
                               lo[:, 2], lo[:, 2] + ext[:, 2]], axis=1))
        nd = int(rng.integers(n_preds - 5, n_preds + 6))
        d = g[rng.integers(0, ng, nd)] + rng.normal(0, 2, (nd, 6))
        d[:, [2, 3, 5]] = np.maximum(d[:, [2, 3, 5]], d[:, [0, 1, 4]] + 0.5)
        far = rng.random(nd) < 0.6
        d[far] += rng.uniform(-50, 50, (int(far.sum()), 1))
        pb.append(d.astype(np.float32))
        ps.append(rng.random(nd).astype(np.float32))
        pl.append(rng.integers(0, n_classes, nd))
        gb.append(g)
        gl.append(rng.integers(0, n_classes, ng))
    return pb, ps, pl, gb, gl


def best_time(fn, repeats: int):
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", type=int, default=500)
    p.add_argument("--preds", type=int, default=50)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    logging.disable(logging.CRITICAL)

    from monai.apps.detection.metrics.coco import COCOMetric
    from monai.apps.detection.metrics.matching import matching_batch
    from monai.data.box_utils import box_iou as monai_box_iou

    from nnpre_detection.metrics import coco_iou_thresholds, compute_coco, compute_froc, match_cases

    k = 2
    pb, ps, pl, gb, gl = make_suite(np.random.default_rng(args.seed), args.cases, args.preds, k)
    to_monai = [0, 1, 4, 2, 3, 5]  # (x1, y1, x2, y2, z1, z2) -> (x1, y1, z1, x2, y2, z2)
    pb_m, gb_m = [b[:, to_monai] for b in pb], [b[:, to_monai] for b in gb]
    thr, _, _ = coco_iou_thresholds((0.1, 0.5))

    def ours(mode="monai-numpy2"):
        match = match_cases(pb, ps, pl, gb, gl, thr, num_classes=k)
        return compute_coco(match, k, iou_list=(0.1, 0.5), float_mode=mode)

    def ours_full():
        match = match_cases(pb, ps, pl, gb, gl, thr, num_classes=k)
        return compute_coco(match, k), compute_froc(match, per_class=True, num_classes=k)

    def monai():
        results = matching_batch(monai_box_iou, thr, pb_m, pl, ps, gb_m, gl, max_detections=100)
        metric = COCOMetric(classes=[str(c) for c in range(k)], iou_list=(0.1, 0.5), iou_range=(0.1, 0.5, 0.05),
                            max_detection=(100,), verbose=False)
        return metric(results)[0]

    t_ours, ap_ours = best_time(ours, args.repeats)
    t_full, (ap_nndet, _) = best_time(ours_full, args.repeats)
    t_monai, ap_monai = best_time(monai, args.repeats)
    keys = [key for key in ap_monai if key in ap_ours]
    diff = max(abs(ap_ours[key] - ap_monai[key]) for key in keys)
    diff_nndet = max(abs(ap_nndet[key] - ap_monai[key]) for key in keys)
    n_pred = sum(len(s) for s in ps)
    print(f"suite: {args.cases} cases, {n_pred} predictions, {sum(len(g) for g in gl)} GT boxes, {k} classes")
    print(f"MONAI matching_batch + COCOMetric : {t_monai * 1000:8.1f} ms")
    print(f"nnpre match_cases + compute_coco  : {t_ours * 1000:8.1f} ms   speed-up x{t_monai / t_ours:.1f}")
    print(f"nnpre + FROC (pooled + per class) : {t_full * 1000:8.1f} ms   speed-up x{t_monai / t_full:.1f}")
    for key in ("AP_IoU_0.10_MaxDet_100", "AP_IoU_0.50_MaxDet_100", "mAP_IoU_0.10_0.50_0.05_MaxDet_100"):
        print(f"{key}: MONAI {ap_monai[key]:.12f}  nnpre {ap_ours[key]:.12f}  "
              f"nnpre(nndet float32) {ap_nndet[key]:.12f}")
    print(f"max |AP difference| over {len(keys)} keys: {diff:.3e} (monai-numpy2 mode), {diff_nndet:.3e} (nndet mode)")
    print(f"RATIO {t_monai / t_ours:.1f}x  identical_AP={diff <= 1e-12}")


if __name__ == "__main__":
    main()
