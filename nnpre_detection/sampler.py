"""Hard-negative sampling over a whole batch (nnDetection ``HardNegativeSamplerBatched``,
``nndet/core/boxes/sampler.py``).

With ``B`` images, budget ``batch_size_per_image * B``:

* ``num_pos = min(#positives, int(budget * positive_fraction))`` positives, drawn uniformly;
* ``num_neg = min(#negatives, max(int(max(1, num_pos) * |1 - 1 / positive_fraction|), min_neg))``;
* the negatives are drawn uniformly from the ``int(num_neg * pool_size)`` negatives with the highest
  foreground probability (hard negatives).

Defaults are nnDetection v001's: 32 anchors per image, positive fraction 0.33, pool 20, min_neg 1.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch


@dataclass(frozen=True)
class HardNegativeSampler:
    """Batched hard-negative sampler.

    Attributes:
        batch_size_per_image: sampled anchors per image (positives + negatives budget).
        positive_fraction: maximal fraction of positives, in (0, 1].
        pool_size: hard negatives are drawn from the ``num_neg * pool_size`` highest-scoring negatives.
        min_neg: minimal number of negatives per batch.
    """

    batch_size_per_image: int = 32
    positive_fraction: float = 0.33
    pool_size: float = 20
    min_neg: int = 1

    def __post_init__(self):
        if not 0 < self.positive_fraction <= 1:
            raise ValueError(f"positive_fraction must be in (0, 1], got {self.positive_fraction}")

    def __call__(
        self,
        labels: Sequence[torch.Tensor],
        fg_probs: Sequence[torch.Tensor],
        generator: Optional[torch.Generator] = None,
    ) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        """Sample positives and hard negatives.

        Args:
            labels: per image (A_i,) long anchor labels, 0 = background, >= 1 = foreground class + 1,
                negative values = ignored (never sampled).
            fg_probs: per image (A_i,) foreground probability of every anchor (max over classes), used to
                rank negatives (no gradient needed).
            generator: CPU ``torch.Generator`` for the random draws (``None``: a new generator with PyTorch's
                default seed, i.e. the same draws every call).

        Returns:
            pos_masks, neg_masks: per image (A_i,) bool masks of the sampled anchors.
        """
        if len(labels) != len(fg_probs):
            raise ValueError("labels and fg_probs must have one entry per image")
        device = labels[0].device
        counts = [lab.numel() for lab in labels]
        lab = torch.cat([lab.reshape(-1) for lab in labels])
        prob = torch.cat([p.reshape(-1) for p in fg_probs]).detach()
        if generator is None:
            generator = torch.Generator()
        pos_idx = torch.nonzero(lab >= 1, as_tuple=False).flatten()
        neg_idx = torch.nonzero(lab == 0, as_tuple=False).flatten()

        budget = self.batch_size_per_image * len(labels)
        num_pos = min(pos_idx.numel(), int(budget * self.positive_fraction))
        num_neg = int(max(1, num_pos) * abs(1 - 1 / self.positive_fraction))
        num_neg = min(neg_idx.numel(), max(num_neg, self.min_neg))

        perm = torch.randperm(pos_idx.numel(), generator=generator)[:num_pos].to(device)
        pos_sel = pos_idx[perm]

        pool = min(neg_idx.numel(), int(num_neg * self.pool_size))
        hardest = prob[neg_idx].topk(pool).indices if pool > 0 else neg_idx[:0]
        perm = torch.randperm(hardest.numel(), generator=generator)[:num_neg].to(device)
        neg_sel = neg_idx[hardest[perm]]

        pos_mask = torch.zeros_like(lab, dtype=torch.bool)
        neg_mask = torch.zeros_like(lab, dtype=torch.bool)
        pos_mask[pos_sel] = True
        neg_mask[neg_sel] = True
        return list(pos_mask.split(counts)), list(neg_mask.split(counts))
