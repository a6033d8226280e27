"""The pretraining study as a library: grid (:mod:`.grid`), runner (:mod:`.runner`), segmentation components
scored as detections (:mod:`.components`) and report (:mod:`.report`). ``nnPre_demo`` is its command line.

Example::

    from nnpre.study import BUDGETS, StudyConfig, StudyGrid, run_study, write_report

    cfg = StudyConfig("study_out", "cpu-tiny", BUDGETS["cpu-tiny"],
                      StudyGrid(methods=("mae",), labelled=(2, 8), adapters=("full", "lora")))
    res = run_study(cfg)
    write_report(cfg.out, res.records, cfg.grid, cfg.budget, cfg.preset, res.stage_seconds, res.wall_seconds)
"""
from nnpre.study.components import evaluate_segmentation_components, segmentation_components
from nnpre.study.grid import (
    BUDGETS,
    DEFAULT_ADAPTERS,
    DEFAULT_METHODS,
    DETECTION_UNSUPPORTED,
    STEP_TIMES,
    TASKS,
    Run,
    StepTimes,
    StudyBudget,
    StudyGrid,
    arm_label,
    available_methods,
    describe,
    estimate,
    parse_adapters,
    parse_labelled,
    parse_methods,
)
from nnpre.study.report import aggregate, parameter_rows, write_report
from nnpre.study.runner import StudyConfig, StudyResult, run_study

__all__ = [
    "BUDGETS", "DEFAULT_ADAPTERS", "DEFAULT_METHODS", "DETECTION_UNSUPPORTED", "STEP_TIMES", "TASKS", "Run",
    "StepTimes", "StudyBudget", "StudyConfig", "StudyGrid", "StudyResult", "aggregate", "arm_label",
    "available_methods", "describe", "estimate", "evaluate_segmentation_components", "parameter_rows",
    "parse_adapters", "parse_labelled", "parse_methods", "run_study", "segmentation_components", "write_report",
]
