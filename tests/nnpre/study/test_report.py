"""Report: aggregation over seeds, detection tables (mean ± std), verdict text, written files."""
import json

import numpy as np
import pytest

from nnpre.study.grid import BUDGETS, StudyGrid
from nnpre.study.report import aggregate, mean_std, report_markdown, verdict_lines, write_report


def _records(grid, det_ap):
    rec = {}
    for r in grid.runs():
        rec[r.name] = {"dice": 0.3 + 0.01 * r.labelled, "AP_IoU_0.10": det_ap(r), "FROC_IoU_0.10": 0.5,
                       "train_losses": [1.0, 0.9], "froc_curve": {"fp_per_scan": [0.5, 2], "sensitivity": [0.2, 0.4]}}
    for m in grid.methods:
        rec[f"pretrain_{m}"] = {"train_losses": [2.0, 1.0]}
    return rec


def test_detection_rows_mean_and_std_over_seeds(tmp_path):
    grid = StudyGrid(methods=("mae",), labelled=(2, 8), seeds=3)
    # Retina U-Net AP: mae beats scratch by 0.1 with 2 labels, by 0.05 with 8; seeds spread by ±0.1
    ap = {"scratch": 0.4, "mae": 0.5}
    rec = _records(grid, lambda r: ap[r.method] - (0.05 if r.method == "mae" and r.labelled == 8 else 0.0)
                   + 0.1 * (r.seed - 1))
    rec.pop("det_scratch_n8_s2")  # a missing run is skipped, not counted as 0
    table = aggregate(rec, grid)
    assert table["det"]["AP_IoU_0.10"]["mae"][2] == [0.4, 0.5, 0.6]
    assert table["det"]["AP_IoU_0.10"]["scratch"][8][2] is None
    md = report_markdown(table, grid, BUDGETS["cpu-tiny"], "cpu-tiny", 60.0)
    sd = np.std([0.4, 0.5, 0.6])
    assert "## Detection (Retina U-Net): AP @ IoU 0.1" in md and "## Detection (Retina U-Net): FROC @ IoU 0.1" in md
    assert f"| mae | 0.500 ± {sd:.3f} | 0.450 ± {sd:.3f} |" in md
    assert "| scratch | 0.400 ± 0.082 | 0.350 ± 0.050 |" in md
    assert "AP @ IoU 0.1 of its connected components" in md
    lines = verdict_lines(table, grid)
    det = [x for x in lines if x.startswith("- Detection (Retina U-Net), mae")][0]
    assert "2 labelled +0.100" in det and "better than scratch at every size" in det
    assert "largest with the fewest" in det
    assert mean_std([None, None]) == "n/a" and mean_std([0.25]) == "0.250"


def test_write_report_files(tmp_path):
    grid = StudyGrid(methods=("mae", "mg"), labelled=(1,), seeds=1)
    rec = _records(grid, lambda r: 0.3)
    md = write_report(str(tmp_path), rec, grid, BUDGETS["cpu-tiny"], "cpu-tiny", 120.0, 30.0)
    rep = tmp_path / "report"
    assert (rep / "report.md").read_text() == md and "reused from an earlier one" in md
    res = json.loads((rep / "results.json").read_text())
    assert res["methods"] == ["scratch", "mae", "mg"] and res["table"]["det"]["AP_IoU_0.10"]["mg"]["1"] == [0.3]
    for name in ("seg_dice_vs_labelled.png", "seg_AP_IoU_0.10_vs_labelled.png", "det_AP_IoU_0.10_vs_labelled.png",
                 "det_FROC_IoU_0.10_vs_labelled.png", "loss_curves.png", "froc_curves.png"):
        assert (rep / name).stat().st_size > 5000, name


