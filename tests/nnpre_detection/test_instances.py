"""Instance maps -> nnDetection boxes, semantic labels -> instances, ground-truth folder loading."""
import json

import numpy as np
import pytest
import scipy.ndimage
import SimpleITK as sitk

from nnpre.errors import NnPreError
from nnpre_detection.instances import (
    boxes_from_instances,
    load_ground_truth,
    load_nndet_label,
    semantic_to_instances,
)


def _naive_boxes(inst):
    """Reference: nnDetection's per-instance min-1 / max+1 rule written as a plain loop."""
    out = []
    for i in np.unique(inst)[1:]:
        idx = np.stack(np.nonzero(inst == i), axis=1)
        lo, hi = idx.min(0), idx.max(0)
        out.append([lo[0] - 1, lo[1] - 1, hi[0] + 1, hi[1] + 1, lo[2] - 1, hi[2] + 1])
    return np.array(out, dtype=np.float32).reshape(-1, 6)


def test_single_voxel_and_block_boxes():
    inst = np.zeros((6, 7, 8), dtype=np.int16)
    inst[2, 3, 4] = 1
    inst[0:2, 5:7, 6:8] = 3  # touches the array border at axis 0 start
    boxes, ids = boxes_from_instances(inst)
    assert ids.tolist() == [1, 3]
    assert boxes.dtype == np.float32
    np.testing.assert_array_equal(boxes[0], [1, 2, 3, 4, 3, 5])  # width 2 for one voxel
    np.testing.assert_array_equal(boxes[1], [-1, 4, 2, 7, 5, 8])


def test_requested_ids_keep_order_and_skip_absent():
    inst = np.zeros((4, 4, 4), dtype=np.int32)
    inst[0, 0, 0], inst[3, 3, 3] = 1, 2
    boxes, ids = boxes_from_instances(inst, ids=[2, 7, 1])
    assert ids.tolist() == [2, 1]
    np.testing.assert_array_equal(boxes[0], [2, 2, 4, 4, 2, 4])


def test_boxes_match_naive_reference_on_random_maps():
    rng = np.random.default_rng(0)
    for _ in range(5):
        inst = rng.integers(0, 6, (9, 10, 11)) * (rng.random((9, 10, 11)) < 0.05)
        boxes, ids = boxes_from_instances(inst)
        np.testing.assert_array_equal(boxes, _naive_boxes(inst))
        assert ids.tolist() == [int(i) for i in np.unique(inst)[1:]]


def test_negative_ids_rejected():
    with pytest.raises(NnPreError, match="negative"):
        boxes_from_instances(-np.ones((2, 2, 2), dtype=np.int8))


def test_semantic_to_instances_26_connectivity_classes_and_order():
    seg = np.zeros((5, 5, 5), dtype=np.uint8)
    seg[0, 0, 0] = seg[1, 1, 1] = 2  # corner-touching voxels: one 26-connected component
    seg[4, 4, 4] = 2
    seg[3, 0, 0] = 1
    inst, mapping = semantic_to_instances(seg)
    assert inst.dtype == np.int32
    # class 1 (label 1 -> class 0) first, then label 2 components in raster order
    assert mapping == {1: 0, 2: 1, 3: 1}
    assert inst[3, 0, 0] == 1 and inst[0, 0, 0] == inst[1, 1, 1] == 2 and inst[4, 4, 4] == 3
    inst2, mapping2 = semantic_to_instances(seg, min_size=2)
    assert mapping2 == {1: 1} and inst2[0, 0, 0] == 1 and inst2[4, 4, 4] == 0 and inst2[3, 0, 0] == 0
    inst3, mapping3 = semantic_to_instances(seg, classes=[2])
    assert set(mapping3.values()) == {1} and inst3[3, 0, 0] == 0


