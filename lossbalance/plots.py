"""Figures of training runs (needs matplotlib: ``pip install 'lossbalance[plots]'``).

Every function takes :class:`~lossbalance.demo.RunResult` objects (anything with ``label``,
``history``, ``error``, ``points``, ``abs_error``) -- :func:`plot_conflicts` also takes one
``balancer.history`` list -- returns a ``matplotlib.figure.Figure`` and, given a ``path``, saves
it there. No pyplot state is touched and no backend is selected, so
the functions are safe in scripts, servers and notebooks alike.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

try:
    import matplotlib  # noqa: F401
    from matplotlib.figure import Figure
except ImportError:  # pragma: no cover - depends on the environment
    raise ImportError(
        "lossbalance.plots needs matplotlib: pip install 'lossbalance[plots]'"
    ) from None

__all__ = [
    "plot_weights", "plot_losses", "plot_error_fields", "plot_conflicts", "plot_pointwise", "has_diagnostics", "has_pointwise",
    "save_figures",
]

PathLike = str | os.PathLike


def _ordered_keys(mappings: Iterable[Mapping[str, Any]]) -> list[str]:
    """The keys of all ``mappings``, each once, in the order they first appear."""
    return list(dict.fromkeys(key for mapping in mappings for key in mapping))


def _panels(count: int, size: tuple[float, float], **subplots: Any) -> tuple[Figure, Any]:
    """A figure of ``count`` panels of ``size`` inches, three to a row, and its axes grid."""
    cols = min(count, 3)
    rows = math.ceil(count / cols)
    fig = Figure(figsize=(size[0] * cols, size[1] * rows), layout="constrained")
    return fig, fig.subplots(rows, cols, squeeze=False, **subplots)


def _hide_unused(axes: Any, used: int) -> None:
    """Hide the panels after the first ``used``."""
    for ax in list(axes.flat)[used:]:
        ax.set_visible(False)


def _finish(fig: Figure, title: str, path: PathLike | None) -> Figure:
    """Title the figure and save it to ``path`` (if given)."""
    fig.suptitle(title)
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


def _log_line(ax: Any, points: list[tuple[float, float]], *, linewidth: float = 1.1, **style: Any) -> None:
    """Plot the points with a positive finite value (a log axis shows no others)."""
    points = [(s, v) for s, v in points if v > 0 and math.isfinite(v)]
    if points:
        steps, values = zip(*points)
        ax.plot(steps, values, linewidth=linewidth, **style)


def _series(results: Sequence[Any], key: str, title: str, ylabel: str, path: PathLike | None) -> Figure:
    """One panel per term, one line per run (runs with ``.history``, or one ``balancer.history``), log y."""
    runs = _runs(results, None)
    names = _ordered_keys(record[key] for _, history in runs for record in history) or ["(none)"]
    fig, axes = _panels(len(names), (4.2, 3.2), sharex=True)
    for ax, name in zip(axes.flat, names):
        for label, history in runs:
            points = [(r["step"], r[key][name]) for r in history if name in r[key]]
            _log_line(ax, points, linewidth=1.2, label=label or None)
        ax.set_yscale("log")
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="major", alpha=0.3)
    _hide_unused(axes, len(names))
    handles, labels = axes.flat[0].get_legend_handles_labels()
    if handles:
        axes.flat[0].legend(handles, labels, fontsize="small")
    return _finish(fig, title, path)


def plot_weights(results: Sequence[Any], path: PathLike | None = None, *, title: str = "Loss weights") -> Figure:
    """Each term's weight over the steps, one panel per term, one line per run (log y).
    ``results``: runs with ``.history`` (``RunResult``) or one ``balancer.history``."""
    return _series(results, "weights", title, "weight", path)


def plot_losses(results: Sequence[Any], path: PathLike | None = None, *,
                title: str = "Loss terms (unweighted)") -> Figure:
    """Each term's (unweighted) loss over the steps, one panel per term, one line per run (log y;
    values <= 0 and non-finite ones are not drawn). ``results``: as :func:`plot_weights`."""
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
    top = _largest_error(runs)
    dim = len(runs[0].points[0]) if runs[0].points else 1
    fig, axes = _panels(len(runs), (4.4, 3.8))
    image = None
    for ax, run in zip(axes.flat, runs):
        ax.set_title(f"{run.label}: rel. L2 {run.error:.3g}")
        if dim == 1:
            _error_curve(ax, run, top, axis_labels[0])
        else:
            image = _error_image(ax, run, top, axis_labels)
    _hide_unused(axes, len(runs))
    if image is not None:
        fig.colorbar(image, ax=axes.ravel().tolist(), label="|u - u*|")
    return _finish(fig, title, path)


def _largest_error(runs: Sequence[Any]) -> float:
    """The top of the shared colour scale: the largest ``|u - u*|`` (1 if none is positive and finite)."""
    finite = [e for r in runs for e in (r.abs_error or ()) if math.isfinite(e)]  # a diverged run's NaN is no top
    top = max(finite, default=1.0)
    return top if top > 0 else 1.0


def _error_curve(ax: Any, run: Any, top: float, xlabel: str) -> None:
    """A 1-D run's ``|u - u*|`` as a curve over the sorted points."""
    order = sorted(range(len(run.points)), key=lambda i: run.points[i][0])
    ax.plot([run.points[i][0] for i in order], [run.abs_error[i] for i in order])
    ax.set_ylim(0, top * 1.05)
    ax.set_xlabel(xlabel)


