"""Report: aggregation over seeds, detection tables (mean ± std), verdict text, written files."""
import json

import numpy as np

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
