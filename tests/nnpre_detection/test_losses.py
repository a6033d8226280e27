"""Retina U-Net losses against hand-computed values."""
import math

import pytest
import torch

from nnpre_detection.losses import classification_loss, sigmoid_focal_loss


def test_focal_loss_hand_values():
    logits = torch.tensor([[0.0], [0.0], [2.0], [5.0]])
    labels = torch.tensor([1, 0, 0, -1])  # positive, negative, confident negative (wrong), ignored
    # p = 0.5 for the first two: (1 - p_t)^2 * log 2 = 0.25 log 2, alpha_t = 0.25 (pos) / 0.75 (neg)
    p = 1 / (1 + math.exp(-2.0))
    expected = (0.25 * 0.25 * math.log(2) + 0.75 * 0.25 * math.log(2) + 0.75 * p ** 2 * -math.log(1 - p)) / 1
    assert sigmoid_focal_loss(logits, labels, num_positives=1).item() == pytest.approx(expected, rel=1e-5)
    assert sigmoid_focal_loss(logits, labels, num_positives=0).item() == pytest.approx(expected, rel=1e-5)
    # gamma 0, alpha 0.5 -> half the summed BCE
    bce = classification_loss(logits[:3], labels[:3]).item() * 3
    assert sigmoid_focal_loss(logits, labels, 1, alpha=0.5, gamma=0.0).item() == pytest.approx(0.5 * bce, rel=1e-5)
    empty = sigmoid_focal_loss(torch.zeros(2, 1, requires_grad=True), torch.tensor([-1, -1]), 0)
    assert empty.item() == 0.0 and empty.requires_grad
