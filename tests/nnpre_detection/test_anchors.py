"""Anchor generator layout and anchor planning."""
import itertools

import numpy as np
import pytest
import torch

from nnpre.errors import NnPreError
from nnpre_detection.anchors import AnchorGenerator, AnchorPlan, mean_best_iou, plan_anchors, relative_level_factors


def test_generator_layout_centres_and_order():
    sizes = [((2, 4), (3,), (5, 6)), ((4, 8), (6,), (10, 12))]
    gen = AnchorGenerator(sizes)
    assert gen.num_anchors_per_location == 4 and gen.num_levels == 2
    per_level = gen((16, 16, 8), [(8, 8, 4), (4, 4, 2)])
    assert [a.shape[0] for a in per_level] == [8 * 8 * 4 * 4, 4 * 4 * 2 * 4]
    a0 = per_level[0]
    # first position (0, 0, 0): cell anchors, Cartesian product with depth innermost
    expected = [[-w / 2, -h / 2, w / 2, h / 2, -d / 2, d / 2] for w, h, d in itertools.product(*sizes[0])]
    assert a0[:4].tolist() == expected
    # position-major, C order over (X, Y, Z), anchors innermost; centre = index * stride (stride 2 here)
    pos = (3 * 8 + 5) * 4 + 1  # index (3, 5, 1)
    centres = torch.stack([(a0[:, 0] + a0[:, 2]) / 2, (a0[:, 1] + a0[:, 3]) / 2, (a0[:, 4] + a0[:, 5]) / 2], 1)
    assert centres[pos * 4:(pos + 1) * 4].tolist() == [[6.0, 10.0, 2.0]] * 4
    # second level has stride 4
    a1 = per_level[1]
    assert ((a1[-1, 0] + a1[-1, 2]) / 2).item() == 12.0 and ((a1[-1, 4] + a1[-1, 5]) / 2).item() == 4.0


def test_generator_rejects_bad_sizes():
    with pytest.raises(NnPreError):
        AnchorGenerator([((2, 4), (3,), (5,)), ((4,), (6,), (10,))])  # different anchors per position
    with pytest.raises(NnPreError):
        AnchorGenerator([((0, 4), (3,), (5,))])


def test_relative_level_factors():
    strides = [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2], [1, 2, 2]]
    assert relative_level_factors(strides, [2, 3, 4]) == [(1.0, 1.0, 1.0), (2.0, 2.0, 2.0), (2.0, 4.0, 4.0)]


def _boxes_with_sizes(sizes, rng):
    c = rng.uniform(20, 60, (len(sizes), 3))
    s = np.asarray(sizes, dtype=float)
    lo, hi = c - s / 2, c + s / 2
    return np.stack([lo[:, 0], lo[:, 1], hi[:, 0], hi[:, 1], lo[:, 2], hi[:, 2]], 1)


def test_plan_recovers_known_sizes():
    rng = np.random.default_rng(0)
    widths, heights, depths = (3, 7, 12), (4, 9, 15), (2, 5, 10)
    combos = list(itertools.product(widths, heights, depths))
    sizes = [combos[i] for i in rng.integers(0, len(combos), 200)] + combos  # every combination present
    plan = plan_anchors(_boxes_with_sizes(sizes, rng), seed=0)
    assert plan.base_sizes == (widths, heights, depths)
    assert plan.mean_best_iou == pytest.approx(1.0)
    # round trip through a plain dict (what a plans file stores)
    assert AnchorPlan.from_dict(plan.to_dict()) == plan


def test_plan_uses_levels_and_beats_default():
    rng = np.random.default_rng(1)
    sizes = rng.choice([4, 6, 20, 40], size=(300, 3))
    boxes = _boxes_with_sizes(sizes, rng)
    factors = [(1, 1, 1), (2, 2, 2)]
    plan = plan_anchors(boxes, level_factors=factors, seed=1)
    default = AnchorPlan(((4, 8, 16),) * 3, tuple(factors))
    default_val = mean_best_iou(np.asarray(sizes, float), np.asarray([default.base_sizes], float),
                                np.asarray(factors, float))[0]
    assert plan.mean_best_iou > default_val + 0.05
    assert plan.mean_best_iou > 0.8
    assert len(plan.sizes_per_level()) == 2
    assert plan.sizes_per_level()[1][0] == tuple(2 * v for v in plan.base_sizes[0])


def test_plan_rejects_bad_boxes():
    with pytest.raises(NnPreError):
        plan_anchors(np.zeros((3, 4)))
    with pytest.raises(NnPreError):
        plan_anchors(np.zeros((3, 6)))  # no positive sizes