def test_semantic_to_instances_equals_scipy_per_class_labelling():
    """Same ids as nnDetection's seg_to_instances (scipy.ndimage.label with a 3x3x3 structure, per class)."""
    rng = np.random.default_rng(1)
    seg = rng.integers(0, 3, (8, 9, 10)) * (rng.random((8, 9, 10)) < 0.15)
    inst, mapping = semantic_to_instances(seg)
    expected = np.zeros_like(inst)
    nxt = 1
    for label in (1, 2):
        lab, n = scipy.ndimage.label(seg == label, structure=np.ones((3, 3, 3)))
        for j in range(1, n + 1):
            expected[lab == j] = nxt
            assert mapping[nxt] == label - 1
            nxt += 1
    np.testing.assert_array_equal(inst, expected)


def _write(arr, path):
    sitk.WriteImage(sitk.GetImageFromArray(arr), str(path))


def test_load_ground_truth_nndet_layout(tmp_path):
    inst = np.zeros((6, 6, 6), dtype=np.uint8)
    inst[1:3, 1:3, 1:3] = 1
    inst[4, 4, 4] = 2
    _write(inst, tmp_path / "a.nii.gz")
    (tmp_path / "a.json").write_text(json.dumps({"instances": {"1": 1, "2": 0}}))
    arr, mapping, img = load_nndet_label(str(tmp_path / "a.nii.gz"))
    assert mapping == {1: 1, 2: 0} and arr.shape == (6, 6, 6) and img.GetSize() == (6, 6, 6)
    gt = load_ground_truth(str(tmp_path))
    assert list(gt) == ["a"]
    np.testing.assert_array_equal(gt["a"]["classes"], [1, 0])
    np.testing.assert_array_equal(gt["a"]["boxes"][0], [0, 0, 3, 3, 0, 3])


def test_load_ground_truth_semantic_and_npz(tmp_path):
    seg = np.zeros((6, 6, 6), dtype=np.uint8)
    seg[0:2, 0:2, 0:2] = 1
    seg[4:6, 4:6, 4:6] = 3
    (tmp_path / "sem").mkdir()
    _write(seg, tmp_path / "sem" / "c1.nii.gz")
    gt = load_ground_truth(str(tmp_path / "sem"))
    np.testing.assert_array_equal(gt["c1"]["classes"], [0, 2])
    np.testing.assert_array_equal(gt["c1"]["boxes"][1], [3, 3, 6, 6, 3, 6])
    assert load_ground_truth(str(tmp_path / "sem"), semantic_classes=[1])["c1"]["classes"].tolist() == [0]
    (tmp_path / "npz").mkdir()
    np.savez(tmp_path / "npz" / "c2_boxes_gt.npz", boxes=np.array([[0, 0, 2, 2, 0, 2]]), classes=np.array([1]))
    gt = load_ground_truth(str(tmp_path / "npz"))
    assert list(gt) == ["c2"] and gt["c2"]["classes"].tolist() == [1]


def test_load_ground_truth_errors(tmp_path):
    inst = np.zeros((4, 4, 4), dtype=np.uint8)
    inst[1, 1, 1] = 1
    inst[2, 2, 2] = 2
    _write(inst, tmp_path / "a.nii.gz")
    _write(inst, tmp_path / "b.nii.gz")
    (tmp_path / "a.json").write_text(json.dumps({"instances": {"1": 0}}))
    with pytest.raises(NnPreError, match="missing for"):  # b has no JSON: mixed layouts
        load_ground_truth(str(tmp_path))
    (tmp_path / "b.json").write_text(json.dumps({"instances": {"1": 0, "2": 0}}))
    with pytest.raises(NnPreError, match=r"instance ids \[2\] have no class"):
        load_ground_truth(str(tmp_path))
    with pytest.raises(NnPreError, match="does not exist"):
        load_ground_truth(str(tmp_path / "nope"))
    (tmp_path / "bad.json").write_text("{not json")
    _write(inst, tmp_path / "bad.nii.gz")
    with pytest.raises(NnPreError, match="bad.json"):
        load_nndet_label(str(tmp_path / "bad.nii.gz"))
