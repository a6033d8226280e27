"""PNG plots of the detection metrics: FROC curves and precision-recall curves.

Uses matplotlib's object API with the Agg canvas (no pyplot, no global backend change); each figure is built and
saved inside :func:`nnpre.plotting.figure_style` (explicit font sizes, independent of global matplotlib /
seaborn state such as nnU-Net's ``font_scale=2.5``) and written atomically. ``froc_figure`` /
``precision_recall_figure`` build the figures (call them inside ``figure_style``); ``plot_froc`` /
``plot_precision_recall`` build and save them.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from nnpre.plotting import figure_style, legend_outside, new_figure, save_figure


def plot_froc(curves: Mapping, iou_thresholds: Sequence[float], fpi_thresholds: Sequence[float], path: str,
              title: str = "FROC") -> None:
    """FROC plot: the full curve (line) and the seven sampled sensitivities (markers) per IoU.

    Args:
        curves: ``compute_froc`` curves (keys ``FROC_curve_IoU_t`` and ``FROC_full_curve_IoU_t``).
        iou_thresholds: IoUs to draw.
        fpi_thresholds: FP/scan sample points (x axis, log2 scale).
        path: output PNG.
        title: figure title.
    """
    with figure_style():
        save_figure(froc_figure(curves, iou_thresholds, fpi_thresholds, title), path)


def froc_figure(curves: Mapping, iou_thresholds: Sequence[float], fpi_thresholds: Sequence[float],
                title: str = "FROC"):
    """The figure of :func:`plot_froc` (call inside :func:`nnpre.plotting.figure_style`)."""
    fig = new_figure(7.0, 4.5)
    ax = fig.add_subplot(1, 1, 1)
    for t in iou_thresholds:
        pts = np.asarray(curves[f"FROC_curve_IoU_{t:.2f}"], dtype=float)
        full = curves.get(f"FROC_full_curve_IoU_{t:.2f}", {})
        fps, sens = np.asarray(full.get("fp_per_scan", []), float), np.asarray(full.get("sensitivity", []), float)
        line = ax.plot(fpi_thresholds, pts, "o", label=f"IoU {t:.2f}: FROC {np.mean(pts):.3f}")[0]
        ok = fps > 0
        if ok.any():
            ax.plot(fps[ok], sens[ok], "-", color=line.get_color(), alpha=0.7)
    ax.set_xscale("log", base=2)
    ax.set_xlim(min(fpi_thresholds) / 1.5, max(fpi_thresholds) * 1.5)
    ax.set_xticks(list(fpi_thresholds))
    ax.set_xticklabels([f"{v:g}" for v in fpi_thresholds])
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("false positives per scan")
    ax.set_ylabel("sensitivity")
    ax.grid(True, alpha=0.3)
    ax.set_title(title)
    legend_outside(ax)
    return fig


def plot_precision_recall(pr_curves: Mapping[str, Mapping[str, Mapping[str, np.ndarray]]], ap: Mapping[str, float],
                          path: str, max_detections: int = 100) -> None:
    """Precision-recall curves (precision envelope) per class, one panel per IoU.

    Args:
        pr_curves: ``{"pr_curve_IoU_t": {class: {"recall", "precision"}}}`` from ``compute_coco``.
        ap: metric dict holding ``{class}_AP_IoU_t_MaxDet_m`` for the legend.
        path: output PNG.
        max_detections: MaxDet used in the AP keys.
    """
    with figure_style():
        save_figure(precision_recall_figure(pr_curves, ap, max_detections), path)


def precision_recall_figure(pr_curves: Mapping[str, Mapping[str, Mapping[str, np.ndarray]]],
                            ap: Mapping[str, float], max_detections: int = 100):
    """The figure of :func:`plot_precision_recall` (call inside :func:`nnpre.plotting.figure_style`)."""
    keys = list(pr_curves)
    fig = new_figure(6.0 * max(1, len(keys)), 4.5)
    for i, key in enumerate(keys):
        ax = fig.add_subplot(1, max(1, len(keys)), i + 1)
        iou = key.rsplit("_", 1)[-1]
        for cls, cur in pr_curves[key].items():
            rc, pr = np.asarray(cur["recall"], float), np.asarray(cur["precision"], float)
            value = ap.get(f"{cls}_AP_IoU_{iou}_MaxDet_{max_detections}", float("nan"))
            # step curve from recall 0, as sampled by the 101-point interpolation
            ax.step(np.r_[0.0, rc], np.r_[pr[:1] if len(pr) else [0.0], pr], where="pre",
                    label=f"class {cls}: AP {value:.3f}")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("recall")
        ax.set_ylabel("precision")
        ax.set_title(f"precision-recall, IoU {iou}")
        ax.grid(True, alpha=0.3)
        legend_outside(ax)
    return fig
