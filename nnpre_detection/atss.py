"""ATSS anchor matching (Zhang et al. 2020, "Adaptive Training Sample Selection"), as in nnDetection v001.

Per ground-truth box g (nnDetection ``nndet/core/boxes/matcher/atss.py``):

1. on every detection level take the ``num_candidates * anchors_per_location`` anchors whose centres are
   closest (Euclidean) to the centre of g (nnDetection: 4 x 27 = 108 per level), at most all anchors of the
   level (nnDetection ``core/boxes/matcher/atss.py``: ``min(num_candidates * anchors_per_loc, anchors_of_level)``);
2. threshold ``t_g = mean + std`` (unbiased std) of the IoUs of g with all its candidates;
3. candidates with ``IoU >= t_g`` are positive for g (optionally only if their centre lies inside g, which
   nnDetection v001 disables);
4. an anchor positive for several boxes goes to the box with the highest IoU; all other anchors are
   background. There is no ignore band.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from nnpre_detection.boxes import box_center, box_pair_iou, corners

#: Matched index of anchors that are background.
BACKGROUND = -1


@dataclass(frozen=True)
class ATSSMatcher:
    """Adaptive training sample selection.

    Attributes:
        num_candidates: candidates per level and per anchor shape (nnDetection v001: 4).
        center_in_gt: also require the anchor centre to lie inside the box (nnDetection v001: False;
            MONAI's default: True).
        center_eps: margin of the centre-inside test (nnDetection: 0.01).
    """

    num_candidates: int = 4
    center_in_gt: bool = False
    center_eps: float = 0.01

    def __call__(
        self,
        gt_boxes: torch.Tensor,
        anchors: torch.Tensor,
        num_anchors_per_level: Sequence[int],
        num_anchors_per_location: int,
    ) -> torch.Tensor:
        """Match anchors of one image to its ground-truth boxes.

        Args:
            gt_boxes: (G, 6) boxes of the image (G may be 0).
            anchors: (A, 6) anchors of all levels, concatenated level by level.
            num_anchors_per_level: anchors per level, summing to A.
            num_anchors_per_location: anchors per position (27 for 3 sizes per axis).

        Returns:
            (A,) long: index of the matched box in ``gt_boxes``, or ``BACKGROUND`` (-1).
        """
        num_anchors = anchors.shape[0]
        if sum(num_anchors_per_level) != num_anchors:
            raise ValueError(f"num_anchors_per_level sums to {sum(num_anchors_per_level)}, expected {num_anchors}")
        matched = torch.full((num_anchors,), BACKGROUND, dtype=torch.long, device=anchors.device)
        if gt_boxes.shape[0] == 0 or num_anchors == 0:
            return matched
        gt = gt_boxes.to(device=anchors.device, dtype=torch.float32)
        dist = torch.cdist(box_center(gt), _centres(anchors))  # (G, A)

        candidates = []
        start = 0
        for count in num_anchors_per_level:
            # capped by the level's number of *anchors* (nnDetection ATSSMatcher.compute_matches); matters on
            # coarse levels with fewer than num_candidates positions (e.g. a 1x1x1 map keeps all 27 anchors)
            k = min(self.num_candidates * num_anchors_per_location, count)
            if k > 0:
                candidates.append(dist[:, start:start + count].topk(k, dim=1, largest=False).indices + start)
            start += count
        cand = torch.cat(candidates, dim=1)  # (G, K)
        # IoU of the candidates only (G x K pairs instead of G x A; same values as box_iou)
        cand_iou = box_pair_iou(gt.repeat_interleave(cand.shape[1], dim=0), anchors[cand.flatten()]).view(cand.shape)
        std = cand_iou.std(dim=1) if cand.shape[1] > 1 else torch.zeros_like(cand_iou[:, 0])
        threshold = cand_iou.mean(dim=1) + std
        positive = cand_iou >= threshold[:, None]

        if self.center_in_gt:
            centres = box_center(anchors.float())[cand]  # (G, K, 3)
            lo, hi = corners(gt)
            inside = ((centres - lo[:, None]) > self.center_eps) & ((hi[:, None] - centres) > self.center_eps)
            positive &= inside.all(dim=2)

        masked = torch.full((gt.shape[0], num_anchors), float("-inf"), device=anchors.device)
        rows = torch.arange(gt.shape[0], device=anchors.device)[:, None].expand_as(cand)
        masked[rows[positive], cand[positive]] = cand_iou[positive]
        best, best_idx = masked.max(dim=0)
        has_match = best > float("-inf")
        matched[has_match] = best_idx[has_match]
        return matched


def _centres(boxes: torch.Tensor) -> torch.Tensor:
    """(N, 6) boxes ``(x1, y1, x2, y2, z1, z2)`` -> (N, 3) float32 centres (x, y, z), as
    :func:`~nnpre_detection.boxes.box_center` but from slices (no index copy of the anchors; the anchors of a
    cpu-tiny patch are 10^5 rows and ATSS runs once per image)."""
    b = boxes.float()
    xy = (b[:, 0:2] + b[:, 2:4]) / 2
    return torch.cat([xy, (b[:, 4:5] + b[:, 5:6]) / 2], dim=1)
