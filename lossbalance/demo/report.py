"""The results of several runs as a text table and as figures."""
from __future__ import annotations

import importlib.util
import math
import os
import sys
from pathlib import Path
from typing import Sequence, TextIO

from .runner import RunResult

__all__ = ["format_table", "write_figures"]


def _number(value: float) -> str:
    return f"{value:.3g}" if math.isfinite(value) else str(value)


def format_table(results: Sequence[RunResult]) -> str:
    """``strategy | rel. L2 error | final weights | wall time`` as aligned text."""
    header = ("strategy", "rel. L2 error", "final weights", "wall time")
    rows = [
        (r.label, f"{r.error:.3e}", ", ".join(f"{k}={_number(v)}" for k, v in r.weights.items()),
         f"{r.wall_time:.1f} s")
        for r in results
    ]
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(4)]
    line = lambda row: " | ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip()  # noqa: E731
    rule = "-+-".join("-" * w for w in widths)
    return "\n".join([line(header), rule, *map(line, rows)])


def write_figures(results: Sequence[RunResult], out: str | os.PathLike, *,
                  axis_labels: tuple[str, str] = ("x", "y"), stdout: TextIO | None = None) -> list[Path]:
    """The weights, losses, error-field and (with diagnostics) conflicts PNGs in ``out``; nothing (with a
    note) without matplotlib."""
    if importlib.util.find_spec("matplotlib") is None:
        print("no figures: matplotlib is not installed (pip install 'lossbalance[plots]')",
              file=sys.stdout if stdout is None else stdout)
        return []
    from .. import plots

    return plots.save_figures(results, out, axis_labels=axis_labels)
