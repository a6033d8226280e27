"""nnDetection's post-processing sweep: synthetic predictions with a known best setting, and a tiny model end to
end (validation predictions -> inference_plan.json -> nnPre_predict, fold ensemble consolidation)."""
import json
import os

import numpy as np
import pytest
import torch

from nnpre.errors import NnPreError
from nnpre_detection.ensemble import InferencePlan, PredictionSet
from nnpre_detection.postprocess_sweep import (
    SWEEP_METRIC,
    SWEEP_VALUES,
    evaluate_plan,
    load_cache,
    save_case_cache,
    sweep_inference_plan,
)


def cube(c, s=6.0):
    h = s / 2
    return [c[0] - h, c[1] - h, c[0] + h, c[1] + h, c[2] - h, c[2] + h]


def one(boxes, scores):
    n = len(scores)
    return PredictionSet(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 6), torch.tensor(scores),
                         torch.zeros(n, dtype=torch.long), torch.ones(n))


def synthetic_cases():
    """Four cases, one object each; two sets predict it shifted by -1.5 / +1.5 voxels along axis 0 (IoU between
    the two predictions 1/3, each 0.6 with the object). At ensemble_iou 0.5 the two stay apart and the second
    becomes a duplicate FP; at <= 0.3 WBC merges them into the exact box."""
    case_sets, gts = {}, {}
    for i, s in enumerate([0.9, 0.8, 0.7, 0.3]):
        c = (20.0, 20.0, 20.0)
        gts[f"c{i}"] = {"boxes": np.asarray([cube(c)], np.float32), "classes": np.asarray([0])}
        case_sets[f"c{i}"] = ([one([cube((18.5, 20, 20))], [s]), one([cube((21.5, 20, 20))], [s])], (40, 40, 40))
    return case_sets, gts


def test_sweep_finds_the_clustering_iou_and_is_greedy():
    case_sets, gts = synthetic_cases()
    default = evaluate_plan(InferencePlan(), case_sets, gts, 1)[SWEEP_METRIC]
    plan, history = sweep_inference_plan(case_sets, gts, 1)
    best = evaluate_plan(plan, case_sets, gts, 1)[SWEEP_METRIC]
    assert default < 0.9 and best == pytest.approx(1.0)
    assert plan.ensemble_iou < 1 / 3  # clusters the two shifted predictions
    assert len(history) == sum(len(v) for v in SWEEP_VALUES.values())
    assert [h["parameter"] for h in history][:6] == ["model_iou"] * 6  # nnDetection's order
    # ties keep the first candidate (np.argmax), so unaffected parameters stay at their first value
    assert plan.model_iou == SWEEP_VALUES["model_iou"][0] and plan.model_nms_fn == "weighted"


def test_sweep_needs_cases_and_a_known_metric():
    with pytest.raises(NnPreError, match="no validation cases"):
        sweep_inference_plan({}, {}, 1)
    case_sets, gts = synthetic_cases()
    with pytest.raises(NnPreError, match="not computed"):
        sweep_inference_plan(case_sets, gts, 1, values={"model_iou": (0.1,)}, target_metric="nope")


def test_cache_roundtrip(tmp_path):
    case_sets, gts = synthetic_cases()
    for k, (sets, shape) in case_sets.items():
        save_case_cache(str(tmp_path), k, sets, shape, gts[k], 1)
    cs, g, k = load_cache(str(tmp_path))
    assert k == 1 and sorted(cs) == sorted(case_sets)
    assert torch.equal(cs["c0"][0][1].boxes, case_sets["c0"][0][1].boxes) and cs["c0"][1] == (40, 40, 40)
    assert np.array_equal(g["c2"]["boxes"], gts["c2"]["boxes"])
    (tmp_path / "bad.npz").write_bytes(b"no zip")
    with pytest.raises(NnPreError, match="not a sweep cache"):
        load_cache(str(tmp_path))


