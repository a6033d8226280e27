"""Segmentation components scored as detections: hand-made cases, folder evaluation, ``nnPre_evaluate seg-det``."""
import json

import numpy as np
import pytest

from nnpre.errors import NnPreError
from nnpre.study.components import evaluate_segmentation_components, segmentation_components


def _volume():
    seg = np.zeros((10, 12, 14), np.uint8)
    seg[1:3, 1:4, 1:5] = 1          # component A, label 1
    seg[6:9, 7:9, 2:3] = 1          # component B, label 1
    seg[5, 1, 10:13] = 2            # component C, label 2
    prob = np.zeros((3, *seg.shape), np.float32)
    prob[0] = 0.5
    prob[1][seg == 1] = 0.6
    prob[1][2, 3, 4] = 0.9          # max of A
    prob[1][7, 8, 2] = 0.7          # max of B
    prob[2][seg == 2] = 0.55
    prob[1][0, 0, 0] = 1.0          # outside every component: must not count
    return seg, prob


def test_components_boxes_scores_labels():
    seg, prob = _volume()
    out = segmentation_components(seg, prob)
    # nnDetection layout (a0_1, a1_1, a0_2, a1_2, a2_1, a2_2) with min-1 / max+1
    np.testing.assert_array_equal(out["boxes"], np.array([[0, 0, 3, 4, 0, 5], [5, 6, 9, 9, 1, 3],
                                                          [4, 0, 6, 2, 9, 13]], np.float32))
    np.testing.assert_allclose(out["scores"], [0.9, 0.7, 0.55], rtol=0, atol=1e-7)
    np.testing.assert_array_equal(out["labels"], [0, 0, 1])
    assert out["boxes"].dtype == np.float32 and out["scores"].dtype == np.float32


def test_components_label_subset_no_probabilities_and_min_size():
    seg, _ = _volume()
    only1 = segmentation_components(seg, None, labels=[1])
    assert len(only1["boxes"]) == 2 and np.all(only1["scores"] == 1.0) and np.all(only1["labels"] == 0)
    big = segmentation_components(seg, None, labels=[1], min_size=10)   # A has 24 voxels, B 6
    assert len(big["boxes"]) == 1 and big["boxes"][0][0] == 0
    empty = segmentation_components(np.zeros((4, 4, 4), np.uint8), np.zeros((2, 4, 4, 4)), labels=[1])
    assert empty["boxes"].shape == (0, 6) and empty["scores"].shape == (0,)


def test_components_reject_mismatched_probabilities():
    seg, prob = _volume()
    with pytest.raises(NnPreError, match="do not match the label map"):
        segmentation_components(seg, prob[:, :5])


def _write_case(folder, name, arr, dtype=np.uint8):
    import SimpleITK as sitk

    folder.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(sitk.GetImageFromArray(arr.astype(dtype)), str(folder / f"{name}.nii.gz"))


def test_folder_evaluation_matches_memory_and_cli(tmp_path):
    from nnpre.cli.evaluate import main
    from nnpre.study.runner import detection_summary
    from nnpre_detection.instances import load_ground_truth
    from nnpre_detection.metrics.evaluate import evaluate_boxes, to_json_ready

    seg, prob = _volume()
    gt = np.zeros_like(seg)
    gt[1:3, 1:4, 1:5] = 1     # A is found
    gt[3, 9:11, 8:12] = 1     # missed lesion
    gt2 = np.zeros_like(seg)
    gt2[6:9, 7:9, 2:3] = 1    # case 2: B is found
    pred, gtd = tmp_path / "pred", tmp_path / "gt"
    _write_case(pred, "c1", np.where(seg == 1, 1, 0))
    _write_case(pred, "c2", np.where(seg == 1, 1, 0))
    np.savez(pred / "c1.npz", probabilities=prob)
    p2 = prob.copy()
    p2[1][seg == 1] = 0.3
    np.savez(pred / "c2.npz", probabilities=p2)
    _write_case(gtd, "c1", gt)
    _write_case(gtd, "c2", gt2)

    rep = evaluate_segmentation_components(str(pred), str(gtd), str(tmp_path / "e.json"), labels=[1],
                                           boxes_folder=str(tmp_path / "boxes"))
    mem = {"c1": segmentation_components(np.where(seg == 1, 1, 0), prob, labels=[1]),
           "c2": segmentation_components(np.where(seg == 1, 1, 0), p2, labels=[1])}
    ref = to_json_ready(evaluate_boxes(mem, load_ground_truth(str(gtd), semantic_classes=[1]), classes=1))
    assert rep["metrics"] == ref["metrics"]
    assert rep["info"]["num_gt"] == 3 and rep["info"]["num_predictions"] == 4
    # 2 of 3 lesions found, with false positives ranked below: AP strictly between 0 and 1
    assert 0.0 < detection_summary(rep)["AP_IoU_0.10"] < 1.0
    assert (tmp_path / "e_froc.png").stat().st_size > 0

    # the written boxes reproduce the numbers through 'det'; 'seg-det' on the CLI gives the same report
    assert main(["det", "-p", str(tmp_path / "boxes"), "-g", str(gtd), "-o", str(tmp_path / "d.json"), "-k", "1",
                 "--no-plots"]) == 0
    assert json.loads((tmp_path / "d.json").read_text())["metrics"] == ref["metrics"]
    assert main(["seg-det", "-p", str(pred), "-g", str(gtd), "-o", str(tmp_path / "c.json"), "-l", "1",
                 "--no-plots"]) == 0
    assert json.loads((tmp_path / "c.json").read_text())["metrics"] == ref["metrics"]

    # without probabilities every component scores 1 (a folder of label maps only)
    import shutil

    bare = tmp_path / "bare"
    bare.mkdir()
    for n in ("c1.nii.gz", "c2.nii.gz"):
        shutil.copy(pred / n, bare / n)
    flat = evaluate_segmentation_components(str(bare), str(gtd), None, labels=[1])
    assert flat["probabilities_folder"] is None and flat["info"]["num_predictions"] == 4


def test_folder_evaluation_errors(tmp_path):
    seg, prob = _volume()
    _write_case(tmp_path / "gt", "c1", seg)
    with pytest.raises(NnPreError, match="does not exist"):
        evaluate_segmentation_components(str(tmp_path / "nope"), str(tmp_path / "gt"))
    _write_case(tmp_path / "pred", "c1", seg)
    np.savez(tmp_path / "pred" / "c1.npz", other=prob)
    with pytest.raises(NnPreError, match="no 'probabilities' array"):
        evaluate_segmentation_components(str(tmp_path / "pred"), str(tmp_path / "gt"), labels=[1])
