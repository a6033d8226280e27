"""Greedy per-case, per-class matching of detections to ground truth (nnDetection ``matching_batch``).

Semantics reproduced exactly (nnDetection ``nndet/evaluator/detection/matching.py``, also ported to MONAI
``monai.apps.detection.metrics.matching``):

* per case and per class, the detections are sorted by descending score with a *stable* sort (ties keep
  their input order) and only the top ``max_detections`` (100) are kept, before matching;
* for every IoU threshold ``t`` independently, detections are visited in that order; each takes the
  not-yet-matched ground-truth box of its case/class with the highest IoU, provided ``IoU >= min(t, 1-1e-10)``;
  when several boxes share that IoU the *later* one (in input order) wins, because nnDetection replaces its
  best match on ``>=``; a detection without such a box is a false positive;
* ground truth is never ignored (nnDetection's evaluator passes ``gt_ignore`` = all zeros).

Vectorisation: all cases and classes are processed at once. Candidate (detection, ground truth) pairs
exist only within one case/class group; the greedy loop runs over the detection *rank* (at most
``max_detections`` steps), and every step resolves all groups and all thresholds with segment reductions.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from nnpre_detection.metrics.iou import box_iou_pairs
from nnpre_detection.metrics.validate import check_ground_truth, check_prediction

#: nnDetection evaluates at most this many detections per case and class (README: hard limit).
MAX_DETECTIONS = 100


@dataclass(frozen=True)
class MatchResult:
    """Matching of all cases, flattened.

    Detections are the kept (top-``max_detections``) ones, ordered by (case, class, rank); ground-truth
    boxes are ordered by (case, class, input order).

    Attributes:
        iou_thresholds: (T,) float64 thresholds, the first axis of the match arrays.
        num_cases: number of evaluated cases (FROC's "scans", including cases without anything).
        det_case, det_class, det_rank, det_index: (D,) int64 case index, class, rank within its
            case/class (0 = highest score) and index into that case's input prediction arrays.
        det_score: (D,) scores, dtype of the input.
        det_matched: (T, D) bool, True = true positive at that threshold.
        gt_case, gt_class, gt_index: (G,) int64 case index, class and index into the case's input arrays.
        gt_matched: (T, G) bool.
    """

    iou_thresholds: np.ndarray
    num_cases: int
    det_case: np.ndarray
    det_class: np.ndarray
    det_rank: np.ndarray
    det_index: np.ndarray
    det_score: np.ndarray
    det_matched: np.ndarray
    gt_case: np.ndarray
    gt_class: np.ndarray
    gt_index: np.ndarray
    gt_matched: np.ndarray

    def threshold_index(self, iou: float) -> int:
        """Index of an IoU threshold (exact float equality, as nnDetection looks thresholds up)."""
        hits = np.flatnonzero(self.iou_thresholds == iou)
        if hits.size == 0:
            raise KeyError(f"IoU threshold {iou!r} was not matched; matched: {self.iou_thresholds.tolist()}")
        return int(hits[0])


def _segment_starts(keys: np.ndarray) -> np.ndarray:
    if keys.size == 0:
        return np.zeros(0, dtype=np.int64)
    return np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])


def _ragged_arange(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Concatenate ``arange(s, s + c)`` for every (s, c) without a Python loop."""
    total = int(counts.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    offsets = np.cumsum(counts) - counts
    return np.repeat(starts - offsets, counts) + np.arange(total, dtype=np.int64)


def _flatten(arrays: Sequence[np.ndarray], dtype=None) -> tuple[np.ndarray, np.ndarray]:
    lengths = np.array([len(a) for a in arrays], dtype=np.int64)
    case = np.repeat(np.arange(len(arrays), dtype=np.int64), lengths)
    nonempty = [a for a in arrays if len(a)]
    if nonempty:
        flat = np.concatenate(nonempty)
    else:
        flat = np.zeros((0,) + tuple(np.shape(arrays[0])[1:]) if arrays else (0,), dtype=dtype or np.float64)
    return flat, case


def match_cases(
    pred_boxes: Sequence[np.ndarray],
    pred_scores: Sequence[np.ndarray],
    pred_classes: Sequence[np.ndarray],
    gt_boxes: Sequence[np.ndarray],
    gt_classes: Sequence[np.ndarray],
    iou_thresholds: Sequence[float],
    max_detections: int = MAX_DETECTIONS,
    num_classes: int | None = None,
    validate: bool = True,
) -> MatchResult:
    """Match detections to ground truth for every case, class and IoU threshold.

    Args:
        pred_boxes: per case (D_i, 6) boxes in nnDetection layout (a0_1, a1_1, a0_2, a1_2, a2_1, a2_2).
        pred_scores: per case (D_i,) scores in [0, 1].
        pred_classes: per case (D_i,) class ids (>= 0).
        gt_boxes: per case (G_i, 6) boxes, same layout.
        gt_classes: per case (G_i,) class ids.
        iou_thresholds: IoU thresholds; each is matched independently.
        max_detections: detections kept per case and class (nnDetection: 100).
        num_classes: if given, class ids must be < num_classes.
        validate: check the inputs (see :mod:`nnpre_detection.metrics.validate`).

    Returns:
        :class:`MatchResult`.
    """
    n_cases = len(pred_boxes)
    if not (len(pred_scores) == len(pred_classes) == len(gt_boxes) == len(gt_classes) == n_cases):
        raise ValueError("pred_boxes, pred_scores, pred_classes, gt_boxes and gt_classes need one entry per case")
    pb, ps, pl, gb, gl = [], [], [], [], []
    for i in range(n_cases):
        if validate:
            b, s, c = check_prediction(pred_boxes[i], pred_scores[i], pred_classes[i], num_classes, f"case {i}")
            g, gc = check_ground_truth(gt_boxes[i], gt_classes[i], num_classes, f"case {i} ground truth")
        else:
            b, s, c = np.asarray(pred_boxes[i]).reshape(-1, 6), np.asarray(pred_scores[i]).reshape(-1), \
                np.asarray(pred_classes[i]).reshape(-1).astype(np.int64)
            g, gc = np.asarray(gt_boxes[i]).reshape(-1, 6), np.asarray(gt_classes[i]).reshape(-1).astype(np.int64)
        pb.append(b), ps.append(s), pl.append(c), gb.append(g), gl.append(gc)

    thresholds = np.asarray(list(iou_thresholds), dtype=np.float64).reshape(-1)
    n_thr = len(thresholds)

    # ---- detections: order by (case, class, score desc [stable]) and keep the top max_detections
    det_box, det_case = _flatten(pb)
    det_score, _ = _flatten(ps)
    det_class, _ = _flatten(pl)
    det_class = det_class.astype(np.int64)
    det_local = _ragged_arange(np.zeros(n_cases, dtype=np.int64), np.array([len(s) for s in ps], dtype=np.int64))
    order = np.argsort(-det_score, kind="stable")
    order = order[np.argsort(det_class[order], kind="stable")]
    order = order[np.argsort(det_case[order], kind="stable")]
    n_cls_key = int(max(det_class.max(initial=-1), max((int(c.max()) for c in gl if c.size), default=-1))) + 1
    key = det_case[order] * n_cls_key + det_class[order]
    starts = _segment_starts(key)
    counts = np.diff(np.r_[starts, len(key)])
    rank = np.arange(len(key), dtype=np.int64) - np.repeat(starts, counts)
    keep = rank < max_detections
    order, rank, key = order[keep], rank[keep], key[keep]
    det_box, det_case, det_class = det_box[order], det_case[order], det_class[order]
    det_score, det_local = det_score[order], det_local[order]

    # ---- ground truth: order by (case, class), input order within a group
    gt_box, gt_case = _flatten(gb)
    gt_class, _ = _flatten(gl)
    gt_class = gt_class.astype(np.int64)
    gt_local = _ragged_arange(np.zeros(n_cases, dtype=np.int64), np.array([len(c) for c in gl], dtype=np.int64))
    g_order = np.argsort(gt_class, kind="stable")
    g_order = g_order[np.argsort(gt_case[g_order], kind="stable")]
    gt_box, gt_case, gt_class, gt_local = gt_box[g_order], gt_case[g_order], gt_class[g_order], gt_local[g_order]
    gt_key = gt_case * n_cls_key + gt_class

    det_matched = np.zeros((n_thr, len(det_case)), dtype=bool)
    gt_matched = np.zeros((n_thr, len(gt_case)), dtype=bool)

    # ---- candidate pairs (detection, ground truth of the same case and class)
    g_lo = np.searchsorted(gt_key, key, side="left")
    g_hi = np.searchsorted(gt_key, key, side="right")
    n_pairs = g_hi - g_lo
    pair_det = np.repeat(np.arange(len(key), dtype=np.int64), n_pairs)
    pair_gt = _ragged_arange(g_lo, n_pairs)
    if len(pair_det):
        pair_iou = box_iou_pairs(det_box[pair_det], gt_box[pair_gt])
        # regroup pairs by detection rank: the greedy order across a group is the rank order
        p_order = np.argsort(rank[pair_det], kind="stable")
        pair_det, pair_gt, pair_iou = pair_det[p_order], pair_gt[p_order], pair_iou[p_order]
        pair_rank = rank[pair_det]
        # nnDetection starts its search at min(t, 1 - 1e-10) and accepts IoU >= that value
        start = np.minimum(thresholds, 1 - 1e-10)[:, None]
        bounds = np.searchsorted(pair_rank, np.arange(int(pair_rank.max()) + 2), side="left")
        for r in range(len(bounds) - 1):
            lo, hi = bounds[r], bounds[r + 1]
            if lo == hi:
                continue
            p_det, p_gt, p_iou = pair_det[lo:hi], pair_gt[lo:hi], pair_iou[lo:hi]
            seg = _segment_starts(p_det)
            seg_len = np.diff(np.r_[seg, len(p_det)])
            valid = ~gt_matched[:, p_gt] & (p_iou[None, :] >= start)  # (T, P)
            score = np.where(valid, p_iou[None, :], -np.inf)
            best_iou = np.maximum.reduceat(score, seg, axis=1)  # (T, S)
            # ties: the later ground truth wins -> take the largest position holding the maximum
            pos = np.where(valid & (score == np.repeat(best_iou, seg_len, axis=1)),
                           np.arange(len(p_det))[None, :], -1)
            best = np.maximum.reduceat(pos, seg, axis=1)  # (T, S), -1 = unmatched
            t_idx, s_idx = np.nonzero(best >= 0)
            chosen = best[t_idx, s_idx]
            det_matched[t_idx, p_det[chosen]] = True
            gt_matched[t_idx, p_gt[chosen]] = True

    return MatchResult(
        iou_thresholds=thresholds,
        num_cases=n_cases,
        det_case=det_case,
        det_class=det_class,
        det_rank=rank,
        det_index=det_local,
        det_score=det_score,
        det_matched=det_matched,
        gt_case=gt_case,
        gt_class=gt_class,
        gt_index=gt_local,
        gt_matched=gt_matched,
    )


def to_results_list(match: MatchResult) -> list[dict[int, dict[str, np.ndarray]]]:
    """Convert to nnDetection's/MONAI's ``matching_batch`` output (one dict per case, keyed by class).

    Useful for cross-checks and for feeding nnDetection/MONAI metric classes. Keys per class:
    ``dtMatches`` (T, D) float, ``gtMatches`` (T, G) float, ``dtScores`` (D,), ``gtIgnore`` (G,) zeros,
    ``dtIgnore`` (T, D) zeros.
    """
    results: list[dict[int, dict[str, np.ndarray]]] = [dict() for _ in range(match.num_cases)]
    n_thr = len(match.iou_thresholds)
    det_key = np.stack([match.det_case, match.det_class], axis=1)
    gt_key = np.stack([match.gt_case, match.gt_class], axis=1)
    keys = np.unique(np.concatenate([det_key, gt_key]).reshape(-1, 2), axis=0)
    for case, cls in keys:
        d = (match.det_case == case) & (match.det_class == cls)
        g = (match.gt_case == case) & (match.gt_class == cls)
        results[int(case)][int(cls)] = {
            "dtMatches": match.det_matched[:, d].astype(np.float64),
            "gtMatches": match.gt_matched[:, g].astype(np.float64),
            "dtScores": match.det_score[d],
            "gtIgnore": np.zeros(int(g.sum())),
            "dtIgnore": np.zeros((n_thr, int(d.sum()))),
        }
    return results