def _error_image(ax: Any, run: Any, top: float, axis_labels: tuple[str, str]) -> Any:
    """A 2-D run's ``|u - u*|``: an image on a full grid, else a scatter; returns the mappable."""
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
    return image


def _diagnosed(entry: Mapping[str, Any]) -> bool:
    """Whether one history entry carries conflict diagnostics."""
    return "cosine" in entry and "grad_norm" in entry


def has_diagnostics(history: Sequence[Mapping[str, Any]]) -> bool:
    """Whether some entry of ``history`` carries conflict diagnostics (``"cosine"``, ``"grad_norm"``)."""
    return any(_diagnosed(entry) for entry in history)


def _runs(history: Any, label: str | None) -> list[tuple[str, list[Mapping[str, Any]]]]:
    """``[(label, history)]`` from one history (a list of dicts) or from runs with ``history``."""
    items = list(history)
    if items and all(hasattr(item, "history") for item in items):
        return [(str(getattr(item, "label", f"run {i}")), list(item.history)) for i, item in enumerate(items)]
    if any(not isinstance(item, Mapping) for item in items):
        raise TypeError("the plot takes a history (a list of dicts, as balancer.history) or runs with .history")
    return [(label or "", items)]


def _diagnosed_runs(history: Any, label: str | None) -> list[tuple[str, list[Mapping[str, Any]]]]:
    """:func:`_runs` with only the diagnosed entries, runs without any left out; raises if none is left."""
    runs = [(name, [e for e in entries if _diagnosed(e)]) for name, entries in _runs(history, label)]
    runs = [(name, entries) for name, entries in runs if entries]
    if not runs:
        raise ValueError("no history entry carries diagnostics (grad_norm, cosine): record them with "
                         "diagnose_every= or a strategy that computes per-term gradients, and history=")
    return runs


def _edges(steps: list[float]) -> list[float]:
    """Cell edges around the (sorted, possibly irregular) steps: midpoints, half a gap outside."""
    if len(steps) == 1:
        return [steps[0] - 0.5, steps[0] + 0.5]
    mids = [(a + b) / 2 for a, b in zip(steps[:-1], steps[1:])]
    return [steps[0] - (mids[0] - steps[0]), *mids, steps[-1] + (steps[-1] - mids[-1])]


def plot_conflicts(history: Any, path: PathLike | None = None, *, title: str = "Gradient conflicts",
                   label: str | None = None, weighted: bool = True, cmap: str = "RdBu") -> Figure:
    """Conflict diagnostics over the steps: pairwise cosine similarities and gradient norms.

    ``history``: one run's history (``balancer.history`` or ``RunResult.history``: dicts with
    ``"step"`` and, on diagnosed steps, ``"grad_norm"`` ``{term: ||grad L_i||}`` and ``"cosine"``
    (K x K, in the entry's term order)), or a sequence of runs (objects with ``label`` and
    ``history``): one column each. Entries without diagnostics are left out.

    Top panel: a heat map, one row per term pair, x = step, colour = ``cos(grad L_i, grad L_j)``
    on ``[-1, 1]`` with a diverging colormap centred at 0 (``cmap``, default ``"RdBu"``: red =
    the terms pull against each other, blue = they agree); the title gives the share of
    diagnosed steps on which a pair conflicts (cosine < 0). Bottom panel: each term's gradient
    norm (unweighted, solid) and, with ``weighted`` and weights in the entries, the weighted norm
    ``lambda_i ||grad L_i||`` (dashed), on a log axis: norms orders of magnitude apart are the
    imbalance that gradient-based weighting corrects.

    Raises ``ValueError`` when no entry carries diagnostics.
    """
    runs = _diagnosed_runs(history, label)
    pairs_of_run = [_pairs(_grad_terms(entries)) for _, entries in runs]
    rows = max(1, max(len(p) for p in pairs_of_run))
    fig = Figure(figsize=(max(6.0, 5.2 * len(runs)), 3.6 + 0.32 * rows), layout="constrained")
    axes = fig.subplots(2, len(runs), squeeze=False, sharex="col",
                        gridspec_kw={"height_ratios": [0.6 + 0.25 * rows, 2.0]})
    image = None
    for col, ((name, entries), pairs) in enumerate(zip(runs, pairs_of_run)):
        mesh = _cosine_panel(axes[0, col], name, entries, pairs, cmap)
        if mesh is not None:
            image = mesh
        _norm_panel(axes[1, col], entries, weighted)
    if image is not None:
        fig.colorbar(image, ax=axes[0, :].tolist(), label="cosine", ticks=[-1, -0.5, 0, 0.5, 1])
    return _finish(fig, title, path)


