"""Run a study: synthetic data → planning → pretraining → fine-tuning (segmentation, detection) → test metrics.

:func:`run_study` executes the stages of a :class:`StudyConfig` in ``<out>``. Every stage writes a completion
record (``<out>/stages/<name>.json``, atomic) when it succeeds; a rerun skips stages whose record and files
exist and redoes the others, so an interrupted study resumes.

Seeds are passed to the trainers (``compose(seed=...)``), which draw their network initialisation and data
streams from them without touching the global generators: pretraining uses
:data:`~nnpre.study.grid.PRETRAIN_SEED`, fine-tuning run ``s`` :attr:`~nnpre.study.grid.Run.init_seed`
(``100 + s``). The study seeds no global RNG.

Each fine-tuning run gets its adapter from the registry (``nnpre_trainers.adapters.get_adapter``), ``full``
included, as ``nnPre_train`` does; the trainer writes the parameter counts to ``<run folder>/adapter.json``,
which the stage record copies (``params``) for the report.

Determinism: for a fixed seed and number of data-loader workers a run is reproducible up to floating-point
non-determinism of the device (CPU convolutions are deterministic; cuDNN's are not unless configured so).
"""
from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional

from nnpre.study.grid import PRETRAIN_SEED, STEP_TIMES, VAL_ITERATIONS, Run, StudyBudget, StudyGrid, estimate

#: nnU-Net dataset ids of the study's labelled set and unlabelled pool (inside the study's own folder).
LABELLED_ID, POOL_ID = 501, 502
#: Plans used by every run (written by ``nnPre_plan``).
PLANS = "nnPreResEncLPlans"
#: Nominal cost of synthetic data generation and of planning, in reference steps (progress bar only).
SETUP_STEPS = 20


@dataclass(frozen=True)
class StudyConfig:
    """Everything a study run needs: output folder, preset (geometry), budget (lengths, data) and grid."""

    out: str
    preset: str
    budget: StudyBudget
    grid: StudyGrid


@dataclass
class StudyResult:
    """Stage records by name, the summed stage time (incl. stages reused from an earlier invocation) and this
    invocation's wall time, in seconds."""

    records: Dict[str, dict] = field(default_factory=dict)
    stage_seconds: float = 0.0
    wall_seconds: float = 0.0


class Stages:
    """Completion markers: ``<out>/stages/<name>.json`` written atomically after a stage succeeded."""

    def __init__(self, out: str):
        self.folder = os.path.join(out, "stages")
        os.makedirs(self.folder, exist_ok=True)
        self._started: Dict[str, float] = {}

    def start(self, name: str) -> None:
        """Note when stage ``name`` began; :meth:`mark` then records its duration as ``seconds``."""
        self._started[name] = time.time()

    def done(self, name: str) -> Optional[dict]:
        """The record of stage ``name`` if it completed and all its ``files`` still exist, else None."""
        p = os.path.join(self.folder, name + ".json")
        if not os.path.isfile(p):
            return None
        with open(p) as f:
            rec = json.load(f)
        files = rec.get("files", [])
        return rec if all(os.path.exists(x) for x in files) else None

    def mark(self, name: str, rec: dict) -> None:
        from nnpre.atomic import write_json

        if name in self._started:
            rec = {**rec, "seconds": time.time() - self._started.pop(name)}
        write_json(rec, os.path.join(self.folder, name + ".json"))


def pretrain_trainer_class(method: str):
    """The named nnU-Net trainer class of a study method (``nnpre_trainers.aliases``: one class per registered
    task, so that every method gets its own results folder)."""
    from nnpre_trainers.aliases import pretrain_trainer

    return pretrain_trainer(method)


def training_history(trainer) -> Dict[str, list]:
    """Per-epoch ``train_losses`` / ``val_losses`` of a trained trainer, from nnU-Net's logger API
    (``get_checkpoint()``, what the trainer stores in its checkpoints)."""
    log = trainer.logger.get_checkpoint()
    return {k: [float(x) for x in log.get(k, [])] for k in ("train_losses", "val_losses")}


# ------------------------------------------------------------------------------------------------ evaluation
def _num(v) -> Optional[float]:
    try:
        v = float(v)
    except (TypeError, ValueError):
        return None
    return v if v == v else None


