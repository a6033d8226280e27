"""Instance maps of predicted boxes (viewer output of nnPre_predict)."""
import numpy as np
import SimpleITK as sitk

from nnpre_detection.instance_map import boxes_to_instance_map, write_instance_map
from nnpre_detection.instances import boxes_from_instances


def test_inverse_of_boxes_from_instances_for_cuboids_and_score_order():
    inst = np.zeros((10, 12, 8), dtype=np.int32)
    inst[1:4, 2:7, 0:3] = 1   # touches the border on axis 2
    inst[6:10, 8:12, 5:8] = 2  # touches the far borders
    inst[5, 5, 5] = 3          # single voxel
    boxes, ids = boxes_from_instances(inst)
    scores = np.array([0.9, 0.6, 0.3])[np.asarray(ids) - 1]
    out = boxes_to_instance_map(boxes, scores, inst.shape, min_score=0.0)
    # rank 1 = best score: ids 1, 2, 3 keep their numbers because scores fall with the id
    assert np.array_equal(out, inst.astype(np.uint16))
    # threshold drops the weakest; overlapping boxes: the higher score wins
    assert boxes_to_instance_map(boxes, scores, inst.shape, min_score=0.5).max() == 2
    over = np.array([[0, 0, 6, 6, 0, 6], [2, 2, 9, 9, 2, 9]], dtype=float)
    m = boxes_to_instance_map(over, np.array([0.4, 0.8]), (10, 10, 10), min_score=0.0)
    assert m[3, 3, 3] == 1 and m[1, 1, 1] == 2 and m[8, 8, 8] == 1
    assert boxes_to_instance_map(np.zeros((0, 6)), np.zeros(0), (4, 4, 4)).sum() == 0


def test_write_instance_map_copies_geometry(tmp_path):
    ref = sitk.GetImageFromArray(np.zeros((6, 7, 8), dtype=np.float32))
    ref.SetSpacing((0.7, 0.8, 2.5))
    ref.SetOrigin((10.0, -5.0, 3.0))
    path = str(tmp_path / "c_instances.nii.gz")
    write_instance_map(np.array([[0, 0, 3, 3, 0, 3]], dtype=float), np.array([0.9]), ref, path)
    im = sitk.ReadImage(path)
    assert im.GetSize() == ref.GetSize() and np.allclose(im.GetSpacing(), ref.GetSpacing())
    arr = sitk.GetArrayFromImage(im)
    assert arr[1:3, 1:3, 1:3].min() == 1 and arr.sum() == 8
    assert [p.name for p in tmp_path.iterdir()] == ["c_instances.nii.gz"]  # no temp file left