def _grad_terms(entries: Sequence[Mapping[str, Any]]) -> list[str]:
    """The terms with a gradient norm in some entry, in order of appearance."""
    return _ordered_keys(entry["grad_norm"] for entry in entries)


def _pairs(names: list[str]) -> list[tuple[str, str]]:
    """Every pair ``(a, b)`` of ``names`` with ``a`` before ``b``."""
    return [(a, b) for i, a in enumerate(names) for b in names[i + 1:]]


def _cosine_panel(ax: Any, name: str, entries: Sequence[Mapping[str, Any]], pairs: list[tuple[str, str]],
                  cmap: str) -> Any:
    """The heat map of the pairs' cosines over the steps; returns its mesh (``None`` without pairs)."""
    if not pairs:
        ax.text(0.5, 0.5, "one term: no pairs", ha="center", va="center", transform=ax.transAxes)
        ax.set_yticks([])
        ax.set_title(name, fontsize="medium")
        return None
    steps = sorted({float(e["step"]) for e in entries})
    by_step = {float(e["step"]): e for e in entries}
    grid = [[_cosine(by_step[s], a, b) for s in steps] for a, b in pairs]
    mesh = ax.pcolormesh(_edges(steps), list(range(len(pairs) + 1)), grid, cmap=cmap, vmin=-1.0, vmax=1.0,
                         shading="flat")
    ax.set_yticks([i + 0.5 for i in range(len(pairs))], [f"{a} / {b}" for a, b in pairs], fontsize="small")
    ax.set_ylim(len(pairs), 0)
    ax.set_title(f"{name + ': ' if name else ''}cosine per pair (conflicting: {_conflict_share(grid):.0%} of pair-steps)",
                 fontsize="medium")
    return mesh


def _conflict_share(grid: list[list[float]]) -> float:
    """The share of known (non-NaN) cosines below 0; NaN if none is known."""
    known = [v for row in grid for v in row if not math.isnan(v)]
    return sum(v < 0 for v in known) / len(known) if known else math.nan


def _norm_panel(ax: Any, entries: Sequence[Mapping[str, Any]], weighted: bool) -> None:
    """Each term's gradient norm over the steps (and, with ``weighted``, the weighted norm), log y."""
    for index, term in enumerate(_grad_terms(entries)):
        _norm_lines(ax, entries, term, f"C{index}", weighted)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("gradient norm")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=3, frameon=False)


def _norm_lines(ax: Any, entries: Sequence[Mapping[str, Any]], term: str, color: str, weighted: bool) -> None:
    """``||grad term||`` solid and, where some weight differs from 1 and ``weighted``, ``weight x ||grad term||`` dashed."""
    points = [(float(e["step"]), e["grad_norm"][term]) for e in entries if term in e["grad_norm"]]
    _log_line(ax, points, color=color, label=f"||grad {term}||")
    if weighted and any(e.get("weights", {}).get(term, 1.0) != 1.0 for e in entries):
        scaled = [(float(e["step"]), e["grad_norm"][term] * e["weights"][term]) for e in entries
                  if term in e["grad_norm"] and term in e.get("weights", {})]
        _log_line(ax, scaled, color=color, linestyle="--", label=f"weight x ||grad {term}||")


def _cosine(entry: Mapping[str, Any], a: str, b: str) -> float:
    """``cos(grad a, grad b)`` of one entry (its ``cosine`` is in its ``grad_norm`` order); NaN if absent."""
    order = list(entry["grad_norm"])
    if a not in order or b not in order:
        return math.nan
    value = float(entry["cosine"][order.index(a)][order.index(b)])
    return value if math.isfinite(value) else math.nan


