"""Figures keep their own style after nnU-Net's progress plot changed the global matplotlib / seaborn state."""
import matplotlib
import numpy as np

from nnpre.plotting import STYLE, figure_style, legend_outside, new_figure, save_figure


def _run_nnunet_progress_plot(folder):
    """nnU-Net's own progress plot (2.8.1: ``LocalLogger``, what ``nnUNetLogger`` was) on a tiny fake log: it calls
    seaborn.set(font_scale=2.5) globally."""
    from nnunetv2.training.logging.nnunet_logger import LocalLogger

    log = LocalLogger()
    for e in range(3):
        for k, v in (("mean_fg_dice", 0.1 * e), ("ema_fg_dice", 0.1 * e), ("dice_per_class_or_region", [0.1]),
                     ("train_losses", 1.0 - 0.1 * e), ("val_losses", 1.1 - 0.1 * e), ("lrs", 0.01),
                     ("epoch_start_timestamps", float(e)), ("epoch_end_timestamps", e + 0.5)):
            log.log(k, v, e)
    log.plot_progress_png(str(folder))
    assert (folder / "progress.png").is_file()


def _tick_labels(axis):
    """Tick labels matplotlib draws: those of ticks inside the view interval."""
    lo, hi = sorted(axis.get_view_interval())
    tol = 1e-9 * max(1.0, abs(hi - lo))
    ticks = axis.get_major_ticks() + axis.get_minor_ticks()
    return [t.label1 for t in ticks if lo - tol <= t.get_loc() <= hi + tol and t.label1.get_text()]


def _texts(fig):
    out = []
    for ax in fig.axes:
        out += [ax.title, ax.xaxis.label, ax.yaxis.label, *_tick_labels(ax.xaxis), *_tick_labels(ax.yaxis)]
        if ax.get_legend() is not None:
            out += list(ax.get_legend().get_texts())
    return [t for t in out if t.get_text()]


def _check_readable(fig):
    """Explicit font sizes, legend clear of every data point, every text inside the canvas, x tick labels apart."""
    fig.canvas.draw()
    r = fig.canvas.get_renderer()
    canvas = fig.bbox
    allowed = {float(STYLE[k]) for k in ("axes.titlesize", "axes.labelsize", "xtick.labelsize", "ytick.labelsize",
                                         "legend.fontsize")}
    for t in _texts(fig):
        assert t.get_fontsize() in allowed, (t.get_text(), t.get_fontsize())
        bb = t.get_window_extent(r)
        assert bb.x0 >= canvas.x0 - 1 and bb.x1 <= canvas.x1 + 1 and bb.y0 >= canvas.y0 - 1 \
            and bb.y1 <= canvas.y1 + 1, f"text {t.get_text()!r} clipped: {bb} vs {canvas}"
    n_legends = 0
    for ax in fig.axes:
        leg = ax.get_legend()
        if leg is None:
            continue
        n_legends += 1
        lb = leg.get_window_extent(r)
        for line in ax.get_lines():
            xy = np.column_stack(line.get_data()).astype(float)
            xy = xy[np.isfinite(xy).all(axis=1)]
            if not len(xy):
                continue
            pts = ax.transData.transform(xy)
            inside = (pts[:, 0] >= lb.x0) & (pts[:, 0] <= lb.x1) & (pts[:, 1] >= lb.y0) & (pts[:, 1] <= lb.y1)
            assert not inside.any(), f"legend {lb} covers data points {pts[inside]}"
        boxes = [t.get_window_extent(r) for t in _tick_labels(ax.xaxis)]
        for i, a in enumerate(boxes):
            assert not any(a.overlaps(b) for b in boxes[i + 1:]), "x tick labels overlap"
    assert n_legends > 0


def test_report_figure_after_nnunet_progress_plot(tmp_path):
    from nnpre.study.grid import StudyGrid
    from nnpre.study.report import aggregate, froc_figure, loss_figure, metric_figure

    _run_nnunet_progress_plot(tmp_path)
    assert matplotlib.rcParams["axes.labelsize"] > 2 * float(STYLE["axes.labelsize"])  # seaborn's scale is global
    before = dict(matplotlib.rcParams)

    grid = StudyGrid(methods=("mae", "mg", "diffusion"), labelled=(2, 8), seeds=3)
    rng = np.random.default_rng(0)
    records = {}
    for r in grid.runs():
        records[r.name] = {"dice": float(rng.uniform(0.2, 0.5)), "AP_IoU_0.10": float(rng.uniform(0, 1)),
                           "FROC_IoU_0.10": float(rng.uniform(0, 1)), "train_losses": list(rng.uniform(0.5, 1, 6)),
                           "froc_curve": {"fp_per_scan": [0.125, 0.5, 2, 8], "sensitivity": [0.1, 0.3, 0.6, 0.9]}}
    for m in grid.methods:
        records[f"pretrain_{m}"] = {"train_losses": [1.0, 0.8, 0.7]}
    table = aggregate(records, grid)
    with figure_style():
        figs = {"metric": metric_figure(table, grid, "det", "AP_IoU_0.10", "Detection (Retina U-Net): AP @ IoU 0.1"),
                "loss": loss_figure(records, grid), "froc": froc_figure(records, grid)}
        for name, fig in figs.items():
            _check_readable(fig)
            save_figure(fig, str(tmp_path / f"{name}.png"))
    for name in figs:
        assert (tmp_path / f"{name}.png").stat().st_size > 5000
    # the global state (seaborn's) is what it was: figure_style neither used nor changed it
    assert dict(matplotlib.rcParams) == before


def test_detection_metric_plots_after_seaborn_scale(tmp_path):
    import seaborn as sns

    from nnpre_detection.metrics.plots import froc_figure, precision_recall_figure

    sns.set(font_scale=2.5)
    try:
        fpi = [0.125, 0.25, 0.5, 1, 2, 4, 8]
        curves = {"FROC_curve_IoU_0.10": [0.2, 0.3, 0.4, 0.6, 0.7, 0.8, 0.9],
                  "FROC_full_curve_IoU_0.10": {"fp_per_scan": [0.1, 1, 10], "sensitivity": [0.2, 0.6, 0.95]}}
        pr = {"pr_curve_IoU_0.10": {"0": {"recall": np.linspace(0, 1, 11), "precision": np.linspace(1, 0.2, 11)}}}
        with figure_style():
            ap = {"0_AP_IoU_0.10_MaxDet_100": 0.5}
            for fig in (froc_figure(curves, [0.1], fpi), precision_recall_figure(pr, ap)):
                _check_readable(fig)
    finally:
        sns.reset_orig()


def test_figure_style_is_scoped_and_overridable(tmp_path):
    matplotlib.rcParams["font.size"] = 31.0
    try:
        with figure_style({"font.size": 12.0}):
            assert matplotlib.rcParams["font.size"] == 12.0
            assert matplotlib.rcParams["legend.fontsize"] == STYLE["legend.fontsize"]
            fig = new_figure(3, 2)
            ax = fig.add_subplot(1, 1, 1)
            assert legend_outside(ax) is None  # nothing labelled: no empty legend box
            ax.plot([0, 1], [0, 1], label="a")
            assert legend_outside(ax) is not None
            save_figure(fig, str(tmp_path / "a.png"))
        assert matplotlib.rcParams["font.size"] == 31.0
    finally:
        matplotlib.rcParams["font.size"] = 10.0
    assert (tmp_path / "a.png").stat().st_size > 0