def lesion_dice(seg_metrics: dict) -> Optional[float]:
    """Dice of label 1 from nnU-Net's summary (its key layout differs slightly between versions)."""
    mean = seg_metrics.get("mean") or seg_metrics.get("metrics", {}).get("mean") or {}
    for k in ("1", 1, "(1,)"):
        if k in mean and "Dice" in mean[k]:
            return _num(mean[k]["Dice"])
    fg = seg_metrics.get("foreground_mean") or {}
    return _num(fg.get("Dice"))


def detection_summary(det: dict) -> dict:
    """Headline numbers of an ``evaluate_boxes`` report (JSON-ready) for the study tables.

    nnDetection's FROC is NaN when no detection is a true positive (sklearn's tpr is 0/0); the study reports
    sensitivity 0 there (``FROC_no_tp`` marks it) so that an untrained model scores 0, not "missing".
    """
    m = det["metrics"]
    curve = det["froc"].get("FROC_full_curve_IoU_0.10") or {}
    froc = _num(m.get("FROC_score_IoU_0.10"))
    no_tp = froc is None and det["info"].get("num_gt", 0) > 0
    return {"AP_IoU_0.10": _num(m.get("AP_IoU_0.10_MaxDet_100")),
            "mAP_IoU_0.10_0.50": _num(m.get("mAP_IoU_0.10_0.50_0.05_MaxDet_100")),
            "FROC_IoU_0.10": 0.0 if no_tp else froc, "FROC_no_tp": bool(no_tp),
            "froc_curve": {"fp_per_scan": list(curve.get("fp_per_scan", [])),
                           "sensitivity": list(curve.get("sensitivity", []))}}


def evaluate_segmentation_model(trainer, images_ts: str, labels_ts: str, out_dir: str) -> dict:
    """Sliding-window prediction of the test set with a trained nnU-Net trainer; lesion Dice (nnU-Net's
    evaluation) and detection metrics of the lesion label's connected components
    (:func:`nnpre.study.components.segmentation_components`).

    Writes ``out_dir/seg/<case>`` label maps, ``out_dir/seg_boxes/<case>.json`` component boxes (so
    ``nnPre_evaluate det -p out_dir/seg_boxes -g labelsTs -k 1`` reproduces the detection numbers),
    ``seg_metrics.json`` and ``det_metrics.json``.
    """
    import torch
    from batchgenerators.utilities.file_and_folder_operations import subfiles
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.utilities.utils import create_paths_fn, get_identifiers_from_splitted_dataset_folder

    from nnpre.atomic import write_json
    from nnpre.study.components import segmentation_components, write_prediction_json
    from nnpre_detection.instances import load_ground_truth
    from nnpre_detection.metrics.evaluate import evaluate_boxes, evaluate_segmentation, to_json_ready

    net = trainer.unwrapped_network
    net.eval()
    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=False,
                                perform_everything_on_device=False, device=trainer.device, verbose=False,
                                verbose_preprocessing=False, allow_tqdm=False)
    predictor.manual_initialization(net, trainer.plans_manager, trainer.configuration_manager, [net.state_dict()],
                                    trainer.dataset_json, type(trainer).__name__, None)
    pred_dir, box_dir = os.path.join(out_dir, "seg"), os.path.join(out_dir, "seg_boxes")
    for d in (pred_dir, box_dir):
        shutil.rmtree(d, ignore_errors=True)
        os.makedirs(d)
    # Case by case in memory: the lesion probabilities score the connected components, and nnU-Net's own
    # export would first write them as compressed .npz (a quarter of the evaluation time here).
    ending = trainer.dataset_json["file_ending"]
    reader = trainer.plans_manager.image_reader_writer_class()
    preds = {}
    # nnU-Net's per-case file lists, without create_lists_from_splitted_dataset_folder's 12-process pool
    names = subfiles(images_ts, suffix=ending, join=False, sort=True)
    for case in map(str, get_identifiers_from_splitted_dataset_folder(images_ts, ending)):
        image, props = reader.read_images(create_paths_fn(images_ts, names, ending, case))
        with torch.no_grad():
            lab, prob = predictor.predict_single_npy_array(image, props, None, None, True)
        reader.write_seg(lab, os.path.join(pred_dir, case + ending), props)
        preds[case] = segmentation_components(lab, prob, labels=[1])
        write_prediction_json(preds[case], case, box_dir)
    seg = evaluate_segmentation(pred_dir, labels_ts, os.path.join(out_dir, "seg_metrics.json"))
    gts = load_ground_truth(labels_ts, semantic_classes=[1])
    det = to_json_ready(evaluate_boxes(preds, gts, classes=1))
    write_json(det, os.path.join(out_dir, "det_metrics.json"))
    return {"dice": lesion_dice(seg), **detection_summary(det)}


