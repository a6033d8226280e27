"""The study report: tables (mean ± std over seeds), the calibration check, verdict text and plots.

:func:`aggregate` turns stage records into ``table[task][metric][arm][labelled] = [value per seed]``, where an
arm is ``scratch``, a pretext method fine-tuned fully (``mae``) or with an adapter (``mae+lora``,
:func:`nnpre.study.grid.arm_label`); :func:`verdict_lines` reads the claim "pretraining beats scratch, most
with few labels" off that table, :func:`adapter_verdict_lines` whether each adapter arm matches full
fine-tuning of the same checkpoint, and :func:`parameter_rows` lists each arm's trainable parameters (from the
runs' ``adapter.json``). :func:`write_report` writes ``<out>/report/{report.md, results.json, *.png}``.
Every figure is drawn in :func:`nnpre.plotting.figure_style`, so global matplotlib / seaborn settings
(nnU-Net's progress plot sets seaborn's ``font_scale=2.5``) do not change it.
"""
from __future__ import annotations

import os
import shutil
from typing import Dict, List, Mapping, Optional, Sequence

import numpy as np

from nnpre.study.grid import DEFAULT_ADAPTERS, Run, StudyBudget, StudyGrid, arm_label

#: Scratch Dice gap between the largest and the smallest labelled set that counts as "well below".
CALIBRATION_GAP = 0.05
#: (task, metric key, title) rows of the report. The detection rows are nnDetection's metrics: AP at IoU 0.1
#: (COCO-style, MaxDet 100) and FROC (mean sensitivity at 1/8 ... 8 false positives per scan) at IoU 0.1.
REPORT_METRICS = (
    ("seg", "dice", "Segmentation (nnU-Net): lesion Dice"),
    ("seg", "AP_IoU_0.10", "Segmentation (nnU-Net) as detection: AP @ IoU 0.1 of its connected components"),
    ("seg", "FROC_IoU_0.10", "Segmentation (nnU-Net) as detection: FROC @ IoU 0.1 of its connected components"),
    ("det", "AP_IoU_0.10", "Detection (Retina U-Net): AP @ IoU 0.1"),
    ("det", "FROC_IoU_0.10", "Detection (Retina U-Net): FROC @ IoU 0.1"),
)
#: Rows the verdict reads: segmentation Dice and Retina U-Net AP @ IoU 0.1.
VERDICT_METRICS = (("seg", "dice"), ("det", "AP_IoU_0.10"))

#: What each adapter arm trains, for the report text (the adapters' own docstrings in
#: ``nnpre_trainers/adapters`` are the reference).
ADAPTER_SUMMARY = {
    "full": "every parameter trains (encoder, decoder, heads)",
    "lora": "encoder frozen, low-rank (LoRA) updates of its convolutions, decoder and heads train",
    "molre": "encoder frozen, K routed low-rank experts on its convolutions, decoder and heads train",
    "probe-linear": "encoder frozen; segmentation: only linear 1×1×1 heads per encoder stage (replacing the decoder) "
                    "train; detection: the UFPN decoder and the heads train",
    "probe-mlp": "encoder frozen, only small MLP heads per encoder stage (replacing the decoder) train; "
                 "segmentation only",
}
#: Line styles and markers of the adapters in the figures (colour = method; line style and marker = adapter, so
#: arms stay apart also where a curve is a single point: one labelled size, one epoch).
_LINESTYLES = ("-", "--", ":", "-.", (0, (3, 1, 1, 1)), (0, (5, 1)))
_MARKERS = ("o", "s", "^", "D", "v", "P")

Table = Dict[str, Dict[str, Dict[str, Dict[int, List[Optional[float]]]]]]


def aggregate(records: Mapping[str, dict], grid: StudyGrid) -> Table:
    """``table[task][metric][arm][labelled]`` = the metric of each seed (None where missing); arms in the grid's
    order (:meth:`~nnpre.study.grid.StudyGrid.arm_labels`: scratch, then each method with each adapter)."""
    table: Table = {}
    for task, metric, _ in REPORT_METRICS:
        if task not in grid.tasks:
            continue
        rows = table.setdefault(task, {}).setdefault(metric, {})
        for m, a in grid.arms(task):
            for n in grid.labelled:
                vals = [records.get(Run(task, m, n, s, a).name, {}).get(metric) for s in range(grid.seeds)]
                rows.setdefault(arm_label(m, a), {})[n] = vals
    return table


