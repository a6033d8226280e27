"""nnDetection's whole-case ensembler (BoxEnsemblerSelective) against hand-computed cases."""
import json

import pytest
import torch

from nnpre.errors import NnPreError
from nnpre_detection.ensemble import (
    InferencePlan,
    PredictionSet,
    ensemble_case,
    ensemble_sets,
    load_inference_plan,
    process_set,
    save_inference_plan,
    tile_position_weight,
)


def box(c, s=4.0):
    """Cube of side s centred at c = (a0, a1, a2) in nnDetection layout."""
    h = s / 2
    return [c[0] - h, c[1] - h, c[0] + h, c[1] + h, c[2] - h, c[2] + h]


def pset(boxes, scores, labels=None, weights=None):
    n = len(scores)
    return PredictionSet(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 6), torch.tensor(scores),
                         torch.tensor(labels if labels is not None else [0] * n),
                         torch.tensor(weights if weights is not None else [1.0] * n))


def test_tile_position_weight_plateau_and_corner():
    tile = (8, 8, 8)
    c = torch.tensor([[4.0, 4, 4],   # centre -> 1
                      [0.0, 0, 0],   # corner: distance ratio 1 -> 1 - 0.5 = 0.5
                      [2.0, 2, 2],   # ratio 0.5: end of the plateau -> 1
                      [1.0, 1, 1],   # ratio 0.75 -> 0.75
                      [4.0, 4, 0]])  # ratio 4 / sqrt(48) = 0.577 -> 0.923
    w = tile_position_weight(c, tile)
    expected = torch.tensor([1.0, 0.5, 1.0, 0.75, 1.0 - (4 / 48 ** 0.5 - 0.5)])
    assert torch.allclose(w, expected, atol=1e-6)
    assert tile_position_weight(torch.zeros(0, 3), tile).shape == (0,)


def test_from_tiles_offsets_and_weights():
    tiles = [{"boxes": torch.tensor([box((4, 4, 4))]), "scores": torch.tensor([0.5]), "labels": torch.tensor([0]),
              "origin": (0, 0, 0)},
             {"boxes": torch.tensor([box((2, 2, 2), 2)]), "scores": torch.tensor([0.7]), "labels": torch.tensor([1]),
              "origin": (4, 0, 8)}]
    p = PredictionSet.from_tiles(tiles, (8, 8, 8), model_weight=2.0)
    assert p.boxes.tolist() == [box((4, 4, 4)), box((6, 2, 10), 2)]
    assert torch.allclose(p.weights, torch.tensor([2.0, 2.0]))  # both on the plateau, times the model weight
    assert p.labels.tolist() == [0, 1]


def test_weighted_nms_ranks_by_score_times_weight_then_resets_weights():
    # two overlapping boxes (IoU > 0.1): A has the higher score but a corner weight
    a, b = box((5, 5, 5)), box((6, 5, 5))
    p = pset([a, b], [0.9, 0.8], weights=[0.5, 1.0])
    w = process_set(p, (20, 20, 20), InferencePlan(model_nms_fn="weighted"))
    assert w.boxes.tolist() == [b] and w.scores.tolist() == pytest.approx([0.8]) and w.weights.tolist() == [1.0]
    plain = process_set(p, (20, 20, 20), InferencePlan(model_nms_fn="plain"))
    assert plain.boxes.tolist() == [a] and plain.weights.tolist() == [0.5]  # plain NMS keeps the tile weight


def test_process_set_topk_threshold_clip_small_and_top100():
    # 150 disjoint boxes: NMS keeps all, top-100 keeps the 100 best
    boxes = [box((5 * i, 0, 0), 2) for i in range(150)]
    scores = [0.001 * (i + 1) for i in range(150)]
    out = process_set(pset(boxes, scores), (1000, 10, 10))
    assert out.scores.numel() == 100 and out.scores.min() == pytest.approx(0.051)
    # model_topk is applied before NMS, score threshold after it
    out = process_set(pset(boxes, scores), (1000, 10, 10), InferencePlan(model_topk=10, model_score_thresh=0.145))
    assert out.scores.numel() == 5
    # clipping to the case and removal of boxes thinner than remove_small_boxes after clipping
    p = pset([[-3.0, 0, 2, 4, 0, 4], [9.5, 0, 14, 4, 0, 4]], [0.9, 0.8])
    out = process_set(p, (10, 10, 10), InferencePlan(remove_small_boxes=1.0))
    assert out.boxes.tolist() == [[0.0, 0, 2, 4, 0, 4]]  # second box clipped to width 0.5 < 1 -> removed


