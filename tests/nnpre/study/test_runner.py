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


def test_adapter_params_from_the_run_folder(tmp_path):
    from nnpre.study.runner import adapter_params

    assert adapter_params(str(tmp_path)) is None
    (tmp_path / "adapter.json").write_text(json.dumps({
        "adapter": "lora", "options": {"rank": 8}, "trainable": 10, "frozen": 90, "total": 100,
        "trainable_share": 0.1, "added": 4, "added_share": 0.04, "exact_merge": True}))
    d = adapter_params(str(tmp_path))
    assert d == {"adapter": "lora", "options": {"rank": 8}, "trainable": 10, "total": 100, "trainable_share": 0.1,
                 "added": 4, "added_share": 0.04}


class _FakeTrainer:
    """Records what the study's fine-tuning stage asks of a trainer; "training" writes an adapter.json with
    the adapter's name, as the real trainer does (the counts themselves are tested with the adapters)."""

    def __init__(self, cls, folder, **kw):
        self.cls, self.kw, self.output_folder = cls, kw, str(folder / kw["variant"])
        self.configured, self.seed = None, None

        class Log:
            def get_checkpoint(self):
                return {"train_losses": [1.0, 0.5]}

        self.logger = Log()

    def configure_finetuning(self, **kw):
        self.configured = ("seg", kw)

    def configure_detection(self, **kw):
        self.configured = ("det", kw)

    def compose(self, seed=None):
        self.seed = seed

    def run_training(self):
        from nnpre.atomic import write_json

        adapter = self.configured[1]["adapter"]
        trainable = 1000 if adapter.name == "full" else 10
        os.makedirs(self.output_folder, exist_ok=True)
        write_json({"adapter": adapter.name, "options": adapter.options(), "trainable": trainable, "total": 1000,
                    "trainable_share": trainable / 1000, "added": 0, "added_share": 0.0},
                   os.path.join(self.output_folder, "adapter.json"))


@pytest.mark.parametrize("task, adapter", [("seg", "lora"), ("det", "probe-linear"), ("seg", "full")])
def test_finetune_stage_passes_the_adapter_and_tag(tmp_path, monkeypatch, task, adapter):
    import nnpre.study.runner as runner
    import nnpre_trainers.run
    from nnpre.study.grid import BUDGETS, Run

    made = []

    def make_trainer(cls, dataset, plans, **kw):
        made.append(_FakeTrainer(cls, tmp_path, **kw))
        return made[-1]

    monkeypatch.setattr(nnpre_trainers.run, "make_trainer", make_trainer)
    monkeypatch.setattr(runner, "evaluate_segmentation_model", lambda *a: {"dice": 0.5})
    monkeypatch.setattr(runner, "evaluate_detection_model", lambda *a: {"AP_IoU_0.10": 0.25})
    run = Run(task, "mae", 2, 1, adapter)
    rec = runner._finetune(run, BUDGETS["cpu-tiny"], "ck.pth", "imagesTs", "labelsTs")
    t = made[0]
    assert t.kw["variant"] == run.tag == ("mae_n2_s1" if adapter == "full" else f"mae_n2_s1_{adapter}")
    kind, kw = t.configured
    assert kind == task and kw["tag"] == run.tag and kw["pretrained"] == "ck.pth" and kw["num_train_cases"] == 2
    assert kw["adapter"].name == adapter and t.seed == 101
    assert t.cls.__name__ == ("nnPreFineTuneTrainer" if task == "seg" else "nnPreDetectionTrainer")
    assert (rec["adapter"], rec["arm"], rec["folder"]) == (adapter, run.arm, t.output_folder)
    assert rec["params"]["adapter"] == adapter
    assert rec["params"]["trainable"] == (1000 if adapter == "full" else 10)
    assert rec["train_losses"] == [1.0, 0.5] and (rec.get("dice") or rec.get("AP_IoU_0.10"))