def parameter_rows(records: Mapping[str, dict], grid: StudyGrid) -> Dict[str, Dict[str, dict]]:
    """``rows[task][arm]`` = parameter counts of the arm's first run that has them (``Adapter.describe`` as the
    trainer wrote it to ``<run folder>/adapter.json``: trainable, total, trainable_share, added, added_share,
    options); read from the stage record, else from the run folder. Arms without counts are left out."""
    from nnpre.study.runner import adapter_params

    rows: Dict[str, Dict[str, dict]] = {}
    for task in grid.tasks:
        for m, a in grid.arms(task):
            for n in grid.labelled:
                found = None
                for s in range(grid.seeds):
                    rec = records.get(Run(task, m, n, s, a).name) or {}
                    found = rec.get("params") or (adapter_params(rec["folder"]) if rec.get("folder") else None)
                    if found:
                        break
                if found:
                    rows.setdefault(task, {})[arm_label(m, a)] = found
                    break
    return rows


def mean(values: Sequence[Optional[float]]) -> float:
    """Mean of the non-missing values (NaN if none)."""
    v = [x for x in values if x is not None]
    return float(np.mean(v)) if v else float("nan")


def mean_std(values: Sequence[Optional[float]]) -> str:
    """``"0.412 ± 0.020"`` over the non-missing values (population std, as numpy); one value alone; ``n/a``."""
    v = [x for x in values if x is not None]
    if not v:
        return "n/a"
    return f"{np.mean(v):.3f} ± {np.std(v):.3f}" if len(v) > 1 else f"{v[0]:.3f}"


def verdict_lines(table: Table, grid: StudyGrid) -> List[str]:
    """One line per (row, pretrained arm): the gain over scratch at each labelled size and what it says."""
    titles = {(t, m): title for t, m, title in REPORT_METRICS}
    lines = []
    for task, metric in VERDICT_METRICS:
        if task not in table:
            continue
        rows = table[task][metric]
        for arm in (a for a in rows if a != "scratch"):
            gains = [mean(rows[arm][n]) - mean(rows["scratch"][n]) for n in grid.labelled]
            parts = ", ".join(f"{n} labelled {'+' if d >= 0 else ''}{d:.3f}" for n, d in zip(grid.labelled, gains))
            verdict = "better than scratch at every size" if all(d > 0 for d in gains) else (
                "not better than scratch at any size" if all(not d > 0 for d in gains) else "mixed")
            most = ""
            if len(gains) > 1 and all(np.isfinite(gains)) and max(gains) > 0:
                most = ("; the gain is largest with the fewest labels" if gains[0] == max(gains)
                        else "; the gain is not largest with the fewest labels")
            lines.append(f"- {titles[(task, metric)].split(':')[0]}, {arm}: {metric} vs scratch {parts} "
                         f"({verdict}{most})")
    return lines


def adapter_verdict_lines(table: Table, grid: StudyGrid) -> List[str]:
    """One line per (row, method, adapter other than full): the difference to full fine-tuning of the same
    checkpoint at each labelled size; empty when the grid has no full arms to compare with."""
    if "full" not in grid.adapters:
        return []
    titles = {(t, m): title for t, m, title in REPORT_METRICS}
    lines = []
    for task, metric in VERDICT_METRICS:
        if task not in table:
            continue
        rows = table[task][metric]
        for m in grid.methods:
            for a in (a for a in grid.adapters if a != "full" and m in rows and arm_label(m, a) in rows):
                diff = [mean(rows[arm_label(m, a)][n]) - mean(rows[m][n]) for n in grid.labelled]
                parts = ", ".join(f"{n} labelled {'+' if d >= 0 else ''}{d:.3f}" for n, d in zip(grid.labelled, diff))
                lines.append(f"- {titles[(task, metric)].split(':')[0]}, {arm_label(m, a)}: {metric} vs {m} "
                             f"(full) {parts} ({_versus_full(diff)})")
    return lines


def _versus_full(diff: Sequence[float]) -> str:
    """Verdict on adapter − full differences per labelled size (rounded as printed: 3 decimals)."""
    if not all(np.isfinite(diff)):
        return "values missing"
    d = [round(float(x), 3) for x in diff]
    for test, text in ((lambda x: x > 0, "better than full fine-tuning at every size"),
                       (lambda x: x == 0, "equal to full fine-tuning at every size"),
                       (lambda x: x >= 0, "at least as good as full fine-tuning at every size"),
                       (lambda x: x < 0, "below full fine-tuning at every size"),
                       (lambda x: x <= 0, "not better than full fine-tuning at any size")):
        if all(test(x) for x in d):
            return text
    return "mixed"


