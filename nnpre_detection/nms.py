"""Greedy non-maximum suppression for 3D (and 2D) boxes in pure PyTorch, on CPU or GPU.

nnDetection's only compiled extension is its 3D NMS (``nndet/csrc``), the biggest source of its install
issues (MIC-DKFZ/nnDetection issue tracker: build failures of ``nndet._C``). This module needs no extension and gives
exactly greedy NMS:
boxes are visited in descending score order (stable sort, so ties keep input order as in MONAI), and a
box is suppressed when its IoU with an already kept box is strictly greater than the threshold
(nnDetection and MONAI semantics).

Algorithm (blocked greedy): the score-sorted boxes that are still alive (neither kept nor suppressed) are
processed ``block_size`` at a time. Every box of a block has survived all previously kept boxes, so the
block's (R, R) overlap matrix decides the greedy choice exactly (a cheap sequential scan on the host over a
small boolean matrix); then the block's kept boxes suppress all remaining alive boxes at once with one (K, M)
IoU evaluation (in column chunks of bounded size), and the alive list is compacted. Memory is bounded
(O(block_size * N) up to ``MAX_CHUNK_ELEMENTS``), never O(N^2); suppressed boxes are never looked at again, so
a few objects with many overlapping predictions take only a few blocks.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from nnpre_detection.boxes import _check, corners

#: Default (maximal) rows per block.
DEFAULT_BLOCK_SIZE = 256
#: Maximal elements of one (K, M) intermediate; longer alive lists are processed in column chunks, which
#: bounds the workspace at about 13 bytes x 4M = 52 MB whatever the number of boxes.
MAX_CHUNK_ELEMENTS = 1 << 22


class _Workspace:
    """Reusable flat float32 buffers for the (K, M) intermediates (allocating them per call costs more than
    the arithmetic)."""

    def __init__(self, size: int, device: torch.device):
        self._alloc(size, device)

    def _alloc(self, size: int, device: torch.device):
        self.bufs = [torch.empty(size, dtype=torch.float32, device=device) for _ in range(3)]
        self.bufs.append(torch.empty(size, dtype=torch.bool, device=device))

    def views(self, k: int, m: int):
        if k * m > self.bufs[0].numel():
            self._alloc(k * m, self.bufs[0].device)
        return [b[: k * m].view(k, m) for b in self.bufs]


def _overlap_gt(lo_a, hi_a, vol_a, lo_b, hi_b, vol_b, iou_threshold: float, ws: _Workspace) -> torch.Tensor:
    """Boolean (K, M) matrix ``IoU(a, b) > iou_threshold`` in float32 (same formula as ``boxes.box_iou``).

    Args:
        lo_a, hi_a: (D, K) contiguous corner coordinates per axis; vol_a: (K,). Same for b with M boxes.
    """
    inter, tmp, side, result = ws.views(lo_a.shape[1], lo_b.shape[1])
    for d in range(lo_a.shape[0]):
        out = inter if d == 0 else side
        torch.minimum(hi_a[d][:, None], hi_b[d][None, :], out=out)
        torch.maximum(lo_a[d][:, None], lo_b[d][None, :], out=tmp)
        out.sub_(tmp).clamp_(min=0)
        if d > 0:
            inter.mul_(side)
    torch.add(vol_a[:, None], vol_b[None, :], out=tmp)
    union = tmp.sub_(inter).clamp_(min=torch.finfo(torch.float32).tiny)
    # union == 0 only for two degenerate boxes; their IoU is 0 (inter == 0), as in boxes.box_iou.
    return torch.gt(inter.div_(union), iou_threshold, out=result)


def _greedy_scan(inner: np.ndarray) -> np.ndarray:
    """Exact greedy selection inside one block.

    Args:
        inner: (R, R) bool, ``inner[i, j]`` = box i would suppress box j (score order i < j).

    Returns:
        (R,) bool mask of the kept boxes.
    """
    keep = np.ones(inner.shape[0], dtype=bool)
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
    order = torch.argsort(scores.detach(), descending=True, stable=True)
    lo, hi = corners(boxes.detach().float()[order])
    vol = (hi - lo).prod(dim=1)
    lo, hi = lo.T.contiguous(), hi.T.contiguous()  # (D, N): contiguous rows per axis
    ws = _Workspace(min(min(block_size, n) * n, MAX_CHUNK_ELEMENTS), device)
    alive = torch.arange(n, device=device)  # not yet decided, in score order
    kept_chunks = []
    n_kept = 0
    step = min(16, block_size)
    while alive.numel() > 0:
        # blocks grow geometrically up to block_size: small first blocks let the top boxes suppress their
        # (often many) overlapping predictions before the expensive (K, M) evaluations on the long alive list
        rows, alive = alive[:step], alive[step:]
        step = min(2 * step, block_size)
        lo_r, hi_r, vol_r = lo[:, rows], hi[:, rows], vol[rows]
        inner = _overlap_gt(lo_r, hi_r, vol_r, lo_r, hi_r, vol_r, iou_threshold, ws)
        # (`inner` is a view of the workspace: scan it before the next _overlap_gt call)
        keep_t = torch.from_numpy(_greedy_scan(inner.cpu().numpy())).to(device)
        kept = rows[keep_t]
        if max_keep is not None and n_kept + kept.numel() >= max_keep:
            kept_chunks.append(kept[: max_keep - n_kept])
            break
        kept_chunks.append(kept)
        n_kept += kept.numel()
        if alive.numel() > 0 and kept.numel() > 0:
            lo_k, hi_k, vol_k = lo_r[:, keep_t], hi_r[:, keep_t], vol_r[keep_t]
            chunk = max(1, MAX_CHUNK_ELEMENTS // kept.numel())
            hit = torch.cat([
                _overlap_gt(lo_k, hi_k, vol_k, lo[:, cols], hi[:, cols], vol[cols], iou_threshold, ws).any(dim=0)
                for cols in alive.split(chunk)
            ])
            alive = alive[~hit]
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