def evaluate_detection_model(trainer, images_ts: str, labels_ts: str, out_dir: str) -> dict:
    """Retina U-Net: whole-case prediction of the test set (``nnPre_predict``'s code) and detection metrics."""
    from nnpre_detection.inference import predict_folder
    from nnpre_detection.metrics.evaluate import evaluate_detection, to_json_ready

    pred_dir = os.path.join(out_dir, "boxes")
    shutil.rmtree(pred_dir, ignore_errors=True)
    predict_folder(trainer.output_folder, images_ts, pred_dir, mirror=False, device=trainer.device, progress=False)
    det = evaluate_detection(pred_dir, labels_ts, os.path.join(out_dir, "det_metrics.json"), num_classes=1,
                             plots=False)
    return detection_summary(to_json_ready(det))


# ------------------------------------------------------------------------------------------------- the stages
def _pretrain(method: str, budget: StudyBudget) -> dict:
    from nnpre_trainers.run import make_trainer

    t = make_trainer(pretrain_trainer_class(method), POOL_ID, PLANS, fold="all",
                     epochs=budget.pretrain_epochs, iterations=budget.pretrain_iterations)
    t.num_val_iterations_per_epoch = VAL_ITERATIONS
    t.save_every = max(1, budget.pretrain_epochs)
    t.compose(seed=PRETRAIN_SEED)
    t.run_training()
    return {"files": [os.path.join(t.output_folder, "checkpoint_final.pth")], **training_history(t),
            "folder": t.output_folder}


def adapter_params(folder: str) -> Optional[dict]:
    """Parameter counts of a fine-tuning run from the ``adapter.json`` its trainer wrote (``Adapter.describe``:
    trainable, frozen, total, added, shares, options), or None if the run has none."""
    p = os.path.join(folder, "adapter.json")
    if not os.path.isfile(p):
        return None
    with open(p, encoding="utf-8") as f:
        d = json.load(f)
    return {k: d.get(k) for k in ("adapter", "options", "trainable", "total", "trainable_share", "added",
                                  "added_share")}


def _finetune(run: Run, budget: StudyBudget, pretrained: Optional[str], images_ts: str, labels_ts: str) -> dict:
    from nnpre_trainers.adapters import get_adapter
    from nnpre_trainers.aliases import nnPreDetectionTrainer, nnPreFineTuneTrainer
    from nnpre_trainers.run import make_trainer

    seg = run.task == "seg"
    epochs, its = ((budget.finetune_epochs, budget.finetune_iterations) if seg
                   else (budget.detect_epochs, budget.detect_iterations))
    # the run's plans variant <PLANS>_<tag> from the start: <Trainer>__<PLANS>_<tag>__3d_fullres (nnU-Net's scheme);
    # tag mae_n2_s0 (full fine-tuning, as before adapters) or mae_n2_s0_lora
    t = make_trainer(nnPreFineTuneTrainer if seg else nnPreDetectionTrainer, LABELLED_ID, PLANS, fold="all",
                     epochs=epochs, iterations=its, variant=run.tag)
    t.num_val_iterations_per_epoch = VAL_ITERATIONS
    t.save_every = max(1, epochs)
    # the adapter object as nnPre_train passes it (full = every parameter trains, as without one; it also
    # writes adapter.json with the parameter counts)
    adapter = get_adapter(run.adapter)
    if seg:
        t.configure_finetuning(pretrained=pretrained, from_scratch=pretrained is None,
                               num_train_cases=run.labelled, tag=run.tag, adapter=adapter)
    else:
        t.configure_detection(pretrained=pretrained, num_train_cases=run.labelled, tag=run.tag, adapter=adapter)
    t.compose(seed=run.init_seed)
    t.run_training()
    test_dir = os.path.join(t.output_folder, "test")
    evaluate = evaluate_segmentation_model if seg else evaluate_detection_model
    metrics = evaluate(t, images_ts, labels_ts, test_dir)
    return {"files": [os.path.join(t.output_folder, "checkpoint_final.pth"),
                      os.path.join(test_dir, "det_metrics.json")],
            "task": run.task, "method": run.method, "adapter": run.adapter, "arm": run.arm,
            "labelled": run.labelled, "seed": run.seed, "folder": t.output_folder,
            "params": adapter_params(t.output_folder),
            "train_losses": training_history(t)["train_losses"], **metrics}