def _count(v) -> str:
    return "n/a" if v is None else f"{int(v):,}"


def _share(v) -> str:
    return "n/a" if v is None else f"{100 * float(v):.2f} %"


def parameter_markdown(params: Dict[str, Dict[str, dict]]) -> List[str]:
    """Markdown table of :func:`parameter_rows`."""
    lines = ["| task | arm | trainable | of total | trainable share | added by the adapter (share of plain) |",
             "|---|---|---|---|---|---|"]
    for task, rows in params.items():
        for arm, d in rows.items():
            lines.append(f"| {task} | {arm} | {_count(d.get('trainable'))} | {_count(d.get('total'))} | "
                         f"{_share(d.get('trainable_share'))} | {_count(d.get('added'))} "
                         f"({_share(d.get('added_share'))}) |")
    return lines


def _calibration_text(difficulty: str) -> str:
    try:
        from nnpre.synthetic import SYNTH_CALIBRATION
    except ImportError:
        return "custom"
    return SYNTH_CALIBRATION.get(difficulty, "custom")


def _lr_lines(preset: str) -> List[str]:
    from nnpre.presets import get_preset
    from nnpre_trainers.finetune_schedule import PRETRAINED_LR, SCRATCH_LR

    scratch_lr, pretrained_lr = get_preset(preset).finetune_lr or (SCRATCH_LR, PRETRAINED_LR)
    if pretrained_lr < scratch_lr:
        return ["", "Pretrained runs follow the fine-tuning recipe's lower peak learning rate "
                f"({pretrained_lr:g} vs {scratch_lr:g} from scratch, see nnpre.presets) plus a decoder-only "
                "warm-up; in short runs that alone can favour scratch (compare the fine-tuning loss curves in "
                "loss_curves.png)."]
    return ["", f"Pretrained and scratch runs share the peak learning rate ({scratch_lr:g}, see nnpre.presets); "
            "pretrained runs add the decoder-only warm-up (first 5 % of iterations)."]


def report_markdown(table: Table, grid: StudyGrid, budget: StudyBudget, preset: str, seconds: float,
                    invocation_seconds: Optional[float] = None,
                    params: Optional[Dict[str, Dict[str, dict]]] = None) -> str:
    """The Markdown report (see module doc); ``seconds``: summed stage time, ``invocation_seconds``: this
    invocation's wall time (the text says when most stages were reused from an earlier invocation);
    ``params``: :func:`parameter_rows`, tabulated when the grid has adapter arms."""
    sizes, seeds = list(grid.labelled), grid.seeds
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
    several = tuple(grid.adapters) != DEFAULT_ADAPTERS
    if several:
        lines += ["Arms: `scratch` trains fully from a random initialisation; `<method>` is full fine-tuning of the "
                  "method's checkpoint; `<method>+<adapter>` fine-tunes the same checkpoint with an adapter "
                  "(`nnPre_train --adapter`, default options):", ""]
        lines += [f"- `{a}`: {ADAPTER_SUMMARY.get(a, 'see nnpre_trainers/adapters')}" for a in grid.adapters]
        lines += [f"- {n[len('note: '):] if n.startswith('note: ') else n}" for n in grid.skipped()]
        lines.append("")
    if "seg" in table:
        dice_scratch = {n: mean(table["seg"]["dice"]["scratch"][n]) for n in sizes}
        lines += ["## Calibration", "",
                  "The generator is calibrated so that scratch training with the fewest labels stays well below "
                  "training on all labelled cases (room for pretraining to help). Difficulty "
                  f"'{budget.difficulty}': {_calibration_text(budget.difficulty)}. This run, scratch lesion Dice: "
                  + ", ".join(f"{n} labelled {dice_scratch[n]:.3f}" for n in sizes) + ".", ""]
        gap = dice_scratch[sizes[-1]] - dice_scratch[sizes[0]] if len(sizes) > 1 else float("nan")
        if len(sizes) > 1 and not gap >= CALIBRATION_GAP:
            lines += [f"**Not calibrated in this run:** scratch with {sizes[0]} labelled cases is not well below "
                      f"(≥ {CALIBRATION_GAP} Dice) scratch with {sizes[-1]} (difference {gap:+.3f}): at this "
                      f"training length the models are limited by iterations rather than labels, so the comparison "
                      f"below says little about pretraining. Longer runs (`--finetune-epochs`, `--preset gpu`) are "
                      f"needed.", ""]
    for task, metric, title in REPORT_METRICS:
        if task not in table:
            continue
        lines += [f"## {title}", "", "| method | " + " | ".join(f"{n} labelled" for n in sizes) + " |",
                  "|---|" + "---|" * len(sizes)]
        for arm, row in table[task][metric].items():
            lines.append(f"| {arm} | " + " | ".join(mean_std(row[n]) for n in sizes) + " |")
        lines.append("")
    if several and params:
        lines += ["## Trainable parameters per arm", "",
                  "From each run's `adapter.json` (written by the trainer; every tensor counted once). Added = "
                  "parameters the adapter introduced, as a share of the plain network.", "",
                  *parameter_markdown(params), ""]
    lines += ["## Does pretraining beat scratch?", "", *verdict_lines(table, grid), *_lr_lines(preset)]
    adapter_lines = adapter_verdict_lines(table, grid)
    if adapter_lines:
        lines += ["", "## Do the adapters match full fine-tuning?", "", *adapter_lines]
    if seeds == 1:
        lines += ["", "Short CPU runs are noisy: with one seed, differences of a few points are within noise; use "
                  "`--seeds 3` (and `--preset gpu` for faithful training lengths) before drawing conclusions."]
    lines.append("")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------ plots
