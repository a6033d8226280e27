"""Greedy non-maximum suppression for 3D (and 2D) boxes in pure PyTorch, on CPU or GPU.

nnDetection's only compiled extension is its 3D NMS (``nndet/csrc``), the biggest source of its install
issues (detection.md §0.8, §5). This module needs no extension and gives exactly greedy NMS:
boxes are visited in descending score order (stable sort, so ties keep input order as in MONAI), and a
box is suppressed when its IoU with an already kept box is strictly greater than the threshold
(nnDetection and MONAI semantics).

Algorithm (blocked greedy): the score-sorted boxes are processed in blocks of ``block_size``. Inside a
block only boxes not yet suppressed are considered; their (R, R) overlap matrix decides the greedy choice
exactly (a cheap sequential scan on the host over a small boolean matrix); then the block's kept boxes
suppress all later, still alive boxes at once with one (K, M) IoU evaluation. Memory is O(block_size * N),
never O(N^2), and suppressed boxes are never looked at again.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from nnpre_detection.boxes import _check, corners

#: Default rows per block; 256 keeps the (256, N) intermediates of a 10k-box problem at ~10 MB.
DEFAULT_BLOCK_SIZE = 256


def _overlap_gt(lo_a, hi_a, vol_a, lo_b, hi_b, vol_b, iou_threshold: float) -> torch.Tensor:
    """Boolean (A, B) matrix ``IoU(a, b) > iou_threshold`` computed in float32 (same formula as ``box_iou``)."""
    inter = None
    for d in range(lo_a.shape[1]):
        side = torch.minimum(hi_a[:, None, d], hi_b[None, :, d]).sub_(torch.maximum(lo_a[:, None, d], lo_b[None, :, d]))
        side.clamp_(min=0)
        inter = side if inter is None else inter.mul_(side)
    union = (vol_a[:, None] + vol_b[None, :]).sub_(inter)
    # union == 0 only for two degenerate boxes; their IoU is defined as 0 (see boxes.box_iou).
    iou = inter.div_(union.clamp_(min=torch.finfo(torch.float32).tiny))
    return iou > iou_threshold


def _greedy_scan(inner: np.ndarray, alive: np.ndarray) -> np.ndarray:
    """Exact greedy selection inside one block.

    Args:
        inner: (R, R) bool, ``inner[i, j]`` = box i would suppress box j (score order i < j).
        alive: (R,) bool, boxes not suppressed by earlier blocks (modified copy is returned).
    """
    keep = alive.copy()
    suppressors = np.nonzero(np.triu(inner, 1).any(axis=1))[0]
    for i in suppressors:
        if keep[i]:
            keep[i + 1:] &= ~inner[i, i + 1:]
    return keep


def nms(
    boxes: torch.Tensor,
    scores: torch.Tensor,
    iou_threshold: float,
    max_keep: Optional[int] = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> torch.Tensor:
    """Greedy NMS.

    Args:
        boxes: (N, 6) boxes ``(x1, y1, x2, y2, z1, z2)`` (or (N, 4) 2D), any float dtype, CPU or CUDA.
        scores: (N,) scores; higher is kept first.
        iou_threshold: a box is removed if its IoU with a kept box is ``> iou_threshold``
            (nnDetection uses 0.6 per patch, 0.1 per case; MONAI's detector default is 0.5).
        max_keep: stop after this many kept boxes (``None`` = no limit).
        block_size: boxes per block (memory/speed trade-off only; the result does not depend on it).

    Returns:
        (K,) long indices into ``boxes`` of the kept boxes, in descending score order.
    """
    _check(boxes)
    if scores.ndim != 1 or scores.shape[0] != boxes.shape[0]:
        raise ValueError(f"scores must have shape ({boxes.shape[0]},), got {tuple(scores.shape)}")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    n = boxes.shape[0]
    device = boxes.device
    if n == 0 or (max_keep is not None and max_keep <= 0):
        return torch.zeros(0, dtype=torch.long, device=device)
    order = torch.argsort(scores, descending=True, stable=True)
    lo, hi = corners(boxes.float()[order])
    vol = (hi - lo).prod(dim=1)
    removed = torch.zeros(n, dtype=torch.bool, device=device)
    kept_chunks = []
    n_kept = 0
    for start in range(0, n, block_size):
        end = min(start + block_size, n)
        rows = start + torch.nonzero(~removed[start:end], as_tuple=False).flatten()
        if rows.numel() == 0:
            continue
        inner = _overlap_gt(lo[rows], hi[rows], vol[rows], lo[rows], hi[rows], vol[rows], iou_threshold)
        keep_np = _greedy_scan(inner.cpu().numpy(), np.ones(rows.numel(), dtype=bool))
        kept = rows[torch.from_numpy(keep_np).to(device)]
        if max_keep is not None and n_kept + kept.numel() >= max_keep:
            kept_chunks.append(kept[: max_keep - n_kept])
            break
        kept_chunks.append(kept)
        n_kept += kept.numel()
        if end < n and kept.numel() > 0:
            cols = end + torch.nonzero(~removed[end:], as_tuple=False).flatten()
            if cols.numel() > 0:
                hit = _overlap_gt(lo[kept], hi[kept], vol[kept], lo[cols], hi[cols], vol[cols], iou_threshold)
                removed[cols[hit.any(dim=0)]] = True
    if not kept_chunks:
        return torch.zeros(0, dtype=torch.long, device=device)
    return order[torch.cat(kept_chunks)]


def batched_nms(
    boxes: torch.Tensor,
    scores: torch.Tensor,
    labels: torch.Tensor,
    iou_threshold: float,
    max_keep: Optional[int] = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> torch.Tensor:
    """Class-wise greedy NMS: boxes of different labels never suppress each other.

    Runs :func:`nms` per label (exact; no coordinate-offset trick, which loses float32 precision).

    Args:
        boxes: (N, 6) boxes. scores: (N,) scores. labels: (N,) integer class labels.
        iou_threshold: see :func:`nms`. max_keep: total number of boxes to return (highest scores first).

    Returns:
        (K,) long indices into ``boxes``, in descending score order (stable).
    """
    if labels.shape != scores.shape:
        raise ValueError(f"labels must have shape {tuple(scores.shape)}, got {tuple(labels.shape)}")
    if boxes.shape[0] == 0:
        return torch.zeros(0, dtype=torch.long, device=boxes.device)
    keep = []
    for label in torch.unique(labels):
        idx = torch.nonzero(labels == label, as_tuple=False).flatten()
        keep.append(idx[nms(boxes[idx], scores[idx], iou_threshold, max_keep=max_keep, block_size=block_size)])
    keep = torch.cat(keep)
    keep = keep[torch.argsort(scores[keep], descending=True, stable=True)]
    return keep if max_keep is None else keep[:max_keep]
