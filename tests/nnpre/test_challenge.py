"""Grand Challenge job I/O (``nnpre.challenge``) without a model: input discovery and the boxes JSON."""
import numpy as np
import pytest
import SimpleITK as sitk

from nnpre.challenge import box_corners_world, find_input_images, grand_challenge_boxes
from nnpre.errors import NnPreError


def _image(path, direction=None):
    im = sitk.GetImageFromArray(np.zeros((6, 7, 8), np.float32))  # array (Z, Y, X)
    im.SetSpacing((0.7, 0.8, 2.5))
    im.SetOrigin((-100.0, 20.0, 300.0))
    if direction is not None:
        im.SetDirection(direction)
    if path is not None:
        sitk.WriteImage(im, str(path))
    return im


def test_inputs_follow_the_platform_layout(tmp_path):
    for slug in ("t2", "adc"):
        (tmp_path / "images" / slug).mkdir(parents=True)
        _image(tmp_path / "images" / slug / f"{slug}-uuid.mha")
    assert [p.split("/")[-2] for p in find_input_images(str(tmp_path))] == ["adc", "t2"]  # sorted slugs
    assert [p.split("/")[-2] for p in find_input_images(str(tmp_path), ["t2", "adc"])] == ["t2", "adc"]
    with pytest.raises(NnPreError, match="expected exactly one image for input 'dwi'"):
        find_input_images(str(tmp_path), ["t2", "dwi"])
    flat = tmp_path / "flat"
    flat.mkdir()
    _image(flat / "scan.mha")
    assert find_input_images(str(flat))[0].endswith("scan.mha")
    _image(flat / "second.mha")
    with pytest.raises(NnPreError, match="found 2 images"):
        find_input_images(str(flat))
    with pytest.raises(NnPreError, match="does not exist"):
        find_input_images(str(tmp_path / "missing"))


def test_corners_are_the_box_in_world_coordinates_also_for_oblique_scans():
    theta = np.deg2rad(30)
    rot = (np.cos(theta), -np.sin(theta), 0.0, np.sin(theta), np.cos(theta), 0.0, 0.0, 0.0, 1.0)
    for direction in (None, rot):
        ref = _image(None, direction)
        box = [1.0, 2.0, 4.0, 6.0, 0.5, 3.5]  # (a0_lo, a1_lo, a0_hi, a1_hi, a2_lo, a2_hi), array axes (Z, Y, X)
        corners = np.asarray(box_corners_world(box, ref))
        assert corners.shape == (8, 3)
        # hand-computed: world = origin + D @ (spacing * index), index = (a2, a1, a0)
        d = np.asarray(ref.GetDirection()).reshape(3, 3)
        expect = [np.asarray(ref.GetOrigin()) + d @ (np.asarray(ref.GetSpacing()) * np.array([a2, a1, a0]))
                  for a0 in (1.0, 4.0) for a1 in (2.0, 6.0) for a2 in (0.5, 3.5)]
        assert np.allclose(corners, expect)


def test_boxes_json_sorted_filtered_and_shaped_as_the_interface():
    ref = _image(None)
    pred = {"boxes": [[0, 0, 2, 2, 0, 2], [1, 1, 3, 3, 1, 3], [2, 2, 4, 4, 2, 4]], "scores": [0.2, 0.9, 0.05],
            "labels": [0, 1, 0]}
    out = grand_challenge_boxes(pred, ref, min_score=0.1)
    assert out["type"] == "Multiple 3D bounding boxes" and out["version"] == {"major": 1, "minor": 0}
    assert [b["probability"] for b in out["boxes"]] == pytest.approx([0.9, 0.2])
    assert out["boxes"][0]["name"].endswith("(class 1)")
    assert np.allclose(out["boxes"][0]["corners"], box_corners_world(pred["boxes"][1], ref))
    assert grand_challenge_boxes({"boxes": [], "scores": [], "labels": []}, ref)["boxes"] == []
