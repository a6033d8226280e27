"""Axis-aligned box utilities: layout conversions, volume, IoU, GIoU, clipping.

Layout
    All boxes in nnpre use nnDetection's layout ``(x1, y1, x2, y2, z1, z2)`` (MONAI name ``"xyxyzz"``), where
    x, y, z are simply array axes 0, 1, 2 of the spatial tensor (not world axes). 2D boxes ``(x1, y1, x2, y2)``
    are accepted wherever that costs nothing. Boxes are continuous coordinates; the size along an axis is
    ``hi - lo`` and the volume is the product of the sizes, without nnDetection's historic ``+1``
    (nnDetection ``nndet/core/boxes/ops.py``). IoU/GIoU are always computed in float32, whatever the input dtype
    (nnDetection and
    MONAI both do this), and returned as float32.
"""
from __future__ import annotations

from typing import Sequence, Tuple

import torch

#: Column indices of the lower / upper corner per axis for 3D boxes in nnDetection layout.
LO_3D = (0, 1, 4)
HI_3D = (2, 3, 5)
LO_2D = (0, 1)
HI_2D = (2, 3)

#: Layouts understood by :func:`convert_boxes`.
LAYOUTS = ("xyxyzz", "xyzxyz", "cccwhd")


def _check(boxes: torch.Tensor, name: str = "boxes") -> int:
    """Validate a (N, 4|6) box tensor and return its spatial dimension (2 or 3)."""
    if not isinstance(boxes, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(boxes).__name__}")
    if boxes.ndim != 2 or boxes.shape[1] not in (4, 6):
        raise ValueError(f"{name} must have shape (N, 6) (3D) or (N, 4) (2D), got {tuple(boxes.shape)}")
    return boxes.shape[1] // 2