# Each *_figure function builds a matplotlib Figure; call it inside nnpre.plotting.figure_style() (fonts and
# sizes are fixed when the artists are created) and save it there too.
def arm_styles(grid: StudyGrid, task: str) -> Dict[str, dict]:
    """Matplotlib style per arm of ``task``: colour per method (scratch first), line style and marker per
    adapter (``full`` solid with circles)."""
    colours = {m: f"C{i}" for i, m in enumerate(grid.all_methods)}
    order = ["full", *(a for a in grid.adapters if a != "full")]
    style = {a: {"linestyle": _LINESTYLES[i % len(_LINESTYLES)], "marker": _MARKERS[i % len(_MARKERS)]}
             for i, a in enumerate(order)}
    return {arm_label(m, a): {"color": colours[m], **style[a]} for m, a in grid.arms(task)}


def metric_figure(table: Table, grid: StudyGrid, task: str, metric: str, title: str):
    """Mean over seeds (markers, line) with ± std error bars, per arm (colour = method, line style = adapter),
    against the labelled-set size."""
    from nnpre.plotting import legend_outside, new_figure

    sizes = list(grid.labelled)
    styles = arm_styles(grid, task)
    fig = new_figure(5.5, 3.5)
    ax = fig.add_subplot(1, 1, 1)
    for arm, row in table[task][metric].items():
        vals = [[x for x in row[n] if x is not None] for n in sizes]
        mu = [float(np.mean(v)) if v else np.nan for v in vals]
        sd = [float(np.std(v)) if len(v) > 1 else 0.0 for v in vals]
        ax.errorbar(sizes, mu, yerr=sd if grid.seeds > 1 else None, capsize=3, label=arm, **styles[arm])
    ax.set_xticks(sizes)
    ax.set_xlabel("labelled training cases")
    ax.set_ylabel(metric)
    ax.set_title(title.split(":")[0] + (f" (mean ± std, {grid.seeds} seeds)" if grid.seeds > 1 else ""))
    legend_outside(ax)
    return fig


def loss_figure(records: Mapping[str, dict], grid: StudyGrid):
    """Pretraining train loss (normalised to the first epoch) and fine-tuning train losses (smallest labelled
    size, seed 0)."""
    from matplotlib.ticker import MaxNLocator

    from nnpre.plotting import legend_outside, new_figure

    n0, k = grid.labelled[0], 1 + len(grid.tasks)
    fig = new_figure(4.2 * k, 3.4)
    axes = [fig.add_subplot(1, k, i + 1) for i in range(k)]
    for m in grid.methods:
        tr = np.asarray(records.get(f"pretrain_{m}", {}).get("train_losses") or [], float)
        if tr.size:
            axes[0].plot(np.arange(1, tr.size + 1), tr / tr[0], "-o", label=m)
    axes[0].set_title("pretraining: train loss / epoch 1")
    for ax, task in zip(axes[1:], grid.tasks):
        styles = arm_styles(grid, task)
        for m, a in grid.arms(task):
            tr = np.asarray(records.get(Run(task, m, n0, 0, a).name, {}).get("train_losses") or [], float)
            if tr.size:
                ax.plot(np.arange(1, tr.size + 1), tr, label=arm_label(m, a), **styles[arm_label(m, a)])
        ax.set_title(f"{task} fine-tuning, {n0} labelled: train loss")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
        legend_outside(ax)
    return fig


