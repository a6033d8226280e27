"""nnDetection ``<case>_boxes.pkl`` predictions: read like our JSON files, never run code from them."""
import json
import os
import pickle

import numpy as np
import pytest

from nnpre.errors import NnPreError
from nnpre_detection.metrics.io import load_predictions


def _nndet_case(rng, n):
    """A dict shaped as nnDetection's ``get_case_result`` after ``to_numpy``."""
    lo = rng.uniform(0, 40, (n, 3))
    hi = lo + rng.uniform(2, 9, (n, 3))
    boxes = np.stack([lo[:, 0], lo[:, 1], hi[:, 0], hi[:, 1], lo[:, 2], hi[:, 2]], 1).astype(np.float32)
    return {"pred_boxes": boxes, "pred_scores": rng.uniform(0, 1, n).astype(np.float32),
            "pred_labels": rng.integers(0, 2, n), "restore": True, "original_size_of_raw_data": (48, 48, 40),
            "itk_origin": (0.0, 0.0, 0.0), "itk_spacing": (1.0, 1.0, 1.0), "itk_direction": tuple(np.eye(3).ravel())}


def test_boxes_pkl_folder_reads_like_the_same_json_folder(tmp_path):
    rng = np.random.default_rng(3)
    pkl_dir, json_dir = tmp_path / "pkl", tmp_path / "json"
    pkl_dir.mkdir()
    json_dir.mkdir()
    for case, n in (("case_000", 5), ("case_001", 0), ("case_002", 3)):
        d = _nndet_case(rng, n)
        with open(pkl_dir / f"{case}_boxes.pkl", "wb") as f:
            pickle.dump(d, f)
        (json_dir / f"{case}.json").write_text(json.dumps({"case": case, "boxes": d["pred_boxes"].tolist(),
                                                           "scores": d["pred_scores"].tolist(),
                                                           "labels": d["pred_labels"].tolist()}))
    a, b = load_predictions(str(pkl_dir)), load_predictions(str(json_dir))
    assert sorted(a) == sorted(b) == ["case_000", "case_001", "case_002"]
    for case in a:
        for key in ("boxes", "scores", "labels"):
            assert np.array_equal(a[case][key], b[case][key]), (case, key)
        assert a[case]["boxes"].dtype == np.float32 and a[case]["boxes"].shape[1] == 6


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_code_in_a_boxes_pkl_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    d = _nndet_case(np.random.default_rng(0), 2)
    d["pred_scores"] = _Payload(marker)
    folder = tmp_path / "preds"
    folder.mkdir()
    with open(folder / "evil_boxes.pkl", "wb") as f:
        pickle.dump(d, f)
    with pytest.raises(NnPreError, match=r"evil_boxes\.pkl: refusing to unpickle .*system"):
        load_predictions(str(folder))
    assert not marker.exists()


def test_truncated_or_foreign_boxes_pkl_is_one_clear_error(tmp_path):
    folder = tmp_path / "preds"
    folder.mkdir()
    data = pickle.dumps(_nndet_case(np.random.default_rng(1), 4))
    (folder / "cut_boxes.pkl").write_bytes(data[: len(data) // 2])
    with pytest.raises(NnPreError, match=r"cut_boxes\.pkl: not a readable pickle"):
        load_predictions(str(folder))
    (folder / "cut_boxes.pkl").write_bytes(pickle.dumps({"boxes": [1, 2]}))
    with pytest.raises(NnPreError, match="expected nnDetection's dict"):
        load_predictions(str(folder))
