"""Figures drawn in their own style, independent of global matplotlib / seaborn state.

nnU-Net's progress plot (``nnunetv2/training/logging/nnunet_logger.py``, ``plot_progress_png``) calls
``seaborn.set(font_scale=2.5)``, which rewrites matplotlib's *global* ``rcParams``; every figure drawn later in
the same process inherits 2.5× fonts and seaborn's grid theme, so legends cover the data and labels are
clipped. Every nnpre figure is therefore built and saved inside :func:`figure_style`, which starts from
matplotlib's own defaults (``matplotlib.style.context("default")``, built on ``rc_context``) and applies
explicit font sizes; the global state is restored on exit, whatever it was.

Figures use matplotlib's object API (``Figure`` + Agg canvas): no pyplot, no global backend switch, and no
figure left registered with pyplot.

Example::

    from nnpre.plotting import figure_style, new_figure, save_figure, legend_outside

    with figure_style():
        fig = new_figure(5, 3.5)
        ax = fig.add_subplot(1, 1, 1)
        ax.plot([1, 2], [0.3, 0.5], "-o", label="scratch")
        legend_outside(ax)
        save_figure(fig, "out.png")
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Mapping, Optional

#: Explicit sizes (points) applied on top of matplotlib's defaults; chosen for figures 4-12 inches wide
#: saved at 100 dpi (readable when shown at 100 %).
STYLE: Mapping[str, object] = {
    "font.size": 9.0,
    "axes.titlesize": 10.0,
    "axes.labelsize": 9.0,
    "xtick.labelsize": 8.0,
    "ytick.labelsize": 8.0,
    "legend.fontsize": 8.0,
    "figure.titlesize": 11.0,
    "lines.linewidth": 1.5,
    "lines.markersize": 5.0,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "legend.frameon": False,
    "figure.dpi": 100.0,
    "savefig.dpi": 100.0,
    "savefig.facecolor": "white",
}


@contextlib.contextmanager
def figure_style(rc: Optional[Mapping[str, object]] = None) -> Iterator[None]:
    """Context in which figures are created *and saved*: matplotlib defaults + :data:`STYLE` + ``rc``.

    ``rc``: extra rcParams, e.g. ``{"font.size": 10}``. Global rcParams (e.g. seaborn's ``font_scale``) do
    not leak in, and nothing set here leaks out.
    """
    import matplotlib.style

    with matplotlib.style.context(["default", {**STYLE, **dict(rc or {})}]):
        yield


def new_figure(width: float, height: float, constrained: bool = True):
    """A ``matplotlib.figure.Figure`` of ``width`` × ``height`` inches with an Agg canvas (call inside
    :func:`figure_style`). ``constrained``: matplotlib's constrained layout, which keeps axis labels, titles
    and outside legends inside the canvas."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained" if constrained else None)
    FigureCanvasAgg(fig)
    return fig


def legend_outside(ax, title: Optional[str] = None):
    """Legend to the right of ``ax`` (outside the data area, so it can never cover a curve); returns it, or
    None when ``ax`` has no labelled artist."""
    handles, labels = ax.get_legend_handles_labels()
    if not handles:
        return None
    return ax.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, title=title)


def save_figure(fig, path: str, dpi: Optional[float] = None) -> None:
    """Write ``fig`` as PNG to ``path`` atomically (call inside :func:`figure_style`)."""
    from nnpre.atomic import write_with

    write_with(lambda tmp: fig.savefig(tmp, format="png", dpi=dpi or "figure"), path)
