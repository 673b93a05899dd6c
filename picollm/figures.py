"""Figures for reports and fits, drawn with matplotlib's object API: no pyplot state and no
display, so they are safe in any process (a training run, a sweep worker, a test)."""

from __future__ import annotations

from pathlib import Path
from typing import Union

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

DPI = 120


def new_figure(**kw) -> Figure:
    """A Figure on an Agg canvas, laid out tight so labels of neighbouring panels never overlap."""
    fig = Figure(layout="tight", **kw)
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Figure, path: Union[str, Path]) -> Path:
    """``fig`` as a PNG at ``path`` (its folder created), cropped to what was drawn."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    return path
