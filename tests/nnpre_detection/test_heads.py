"""Detection heads: the sparse output conv (``outputs_at`` / ``deltas_at``) equals the dense forward."""
import pytest
import torch

from nnpre_detection.heads import ClassificationHead, RegressionHead


def _features(gen):
    # three levels, odd sizes so that border positions (zero padding) and every level are exercised
    return [torch.randn(2, 8, *s, generator=gen) for s in ((6, 5, 4), (3, 3, 2), (1, 2, 1))]


def test_deltas_at_equals_dense_rows_and_gradients():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    head = RegressionHead(8, num_anchors=3, num_levels=3, head_channels=16, num_convs=1, group_channels=8)
    with torch.no_grad():  # non-trivial output weights, biases and per-level scales
        head.out.weight.normal_(0, 0.1, generator=gen)
        head.out.bias.normal_(0, 0.1, generator=gen)
        head.scales.copy_(torch.tensor([0.5, 1.5, 2.0]))
    feats = [f.requires_grad_() for f in _features(gen)]
    dense = head(feats)  # (B, A_total, 6)
    a_total = dense.shape[1]
    assert a_total == 3 * (6 * 5 * 4 + 3 * 3 * 2 + 2)
    # unsorted picks over both images, all levels, first / last anchors and a repeated anchor
    b = torch.tensor([1, 0, 0, 1, 1, 0, 0])
    a = torch.tensor([a_total - 1, 0, 359, 360, 365, 117, 0])
    sparse = head.deltas_at(head.towers(feats), b, a)
    assert sparse.shape == (7, 6)
    assert torch.allclose(sparse, dense[b, a], atol=1e-5)

    g_dense = torch.autograd.grad(dense[b, a].square().sum(), [head.out.weight, head.scales, *feats])
    g_sparse = torch.autograd.grad(head.deltas_at(head.towers(feats), b, a).square().sum(),
                                   [head.out.weight, head.scales, *feats])
    for gd, gs in zip(g_dense, g_sparse):
        assert torch.allclose(gd, gs, atol=1e-4)

    empty = head.deltas_at(head.towers(feats), b[:0], a[:0])
    assert empty.shape == (0, 6) and empty.requires_grad
    with pytest.raises(ValueError, match="outside"):
        head.deltas_at(head.towers(feats), torch.tensor([0]), torch.tensor([a_total]))
    with pytest.raises(ValueError, match="levels"):
        head.deltas_at(head.towers(feats)[:2], b, a)


def test_classifier_outputs_at_equals_dense_rows():
    gen = torch.Generator().manual_seed(2)
    head = ClassificationHead(8, num_anchors=2, num_classes=3, head_channels=16, num_convs=2, group_channels=8)
    with torch.no_grad():
        head.out.weight.normal_(0, 0.1, generator=gen)
    feats = _features(gen)
    dense = head(feats)
    b, a = torch.tensor([0, 1, 1]), torch.tensor([5, 250, dense.shape[1] - 1])
    rows, levels = head.outputs_at(head.towers(feats), b, a)
    assert torch.allclose(rows, dense[b, a], atol=1e-5)
    assert levels.tolist() == [0, 1, 2]


def test_deltas_at_under_autocast():
    """Mixed precision (towers in bfloat16, weights float32): the sparse conv runs in float32 without a dtype error."""
    gen = torch.Generator().manual_seed(3)
    head = RegressionHead(8, num_anchors=3, num_levels=3, head_channels=16, num_convs=1, group_channels=8)
    feats = _features(gen)
    b, a = torch.tensor([0, 1]), torch.tensor([4, 370])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        dense = head(feats)[b, a].float()
        sparse = head.deltas_at(head.towers(feats), b, a)
    assert sparse.dtype == torch.float32
    assert torch.allclose(sparse, dense, atol=0.05)