# ------------------------------------------------------------------------------------------------ adapter arms
def _adapter_records(grid, tmp_path):
    """Fabricated results: Dice full 0.40, lora 0.35, probe-linear 0.20, probe-mlp 0.25, scratch 0.30 (+0.1 with 8
    labels, ±0.02 over seeds); Retina U-Net AP 0.5 everywhere. Parameter counts in the record for most arms, in
    the run folder's adapter.json only for the detection probe (the report reads both)."""
    import os

    dice = {"full": 0.40, "lora": 0.35, "probe-linear": 0.20, "probe-mlp": 0.25}
    counts = {"full": (1000, 1000, 0), "lora": (300, 1100, 100), "probe-linear": (20, 920, 20),
              "probe-mlp": (200, 1100, 200)}
    rec = _records(grid, lambda r: 0.5)
    for r in grid.runs():
        base = 0.30 if r.method == "scratch" else dice[r.adapter]
        rec[r.name]["dice"] = base + (0.1 if r.labelled == 8 else 0.0) + 0.02 * (2 * r.seed - 1)
        trainable, total, added = counts[r.adapter]
        params = {"adapter": r.adapter, "options": {}, "trainable": trainable, "total": total,
                  "trainable_share": trainable / total, "added": added, "added_share": added / (total - added)}
        if r.task == "det" and r.adapter == "probe-linear":
            folder = tmp_path / r.name
            os.makedirs(folder)
            (folder / "adapter.json").write_text(json.dumps({**params, "frozen": total - trainable}))
            rec[r.name]["folder"] = str(folder)
        else:
            rec[r.name]["params"] = params
    return rec


def test_adapter_arms_in_tables_parameters_and_verdicts(tmp_path):
    from nnpre.study.report import adapter_verdict_lines, parameter_rows

    grid = StudyGrid(methods=("mae",), labelled=(2, 8), seeds=2, adapters=("full", "lora", "probe-linear",
                                                                           "probe-mlp"))
    rec = _adapter_records(grid, tmp_path)
    table = aggregate(rec, grid)
    assert list(table["seg"]["dice"]) == ["scratch", "mae", "mae+lora", "mae+probe-linear", "mae+probe-mlp"]
    assert list(table["det"]["AP_IoU_0.10"]) == ["scratch", "mae", "mae+lora", "mae+probe-linear"]
    assert table["seg"]["dice"]["mae+lora"][8] == pytest.approx([0.43, 0.47])
    params = parameter_rows(rec, grid)
    assert params["seg"]["mae+lora"]["trainable"] == 300 and params["seg"]["scratch"]["trainable"] == 1000
    assert params["det"]["mae+probe-linear"]["trainable"] == 20  # read from the run folder's adapter.json
    assert "mae+probe-mlp" not in params["det"]
    md = report_markdown(table, grid, BUDGETS["cpu-tiny"], "cpu-tiny", 60.0, params=params)
    assert "| mae+lora | 0.350 ± 0.020 | 0.450 ± 0.020 |" in md
    assert "| mae+probe-linear | 0.200 ± 0.020 | 0.300 ± 0.020 |" in md
    det_ap = md.split("## Detection (Retina U-Net): AP @ IoU 0.1")[1].split("##")[0]
    assert "| mae+lora | 0.500 ± 0.000 |" in det_ap and "probe-mlp" not in det_ap
    assert "## Trainable parameters per arm" in md
    assert "| seg | mae+lora | 300 | 1,100 | 27.27 % | 100 (10.00 %) |" in md
    assert "| det | mae+probe-linear | 20 | 920 | 2.17 % | 20 (2.22 %) |" in md
    assert "no detection arms for adapter probe-mlp" in md and "`lora`: encoder frozen" in md
    lines = adapter_verdict_lines(table, grid)
    lora = [x for x in lines if x.startswith("- Segmentation (nnU-Net), mae+lora:")][0]
    assert "dice vs mae (full) 2 labelled -0.050, 8 labelled -0.050 (below full fine-tuning at every size)" in lora
    assert any(x.startswith("- Detection (Retina U-Net), mae+lora:") and "(equal to full" in x for x in lines)
    assert "## Do the adapters match full fine-tuning?" in md
    # every pretrained arm is also compared with scratch
    assert "- Segmentation (nnU-Net), mae+probe-linear: dice vs scratch 2 labelled -0.100" in md
    # without a full arm there is nothing to compare with
    only_lora = StudyGrid(methods=("mae",), labelled=(2, 8), seeds=2, adapters=("lora",))
    assert adapter_verdict_lines(aggregate(rec, only_lora), only_lora) == []


