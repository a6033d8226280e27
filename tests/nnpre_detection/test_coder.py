"""Box coder: hand-computed deltas, round trip, clamp."""
import math

import pytest
import torch

from nnpre_detection.coder import BoxCoder


def test_hand_computed_deltas_in_nndetection_order():
    anchor = torch.tensor([[0.0, 0, 10, 10, 0, 10]])
    box = torch.tensor([[5.0, 0, 15, 20, 0, 10]])  # x shifted by 5, y size doubled (centre +5), z unchanged
    d = BoxCoder().encode(box, anchor)
    # order (dx, dy, dw, dh, dz, dd)
    assert d[0].tolist() == pytest.approx([0.5, 0.5, 0.0, math.log(2), 0.0, 0.0])
    w = BoxCoder(weights=(10, 10, 5, 5, 10, 5)).encode(box, anchor)
    assert w[0].tolist() == pytest.approx([5.0, 5.0, 0.0, 5 * math.log(2), 0.0, 0.0])


@pytest.mark.parametrize("weights", [(1.0,) * 6, (10.0, 10.0, 5.0, 5.0, 2.0, 1.0)])
def test_round_trip(weights):
    gen = torch.Generator().manual_seed(0)
    lo = torch.rand(100, 3, generator=gen) * 50
    size = 1 + torch.rand(100, 3, generator=gen) * 30
    boxes = torch.stack([lo[:, 0], lo[:, 1], lo[:, 0] + size[:, 0], lo[:, 1] + size[:, 1],
                         lo[:, 2], lo[:, 2] + size[:, 2]], 1)
    anchors = boxes + torch.randn(100, 6, generator=gen)
    anchors[:, [2, 3, 5]] = torch.maximum(anchors[:, [2, 3, 5]], anchors[:, [0, 1, 4]] + 0.5)
    coder = BoxCoder(weights=weights)
    assert torch.allclose(coder.decode(coder.encode(boxes, anchors), anchors), boxes, atol=1e-4)


def test_decode_clamps_size_deltas_and_is_differentiable():
    anchor = torch.tensor([[0.0, 0, 16, 16, 0, 16]])
    box = BoxCoder().decode(torch.tensor([[0.0, 0, 100.0, 0, 0, 0]]), anchor)
    assert (box[0, 2] - box[0, 0]).item() == pytest.approx(1000.0, rel=1e-4)  # exp(log(1000/16)) * 16
    deltas = torch.zeros(1, 6, requires_grad=True)
    BoxCoder().decode(deltas, anchor)[:, 2].sum().backward()  # x2 = cx + w/2 depends on dx and dw only
    assert deltas.grad[0].tolist() == pytest.approx([16.0, 0.0, 8.0, 0.0, 0.0, 0.0])
    with pytest.raises(ValueError):
        BoxCoder(weights=(1.0,) * 4).encode(anchor, anchor)