def corners(boxes: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Split boxes into lower and upper corners.

    Args:
        boxes: (N, 6) ``(x1, y1, x2, y2, z1, z2)`` or (N, 4) ``(x1, y1, x2, y2)``.

    Returns:
        lo, hi: (N, D) lower and upper corners in axis order (x, y[, z]), D = 3 or 2.
    """
    dim = _check(boxes)
    lo_idx, hi_idx = (LO_3D, HI_3D) if dim == 3 else (LO_2D, HI_2D)
    return boxes[:, list(lo_idx)], boxes[:, list(hi_idx)]


def from_corners(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`corners`: (N, D) lower/upper corners -> (N, 2D) boxes in nnDetection layout."""
    if lo.shape != hi.shape or lo.ndim != 2 or lo.shape[1] not in (2, 3):
        raise ValueError(f"corners must both be (N, 2|3), got {tuple(lo.shape)} and {tuple(hi.shape)}")
    if lo.shape[1] == 3:
        return torch.stack([lo[:, 0], lo[:, 1], hi[:, 0], hi[:, 1], lo[:, 2], hi[:, 2]], dim=1)
    return torch.stack([lo[:, 0], lo[:, 1], hi[:, 0], hi[:, 1]], dim=1)


def box_center(boxes: torch.Tensor) -> torch.Tensor:
    """(N, 6) boxes -> (N, 3) centres (x, y, z)."""
    lo, hi = corners(boxes)
    return (lo + hi) / 2


def box_size(boxes: torch.Tensor) -> torch.Tensor:
    """(N, 6) boxes -> (N, 3) side lengths ``hi - lo`` (x, y, z), no ``+1``."""
    lo, hi = corners(boxes)
    return hi - lo


def box_volume(boxes: torch.Tensor) -> torch.Tensor:
    """(N, 6) boxes -> (N,) float32 volumes ``(x2-x1)(y2-y1)(z2-z1)`` (area for 2D boxes)."""
    return box_size(boxes.float()).prod(dim=1)


def convert_boxes(boxes: torch.Tensor, src: str, dst: str) -> torch.Tensor:
    """Convert 3D boxes between layouts.

    Args:
        boxes: (N, 6) boxes in layout ``src``.
        src, dst: one of ``"xyxyzz"`` (nnDetection/nnpre: x1, y1, x2, y2, z1, z2), ``"xyzxyz"`` (MONAI
            ``StandardMode``: x1, y1, z1, x2, y2, z2) or ``"cccwhd"`` (centre x, y, z then sizes w, h, d).

    Returns:
        (N, 6) boxes in layout ``dst`` (same dtype).
    """
    for name in (src, dst):
        if name not in LAYOUTS:
            raise ValueError(f"unknown box layout '{name}'; choose one of {LAYOUTS}")
    if boxes.ndim != 2 or boxes.shape[1] != 6:
        raise ValueError(f"convert_boxes expects (N, 6) 3D boxes, got {tuple(boxes.shape)}")
    if src == dst:
        return boxes.clone()
    if src == "xyzxyz":
        lo, hi = boxes[:, :3], boxes[:, 3:]
    elif src == "cccwhd":
        lo, hi = boxes[:, :3] - boxes[:, 3:] / 2, boxes[:, :3] + boxes[:, 3:] / 2
    else:
        lo, hi = corners(boxes)
    if dst == "xyzxyz":
        return torch.cat([lo, hi], dim=1)
    if dst == "cccwhd":
        return torch.cat([(lo + hi) / 2, hi - lo], dim=1)
    return from_corners(lo, hi)


def _pairwise_inter(lo1, hi1, lo2, hi2) -> torch.Tensor:
    """Intersection volume (N, M) of float32 corners (N, D) vs (M, D)."""
    inter = None
    for d in range(lo1.shape[1]):
        side = (torch.minimum(hi1[:, None, d], hi2[None, :, d]) - torch.maximum(lo1[:, None, d], lo2[None, :, d]))
        side = side.clamp_(min=0)
        inter = side if inter is None else inter.mul_(side)
    return inter


def box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """Pairwise intersection over union.

    Args:
        boxes1: (N, 6) boxes. boxes2: (M, 6) boxes (same dimension).

    Returns:
        (N, M) float32 IoU in [0, 1]; pairs whose union is 0 (two degenerate boxes) get 0.
    """
    if _check(boxes1, "boxes1") != _check(boxes2, "boxes2"):
        raise ValueError("boxes1 and boxes2 must both be 2D or both be 3D boxes")
    lo1, hi1 = corners(boxes1.float())
    lo2, hi2 = corners(boxes2.float())
    inter = _pairwise_inter(lo1, hi1, lo2, hi2)
    union = (hi1 - lo1).prod(1)[:, None] + (hi2 - lo2).prod(1)[None, :] - inter
    return torch.where(union > 0, inter / union.clamp(min=torch.finfo(torch.float32).tiny), torch.zeros_like(inter))


def box_giou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """Pairwise generalised IoU (Rezatofighi et al. 2019): ``IoU - (enclosure - union) / enclosure``.

    Args:
        boxes1: (N, 6) boxes. boxes2: (M, 6) boxes.

    Returns:
        (N, M) float32 GIoU in [-1, 1]; a zero-volume enclosure gives 0.
    """
    if _check(boxes1, "boxes1") != _check(boxes2, "boxes2"):
        raise ValueError("boxes1 and boxes2 must both be 2D or both be 3D boxes")
    lo1, hi1 = corners(boxes1.float())
    lo2, hi2 = corners(boxes2.float())
    inter = _pairwise_inter(lo1, hi1, lo2, hi2)
    union = (hi1 - lo1).prod(1)[:, None] + (hi2 - lo2).prod(1)[None, :] - inter
    enclosure = (torch.maximum(hi1[:, None], hi2[None]) - torch.minimum(lo1[:, None], lo2[None])).clamp(min=0).prod(-1)
    return _giou_from_parts(inter, union, enclosure)


def _giou_from_parts(inter, union, enclosure) -> torch.Tensor:
    tiny = torch.finfo(torch.float32).tiny
    iou = torch.where(union > 0, inter / union.clamp(min=tiny), torch.zeros_like(inter))
    penalty = torch.where(enclosure > 0, (enclosure - union) / enclosure.clamp(min=tiny), torch.zeros_like(inter))
    return iou - penalty


def box_pair_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """Element-wise IoU of two equally long box lists: (N, 6), (N, 6) -> (N,) float32."""
    return _pair(boxes1, boxes2, giou=False)


def box_pair_giou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """Element-wise GIoU of two equally long box lists: (N, 6), (N, 6) -> (N,) float32 in [-1, 1].

    Differentiable in both arguments (used by the GIoU regression loss).
    """
    return _pair(boxes1, boxes2, giou=True)


def _pair(boxes1: torch.Tensor, boxes2: torch.Tensor, giou: bool) -> torch.Tensor:
    if _check(boxes1, "boxes1") != _check(boxes2, "boxes2") or boxes1.shape[0] != boxes2.shape[0]:
        raise ValueError(f"element-wise IoU needs equal shapes, got {tuple(boxes1.shape)} and {tuple(boxes2.shape)}")
    lo1, hi1 = corners(boxes1.float())
    lo2, hi2 = corners(boxes2.float())
    inter = (torch.minimum(hi1, hi2) - torch.maximum(lo1, lo2)).clamp(min=0).prod(1)
    union = (hi1 - lo1).prod(1) + (hi2 - lo2).prod(1) - inter
    if not giou:
        tiny = torch.finfo(torch.float32).tiny
        return torch.where(union > 0, inter / union.clamp(min=tiny), torch.zeros_like(inter))
    enclosure = (torch.maximum(hi1, hi2) - torch.minimum(lo1, lo2)).clamp(min=0).prod(1)
    return _giou_from_parts(inter, union, enclosure)


def clip_boxes(boxes: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Clip boxes to the image extent ``[0, shape[d]]`` per axis (nnDetection ``clip_boxes_to_image``).

    Args:
        boxes: (N, 6) boxes. shape: spatial image shape (X, Y, Z).

    Returns:
        (N, 6) clipped copy.
    """
    lo, hi = corners(boxes)
    if len(shape) != lo.shape[1]:
        raise ValueError(f"shape {tuple(shape)} does not match {lo.shape[1]}D boxes")
    upper = torch.as_tensor(list(shape), dtype=boxes.dtype, device=boxes.device)
    lo = torch.minimum(lo.clamp(min=0), upper)
    hi = torch.minimum(hi.clamp(min=0), upper)
    return from_corners(lo, hi)


def remove_small_boxes(boxes: torch.Tensor, min_size: float) -> torch.Tensor:
    """Indices of boxes whose every side is at least ``min_size`` (nnDetection default 0.01).

    Args:
        boxes: (N, 6) boxes. min_size: minimal side length.

    Returns:
        (K,) long indices into ``boxes``.
    """
    return torch.nonzero((box_size(boxes) >= min_size).all(dim=1), as_tuple=False).flatten()
