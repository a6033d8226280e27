"""Weighted box clustering on hand-made clusters."""
import pytest
import torch

from nnpre_detection.boxes import box_iou
from nnpre_detection.wbc import weighted_box_clustering as wbc


def test_identical_boxes_average_scores():
    b = torch.tensor([[0.0, 0, 10, 10, 0, 10]] * 2)
    boxes, scores, labels = wbc(b, torch.tensor([0.9, 0.7]), n_exp_preds=2)
    assert torch.allclose(boxes, b[:1])
    assert scores.tolist() == pytest.approx([0.8])
    assert labels.tolist() == [0]


def test_weighted_average_box_and_score():
    b = torch.tensor([[0.0, 0, 10, 10, 0, 10], [1.0, 0, 11, 10, 0, 10]])  # IoU 9/11
    s = torch.tensor([0.8, 0.4])
    boxes, scores, _ = wbc(b, s, n_exp_preds=2, iou_threshold=0.5)
    u = torch.tensor([1.0, 9 / 11])
    exp_score = (u * s).sum() / u.sum()
    exp_box = ((u * s)[:, None] * b).sum(0) / (u * s).sum()
    assert scores.item() == pytest.approx(exp_score.item())
    assert torch.allclose(boxes[0], exp_box)
    # with tile weights: u_i = IoU * weight
    w = torch.tensor([1.0, 0.5])
    _, scores_w, _ = wbc(b, s, weights=w, n_exp_preds=2)
    uw = u * w
    assert scores_w.item() == pytest.approx(((uw * s).sum() / uw.sum()).item())


def test_missing_predictions_lower_the_score():
    b = torch.tensor([[0.0, 0, 10, 10, 0, 10]])
    _, scores, _ = wbc(b, torch.tensor([0.8]), n_exp_preds=4)
    # n_missing = 3: score = u s / (u + 3 u) = s / 4
    assert scores.item() == pytest.approx(0.2)
    _, scores, _ = wbc(b, torch.tensor([0.8]))
    assert scores.item() == pytest.approx(0.8)


def test_separate_clusters_classes_and_threshold():
    base = torch.tensor([[0.0, 0, 10, 10, 0, 10]])
    far = base + 50
    b = torch.cat([base, base + 0.5, far, far + 0.5, base])
    s = torch.tensor([0.9, 0.8, 0.6, 0.5, 0.95])
    labels = torch.tensor([0, 0, 0, 0, 1])
    boxes, scores, lab = wbc(b, s, labels=labels, n_exp_preds=2, iou_threshold=0.5)
    iou = 9.5 ** 3 / (2000 - 9.5 ** 3)  # IoU of a box with its copy shifted by 0.5 on every axis
    expected = [(0.9 + iou * 0.8) / (1 + iou), (0.6 + iou * 0.5) / (1 + iou), 0.95 / 2]  # singleton: 1 missing
    assert scores.tolist() == pytest.approx(expected)
    assert lab.tolist() == [0, 0, 1]
    assert len(boxes) == 3
    # the two class-0 clusters are merged separately and stay far apart
    assert box_iou(boxes[lab == 0][:1], boxes[lab == 0][1:]).item() == 0.0
    # a score threshold drops weak clusters
    _, scores_t, _ = wbc(b, s, labels=labels, n_exp_preds=2, score_threshold=0.6)
    assert (scores_t > 0.6).all() and len(scores_t) == 1


def test_empty():
    boxes, scores, labels = wbc(torch.zeros(0, 6), torch.zeros(0))
    assert boxes.shape == (0, 6) and scores.numel() == 0 and labels.numel() == 0