def _fake_fold(plans, dataset_json, folder, seed):
    """An untrained cpu-tiny Retina U-Net saved as a detection checkpoint (what load_detector reads)."""
    import dataclasses

    from nnpre_detection.retina_unet import build_retina_unet

    cfg = plans["configurations"]["3d_fullres"]
    arch = cfg["architecture"]
    torch.manual_seed(seed)
    net = build_retina_unet(arch["network_class_name"], arch["arch_kwargs"], 1, 1,
                            arch_kwargs_req_import=arch["_kw_requires_import"], head_channels=16)
    info = {"num_classes": 1, "num_input_channels": 1,
            "anchor_sizes": [[list(map(float, a)) for a in lvl] for lvl in net.anchor_generator.sizes_per_level],
            "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(net.config).items()},
            "arch_class_name": arch["network_class_name"], "arch_kwargs": arch["arch_kwargs"],
            "arch_kwargs_req_import": list(arch["_kw_requires_import"]), "configuration": "3d_fullres",
            "plans": plans, "dataset_json": dataset_json}
    os.makedirs(folder, exist_ok=True)
    torch.save({"network_weights": net.state_dict(), "nnpre_detection": info},
               os.path.join(folder, "checkpoint_final.pth"))


def test_tiny_model_sweep_and_fold_ensemble(nnunet_root, tmp_path):
    torch.set_num_threads(1)
    from nnpre_testdata import write_raw_dataset

    from nnpre.cli.predict import main as predict_main
    from nnpre_detection.ensemble import load_inference_plan
    from nnpre_detection.postprocess_sweep import run_postprocessing_sweep
    from planners.pipeline import plan_dataset

    raw = write_raw_dataset(nnunet_root, did=48, n_cases=3)
    r = plan_dataset(48, preset="cpu-tiny", num_processes=1)
    with open(os.path.join(raw, "dataset.json")) as f:
        dj = json.load(f)
    trainer_dir = tmp_path / "trainer"
    for fold in (0, 1):
        _fake_fold(r.plans, dj, str(trainer_dir / f"fold_{fold}"), seed=fold)
    values = {"model_iou": (0.1, 0.3), "model_score_thresh": (0.0, 0.2)}
    plan = run_postprocessing_sweep(str(trainer_dir / "fold_0"), r.preprocessed_folder, ["c000", "c001"],
                                    mirror=False, values=values)
    saved = json.loads((trainer_dir / "fold_0" / "inference_plan.json").read_text())
    assert load_inference_plan(str(trainer_dir / "fold_0")) == plan
    assert saved["sweep"]["cases"] == ["c000", "c001"] and len(saved["sweep"]["history"]) == 4
    assert sorted(os.listdir(trainer_dir / "fold_0" / "sweep_predictions")) == ["c000.npz", "c001.npz"]
    run_postprocessing_sweep(str(trainer_dir / "fold_1"), r.preprocessed_folder, ["c002"], mirror=False,
                             values=values)

    # nnPre_predict -f 0 1: both folds, consolidated sweep over the pooled validation cases of both folds
    out = tmp_path / "preds"
    predict_main(["-i", os.path.join(raw, "imagesTr"), "-o", str(out), "-m", str(trainer_dir), "-f", "0", "1",
                  "--no-mirror", "--device", "cpu"])
    consolidated = json.loads((trainer_dir / "inference_plan.json").read_text())
    assert consolidated["sweep"]["cases"] == ["c000", "c001", "c002"]
    assert sorted(os.listdir(out)) == ["c000.json", "c001.json", "c002.json"]
    pred = json.loads((out / "c000.json").read_text())
    assert len(pred["boxes"]) == len(pred["scores"]) <= 100
    with pytest.raises(SystemExit):
        predict_main(["-i", os.path.join(raw, "imagesTr"), "-o", str(out), "-m", str(trainer_dir), "-f", "0", "7"])
