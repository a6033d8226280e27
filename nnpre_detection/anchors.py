"""Anchors: the per-level anchor generator and anchor planning from training boxes.

Parametrisation (nnDetection v001 ``AnchorGenerator3DS``, ``nndet/core/boxes/anchors.py``): per detection level three
sizes per axis -- ``widths`` (axis 0), ``heights`` (axis 1), ``depths`` (axis 2) -- and the anchors of a
position are their Cartesian product (3 x 3 x 3 = 27 anchors), centred at ``index * stride`` (no half-stride
offset), cell anchor ``(-w/2, -h/2, w/2, h/2, -d/2, d/2)``. Flatten order is position-major (C order over
X, Y, Z) with anchors innermost, which is the order the heads emit their predictions in.

Planning (:func:`plan_anchors`) follows nnDetection's ``BoxC002``: drop boxes outside the 0.5th--99.5th
size percentiles per axis, centre every box at the origin, and choose integer base sizes (three per axis,
lower bound 1, initial guess (4, 8, 16)) that maximise the mean over boxes of the best IoU with any
origin-centred anchor of any level, where the anchors of level ``l`` are the base sizes scaled by that level's
stride relative to the first detection level. nnDetection uses nevergrad ``TwoPointsDE`` (budget 5000, 3 runs,
on the GPU); here scipy's integer differential evolution (about the same budget) followed by an integer
coordinate-descent polish, on the CPU.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch
from scipy.optimize import differential_evolution

from nnpre.errors import fail

#: nnDetection BoxC002 initial anchor sizes per axis.
DEFAULT_INIT_SIZES = (4, 8, 16)
#: Size percentiles outside of which boxes are ignored during planning (nnDetection).
DEFAULT_PERCENTILES = (0.5, 99.5)

SizesPerLevel = Sequence[Tuple[Sequence[float], Sequence[float], Sequence[float]]]


class AnchorGenerator:
    """Anchors on the detection levels of a patch.

    Args:
        sizes_per_level: per detection level a triple ``(widths, heights, depths)`` of size tuples along array
            axes 0, 1, 2. Every level must have the same number of anchors per position (the heads are
            shared across levels).
    """

    def __init__(self, sizes_per_level: SizesPerLevel):
        if len(sizes_per_level) == 0:
            fail("anchor sizes: need at least one detection level")
        cells = []
        for lvl, sizes in enumerate(sizes_per_level):
            if len(sizes) != 3:
                fail(f"anchor sizes of level {lvl} must be (widths, heights, depths), got {sizes}")
            combos = list(itertools.product(*[[float(v) for v in axis] for axis in sizes]))
            if any(v <= 0 for c in combos for v in c):
                fail(f"anchor sizes of level {lvl} must be positive, got {sizes}")
            cells.append(torch.tensor([(-w / 2, -h / 2, w / 2, h / 2, -d / 2, d / 2) for w, h, d in combos]))
        counts = {c.shape[0] for c in cells}
        if len(counts) != 1:
            fail(f"all detection levels need the same number of anchors per position, got {sorted(counts)}")
        self.sizes_per_level = [tuple(tuple(float(v) for v in axis) for axis in s) for s in sizes_per_level]
        self.cell_anchors = cells
        self._cache: Dict[tuple, List[torch.Tensor]] = {}

    @property
    def num_levels(self) -> int:
        return len(self.cell_anchors)

    @property
    def num_anchors_per_location(self) -> int:
        """Anchors per position (27 for 3 sizes per axis)."""
        return self.cell_anchors[0].shape[0]

    def __call__(
        self,
        image_shape: Sequence[int],
        feature_shapes: Sequence[Sequence[int]],
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> List[torch.Tensor]:
        """Anchors of every detection level.

        Args:
            image_shape: spatial patch shape (X, Y, Z).
            feature_shapes: spatial shape of every detection level's feature map, coarser than the patch by an
                integer stride per axis (``stride = image // fmap``, nnDetection).

        Returns:
            list over levels of (X_l * Y_l * Z_l * A, 6) anchors in nnDetection layout.
        """
        if len(feature_shapes) != self.num_levels:
            fail(f"anchor generator has {self.num_levels} levels but got {len(feature_shapes)} feature maps")
        key = (tuple(image_shape), tuple(tuple(f) for f in feature_shapes), str(device), dtype)
        if key not in self._cache:
            out = []
            for cell, fshape in zip(self.cell_anchors, feature_shapes):
                stride = [int(i // f) for i, f in zip(image_shape, fshape)]
                axes = [torch.arange(f, dtype=torch.float64) * s for f, s in zip(fshape, stride)]
                gx, gy, gz = torch.meshgrid(*axes, indexing="ij")
                gx, gy, gz = gx.reshape(-1), gy.reshape(-1), gz.reshape(-1)
                shifts = torch.stack([gx, gy, gx, gy, gz, gz], dim=1)
                anchors = (shifts[:, None, :] + cell.double()[None]).reshape(-1, 6)
                out.append(anchors.to(device=device, dtype=dtype))
            if len(self._cache) > 8:
                self._cache.clear()
            self._cache[key] = out
        return self._cache[key]


def relative_level_factors(strides: Sequence[Sequence[int]], levels: Sequence[int]) -> List[Tuple[float, ...]]:
    """Stride of each detection level relative to the first one (nnDetection planning step 4).

    Args:
        strides: per encoder stage the pooling stride per axis (nnU-Net ``arch_kwargs['strides']``).
        levels: detection level indices (encoder stages), ascending.

    Returns:
        list over ``levels`` of per-axis factors (first level = (1, 1, 1) in the usual case).
    """
    cum = np.cumprod(np.asarray([list(s) for s in strides], dtype=np.float64), axis=0)
    first = cum[levels[0]]
    return [tuple(float(v) for v in cum[lvl] / first) for lvl in levels]


@dataclass(frozen=True)
class AnchorPlan:
    """Planned anchors.

    Attributes:
        base_sizes: three tuples (axis 0, 1, 2) of base sizes, each ascending.
        level_factors: per detection level the per-axis scale of the base sizes.
        mean_best_iou: objective value on the boxes used for planning (in [0, 1]).
        num_boxes: number of boxes used after percentile filtering / subsampling.
    """

    base_sizes: Tuple[Tuple[float, ...], Tuple[float, ...], Tuple[float, ...]]
    level_factors: Tuple[Tuple[float, ...], ...] = ((1.0, 1.0, 1.0),)
    mean_best_iou: float = float("nan")
    num_boxes: int = 0

    def sizes_per_level(self) -> List[Tuple[Tuple[float, ...], ...]]:
        """Per level ``(widths, heights, depths)``: base sizes times the level factor of each axis."""
        return [
            tuple(tuple(float(v) * f[a] for v in self.base_sizes[a]) for a in range(3)) for f in self.level_factors
        ]

    def to_dict(self) -> dict:
        return {
            "base_sizes": [list(a) for a in self.base_sizes],
            "level_factors": [list(f) for f in self.level_factors],
            "sizes_per_level": [[list(a) for a in lvl] for lvl in self.sizes_per_level()],
            "mean_best_iou": self.mean_best_iou,
            "num_boxes": self.num_boxes,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "AnchorPlan":
        try:
            return cls(
                base_sizes=tuple(tuple(float(v) for v in a) for a in d["base_sizes"]),
                level_factors=tuple(tuple(float(v) for v in f) for f in d["level_factors"]),
                mean_best_iou=float(d.get("mean_best_iou", float("nan"))),
                num_boxes=int(d.get("num_boxes", 0)),
            )
        except (KeyError, TypeError, ValueError) as e:
            fail(f"anchor plan is malformed ({e}); expected keys base_sizes and level_factors")


def default_anchor_plan(level_factors: Sequence[Sequence[float]], base: Sequence[float] = DEFAULT_INIT_SIZES):
    """Unplanned anchors: ``base`` sizes on every axis (nnDetection's initial guess) scaled per level."""
    return AnchorPlan(base_sizes=tuple(tuple(float(b) for b in base) for _ in range(3)),
                      level_factors=tuple(tuple(float(v) for v in f) for f in level_factors))


def mean_best_iou(sizes: np.ndarray, params: np.ndarray, level_factors: np.ndarray) -> np.ndarray:
    """Objective of anchor planning for a batch of candidate parameter sets.

    Args:
        sizes: (N, 3) box sizes (boxes centred at the origin).
        params: (S, 3, K) candidate base sizes, K per axis.
        level_factors: (L, 3) per-level scale per axis.

    Returns:
        (S,) mean over boxes of the best IoU with any anchor (product of the K sizes per axis, all levels).
    """
    # anchor sizes per candidate, level, axis, value: (S, L, 3, K)
    a = params[:, None, :, :] * level_factors[None, :, :, None]
    g = sizes[None, :, None, :, None]  # (1, N, 1, 3, 1)
    m = np.minimum(g, a[:, None])  # (S, N, L, 3, K): overlap per axis of centred boxes
    k = params.shape[2]
    inter = (m[..., 0, :, None, None] * m[..., 1, None, :, None] * m[..., 2, None, None, :]).reshape(
        *m.shape[:3], k ** 3)
    vol_a = (a[..., 0, :, None, None] * a[..., 1, None, :, None] * a[..., 2, None, None, :]).reshape(
        a.shape[0], 1, a.shape[1], k ** 3)
    vol_g = np.prod(sizes, axis=1)[None, :, None, None]
    iou = inter / (vol_g + vol_a - inter)
    return iou.reshape(*iou.shape[:2], -1).max(axis=2).mean(axis=1)


def plan_anchors(
    boxes,
    level_factors: Sequence[Sequence[float]] = ((1.0, 1.0, 1.0),),
    num_sizes: int = 3,
    init: Sequence[float] = DEFAULT_INIT_SIZES,
    percentiles: Tuple[float, float] = DEFAULT_PERCENTILES,
    max_boxes: int = 2000,
    maxiter: int = 40,
    seed: int = 0,
) -> AnchorPlan:
    """Plan anchor sizes from training boxes (maximise mean best IoU).

    Args:
        boxes: (N, 6) training boxes (numpy or torch) in nnDetection layout, in the preprocessed voxel space
            the detector sees (target spacing, transposed axes).
        level_factors: per detection level the per-axis scale relative to the first level
            (:func:`relative_level_factors`).
        num_sizes: sizes per axis (nnDetection: 3 -> 27 anchors per position).
        init: initial guess per axis (nnDetection BoxC002: (4, 8, 16)).
        percentiles: boxes with a size outside ``[p_lo, p_hi]`` percentiles on any axis are ignored
            (nnDetection: 0.5 / 99.5; the bounds themselves are kept so that data sets with few distinct
            sizes keep their extreme boxes).
        max_boxes: random subsample size for speed (seeded).
        maxiter: differential-evolution generations (population 15 x 3 * num_sizes; 40 generations is about
            nnDetection's budget of 5000 evaluations).
        seed: seed of the subsampling and of the optimiser.

    Returns:
        :class:`AnchorPlan` with ascending integer base sizes per axis.
    """
    b = boxes.detach().cpu().numpy() if isinstance(boxes, torch.Tensor) else np.asarray(boxes, dtype=np.float64)
    if b.ndim != 2 or b.shape[1] != 6:
        fail(f"plan_anchors needs (N, 6) boxes in (x1, y1, x2, y2, z1, z2) layout, got shape {b.shape}")
    sizes = np.stack([b[:, 2] - b[:, 0], b[:, 3] - b[:, 1], b[:, 5] - b[:, 4]], axis=1).astype(np.float64)
    sizes = sizes[(sizes > 0).all(axis=1)]
    if sizes.shape[0] == 0:
        fail("plan_anchors got no boxes with positive size; check the training labels (empty instance maps?)")
    lo_p, hi_p = np.percentile(sizes, percentiles[0], axis=0), np.percentile(sizes, percentiles[1], axis=0)
    inside = ((sizes >= lo_p) & (sizes <= hi_p)).all(axis=1)
    if inside.any():
        sizes = sizes[inside]
    rng = np.random.default_rng(seed)
    if sizes.shape[0] > max_boxes:
        sizes = sizes[rng.choice(sizes.shape[0], size=max_boxes, replace=False)]
    factors = np.asarray(level_factors, dtype=np.float64).reshape(-1, 3)
    upper = np.maximum(np.ceil(sizes.max(axis=0)), 2.0)  # per axis
    bounds = [(1.0, float(upper[a])) for a in range(3) for _ in range(num_sizes)]
    init_vec = np.asarray([float(np.clip(init[i % len(init)], 1.0, upper[a]))
                           for a in range(3) for i in range(num_sizes)])

    def objective(x: np.ndarray) -> np.ndarray:
        # scipy's vectorized mode passes (P, S); our own calls pass (P,)
        x = np.asarray(x, dtype=np.float64)
        pop = np.round(x.reshape(len(bounds), -1)).T.reshape(-1, 3, num_sizes)
        out = np.empty(pop.shape[0])
        for s in range(0, pop.shape[0], 16):
            out[s:s + 16] = -mean_best_iou(sizes, pop[s:s + 16], factors)
        return out[0] if x.ndim == 1 else out

    result = differential_evolution(
        objective, bounds, x0=init_vec, integrality=[True] * len(bounds), maxiter=maxiter, popsize=15,
        seed=int(rng.integers(2 ** 31)), polish=False, vectorized=True, updating="deferred", tol=1e-8,
    )
    best = np.round(result.x)
    best_val = -float(objective(best))
    best, best_val = _polish(best, best_val, objective, bounds)
    base = tuple(tuple(float(v) for v in sorted(best.reshape(3, num_sizes)[a])) for a in range(3))
    return AnchorPlan(base_sizes=base, level_factors=tuple(tuple(float(v) for v in f) for f in factors),
                      mean_best_iou=best_val, num_boxes=int(sizes.shape[0]))


def _polish(x: np.ndarray, value: float, objective, bounds, steps: Sequence[int] = (1, 2, 4)):
    """Integer coordinate ascent: try +-step per coordinate until no move improves the objective."""
    improved = True
    while improved:
        improved = False
        for i, (lo, hi) in enumerate(bounds):
            for step in steps:
                for sign in (-1, 1):
                    cand = x.copy()
                    cand[i] = np.clip(cand[i] + sign * step, lo, hi)
                    if cand[i] == x[i]:
                        continue
                    v = -float(objective(cand))
                    if v > value + 1e-12:
                        x, value, improved = cand, v, True
    return x, value
