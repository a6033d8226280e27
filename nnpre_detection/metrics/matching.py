"""Greedy per-case, per-class matching of detections to ground truth (nnDetection ``matching_batch``).

Semantics reproduced exactly (nnDetection ``nndet/evaluator/detection/matching.py``, also ported to MONAI
``monai.apps.detection.metrics.matching``):

* per case and per class, the detections are sorted by descending score with a *stable* sort (ties keep
  their input order) and only the top ``max_detections`` (100) are kept, before matching;
* for every IoU threshold ``t`` independently, detections are visited in that order; each takes the
  not-yet-matched ground-truth box of its case/class with the highest IoU, provided ``IoU >= min(t, 1-1e-10)``;
  when several boxes share that IoU the *later* one (in input order) wins, because nnDetection replaces its
  best match on ``>=``; a detection without such a box is a false positive;
* ground truth is never ignored by default (nnDetection's evaluator passes ``gt_ignore`` = all zeros).

Ignored ground truth (optional ``gt_ignore``; COCO semantics, as MONAI's ``matching_batch(..., gt_ignore=...)``
and pycocotools' ``evaluateImg``): within a case/class the ignored boxes are placed after the regular ones
(stable, input order kept within each part); a detection is matched to an ignored box only when no regular
box is available to it at that threshold (i.e. unmatched with ``IoU >= min(t, 1-1e-10)``), again the highest
IoU with ties to the later box; an ignored box absorbs one detection per threshold (no crowd regions), and a
detection matched to an ignored box is itself ignored (``det_ignored``: neither TP nor FP in AP and FROC).

Vectorisation: all cases and classes are processed at once. Candidate (detection, ground truth) pairs
exist only within one case/class group; the greedy loop runs over the detection *rank* (at most
``max_detections`` steps), and every step resolves all groups and all thresholds with segment reductions.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from nnpre.errors import fail
from nnpre_detection.metrics.iou import box_iou_pairs
from nnpre_detection.metrics.validate import as_boxes, check_ground_truth, check_prediction

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
        det_ignored: (T, D) bool, True = matched to an ignored ground-truth box at that threshold (neither
            TP nor FP). All False without ``gt_ignore``.
        gt_ignored: (G,) bool, the ``gt_ignore`` flag of each ground-truth box (all False without it).
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
    det_ignored: np.ndarray | None = None
    gt_ignored: np.ndarray | None = None

    def __post_init__(self):
        # results built without ignore flags (older callers) get all-False flags
        if self.det_ignored is None:
            object.__setattr__(self, "det_ignored", np.zeros(self.det_matched.shape, dtype=bool))
        if self.gt_ignored is None:
            object.__setattr__(self, "gt_ignored", np.zeros(self.gt_case.shape, dtype=bool))

    @property
    def det_true_positive(self) -> np.ndarray:
        """(T, D) bool: matched to a regular ground-truth box."""
        return self.det_matched & ~self.det_ignored

    @property
    def det_false_positive(self) -> np.ndarray:
        """(T, D) bool: unmatched (and therefore not ignored)."""
        return ~self.det_matched & ~self.det_ignored

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


def _case_arrays(boxes: Sequence, values: Sequence[Sequence], names: Sequence[str], kind: str):
    """Per case: boxes as (N, 6) arrays and 1D value arrays of matching length (cheap checks only)."""
    out_boxes, out_values = [], [[] for _ in values]
    for i in range(len(boxes)):
        b = as_boxes(boxes[i], f"{names[i]} {kind}")
        out_boxes.append(b)
        for j, vals in enumerate(values):
            v = np.asarray(vals[i]).reshape(-1)
            if len(v) != len(b):
                fail(f"{names[i]} {kind}: {len(b)} boxes but {len(v)} scores/classes")
            out_values[j].append(v)
    return out_boxes, out_values


def _concat(arrays: list[np.ndarray], empty_shape: tuple, dtype) -> np.ndarray:
    nonempty = [a for a in arrays if len(a)]
    return np.concatenate(nonempty) if nonempty else np.zeros(empty_shape, dtype=dtype)


def _row_namer(names: Sequence[str], lengths: np.ndarray, kind: str):
    ends = np.cumsum(lengths)

    def where(row):
        if row is None:
            return f"{kind}"
        case = int(np.searchsorted(ends, row, side="right"))
        local = row - (ends[case] - lengths[case])
        return f"{names[case]} {kind} #{local}"

    return where


def _ignore_flags(gt_ignore, g_len: np.ndarray, names: Sequence[str]) -> np.ndarray:
    """Concatenated (G,) bool ignore flags, checked against the ground-truth counts per case."""
    if gt_ignore is None:
        return np.zeros(int(g_len.sum()), dtype=bool)
    if len(gt_ignore) != len(g_len):
        raise ValueError(f"gt_ignore needs one entry per case ({len(g_len)}), got {len(gt_ignore)}")
    flags = []
    for i, f in enumerate(gt_ignore):
        f = np.asarray(f).reshape(-1)
        if len(f) != g_len[i]:
            fail(f"{names[i]} ground truth: {g_len[i]} boxes but {len(f)} ignore flags")
        if f.size and not (f.dtype == bool or np.isin(f, (0, 1)).all()):
            fail(f"{names[i]} ground truth: ignore flags must be booleans (0/1), got {np.unique(f)[:5].tolist()}")
        flags.append(f.astype(bool))
    return _concat(flags, (0,), bool)


def match_cases(
    pred_boxes: Sequence[np.ndarray],
    pred_scores: Sequence[np.ndarray],
    pred_classes: Sequence[np.ndarray],
    gt_boxes: Sequence[np.ndarray],
    gt_classes: Sequence[np.ndarray],
    iou_thresholds: Sequence[float],
    max_detections: int = MAX_DETECTIONS,
    num_classes: int | None = None,
    case_ids: Sequence[str] | None = None,
    validate: bool = True,
    gt_ignore: Sequence[np.ndarray] | None = None,
) -> MatchResult:
    """Match detections to ground truth for every case, class and IoU threshold.

    Args:
        pred_boxes: per case (D_i, 6) boxes in nnDetection layout (a0_1, a1_1, a0_2, a1_2, a2_1, a2_2).
        pred_scores: per case (D_i,) scores in [0, 1].
        pred_classes: per case (D_i,) class ids (>= 0).
        gt_boxes: per case (G_i, 6) boxes, same layout.
        gt_classes: per case (G_i,) class ids.
        iou_thresholds: IoU thresholds (> 0); each is matched independently.
        max_detections: detections kept per case and class (nnDetection: 100).
        num_classes: if given, class ids must be < num_classes.
        case_ids: case names for error messages (default ``case <index>``).
        validate: check the inputs (see :mod:`nnpre_detection.metrics.validate`).
        gt_ignore: per case (G_i,) bool, True = ignored ground-truth box (COCO semantics, see the module
            doc). None (default) = no box ignored, nnDetection's behaviour, bit for bit.

    Returns:
        :class:`MatchResult`. Case order is the input order (it decides score ties in AP).
    """
    n_cases = len(pred_boxes)
    if not (len(pred_scores) == len(pred_classes) == len(gt_boxes) == len(gt_classes) == n_cases):
        raise ValueError("pred_boxes, pred_scores, pred_classes, gt_boxes and gt_classes need one entry per case")
    names = [f"case {i}" for i in range(n_cases)] if case_ids is None else [str(c) for c in case_ids]
    thresholds = np.asarray(list(iou_thresholds), dtype=np.float64).reshape(-1)
    if thresholds.size == 0 or not np.all(thresholds > 0):
        raise ValueError(f"IoU thresholds must be > 0, got {thresholds.tolist()}")
    n_thr = len(thresholds)

    pb, (ps, pl) = _case_arrays(pred_boxes, (pred_scores, pred_classes), names, "predictions")
    gb, (gl,) = _case_arrays(gt_boxes, (gt_classes,), names, "ground truth")
    p_len = np.array([len(b) for b in pb], dtype=np.int64)
    g_len = np.array([len(b) for b in gb], dtype=np.int64)
    det_box = _concat(pb, (0, 6), np.float32)
    det_score = _concat(ps, (0,), np.float32)
    det_class = _concat(pl, (0,), np.int64)
    gt_box = _concat(gb, (0, 6), np.float64)
    gt_class = _concat(gl, (0,), np.int64)
    gt_ign = _ignore_flags(gt_ignore, g_len, names)
    if validate:
        det_box, det_score, det_class = check_prediction(det_box, det_score, det_class, num_classes,
                                                         _row_namer(names, p_len, "prediction"))
        gt_box, gt_class = check_ground_truth(gt_box, gt_class, num_classes,
                                              _row_namer(names, g_len, "ground truth"))
    det_class = det_class.astype(np.int64)
    gt_class = gt_class.astype(np.int64)
    det_case = np.repeat(np.arange(n_cases, dtype=np.int64), p_len)
    gt_case = np.repeat(np.arange(n_cases, dtype=np.int64), g_len)
    det_local = _ragged_arange(np.zeros(n_cases, dtype=np.int64), p_len)
    gt_local = _ragged_arange(np.zeros(n_cases, dtype=np.int64), g_len)

    # ---- detections: order by (case, class) group, then score descending; stable = ties keep input order
    n_key = int(max(det_class.max(initial=-1), gt_class.max(initial=-1))) + 1
    order = np.argsort(-det_score, kind="stable")
    key = det_case[order] * n_key + det_class[order]
    sub = np.argsort(key, kind="stable")
    order, key = order[sub], key[sub]
    starts = _segment_starts(key)
    rank = np.arange(len(key), dtype=np.int64) - np.repeat(starts, np.diff(np.r_[starts, len(key)]))
    keep = rank < max_detections  # nnDetection truncates to the top max_detections before matching
    order, rank, key = order[keep], rank[keep], key[keep]
    det_box, det_case, det_class = det_box[order], det_case[order], det_class[order]
    det_score, det_local = det_score[order], det_local[order]

    # ---- ground truth: order by (case, class) group, input order within a group (matters for IoU ties)
    gt_key = gt_case * n_key + gt_class
    g_order = np.argsort(gt_key, kind="stable")
    gt_box, gt_case, gt_class, gt_local, gt_key, gt_ign = (
        a[g_order] for a in (gt_box, gt_case, gt_class, gt_local, gt_key, gt_ign))
    any_ignored = bool(gt_ign.any())

    det_matched = np.zeros((n_thr, len(det_case)), dtype=bool)
    gt_matched = np.zeros((n_thr, len(gt_case)), dtype=bool)
    det_ignored = np.zeros((n_thr, len(det_case)), dtype=bool)

    # ---- candidate pairs (detection, ground truth of the same case and class)
    g_lo = np.searchsorted(gt_key, key, side="left")
    n_pairs = np.searchsorted(gt_key, key, side="right") - g_lo
    pair_det = np.repeat(np.arange(len(key), dtype=np.int64), n_pairs)
    pair_gt = _ragged_arange(g_lo, n_pairs)
    pair_iou = box_iou_pairs(det_box[pair_det], gt_box[pair_gt]) if len(pair_det) else np.zeros(0)
    # nnDetection starts its search at min(t, 1 - 1e-10) and accepts IoU >= that value; a pair below the
    # smallest start can never match, so it is dropped (this only removes work, not matches)
    start = np.minimum(thresholds, 1 - 1e-10)
    possible = pair_iou >= start.min()
    pair_det, pair_gt, pair_iou = pair_det[possible], pair_gt[possible], pair_iou[possible]
    if len(pair_det):
        # the greedy order within every group is the rank order: process all groups rank by rank
        p_order = np.argsort(rank[pair_det], kind="stable")
        pair_det, pair_gt, pair_iou = pair_det[p_order], pair_gt[p_order], pair_iou[p_order]
        pair_rank = rank[pair_det]
        bounds = np.flatnonzero(np.r_[True, pair_rank[1:] != pair_rank[:-1], True])
        start = start[:, None]
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            p_det, p_gt, p_iou = pair_det[lo:hi], pair_gt[lo:hi], pair_iou[lo:hi]
            seg = _segment_starts(p_det)  # one segment per detection (one detection per group and rank)
            valid = ~gt_matched[:, p_gt] & (p_iou[None, :] >= start)  # (T, P)
            if any_ignored:
                # ignored ground truth is available to a detection only when no regular box is
                p_ign = gt_ign[p_gt]
                has_regular = np.logical_or.reduceat(valid & ~p_ign[None, :], seg, axis=1)  # (T, S)
                seg_len = np.diff(np.r_[seg, len(p_det)])
                valid &= ~(p_ign[None, :] & np.repeat(has_regular, seg_len, axis=1))
            score = np.where(valid, p_iou[None, :], -np.inf)
            best_iou = np.maximum.reduceat(score, seg, axis=1)  # (T, S)
            # IoU ties: the later ground truth wins -> the largest position holding the maximum
            is_best = valid & (score == np.repeat(best_iou, np.diff(np.r_[seg, len(p_det)]), axis=1))
            best = np.maximum.reduceat(np.where(is_best, np.arange(len(p_det))[None, :], -1), seg, axis=1)
            t_idx, s_idx = np.nonzero(best >= 0)
            chosen = best[t_idx, s_idx]
            det_matched[t_idx, p_det[chosen]] = True
            gt_matched[t_idx, p_gt[chosen]] = True
            if any_ignored:
                det_ignored[t_idx, p_det[chosen]] = gt_ign[p_gt[chosen]]

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
        det_ignored=det_ignored,
        gt_ignored=gt_ign,
    )


def to_results_list(match: MatchResult) -> list[dict[int, dict[str, np.ndarray]]]:
    """Convert to nnDetection's/MONAI's ``matching_batch`` output (one dict per case, keyed by class).

    Useful for cross-checks and for feeding nnDetection/MONAI metric classes. Keys per class:
    ``dtMatches`` (T, D) float, ``gtMatches`` (T, G) float, ``dtScores`` (D,), ``gtIgnore`` (G,),
    ``dtIgnore`` (T, D) (zeros without ``gt_ignore``). Within a case/class the ground truth is listed with the
    ignored boxes last (stable), the order MONAI's ``matching_batch`` reports it in.
    """
    results: list[dict[int, dict[str, np.ndarray]]] = [dict() for _ in range(match.num_cases)]
    n_thr = len(match.iou_thresholds)
    det_key = np.stack([match.det_case, match.det_class], axis=1)
    gt_key = np.stack([match.gt_case, match.gt_class], axis=1)
    keys = np.unique(np.concatenate([det_key, gt_key]).reshape(-1, 2), axis=0)
    for case, cls in keys:
        d = (match.det_case == case) & (match.det_class == cls)
        g = np.flatnonzero((match.gt_case == case) & (match.gt_class == cls))
        g = g[np.argsort(match.gt_ignored[g], kind="stable")]  # ignored boxes last
        results[int(case)][int(cls)] = {
            "dtMatches": match.det_matched[:, d].astype(np.float64),
            "gtMatches": match.gt_matched[:, g].astype(np.float64),
            "dtScores": match.det_score[d],
            "gtIgnore": match.gt_ignored[g].astype(np.float64),
            "dtIgnore": match.det_ignored[:, d].astype(np.float64).reshape(n_thr, -1),
        }
    return results
