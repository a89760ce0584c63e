"""The compare sweep's overhead: ``burgers``, ``static,lra`` x 2 seeds, 5 000 steps, 2 workers.

    python benchmarks/sweep_overhead.py OUT_DIR [--steps N]

Prints the sweep's timing (``SweepTable.timing``: wall, runs, busiest worker, overhead,
utilisation) and where the overhead goes: the time from the start of ``run_many`` to each worker's
first run, and from the last run's end to ``run_many``'s return. ``OUT_DIR`` must be new or empty
(a cached run would not be timed). Run it on a quiet machine and note the load.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from lossbalance.demo import sweep

MARKS: dict[str, float] = {}
_run_many = sweep.run_many


def _timed_run_many(*args, **kwargs):
    """``run_many``, with its start and end (epoch seconds) kept in ``MARKS``."""
    MARKS["start"] = time.time()
    try:
        return _run_many(*args, **kwargs)
    finally:
        MARKS["end"] = time.time()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--steps", type=int, default=5000)
    args = parser.parse_args()
    sweep.run_many = _timed_run_many
    table = sweep.compare_strategies("burgers", "static,lra", seeds=2, steps=args.steps, workers=2, out=args.out,
                                     progress="none", plots=False)
    runs = [json.loads(path.read_text())["result"] for path in Path(args.out, "runs").glob("*.json")]
    first: dict[int, float] = {}
    for run in runs:
        first[run["pid"]] = min(first.get(run["pid"], float("inf")), run["started"])
    t = table.timing
    print(f"load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print(f"wall {t['wall']:.2f} s, runs {t['runs']:.2f} s, busiest worker {t['busiest_process']:.2f} s, "
          f"overhead {100 * t['overhead']:.2f} %, utilisation {100 * t['utilisation']:.1f} %")
    print("start-up to each worker's first run: " + ", ".join(f"{v - MARKS['start']:.3f} s" for v in first.values())
          + f"; after the last run: {MARKS['end'] - max(run['finished'] for run in runs):.3f} s")


if __name__ == "__main__":
    main()