def froc_figure(records: Mapping[str, dict], grid: StudyGrid):
    """FROC curves (smallest labelled size, seed 0), one panel per task; x ticks at nnDetection's FROC sample
    points (1/8 ... 8 false positives per scan)."""
    from matplotlib.ticker import NullLocator

    from nnpre.plotting import legend_outside, new_figure
    from nnpre_detection.metrics.froc import FPI_THRESHOLDS

    n0 = grid.labelled[0]
    fig = new_figure(5.0 * len(grid.tasks), 3.4)
    for i, task in enumerate(grid.tasks):
        ax = fig.add_subplot(1, len(grid.tasks), i + 1)
        styles = arm_styles(grid, task)
        for m, a in grid.arms(task):
            c = records.get(Run(task, m, n0, 0, a).name, {}).get("froc_curve") or {}
            fps, sens = np.asarray(c.get("fp_per_scan", []), float), np.asarray(c.get("sensitivity", []), float)
            ok = np.isfinite(fps) & np.isfinite(sens) & (fps > 0)
            if ok.any():
                ax.plot(fps[ok], sens[ok], label=arm_label(m, a), **{**styles[arm_label(m, a)], "marker": None})
        ax.set_xscale("log", base=2)
        ax.set_xlim(FPI_THRESHOLDS[0] / 1.5, FPI_THRESHOLDS[-1] * 1.5)
        ax.set_xticks(list(FPI_THRESHOLDS), [f"{v:g}" for v in FPI_THRESHOLDS])
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("false positives per scan")
        ax.set_ylabel("sensitivity")
        ax.set_title(f"FROC ({task}), {n0} labelled")
        legend_outside(ax)
    return fig


def write_report(out: str, records: Mapping[str, dict], grid: StudyGrid, budget: StudyBudget, preset: str,
                 seconds: float, invocation_seconds: Optional[float] = None) -> str:
    """Write ``<out>/report/`` (``report.md``, ``results.json``, PNG plots, pretraining previews); returns the
    Markdown."""
    from nnpre.atomic import write_json, write_with
    from nnpre.plotting import figure_style, save_figure

    rep = os.path.join(out, "report")
    os.makedirs(rep, exist_ok=True)
    table = aggregate(records, grid)
    params = parameter_rows(records, grid)
    md = report_markdown(table, grid, budget, preset, seconds, invocation_seconds, params)

    def write_text(p: str) -> None:
        with open(p, "w", encoding="utf-8") as f:
            f.write(md)

    write_with(write_text, os.path.join(rep, "report.md"))
    write_json({"results": dict(records), "table": table, "budget": budget.to_dict(), "preset": preset,
                "methods": grid.all_methods, "adapters": list(grid.adapters),
                "arms": {t: grid.arm_labels(t) for t in grid.tasks}, "params": params,
                "labelled": list(grid.labelled), "seeds": grid.seeds},
               os.path.join(rep, "results.json"))
    with figure_style():
        for task, metric, title in REPORT_METRICS:
            if task in table:
                save_figure(metric_figure(table, grid, task, metric, title),
                            os.path.join(rep, f"{task}_{metric}_vs_labelled.png"))
        save_figure(loss_figure(records, grid), os.path.join(rep, "loss_curves.png"))
        save_figure(froc_figure(records, grid), os.path.join(rep, "froc_curves.png"))
    # reconstruction previews written by the pretraining trainer
    for m in grid.methods:
        prev = os.path.join(records.get(f"pretrain_{m}", {}).get("folder", ""), "previews")
        if os.path.isdir(prev) and os.listdir(prev):
            shutil.copyfile(os.path.join(prev, sorted(os.listdir(prev))[-1]), os.path.join(rep, f"preview_{m}.png"))
    return md
