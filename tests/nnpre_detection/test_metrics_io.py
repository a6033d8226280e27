"""Prediction and ignore-box files read through nnpre.atomic.read_json: one-line errors naming file and role."""
import pytest

from nnpre.errors import NnPreError
from nnpre_detection.metrics.ignore import read_ignore_dir
from nnpre_detection.metrics.io import load_predictions, read_prediction


def _one_line(e) -> str:
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_prediction_and_ignore_readers_use_it(tmp_path):
    pred = tmp_path / "pred"
    pred.mkdir()
    (pred / "a.json").write_text('{"boxes": [], "scores": [], "labels": []}')
    assert read_prediction(str(pred / "a.json"))["boxes"].shape[0] == 0
    (pred / "b.json").write_text("{not json")
    with pytest.raises(NnPreError) as e:
        read_prediction(str(pred / "b.json"))
    assert _one_line(e).startswith(f"{pred / 'b.json'}: cannot read prediction JSON (JSONDecodeError")
    with pytest.raises(NnPreError) as e:
        load_predictions(str(pred))
    assert _one_line(e).startswith(f"{pred / 'b.json'}: cannot read JSON (JSONDecodeError")
    ign = tmp_path / "ignore"
    ign.mkdir()
    (ign / "a_ignore.json").write_text('{"boxes": [[0, 0, 2')
    with pytest.raises(NnPreError) as e:
        read_ignore_dir(str(ign))
    assert _one_line(e).startswith(f"{ign / 'a_ignore.json'}: cannot read ignore JSON (JSONDecodeError")