def test_default_report_has_no_adapter_sections():
    grid = StudyGrid(methods=("mae",), labelled=(2, 8))
    rec = _records(grid, lambda r: 0.4)
    md = report_markdown(aggregate(rec, grid), grid, BUDGETS["cpu-tiny"], "cpu-tiny", 60.0)
    assert "Trainable parameters" not in md and "match full fine-tuning" not in md and "Arms:" not in md


def test_write_report_with_adapter_arms(tmp_path):
    grid = StudyGrid(methods=("mae", "mg"), labelled=(2, 8), seeds=2, adapters=("full", "lora", "probe-mlp"))
    rec = _adapter_records(grid, tmp_path)
    write_report(str(tmp_path), rec, grid, BUDGETS["cpu-tiny"], "cpu-tiny", 120.0)
    res = json.loads((tmp_path / "report" / "results.json").read_text())
    assert res["adapters"] == ["full", "lora", "probe-mlp"]
    assert res["arms"]["det"] == ["scratch", "mae", "mae+lora", "mg", "mg+lora"]
    assert res["params"]["seg"]["mg+probe-mlp"]["trainable"] == 200
    assert res["table"]["seg"]["dice"]["mg+lora"]["2"] == pytest.approx([0.33, 0.37])
    for name in ("seg_dice_vs_labelled.png", "det_AP_IoU_0.10_vs_labelled.png", "loss_curves.png",
                 "froc_curves.png"):
        assert (tmp_path / "report" / name).stat().st_size > 5000, name


def test_arm_figures_colour_by_method_style_by_adapter():
    from nnpre.plotting import figure_style
    from nnpre.study.report import froc_figure, metric_figure

    grid = StudyGrid(methods=("mae", "mg"), labelled=(2, 8), seeds=2, adapters=("full", "lora"))
    rec = _records(grid, lambda r: 0.5)
    with figure_style():
        ax = metric_figure(aggregate(rec, grid), grid, "seg", "dice", "Dice").axes[0]
        lines = {c.get_label(): c.lines[0] for c in ax.containers}  # errorbar: one container per arm
        assert list(lines) == ["scratch", "mae", "mae+lora", "mg", "mg+lora"]
        assert lines["mae"].get_color() == lines["mae+lora"].get_color() != lines["mg"].get_color()
        assert lines["mae"].get_linestyle() != lines["mae+lora"].get_linestyle()
        assert lines["mae"].get_marker() != lines["mae+lora"].get_marker()  # apart also as single points
        assert lines["mg"].get_linestyle() == lines["mae"].get_linestyle()
        froc = froc_figure(rec, grid)
        assert [ln.get_label() for ln in froc.axes[1].get_lines()] == ["scratch", "mae", "mae+lora", "mg",
                                                                      "mg+lora"]


def test_versus_full_verdicts():
    from nnpre.study.report import _versus_full

    assert _versus_full([0.1, 0.2]) == "better than full fine-tuning at every size"
    assert _versus_full([0.0001, -0.0002]) == "equal to full fine-tuning at every size"  # ties as printed
    assert _versus_full([0.0, 0.2]) == "at least as good as full fine-tuning at every size"
    assert _versus_full([-0.1, -0.2]) == "below full fine-tuning at every size"
    assert _versus_full([-0.1, 0.0]) == "not better than full fine-tuning at any size"
    assert _versus_full([-0.1, 0.1]) == "mixed"
    assert _versus_full([float("nan"), 0.1]) == "values missing"
