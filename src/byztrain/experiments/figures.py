"""The figure canvas every report draws on: matplotlib's Agg backend, no pyplot, so reports work headless,
in sweep workers and in tests."""

from __future__ import annotations

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

DPI = 120


def new_figure(figsize: tuple[float, float]) -> Figure:
    """A Figure drawn by the Agg backend, independent of pyplot's global state (safe in workers/tests)."""
    fig = Figure(figsize=figsize, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig
