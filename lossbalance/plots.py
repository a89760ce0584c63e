"""Figures of training runs (needs matplotlib: ``pip install 'lossbalance[plots]'``).

Every function takes :class:`~lossbalance.demo.RunResult` objects (anything with ``label``,
``history``, ``error``, ``points``, ``abs_error``), returns a ``matplotlib.figure.Figure`` and,
given a ``path``, saves it there. No pyplot state is touched and no backend is selected, so
the functions are safe in scripts, servers and notebooks alike.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Sequence

try:
    import matplotlib  # noqa: F401
    from matplotlib.figure import Figure
except ImportError:  # pragma: no cover - depends on the environment
    raise ImportError(
        "lossbalance.plots needs matplotlib: pip install 'lossbalance[plots]'"
    ) from None

__all__ = ["plot_weights", "plot_losses", "plot_error_fields", "save_figures"]

PathLike = str | os.PathLike


def _terms(results: Sequence[Any], key: str) -> list[str]:
    names: list[str] = []
    for result in results:
        for record in result.history:
            for name in record[key]:
                if name not in names:
                    names.append(name)
    return names


def _series(results: Sequence[Any], key: str, title: str, ylabel: str, path: PathLike | None) -> Figure:
    """One panel per term, one line per run, log y."""
    names = _terms(results, key) or ["(none)"]
    cols = min(len(names), 3)
    rows = math.ceil(len(names) / cols)
    fig = Figure(figsize=(4.2 * cols, 3.2 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False, sharex=True)
    for ax, name in zip(axes.flat, names):
        for result in results:
            points = [(r["step"], r[key][name]) for r in result.history if name in r[key]]
            points = [(s, v) for s, v in points if v > 0 and math.isfinite(v)]
            if points:
                steps, values = zip(*points)
                ax.plot(steps, values, label=result.label, linewidth=1.2)
        ax.set_yscale("log")
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="major", alpha=0.3)
    for ax in list(axes.flat)[len(names):]:
        ax.set_visible(False)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    if handles:
        axes.flat[0].legend(handles, labels, fontsize="small")
    fig.suptitle(title)
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


def plot_weights(results: Sequence[Any], path: PathLike | None = None, *, title: str = "Loss weights") -> Figure:
    """Each term's weight over the steps, one panel per term, one line per run (log y)."""
    return _series(results, "weights", title, "weight", path)


def plot_losses(results: Sequence[Any], path: PathLike | None = None, *,
                title: str = "Loss terms (unweighted)") -> Figure:
    """Each term's (unweighted) loss over the steps, one panel per term, one line per run (log y)."""
    return _series(results, "losses", title, "loss", path)


def _grid(points: list[list[float]], values: list[float]):
    """``(axis0, axis1, field[i0][i1])`` if the 2-D points form a full grid, else ``None``."""
    axis0 = sorted({p[0] for p in points})
    axis1 = sorted({p[1] for p in points})
    if len(axis0) * len(axis1) != len(points):
        return None
    index0 = {v: i for i, v in enumerate(axis0)}
    index1 = {v: i for i, v in enumerate(axis1)}
    field = [[math.nan] * len(axis1) for _ in axis0]
    for (a, b), value in zip(points, values):
        field[index0[a]][index1[b]] = value
    return axis0, axis1, field


def plot_error_fields(results: Sequence[Any], path: PathLike | None = None, *,
                      title: str = "|u - u*| on the evaluation grid",
                      axis_labels: tuple[str, str] = ("x", "y")) -> Figure:
    """``|u - u*|`` of every run, one panel each, on one colour scale.

    2-D problems: an image over the grid (first coordinate horizontal); 1-D problems: a curve.
    """
    runs = [r for r in results if r.points is not None and r.abs_error is not None]
    if not runs:
        raise ValueError("no run carries an error field (points / abs_error)")
    top = max((max(r.abs_error) for r in runs if r.abs_error), default=1.0)
    top = top if math.isfinite(top) and top > 0 else 1.0
    dim = len(runs[0].points[0]) if runs[0].points else 1
    cols = min(len(runs), 3)
    rows = math.ceil(len(runs) / cols)
    fig = Figure(figsize=(4.4 * cols, 3.8 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    image = None
    for ax, run in zip(axes.flat, runs):
        ax.set_title(f"{run.label}: rel. L2 {run.error:.3g}")
        if dim == 1:
            order = sorted(range(len(run.points)), key=lambda i: run.points[i][0])
            ax.plot([run.points[i][0] for i in order], [run.abs_error[i] for i in order])
            ax.set_ylim(0, top * 1.05)
            ax.set_xlabel(axis_labels[0])
            continue
        grid = _grid(run.points, run.abs_error)
        if grid is None:
            image = ax.scatter([p[0] for p in run.points], [p[1] for p in run.points], c=run.abs_error,
                               s=4, vmin=0, vmax=top, cmap="viridis")
        else:
            axis0, axis1, field = grid
            transposed = [list(row) for row in zip(*field)]  # rows: second coordinate
            image = ax.imshow(transposed, origin="lower", aspect="auto", cmap="viridis", vmin=0, vmax=top,
                              extent=(axis0[0], axis0[-1], axis1[0], axis1[-1]), interpolation="nearest")
        ax.set_xlabel(axis_labels[0])
        ax.set_ylabel(axis_labels[1])
    for ax in list(axes.flat)[len(runs):]:
        ax.set_visible(False)
    if image is not None:
        fig.colorbar(image, ax=axes.ravel().tolist(), label="|u - u*|")
    fig.suptitle(title)
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


def save_figures(results: Sequence[Any], out: PathLike, *, prefix: str = "",
                 axis_labels: tuple[str, str] = ("x", "y")) -> list[Path]:
    """``weights.png``, ``losses.png`` and ``error_fields.png`` in ``out`` (created); their paths."""
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{prefix}{name}.png" for name in ("weights", "losses", "error_fields")]
    plot_weights(results, paths[0])
    plot_losses(results, paths[1])
    if any(r.points is not None for r in results):
        plot_error_fields(results, paths[2], axis_labels=axis_labels)
    else:
        paths.pop()
    return paths