def run_study(config: StudyConfig, progress: bool = True,
              on_stage: Optional[Callable[[str], None]] = None) -> StudyResult:
    """Run (or resume) every stage of ``config``; returns the records of all stages.

    Points nnU-Net's folders at ``<out>/nnunet`` (``nnpre.nnunet_env.use_root``). ``progress``: one tqdm bar
    over the whole study, weighted by each stage's estimated cost (:func:`nnpre.study.grid.estimate`).
    ``on_stage(name)`` is called when a stage starts (e.g. for logging).
    """
    from tqdm import tqdm

    from nnpre.nnunet_env import use_root
    from nnpre.synthetic import get_synth_config, make_study
    from planners.pipeline import plan_dataset

    budget, grid = config.budget, config.grid
    for note in grid.skipped():  # e.g. adapters that cannot train a Retina U-Net
        print(note)
    out = os.path.abspath(config.out)
    os.makedirs(out, exist_ok=True)
    use_root(os.path.join(out, "nnunet"))
    stages = Stages(out)
    cost = {"data": SETUP_STEPS, "plan": SETUP_STEPS,
            **estimate(grid, budget, STEP_TIMES.get(config.preset, STEP_TIMES["gpu"])).steps}
    bar = tqdm(total=round(sum(cost.values())), desc="nnPre study", unit="it", disable=not progress,
               bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} it-equiv [{elapsed}<{remaining}] {postfix}")
    t0 = time.time()
    result = StudyResult()

    def stage(name: str, work: Callable[[], dict]) -> dict:
        bar.set_postfix_str(name)
        if on_stage is not None:
            on_stage(name)
        stages.start(name)
        rec = stages.done(name)
        if not rec:
            stages.mark(name, work())
            rec = stages.done(name)
        result.records[name] = rec
        bar.update(round(cost[name]))
        return rec

    def make_data() -> dict:
        paths = make_study(os.path.join(out, "nnunet"), seed=0, n_train=budget.n_train, n_test=budget.n_test,
                           n_pool=budget.n_pool, labelled_id=LABELLED_ID, pool_id=POOL_ID,
                           config=get_synth_config(budget.difficulty), progress=False)
        return {"files": [paths["labelled"], paths["pool"]], "difficulty": budget.difficulty}

    def make_plans() -> dict:
        r1 = plan_dataset(LABELLED_ID, preset=config.preset, num_processes=1)
        r2 = plan_dataset(POOL_ID, preset=config.preset, num_processes=1)
        return {"files": [r1.preprocessed_folder, r2.preprocessed_folder]}

    labelled_dir, _ = stage("data", make_data)["files"]
    stage("plan", make_plans)
    checkpoints = {m: stage(f"pretrain_{m}", lambda m=m: _pretrain(m, budget))["files"][0] for m in grid.methods}
    images_ts, labels_ts = os.path.join(labelled_dir, "imagesTs"), os.path.join(labelled_dir, "labelsTs")
    for run in grid.runs():
        pretrained = None if run.method == "scratch" else checkpoints[run.method]
        stage(run.name, lambda run=run, p=pretrained: _finetune(run, budget, p, images_ts, labels_ts))
    bar.close()
    result.records.pop("data", None)
    result.records.pop("plan", None)
    result.wall_seconds = time.time() - t0
    result.stage_seconds = sum(float((stages.done(k) or {}).get("seconds", 0.0)) for k in cost)
    return result
