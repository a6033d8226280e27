"""``nnPre_demo``: the whole study on built-in synthetic data — pretrain → fine-tune → evaluate → report.

1. synthetic data (labelled set + held-out test set + unlabelled pool, :mod:`nnpre.synthetic`);
2. planning and preprocessing with the nnPre planner (both datasets, same geometry);
3. pretraining with MAE, Model Genesis and diffusion on the pool;
4. segmentation fine-tuning from each checkpoint and from scratch (5 % decoder-only warm-up for the
   pretrained runs) for each labelled-set size and seed;
5. evaluation on the test set: Dice (nnU-Net's evaluation) and detection metrics (FROC, AP@IoU 0.1,
   nnDetection definitions) of the connected components of each segmentation, scored by their maximum
   foreground probability (nnDetection's "nnU-Net basic" import);
6. a report folder: ``report.md`` (method × labelled cases, mean ± std over seeds), ``results.json``,
   PNG plots (metric vs labelled cases, pretraining loss curves and previews, FROC curves).

Every stage writes a marker when it completes; rerunning skips finished stages and redoes unfinished ones.
The ``cpu-tiny`` preset (default) fits in about 15 minutes on 2 CPU cores; ``--preset gpu`` uses the
faithful defaults (1 mm, 128³, ResEnc-L, full training lengths).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from dataclasses import dataclass
from typing import Dict, List, Optional

from nnpre.cli._common import cli_entry
from nnpre.presets import get_preset
from nnpre.synthetic import SYNTH_CALIBRATION, SYNTH_PRESETS

METHODS = ("mae", "mg", "diffusion")
#: Fine-tuning tasks: nnU-Net segmentation and Retina U-Net detection.
TASKS = ("seg", "det")
#: Scratch Dice gap between the largest and the smallest labelled set that counts as "well below".
CALIBRATION_GAP = 0.05
#: Nominal cost of one test-set evaluation in training-iteration equivalents (for the time estimate only).
EVAL_COST = 10


@dataclass
class DemoBudget:
    """Training lengths per preset (epochs × iterations): pretraining, segmentation and detection fine-tuning."""

    pretrain_epochs: int
    pretrain_iterations: int
    finetune_epochs: int
    finetune_iterations: int
    n_train: int
    n_test: int
    n_pool: int
    difficulty: str
    detect_epochs: int
    detect_iterations: int


BUDGETS = {
    # ~13 min on 2 cores (measured; see README). Synthetic "cpu" difficulty ("medium" confounders, lesions
    # scaled to the 2 mm grid): scratch segmentation with the cpu-tiny recipe (AdamW, see nnpre.presets) for
    # 6x45 iterations reached test Dice 0.37-0.43 with 8 labelled cases and 0.20-0.30 with 2 (3 seeds, 8 test
    # cases), whereas on "medium" it plateaued at ~0.25 with either (only lung nodules were learned) and
    # "easy" saturates (0.91 / 0.88). A Retina U-Net step costs about twice a segmentation step there, hence
    # the shorter detection runs.
    "cpu-tiny": DemoBudget(3, 80, 6, 45, 8, 8, 12, "cpu", 4, 32),
    "gpu": DemoBudget(1000, 250, 1000, 250, 40, 20, 200, "default", 1000, 250),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nnPre_demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="nnpre_demo_out", help="output folder (default ./nnpre_demo_out)")
    p.add_argument("--preset", default="cpu-tiny", choices=sorted(BUDGETS))
    p.add_argument("--seeds", type=int, default=1, help="fine-tuning seeds per configuration (default 1)")
    p.add_argument("--labelled", default="2,8", help="labelled-set sizes, comma separated (default 2,8)")
    p.add_argument("--methods", default=",".join(METHODS), help="pretext tasks (default mae,mg,diffusion)")
    p.add_argument("--pretrain-iterations", type=int, default=None, help="override: iterations per epoch")
    p.add_argument("--pretrain-epochs", type=int, default=None)
    p.add_argument("--finetune-iterations", type=int, default=None)
    p.add_argument("--finetune-epochs", type=int, default=None)
    p.add_argument("--detect-iterations", type=int, default=None, help="override for the detection runs")
    p.add_argument("--detect-epochs", type=int, default=None)
    p.add_argument("--n-train", type=int, default=None)
    p.add_argument("--n-test", type=int, default=None)
    p.add_argument("--n-pool", type=int, default=None)
    p.add_argument("--difficulty", default=None, choices=sorted(SYNTH_PRESETS),
                   help="synthetic difficulty (default: the budget's; 'cpu' for cpu-tiny, 'default' for gpu)")
    return p


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


def _seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    np.random.seed(seed)
    torch.manual_seed(seed)


def _predict_and_evaluate(trainer, images_ts: str, labels_ts: str, out_dir: str) -> dict:
    """Sliding-window prediction of the test set, Dice and component-level detection metrics."""
    import numpy as np
    import torch
    from batchgenerators.utilities.file_and_folder_operations import subfiles
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.utilities.utils import create_paths_fn, get_identifiers_from_splitted_dataset_folder
    from scipy import ndimage

    from nnpre_detection.instances import boxes_from_instances, load_ground_truth, semantic_to_instances
    from nnpre_detection.metrics.evaluate import evaluate_boxes, evaluate_segmentation

    net = trainer.unwrapped_network
    net.eval()
    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=False,
                                perform_everything_on_device=False, device=trainer.device, verbose=False,
                                verbose_preprocessing=False, allow_tqdm=False)
    predictor.manual_initialization(net, trainer.plans_manager, trainer.configuration_manager, [net.state_dict()],
                                    trainer.dataset_json, type(trainer).__name__, None)
    pred_dir = os.path.join(out_dir, "seg")
    shutil.rmtree(pred_dir, ignore_errors=True)
    os.makedirs(pred_dir)
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
        # detection: connected components of the predicted lesion label, score = max lesion probability
        inst, _ = semantic_to_instances((lab == 1).astype(np.uint8), classes=[1])
        boxes, ids = boxes_from_instances(inst)
        scores = np.asarray(ndimage.maximum(prob[1], inst, ids) if len(ids) else [], dtype=np.float32)
        preds[case] = {"boxes": boxes, "scores": np.clip(scores, 0, 1), "labels": np.zeros(len(ids), np.int64)}
    seg = evaluate_segmentation(pred_dir, labels_ts, os.path.join(out_dir, "seg_metrics.json"))
    dice = _lesion_dice(seg)
    gts = load_ground_truth(labels_ts, semantic_classes=[1])
    det = evaluate_boxes(preds, gts, classes=1)
    from nnpre.atomic import write_json
    from nnpre_detection.metrics.evaluate import to_json_ready

    write_json(to_json_ready(det), os.path.join(out_dir, "det_metrics.json"))
    return {"dice": dice, **_detection_summary(to_json_ready(det))}


def _detection_summary(det: dict) -> dict:
    """Headline numbers of an :func:`evaluate_boxes` report (JSON-ready) for the demo table.

    nnDetection's FROC is NaN when no detection is a true positive (sklearn's tpr is 0/0); the demo reports
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