def test_wbc_across_sets_uses_number_of_sets():
    obj, lone = box((10, 10, 10)), box((30, 30, 30))
    s1 = pset([obj, lone], [0.8, 0.6])
    s2 = pset([obj], [0.8])
    out = ensemble_sets([s1, s2])
    # cluster {obj, obj}: (0.8 + 0.8) / 2 = 0.8; lone box, one set of two missing: 0.6 / (1 + 1) = 0.3
    assert out["scores"].tolist() == pytest.approx([0.8, 0.3])
    assert out["boxes"].tolist()[0] == pytest.approx(obj) and out["boxes"].tolist()[1] == pytest.approx(lone)
    assert out["labels"].tolist() == [0, 0]


def test_per_set_nms_keeps_the_missing_prediction_penalty():
    """Duplicates inside one set are suppressed before WBC, so a cluster never exceeds n_exp (the issue's bug:
    without per-set NMS the duplicates filled the cluster and WBC's penalty vanished)."""
    obj, near = box((10, 10, 10)), box((10.5, 10, 10))
    s1 = pset([obj, near], [0.9, 0.85])  # set 1 predicts the object twice
    s2 = pset([], [])                    # set 2 misses it
    out = ensemble_case([s1, s2], (40, 40, 40))
    assert out["scores"].tolist() == pytest.approx([0.45])  # 0.9 / (1 + 1 missing)
    assert out["boxes"].tolist()[0] == pytest.approx(obj)


def test_classes_never_merge_and_empty_input():
    obj = box((10, 10, 10))
    out = ensemble_case([pset([obj, obj], [0.9, 0.7], labels=[0, 1])], (40, 40, 40))
    assert sorted(out["labels"].tolist()) == [0, 1] and out["scores"].tolist() == pytest.approx([0.9, 0.7])
    empty = ensemble_case([PredictionSet.empty(), PredictionSet.empty()], (4, 4, 4))
    assert empty["boxes"].shape == (0, 6) and empty["scores"].shape == (0,)
    assert ensemble_sets([])["boxes"].shape == (0, 6)


def test_ensemble_score_threshold_is_strict():
    obj = box((10, 10, 10))
    out = ensemble_case([pset([obj], [0.4])], (40, 40, 40), InferencePlan(ensemble_score_thresh=0.4))
    assert out["scores"].numel() == 0


def test_plan_roundtrip_and_bad_files(tmp_path):
    assert load_inference_plan(str(tmp_path)) is None
    plan = InferencePlan(model_iou=0.2, model_nms_fn="plain", model_score_thresh=0.3)
    save_inference_plan(plan, str(tmp_path), {"history": [1, 2]})
    assert load_inference_plan(str(tmp_path)) == plan
    (tmp_path / "inference_plan.json").write_text(json.dumps({"model_iou": 0.1, "nms": 1}))
    with pytest.raises(NnPreError, match="unknown parameter"):
        load_inference_plan(str(tmp_path))
    (tmp_path / "inference_plan.json").write_text("{not json")
    with pytest.raises(NnPreError, match="not valid JSON"):
        load_inference_plan(str(tmp_path))
    with pytest.raises(NnPreError, match="model_nms_fn"):
        InferencePlan(model_nms_fn="soft")


class _StubDetector(torch.nn.Module):
    """predict_patch returns one box at a fixed tile position (so flips move it), score = tile mean."""

    def __init__(self):
        super().__init__()
        self.p = torch.nn.Parameter(torch.zeros(1))

    def predict_patch(self, x):
        return [{"boxes": torch.tensor([[1.0, 1, 3, 3, 1, 3]]), "scores": x.mean().reshape(1).clamp(0, 1),
                 "labels": torch.tensor([0])}]


def test_predict_case_sets_one_set_per_model_and_mirror_variant():
    from nnpre_detection.inference import predict_case, predict_case_sets

    img = torch.full((1, 8, 8, 8), 0.5)
    sets = predict_case_sets([_StubDetector(), _StubDetector()], img, (8, 8, 8), mirror=True)
    assert len(sets) == 16
    # identity variant: the box as predicted; mirror along axis 0: flipped back to 8 - 1 - (1..3) = 4..6
    assert sets[0].boxes.tolist() == [[1.0, 1, 3, 3, 1, 3]]
    assert sets[1].boxes.tolist() == [[4.0, 1, 6, 3, 1, 3]]
    one = predict_case_sets(_StubDetector(), img, (8, 8, 8), mirror=False)
    assert len(one) == 1
    # tiles of 4^3 with 50 % overlap on an 8^3 image: 3 x 3 x 3 tiles, boxes shifted by the tile origins
    tiled = predict_case_sets(_StubDetector(), img, (4, 4, 4), mirror=False)[0]
    assert tiled.boxes.shape == (27, 6)
    assert sorted({b[0] for b in tiled.boxes.tolist()}) == [1.0, 3.0, 5.0]
    out = predict_case(_StubDetector(), img, (8, 8, 8), mirror=True)
    # the 8 variants give 8 distinct boxes; each is a WBC cluster alone with 7 of 8 predictions missing
    assert out["scores"].numel() > 0 and float(out["scores"].max()) <= 0.5 / 8 + 1e-6
