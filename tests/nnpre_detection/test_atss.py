"""ATSS matcher invariants, hand cases and a cross-check against MONAI's port."""
import pytest
import torch

from nnpre_detection.anchors import AnchorGenerator
from nnpre_detection.atss import BACKGROUND, ATSSMatcher
from nnpre_detection.boxes import box_center, box_iou, convert_boxes

SIZES = [((4, 8, 16),) * 3, ((8, 16, 32),) * 3]
FMAPS = [(8, 8, 8), (4, 4, 4)]
A_LOC = 27


@pytest.fixture(scope="module")
def anchors():
    per_level = AnchorGenerator(SIZES)((16, 16, 16), FMAPS)
    return torch.cat(per_level), [a.shape[0] for a in per_level]


def random_gt(n, gen):
    c = 2 + torch.rand(n, 3, generator=gen) * 12
    s = 2 + torch.rand(n, 3, generator=gen) * 10
    lo, hi = c - s / 2, c + s / 2
    return torch.stack([lo[:, 0], lo[:, 1], hi[:, 0], hi[:, 1], lo[:, 2], hi[:, 2]], 1)


def test_no_gt_means_all_background(anchors):
    a, counts = anchors
    m = ATSSMatcher()(torch.zeros(0, 6), a, counts, A_LOC)
    assert m.shape == (a.shape[0],) and (m == BACKGROUND).all()


def test_gt_equal_to_an_anchor_matches_it(anchors):
    a, counts = anchors
    idx = 27 * (2 * 64 + 3 * 8 + 4) + 13  # an 8x8x8 anchor at position (2, 3, 4) of level 0
    m = ATSSMatcher()(a[idx:idx + 1].clone(), a, counts, A_LOC)
    assert m[idx] == 0


def _positive_sets(gt, a, counts, num_candidates=4):
    """Reference (G, A) mask: anchor is an ATSS candidate of g with IoU >= mean + std."""
    iou = box_iou(gt, a)
    dist = torch.cdist(box_center(gt), box_center(a))
    mask = torch.zeros_like(iou, dtype=torch.bool)
    for g in range(gt.shape[0]):
        cands, start = [], 0
        for c in counts:
            k = min(num_candidates * A_LOC, c)
            cands.append(dist[g, start:start + c].topk(k, largest=False).indices + start)
            start += c
        cands = torch.cat(cands)
        thr = iou[g, cands].mean() + iou[g, cands].std()
        mask[g, cands[iou[g, cands] >= thr]] = True
    return mask, iou


def test_positives_are_close_candidates_above_adaptive_threshold(anchors):
    a, counts = anchors
    gen = torch.Generator().manual_seed(0)
    gt = random_gt(4, gen)
    m = ATSSMatcher(num_candidates=4)(gt, a, counts, A_LOC)
    assert ((m >= -1) & (m < gt.shape[0])).all()
    pos_sets, iou = _positive_sets(gt, a, counts)
    assert torch.equal(m >= 0, pos_sets.any(0))  # positive iff positive for some box
    for j in torch.nonzero(m >= 0).flatten():
        assert pos_sets[m[j], j]


def test_conflicts_go_to_highest_iou(anchors):
    a, counts = anchors
    gt = torch.tensor([[2.0, 2, 10, 10, 2, 10], [3.0, 3, 10, 10, 3, 10]])  # two strongly overlapping boxes
    m = ATSSMatcher()(gt, a, counts, A_LOC)
    pos_sets, iou = _positive_sets(gt, a, counts)
    conflicts = torch.nonzero(pos_sets.all(0)).flatten()
    assert conflicts.numel() > 0
    for j in conflicts:
        assert m[j] == int(iou[:, j].argmax())
    same = torch.nonzero((a == gt[:1]).all(1)).flatten()  # the anchor identical to box 0 goes to box 0
    assert same.numel() == 1 and m[same] == 0


def test_center_in_gt(anchors):
    a, counts = anchors
    gen = torch.Generator().manual_seed(3)
    gt = random_gt(3, gen)
    m = ATSSMatcher(center_in_gt=True)(gt, a, counts, A_LOC)
    pos = torch.nonzero(m >= 0).flatten()
    c = box_center(a[pos])
    g = gt[m[pos]]
    assert ((c[:, 0] > g[:, 0]) & (c[:, 0] < g[:, 2]) & (c[:, 1] > g[:, 1]) & (c[:, 1] < g[:, 3])
            & (c[:, 2] > g[:, 4]) & (c[:, 2] < g[:, 5])).all()


@pytest.mark.parametrize("center_in_gt", [False, True])
def test_equals_monai_port(center_in_gt):
    """MONAI caps candidates at the level's positions, nnDetection at its anchors: equal when every level has
    at least num_candidates x 27 positions (here 512 and 216)."""
    monai_atss = pytest.importorskip("monai.apps.detection.utils.ATSS_matcher")
    from monai.data.box_utils import box_iou as monai_box_iou

    per_level = AnchorGenerator(SIZES)((16, 16, 16), [(8, 8, 8), (6, 6, 6)])
    a, counts = torch.cat(per_level), [p.shape[0] for p in per_level]
    gen = torch.Generator().manual_seed(7)
    for n in (1, 3, 6):
        gt = random_gt(n, gen)
        ours = ATSSMatcher(4, center_in_gt)(gt, a, counts, A_LOC)
        _, ref = monai_atss.ATSSMatcher(4, monai_box_iou, center_in_gt)(
            convert_boxes(gt, "xyxyzz", "xyzxyz"), convert_boxes(a, "xyxyzz", "xyzxyz"),
            [c // A_LOC for c in counts], A_LOC)
        assert torch.equal(ours, ref)


def test_candidates_capped_by_anchors_not_positions():
    """nnDetection caps a level's candidates at its number of *anchors*: on a 1x1x1 level (27 anchors, fewer
    than 4 x 27) all 27 anchors are candidates; a cap at the number of positions would keep one anchor."""
    sizes = [((2, 4, 8),) * 3]
    a = torch.cat(AnchorGenerator(sizes)((4, 4, 4), [(1, 1, 1)]))  # 27 anchors centred at the origin
    gt = torch.tensor([[-3.0, -3, 3, 3, -3, 3]])  # 6^3 box around the origin
    m = ATSSMatcher(num_candidates=4)(gt, a, [27], 27)
    iou = box_iou(gt, a)[0]
    thr = iou.mean() + iou.std()  # mean + std over all 27 candidates, by hand
    assert torch.equal(m >= 0, iou >= thr)
    assert int((m >= 0).sum()) > 1  # the equidistant 27 anchors: several pass the adaptive threshold
