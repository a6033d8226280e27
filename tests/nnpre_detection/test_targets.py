"""Detection targets built in the data-loader workers (BoxTargetsTransform) equal those built in the step."""
import pytest
import torch

from nnpre.errors import NnPreError
from nnpre_detection.targets import BoxTargetsTransform, encode_boxes, targets_from_batch, targets_from_seg


def _seg_batch():
    seg = torch.zeros(2, 1, 8, 8, 8, dtype=torch.int16)
    seg[0, 0, 1:3, 1:3, 1:3] = 1
    seg[0, 0, 5:7, 5:8, 4:5] = 2
    seg[1, 0, 0, 0, 0] = -1  # nnU-Net padding marker -> background
    return seg


def test_targets_from_seg_hand_boxes():
    t = targets_from_seg(_seg_batch())
    assert t[0]["boxes"].tolist() == [[0, 0, 3, 3, 0, 3], [4, 4, 7, 8, 3, 5]]
    assert t[0]["labels"].tolist() == [0, 1]
    assert t[1]["boxes"].shape == (0, 6) and t[1]["labels"].shape == (0,) and t[1]["seg"].max() == 0
    with pytest.raises(NnPreError, match="expects"):
        targets_from_seg(torch.zeros(8, 8))


def test_worker_transform_then_loader_collation_equals_in_step_targets():
    seg = _seg_batch()
    tr = BoxTargetsTransform(max_instances=4)
    samples = [tr(image=torch.zeros(1, 8, 8, 8), segmentation=s)["segmentation"] for s in seg]
    assert isinstance(samples[0], list) and samples[0][1].shape == (4, 7)
    # nnU-Net's loader stacks each entry of a list-valued segmentation separately
    collated = [torch.stack([s[i] for s in samples]) for i in range(2)]
    a, b = targets_from_batch(collated), targets_from_seg(seg)
    for x, y in zip(a, b):
        assert torch.equal(x["boxes"], y["boxes"]) and torch.equal(x["labels"], y["labels"])
        assert torch.equal(x["seg"], y["seg"])
    # a plain seg target (transform absent) falls back to in-step targets
    assert torch.equal(targets_from_batch(seg)[0]["boxes"], b[0]["boxes"])


def test_transform_errors():
    with pytest.raises(NnPreError, match="raise max_instances"):
        encode_boxes(torch.zeros(3, 6).numpy(), torch.zeros(3).numpy(), max_instances=2)
    with pytest.raises(NnPreError, match="deep supervision"):
        BoxTargetsTransform()(image=torch.zeros(1, 4, 4, 4), segmentation=[torch.zeros(1, 4, 4, 4)])