def _predict_boxes_and_evaluate(trainer, images_ts: str, labels_ts: str, out_dir: str) -> dict:
    """Retina U-Net: whole-case prediction of the test set (``nnPre_predict``'s code) and detection metrics."""
    from nnpre_detection.inference import predict_folder
    from nnpre_detection.metrics.evaluate import evaluate_detection, to_json_ready

    pred_dir = os.path.join(out_dir, "boxes")
    shutil.rmtree(pred_dir, ignore_errors=True)
    predict_folder(trainer.output_folder, images_ts, pred_dir, mirror=False, device=trainer.device, progress=False)
    det = evaluate_detection(pred_dir, labels_ts, os.path.join(out_dir, "det_metrics.json"), num_classes=1,
                             plots=False)
    return _detection_summary(to_json_ready(det))


def _num(v) -> Optional[float]:
    try:
        v = float(v)
    except (TypeError, ValueError):
        return None
    return v if v == v else None


def _lesion_dice(seg_metrics: dict) -> Optional[float]:
    """Dice of label 1 from nnU-Net's summary (its key layout differs slightly between versions)."""
    mean = seg_metrics.get("mean") or seg_metrics.get("metrics", {}).get("mean") or {}
    for k in ("1", 1, "(1,)"):
        if k in mean and "Dice" in mean[k]:
            return _num(mean[k]["Dice"])
    fg = seg_metrics.get("foreground_mean") or {}
    return _num(fg.get("Dice"))


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from nnpre.errors import fail
    from nnpre.nnunet_env import use_root
    from nnpre.synthetic import get_synth_config, make_study
    from planners.pipeline import plan_dataset

    budget = BUDGETS[args.preset]
    over = {k: getattr(args, k) for k in ("pretrain_iterations", "pretrain_epochs", "finetune_iterations",
                                          "finetune_epochs", "n_train", "n_test", "n_pool", "difficulty",
                                          "detect_epochs", "detect_iterations")}
    budget = DemoBudget(**{k: (over[k] if over.get(k) is not None else v) for k, v in budget.__dict__.items()})
    try:
        sizes = sorted({int(s) for s in str(args.labelled).split(",") if s.strip()})
    except ValueError:
        fail(f"--labelled expects comma-separated integers, got '{args.labelled}'")
    if not sizes or min(sizes) < 1 or max(sizes) > budget.n_train:
        fail(f"--labelled sizes must be between 1 and the {budget.n_train} labelled training cases, got {sizes}")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        fail(f"unknown pretext method(s) {unknown}; choose from {', '.join(METHODS)}")
    if args.seeds < 1:
        fail("--seeds must be >= 1")

    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    use_root(os.path.join(out, "nnunet"))
    os.environ.setdefault("nnUNet_n_proc_DA", "1")
    os.environ.setdefault("nnUNet_compile", "false")
    stages = Stages(out)
    labelled_id, pool_id = 501, 502
    preset = args.preset
    runs = [(task, m, n, s) for task in TASKS for n in sizes for s in range(args.seeds) for m in ["scratch"] + methods]
    # The overall bar counts training iterations (plus a nominal cost for data, planning and each test-set
    # evaluation), so its remaining-time estimate holds although stages differ in length.
    cost = {"data": 20, "plan": 20, **{f"pretrain_{m}": budget.pretrain_epochs * budget.pretrain_iterations
                                       for m in methods}}
    for task, m, n, s in runs:
        cost[f"{task}_{m}_n{n}_s{s}"] = EVAL_COST + (budget.finetune_epochs * budget.finetune_iterations
                                                     if task == "seg" else 2 * budget.detect_epochs * budget.detect_iterations)
    bar = tqdm(total=sum(cost.values()), desc="nnPre demo", unit="it",
               bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} it-equiv [{elapsed}<{remaining}] {postfix}")
    t0 = time.time()
    results: Dict[str, dict] = {}

    def step(name):
        bar.set_postfix_str(name)
        stages.start(name)

    def finished(name):
        bar.update(cost[name])

    # 1. data ------------------------------------------------------------------------------------------------
    step("data")
    if not stages.done("data"):
        paths = make_study(os.path.join(out, "nnunet"), seed=0, n_train=budget.n_train, n_test=budget.n_test,
                           n_pool=budget.n_pool, labelled_id=labelled_id, pool_id=pool_id,
                           config=get_synth_config(budget.difficulty), progress=False)
        stages.mark("data", {"files": [paths["labelled"], paths["pool"]], "difficulty": budget.difficulty})
    data = stages.done("data")
    labelled_dir, pool_dir = data["files"]
    finished("data")

    # 2. plan ------------------------------------------------------------------------------------------------
    step("plan")
    if not stages.done("plan"):
        r1 = plan_dataset(labelled_id, preset=preset, num_processes=1)
        r2 = plan_dataset(pool_id, preset=preset, num_processes=1)
        stages.mark("plan", {"files": [r1.preprocessed_folder, r2.preprocessed_folder]})
    finished("plan")

    # 3. pretrain --------------------------------------------------------------------------------------------
    from nnpre_trainers.aliases import PRETRAIN_TRAINERS
    from nnpre_trainers.run import make_trainer

    checkpoints = {}
    for m in methods:
        name = f"pretrain_{m}"
        step(name)
        rec = stages.done(name)
        if not rec:
            _seed_everything(0)
            t = make_trainer(PRETRAIN_TRAINERS[m], pool_id, "nnPreResEncLPlans", fold="all",
                             epochs=budget.pretrain_epochs, iterations=budget.pretrain_iterations)
            t.num_val_iterations_per_epoch = 2
            t.save_every = max(1, budget.pretrain_epochs)
            t.run_training()
            ck = os.path.join(t.output_folder, "checkpoint_final.pth")
            log = t.logger.local_logger.my_fantastic_logging
            rec = {"files": [ck], "train_losses": [float(x) for x in log["train_losses"]],
                   "val_losses": [float(x) for x in log["val_losses"]], "folder": t.output_folder}
            stages.mark(name, rec)
        checkpoints[m] = rec["files"][0]
        results[name] = rec
        finished(name)

    # 4./5. fine-tune (segmentation and Retina U-Net detection) and evaluate -----------------------------------
    from nnpre_detection.trainer import nnPreDetectionTrainer
    from nnpre_trainers.finetune_trainer import nnPreFineTuneTrainer

    images_ts, labels_ts = os.path.join(labelled_dir, "imagesTs"), os.path.join(labelled_dir, "labelsTs")
    for task, m, n, s in runs:
        name = f"{task}_{m}_n{n}_s{s}"
        step(name)
        rec = stages.done(name)
        if not rec:
            _seed_everything(100 + s)
            pretrained = None if m == "scratch" else checkpoints[m]
            cls = nnPreFineTuneTrainer if task == "seg" else nnPreDetectionTrainer
            epochs, its = ((budget.finetune_epochs, budget.finetune_iterations) if task == "seg"
                           else (budget.detect_epochs, budget.detect_iterations))
            t = make_trainer(cls, labelled_id, "nnPreResEncLPlans", fold="all", epochs=epochs, iterations=its)
            t.num_val_iterations_per_epoch = 2
            t.save_every = max(1, epochs)
            if task == "seg":
                t.configure_finetuning(pretrained=pretrained, from_scratch=pretrained is None, num_train_cases=n,
                                       tag=f"{m}_n{n}_s{s}")
            else:
                t.configure_detection(pretrained=pretrained, num_train_cases=n, tag=f"{m}_n{n}_s{s}")
            t.run_training()
            test_dir = os.path.join(t.output_folder, "test")
            if task == "seg":
                metrics = _predict_and_evaluate(t, images_ts, labels_ts, test_dir)
            else:
                metrics = _predict_boxes_and_evaluate(t, images_ts, labels_ts, test_dir)
            log = t.logger.local_logger.my_fantastic_logging
            rec = {"files": [os.path.join(t.output_folder, "checkpoint_final.pth"),
                             os.path.join(test_dir, "det_metrics.json")],
                   "task": task, "method": m, "labelled": n, "seed": s,
                   "train_losses": [float(x) for x in log["train_losses"]], **metrics}
            stages.mark(name, rec)
        results[name] = rec
        finished(name)
    bar.close()

    # 6. report ----------------------------------------------------------------------------------------------
    compute = sum(float((stages.done(k) or {}).get("seconds", 0.0)) for k in cost)
    wall = time.time() - t0
    report = write_report(out, results, methods, sizes, args.seeds, budget, preset, max(compute, wall), wall)
    print(report)
    print(f"\nreport: {os.path.join(out, 'report', 'report.md')}")
    return 0