def has_pointwise(history: Sequence[Mapping[str, Any]]) -> bool:
    """Whether some entry of ``history`` carries pointwise figures (``"pointwise"``)."""
    return any(entry.get("pointwise") for entry in history)


def plot_pointwise(history: Any, path: PathLike | None = None, *, title: str = "Pointwise weights",
                   label: str | None = None) -> Figure:
    """The pointwise figures over the steps: one panel per term and run, log y.

    ``history``: one run's history (``balancer.history``, whose entries carry ``"pointwise"``
    ``{term: {figure: value}}``) or runs with ``label`` and ``history``. Per weighting, the
    per-point weights' median (``<kind>_p50``) as a line between their 10 % and 90 % quantiles
    (shaded) and their min and max (thin); the minimum causal weight (``causal_min``) and the
    NTK trace (``ntk_trace``) as lines. Raises ``ValueError`` when no entry carries them.
    """
    panels = _pointwise_panels(history, label)
    fig, axes = _panels(len(panels), (4.4, 3.2))
    for ax, (name, term, rows) in zip(axes.flat, panels):
        _pointwise_panel(ax, rows)
        ax.set_title(f"{name}: {term}" if name else term)
    _hide_unused(axes, len(panels))
    return _finish(fig, title, path)


def _pointwise_panels(history: Any, label: str | None) -> list[tuple[str, str, list[tuple[float, Mapping[str, float]]]]]:
    """``(run, term, [(step, figures)])`` per term of each run with pointwise figures; raises if none."""
    panels = []
    for name, entries in _runs(history, label):
        entries = [e for e in entries if e.get("pointwise")]
        for term in _ordered_keys(e["pointwise"] for e in entries):
            panels.append((name, term, [(e["step"], e["pointwise"][term]) for e in entries if term in e["pointwise"]]))
    if not panels:
        raise ValueError("no history entry carries pointwise figures: pass Residual terms with pointwise= "
                         "weightings (or an NTK strategy) and history=")
    return panels


def _pointwise_panel(ax: Any, rows: list[tuple[float, Mapping[str, float]]]) -> None:
    """One term's figures: bands and extremes for per-point weight summaries, lines for the rest."""
    keys = _ordered_keys(figures for _, figures in rows)
    kinds = [key[: -len("_p50")] for key in keys if key.endswith("_p50")]
    for kind in kinds:
        _summary_band(ax, rows, kind)
    for key in ("causal_min", "ntk_trace"):
        if key in keys:
            _log_line(ax, [(s, f[key]) for s, f in rows if key in f], linewidth=1.2, label=key)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize="x-small")


def _summary_band(ax: Any, rows: list[tuple[float, Mapping[str, float]]], kind: str) -> None:
    """A per-point weight summary: the median between the 10 % and 90 % quantiles, the extremes dotted."""
    def series(part: str) -> list[tuple[float, float]]:
        return [(s, f[f"{kind}_{part}"]) for s, f in rows if f"{kind}_{part}" in f]

    band = [(s, lo, hi) for (s, lo), (_, hi) in zip(series("p10"), series("p90")) if lo > 0 and hi > 0]
    if band:
        steps, lo, hi = zip(*band)
        ax.fill_between(steps, lo, hi, alpha=0.25, label=f"{kind} 10-90 %")
    _log_line(ax, series("p50"), linewidth=1.4, label=f"{kind} median")
    for part in ("min", "max"):
        _log_line(ax, series(part), linewidth=0.6, linestyle=":", label=f"{kind} {part}")


def save_figures(results: Sequence[Any], out: PathLike, *, prefix: str = "",
                 axis_labels: tuple[str, str] = ("x", "y")) -> list[Path]:
    """``weights.png``, ``losses.png``, ``error_fields.png`` and, when a run's history carries
    conflict diagnostics, ``conflicts.png`` (:func:`plot_conflicts`), when it carries pointwise
    figures, ``pointwise.png`` (:func:`plot_pointwise`), in ``out`` (created); their paths."""
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{prefix}{name}.png" for name in ("weights", "losses")]
    plot_weights(results, paths[0])
    plot_losses(results, paths[1])
    if any(r.points is not None for r in results):
        paths.append(folder / f"{prefix}error_fields.png")
        plot_error_fields(results, paths[-1], axis_labels=axis_labels)
    diagnosed = [r for r in results if has_diagnostics(r.history)]
    if diagnosed:
        paths.append(folder / f"{prefix}conflicts.png")
        plot_conflicts(diagnosed, paths[-1])
    pointwise = [r for r in results if has_pointwise(r.history)]
    if pointwise:
        paths.append(folder / f"{prefix}pointwise.png")
        plot_pointwise(pointwise, paths[-1])
    return paths
