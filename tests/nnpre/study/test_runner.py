"""Runner pieces that need no training: stage records, training history, summaries, trainer lookup."""
import json
import os

import numpy as np
import pytest

from nnpre.study.runner import Stages, detection_summary, lesion_dice, training_history


def test_stages_records_resume_and_vanished_files(tmp_path):
    st = Stages(str(tmp_path))
    f = tmp_path / "ck.pth"
    f.write_text("x")
    assert st.done("a") is None
    st.start("a")
    st.mark("a", {"files": [str(f)], "v": 1})
    rec = st.done("a")
    assert rec["v"] == 1 and rec["seconds"] >= 0
    os.remove(f)
    assert st.done("a") is None  # output vanished: the stage is redone
    assert json.loads((tmp_path / "stages" / "a.json").read_text())["v"] == 1


def test_training_history_uses_the_logger_api():
    class Log:
        def get_checkpoint(self):
            return {"train_losses": [np.float32(1.5), 1.0], "val_losses": [2.0, np.float64(1.25)], "lrs": [0.1]}

    class T:
        logger = Log()

    assert training_history(T()) == {"train_losses": [1.5, 1.0], "val_losses": [2.0, 1.25]}


def test_detection_summary_and_dice():
    det = {"metrics": {"AP_IoU_0.10_MaxDet_100": 0.5, "mAP_IoU_0.10_0.50_0.05_MaxDet_100": 0.25,
                       "FROC_score_IoU_0.10": None},
           "froc": {}, "info": {"num_gt": 3}}
    s = detection_summary(det)
    assert s["AP_IoU_0.10"] == 0.5 and s["FROC_IoU_0.10"] == 0.0 and s["FROC_no_tp"] is True
    assert lesion_dice({"mean": {"1": {"Dice": 0.4}}}) == 0.4
    assert lesion_dice({"foreground_mean": {"Dice": float("nan")}}) is None


@pytest.mark.parametrize("method", ["mae", "mg", "diffusion"])
def test_every_default_method_has_a_named_trainer(method):
    from nnpre.study.runner import pretrain_trainer_class

    cls = pretrain_trainer_class(method)
    assert cls.__name__.startswith("nnPreTrainer_")
