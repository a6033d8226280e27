"""Box conversions, volume, IoU / GIoU against hand-computed cases and MONAI, clipping."""
import numpy as np
import pytest
import torch

from nnpre_detection.boxes import (
    box_center,
    box_giou,
    box_iou,
    box_pair_giou,
    box_pair_iou,
    box_size,
    box_volume,
    clip_boxes,
    convert_boxes,
    remove_small_boxes,
)


def B(*rows):
    return torch.tensor(rows, dtype=torch.float32)


def random_boxes(n, gen, extent=50.0, max_size=20.0):
    lo = torch.rand(n, 3, generator=gen) * extent
    hi = lo + 0.5 + torch.rand(n, 3, generator=gen) * max_size
    return torch.stack([lo[:, 0], lo[:, 1], hi[:, 0], hi[:, 1], lo[:, 2], hi[:, 2]], 1)


def test_volume_size_center_without_plus_one():
    b = B([0, 1, 2, 4, 5, 9])  # x 0..2, y 1..4, z 5..9
    assert box_size(b).tolist() == [[2, 3, 4]]
    assert box_volume(b).tolist() == [24.0]
    assert box_center(b).tolist() == [[1.0, 2.5, 7.0]]


def test_iou_giou_hand_computed():
    a = B([0, 0, 2, 2, 0, 2])            # cube of side 2, volume 8
    b = B([1, 1, 3, 3, 1, 3])            # shifted by 1 on every axis: intersection 1
    far = B([10, 10, 12, 12, 10, 12])
    assert box_iou(a, b).item() == pytest.approx(1 / 15)
    # enclosure 3^3 = 27, union 15
    assert box_giou(a, b).item() == pytest.approx(1 / 15 - 12 / 27)
    assert box_iou(a, a).item() == 1.0 and box_giou(a, a).item() == 1.0
    assert box_iou(a, far).item() == 0.0
    # enclosure 12^3, union 16 -> GIoU = -(1728 - 16) / 1728
    assert box_giou(a, far).item() == pytest.approx(-(1728 - 16) / 1728)
    # z axis is columns 4/5: boxes overlapping in x/y but not in z have IoU 0
    assert box_iou(a, B([0, 0, 2, 2, 2, 4])).item() == 0.0
    # touching faces only: IoU 0, GIoU 0 (enclosure == union)
    assert box_giou(a, B([2, 0, 4, 2, 0, 2])).item() == pytest.approx(0.0)


def test_iou_of_nndetection_instance_boxes():
    """Two 3-voxel cubes offset by one voxel along one axis: IoU 0.6 with nnDetection's min-1/max+1 boxes."""
    instances = pytest.importorskip("nnpre_detection.instances")
    inst = np.zeros((12, 12, 12), dtype=np.int32)
    inst[2:5, 2:5, 2:5] = 1
    boxes, ids = instances.boxes_from_instances(inst)
    assert ids.tolist() == [1]
    b1 = torch.from_numpy(boxes)
    b2 = b1.clone()
    b2[:, [0, 2]] += 1  # offset by one voxel along axis 0
    assert box_iou(b1, b2).item() == pytest.approx(3 / 5)
    assert box_size(b1).tolist() == [[4.0, 4.0, 4.0]]


def test_degenerate_boxes_give_zero_not_nan():
    z = B([1, 1, 1, 1, 1, 1])
    assert box_iou(z, z).item() == 0.0
    assert box_giou(z, z).item() == 0.0
    assert torch.isfinite(box_pair_giou(z, z)).all()


def test_pairwise_and_elementwise_agree_and_match_monai():
    box_utils = pytest.importorskip("monai.data.box_utils")
    gen = torch.Generator().manual_seed(0)
    a, b = random_boxes(40, gen), random_boxes(40, gen)
    iou, giou = box_iou(a, b), box_giou(a, b)
    assert iou.dtype == torch.float32 and iou.shape == (40, 40)
    assert torch.allclose(torch.diagonal(iou), box_pair_iou(a, b))
    assert torch.allclose(torch.diagonal(giou), box_pair_giou(a, b))
    ma, mb = convert_boxes(a, "xyxyzz", "xyzxyz"), convert_boxes(b, "xyxyzz", "xyzxyz")
    assert torch.allclose(iou, box_utils.box_iou(ma, mb), atol=1e-6)
    assert torch.allclose(giou, box_utils.box_giou(ma, mb), atol=1e-6)
    assert (giou <= iou + 1e-7).all() and (giou >= -1).all()


def test_layout_conversions_round_trip_and_match_monai():
    box_utils = pytest.importorskip("monai.data.box_utils")
    b = B([1, 2, 4, 6, 3, 8])
    assert convert_boxes(b, "xyxyzz", "xyzxyz").tolist() == [[1, 2, 3, 4, 6, 8]]
    assert convert_boxes(b, "xyxyzz", "cccwhd").tolist() == [[2.5, 4, 5.5, 3, 4, 5]]
    gen = torch.Generator().manual_seed(1)
    r = random_boxes(20, gen)
    for mid in ("xyzxyz", "cccwhd"):
        assert torch.allclose(convert_boxes(convert_boxes(r, "xyxyzz", mid), mid, "xyxyzz"), r, atol=1e-5)
    assert torch.allclose(convert_boxes(r, "xyxyzz", "xyzxyz"),
                          box_utils.convert_box_mode(r, src_mode="xyxyzz", dst_mode="xyzxyz"))
    with pytest.raises(ValueError):
        convert_boxes(r, "xyxyzz", "yxz")
    with pytest.raises(ValueError):
        box_iou(torch.zeros(3, 5), torch.zeros(3, 6))


def test_clip_and_remove_small():
    b = B([-3, 2, 5, 40, 1, 9], [10, 10, 12, 12, 40, 50])
    c = clip_boxes(b, (8, 32, 16))
    assert c.tolist() == [[0, 2, 5, 32, 1, 9], [8, 10, 8, 12, 16, 16]]
    assert remove_small_boxes(c, 0.01).tolist() == [0]