def _agg(values: List[Optional[float]]) -> str:
    import numpy as np

    v = [x for x in values if x is not None]
    if not v:
        return "n/a"
    return f"{np.mean(v):.3f} ± {np.std(v):.3f}" if len(v) > 1 else f"{v[0]:.3f}"


#: (task, metric key, title) rows of the report.
REPORT_METRICS = (
    ("seg", "dice", "Segmentation (nnU-Net): lesion Dice"),
    ("seg", "FROC_IoU_0.10", "Segmentation (nnU-Net) as detection: FROC @ IoU 0.1 of its connected components"),
    ("det", "AP_IoU_0.10", "Detection (Retina U-Net): AP @ IoU 0.1"),
    ("det", "FROC_IoU_0.10", "Detection (Retina U-Net): FROC @ IoU 0.1"),
)


def _mean(values) -> float:
    import numpy as np

    v = [x for x in values if x is not None]
    return float(np.mean(v)) if v else float("nan")


def write_report(out: str, results: dict, methods: List[str], sizes: List[int], seeds: int,
                 budget: DemoBudget, preset: str, seconds: float, invocation_seconds: Optional[float] = None) -> str:
    """Markdown tables, JSON and PNG plots in ``<out>/report``; returns the Markdown.

    ``seconds`` is the summed duration of all stages (also those reused from an earlier, resumed invocation);
    ``invocation_seconds`` the wall time of this invocation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from nnpre.atomic import write_json, write_with

    rep = os.path.join(out, "report")
    os.makedirs(rep, exist_ok=True)
    all_methods = ["scratch"] + list(methods)
    # table[task][metric][method][n] = values over seeds
    table: Dict[str, Dict[str, Dict[str, Dict[int, list]]]] = {}
    for task, metric, _ in REPORT_METRICS:
        for m in all_methods:
            for n in sizes:
                vals = [results.get(f"{task}_{m}_n{n}_s{s}", {}).get(metric) for s in range(seeds)]
                table.setdefault(task, {}).setdefault(metric, {}).setdefault(m, {})[n] = vals
    lines = [f"# nnPre demo report ({preset})", "",
             f"Synthetic data: difficulty '{budget.difficulty}', {budget.n_train} labelled training cases, "
             f"{budget.n_test} test cases, {budget.n_pool} unlabelled pool cases. Pretraining "
             f"{budget.pretrain_epochs}×{budget.pretrain_iterations} iterations per method; fine-tuning "
             f"{budget.finetune_epochs}×{budget.finetune_iterations} (segmentation) and "
             f"{budget.detect_epochs}×{budget.detect_iterations} (detection) iterations per run (pretrained runs: "
             f"encoder-only transfer, decoder-only warm-up for the first 5 %). {seeds} seed(s); values are the "
             f"mean ± std over seeds on the held-out test set. Stage time {seconds / 60:.1f} min"
             + (f" ({invocation_seconds / 60:.1f} min in this invocation; the rest was reused from an earlier one)."
                if invocation_seconds is not None and invocation_seconds < 0.9 * seconds else "."), ""]
    dice_scratch = {n: _mean(table["seg"]["dice"]["scratch"][n]) for n in sizes}
    lines += ["## Calibration", "",
              "The generator is calibrated so that scratch training with the fewest labels stays well below "
              "training on all labelled cases (room for pretraining to help). Difficulty "
              f"'{budget.difficulty}': {SYNTH_CALIBRATION.get(budget.difficulty, 'custom')}. This run, scratch lesion Dice: "
              + ", ".join(f"{n} labelled {dice_scratch[n]:.3f}" for n in sizes) + ".", ""]
    gap = dice_scratch[sizes[-1]] - dice_scratch[sizes[0]] if len(sizes) > 1 else float("nan")
    if len(sizes) > 1 and not gap >= CALIBRATION_GAP:
        lines += [f"**Not calibrated in this run:** scratch with {sizes[0]} labelled cases is not well below "
                  f"(≥ {CALIBRATION_GAP} Dice) scratch with {sizes[-1]} (difference {gap:+.3f}): at this training "
                  f"length the models are limited by iterations rather than labels, so the comparison below says "
                  f"little about pretraining. Longer runs (`--finetune-epochs`, `--preset gpu`) are needed.", ""]
    for task, metric, title in REPORT_METRICS:
        lines += [f"## {title}", "", "| method | " + " | ".join(f"{n} labelled" for n in sizes) + " |",
                  "|---|" + "---|" * len(sizes)]
        for m in all_methods:
            lines.append(f"| {m} | " + " | ".join(_agg(table[task][metric][m][n]) for n in sizes) + " |")
        lines.append("")
    # honest reading of the claim "reconstruction pretraining beats scratch, most with few labels"
    lines += ["## Does pretraining beat scratch?", ""]
    for task, metric, title in (REPORT_METRICS[0], REPORT_METRICS[2]):
        for m in methods:
            gains = []
            for n in sizes:
                d = _mean(table[task][metric][m][n]) - _mean(table[task][metric]["scratch"][n])
                gains.append(d)
            parts = ", ".join(f"{n} labelled {'+' if d >= 0 else ''}{d:.3f}" for n, d in zip(sizes, gains))
            verdict = "better than scratch at every size" if all(d > 0 for d in gains) else (
                "not better than scratch at any size" if all(not d > 0 for d in gains) else "mixed")
            most = ""
            if len(sizes) > 1 and all(np.isfinite(gains)) and max(gains) > 0:
                most = ("; the gain is largest with the fewest labels" if gains[0] == max(gains)
                        else "; the gain is not largest with the fewest labels")
            lines.append(f"- {title.split(':')[0]}, {m}: {metric} vs scratch {parts} ({verdict}{most})")
    from nnpre_trainers.finetune_schedule import PRETRAINED_LR, SCRATCH_LR

    scratch_lr, pretrained_lr = get_preset(preset).finetune_lr or (SCRATCH_LR, PRETRAINED_LR)
    if pretrained_lr < scratch_lr:
        lines += ["", "Pretrained runs follow the fine-tuning recipe's lower peak learning rate "
                  f"({pretrained_lr:g} vs {scratch_lr:g} from scratch, see nnpre.presets) plus a decoder-only "
                  "warm-up; in short runs that alone can favour scratch (compare the fine-tuning loss curves in "
                  "loss_curves.png)."]
    else:
        lines += ["", f"Pretrained and scratch runs share the peak learning rate ({scratch_lr:g}, see nnpre.presets); "
                  "pretrained runs add the decoder-only warm-up (first 5 % of iterations)."]
    if seeds == 1:
        lines += ["", "Short CPU runs are noisy: with one seed, differences of a few points are within noise; use "
                  "`--seeds 3` (and `--preset gpu` for faithful training lengths) before drawing conclusions."]
    lines.append("")
    md = "\n".join(lines)
    write_with(lambda p: open(p, "w").write(md), os.path.join(rep, "report.md"))
    write_json({"results": results, "table": table, "budget": budget.__dict__, "preset": preset,
                "methods": all_methods, "labelled": sizes, "seeds": seeds}, os.path.join(rep, "results.json"))

    def save(fig, name):
        fig.tight_layout()
        write_with(lambda p: fig.savefig(p, dpi=90, format="png"), os.path.join(rep, name))
        plt.close(fig)

    # metric vs labelled cases
    for task, metric, title in REPORT_METRICS:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for m in all_methods:
            ax.plot(sizes, [_mean(table[task][metric][m][n]) for n in sizes], "-o", label=m)
        ax.set_xlabel("labelled training cases")
        ax.set_ylabel(metric)
        ax.set_title(title.split(":")[0], fontsize=9)
        ax.legend()
        save(fig, f"{task}_{metric}_vs_labelled.png")
    # loss curves: pretraining, and fine-tuning at the smallest labelled size
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.5))
    for m in methods:
        tr = np.asarray(results.get(f"pretrain_{m}", {}).get("train_losses") or [], float)
        if tr.size:
            axes[0].plot(np.arange(1, tr.size + 1), tr / tr[0], "-o", label=m)
    axes[0].set_title("pretraining (train loss / first epoch)", fontsize=9)
    for ax, task in zip(axes[1:], TASKS):
        for m in all_methods:
            tr = np.asarray(results.get(f"{task}_{m}_n{sizes[0]}_s0", {}).get("train_losses") or [], float)
            if tr.size:
                ax.plot(np.arange(1, tr.size + 1), tr, "-o", label=m)
        ax.set_title(f"{task} fine-tuning, {sizes[0]} labelled (train loss)", fontsize=9)
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.legend(fontsize=7)
    save(fig, "loss_curves.png")
    # reconstruction previews written by the pretraining trainer
    for m in methods:
        prev = os.path.join(results.get(f"pretrain_{m}", {}).get("folder", ""), "previews")
        if os.path.isdir(prev) and os.listdir(prev):
            shutil.copyfile(os.path.join(prev, sorted(os.listdir(prev))[-1]), os.path.join(rep, f"preview_{m}.png"))
    # FROC curves at the smallest labelled size, seed 0
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, task in zip(axes, TASKS):
        for m in all_methods:
            c = results.get(f"{task}_{m}_n{sizes[0]}_s0", {}).get("froc_curve") or {}
            fps, sens = np.asarray(c.get("fp_per_scan", []), float), np.asarray(c.get("sensitivity", []), float)
            ok = np.isfinite(fps) & np.isfinite(sens) & (fps > 0)
            if ok.any():
                ax.plot(fps[ok], sens[ok], label=m)
        ax.set_xscale("log")
        ax.set_xlabel("false positives per scan")
        ax.set_ylabel("sensitivity")
        ax.set_title(f"FROC ({task}), {sizes[0]} labelled", fontsize=9)
        ax.legend(fontsize=7)
    save(fig, "froc_curves.png")
    return md


main = cli_entry(run, build_parser)

if __name__ == "__main__":
    main()
