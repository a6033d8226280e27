"""NMS equals a brute-force greedy reference (and MONAI's implementation)."""
import pytest
import torch

from nnpre_detection.boxes import box_iou, convert_boxes
from nnpre_detection.nms import batched_nms, nms


def brute_force_nms(boxes, scores, thr):
    order = sorted(range(len(scores)), key=lambda i: -float(scores[i]))  # Python sort is stable
    iou = box_iou(boxes, boxes).numpy()
    keep = []
    for i in order:
        if all(iou[i, j] <= thr for j in keep):
            keep.append(i)
    return keep


def random_boxes(n, gen, extent=40.0, min_size=2.0, max_size=15.0, dim=3):
    c = torch.rand(n, dim, generator=gen) * extent
    s = min_size + torch.rand(n, dim, generator=gen) * (max_size - min_size)
    lo, hi = c - s / 2, c + s / 2
    if dim == 2:
        return torch.stack([lo[:, 0], lo[:, 1], hi[:, 0], hi[:, 1]], 1)
    return torch.stack([lo[:, 0], lo[:, 1], hi[:, 0], hi[:, 1], lo[:, 2], hi[:, 2]], 1)


def test_hand_made():
    boxes = torch.tensor([[0.0, 0, 10, 10, 0, 10], [1, 0, 11, 10, 0, 10], [20, 20, 30, 30, 20, 30],
                          [0, 0, 10, 10, 5, 15]])
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6])
    # IoU(0, 1) = 9/11 = 0.818, IoU(0, 3) = 1/3
    assert nms(boxes, scores, 0.5).tolist() == [0, 2, 3]
    assert nms(boxes, scores, 0.3).tolist() == [0, 2]
    assert nms(boxes, scores, 0.9).tolist() == [0, 1, 2, 3]
    assert nms(boxes, scores, 0.5, max_keep=2).tolist() == [0, 2]
    # exactly at the threshold: not suppressed (IoU must be > threshold)
    half = torch.tensor([[0.0, 0, 2, 1, 0, 1], [1, 0, 3, 1, 0, 1]])  # IoU 1/3
    assert nms(half, torch.tensor([1.0, 0.5]), 1 / 3).tolist() == [0, 1]
    assert nms(torch.zeros(0, 6), torch.zeros(0), 0.5).numel() == 0


@pytest.mark.parametrize("seed,n,thr,block", [(0, 300, 0.5, 256), (1, 300, 0.1, 16), (2, 500, 0.3, 7),
                                             (3, 200, 0.0, 64), (4, 400, 0.7, 1)])
def test_equals_brute_force(seed, n, thr, block):
    gen = torch.Generator().manual_seed(seed)
    boxes = random_boxes(n, gen)
    scores = torch.rand(n, generator=gen)
    scores[::7] = 0.5  # ties are resolved by input order (stable)
    keep = nms(boxes, scores, thr, block_size=block)
    assert keep.tolist() == brute_force_nms(boxes, scores, thr)
    assert torch.equal(keep, nms(boxes.double(), scores, thr))
    assert torch.equal(keep, nms(boxes.clone().requires_grad_(), scores, thr))  # works on autograd tensors


def test_column_chunking_gives_the_same_result(monkeypatch):
    import nnpre_detection.nms as nms_module

    gen = torch.Generator().manual_seed(10)
    boxes = random_boxes(400, gen, extent=30)
    scores = torch.rand(400, generator=gen)
    expected = brute_force_nms(boxes, scores, 0.2)
    monkeypatch.setattr(nms_module, "MAX_CHUNK_ELEMENTS", 50)
    assert nms(boxes, scores, 0.2).tolist() == expected


def test_2d_boxes():
    gen = torch.Generator().manual_seed(5)
    boxes = random_boxes(200, gen, dim=2)
    scores = torch.rand(200, generator=gen)
    assert nms(boxes, scores, 0.4, block_size=32).tolist() == brute_force_nms(boxes, scores, 0.4)


def test_batched_nms_is_classwise():
    gen = torch.Generator().manual_seed(6)
    boxes = random_boxes(300, gen)
    scores = torch.rand(300, generator=gen)
    labels = torch.randint(0, 3, (300,), generator=gen)
    keep = batched_nms(boxes, scores, labels, 0.3)
    expected = []
    for c in range(3):
        idx = torch.nonzero(labels == c).flatten()
        expected += idx[torch.tensor(brute_force_nms(boxes[idx], scores[idx], 0.3), dtype=torch.long)].tolist()
    assert sorted(keep.tolist()) == sorted(expected)
    assert (scores[keep][:-1] >= scores[keep][1:]).all()
    assert batched_nms(boxes, scores, labels, 0.3, max_keep=10).tolist() == keep[:10].tolist()


def test_equals_monai():
    box_utils = pytest.importorskip("monai.data.box_utils")
    gen = torch.Generator().manual_seed(8)
    boxes = random_boxes(600, gen, extent=50)
    scores = torch.rand(600, generator=gen)
    for thr in (0.1, 0.5):
        ref = box_utils.non_max_suppression(convert_boxes(boxes, "xyxyzz", "xyzxyz"), scores, thr)
        assert torch.equal(nms(boxes, scores, thr), ref)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_equals_cpu():
    gen = torch.Generator().manual_seed(9)
    boxes = random_boxes(2000, gen)
    scores = torch.rand(2000, generator=gen)
    assert torch.equal(nms(boxes.cuda(), scores.cuda(), 0.4).cpu(), nms(boxes, scores, 0.4))
