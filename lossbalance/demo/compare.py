"""The demo: 2-D Helmholtz with fixed weights against each named strategy (:func:`run_demo`)."""
from __future__ import annotations

import os
import sys
import time
from typing import Sequence, TextIO

from .parallel import run_many
from .report import format_table, write_figures
from .runner import DEMO_DECAY_EVERY, DEMO_STEPS, RunResult, RunSpec, strategy_settings

__all__ = ["resolve_strategies", "run_demo"]


def resolve_strategies(names: Sequence[str] | str, baseline: str | None = "static") -> list[str]:
    """The baseline first, then the named strategies (deduplicated); unknown names raise ``ValueError``."""
    if isinstance(names, str):
        names = names.split(",")
    out = [baseline] if baseline else []
    for name in (n.strip() for n in names):
        if name and name not in out:
            out.append(name)
    for name in out:
        strategy_settings(name)  # validates the name (and the default options)
    return out


def run_demo(
    strategies: Sequence[str] | str = ("lra",),
    *,
    steps: int = DEMO_STEPS,
    lr_decay_every: int = DEMO_DECAY_EVERY,
    seed: int = 0,
    device: str = "cpu",
    out: str | os.PathLike | None = "lossbalance-demo",
    plots: bool = True,
    workers: int | None = None,
    progress: str = "auto",
    eval_n: int | None = None,
    stdout: TextIO | None = None,
) -> list[RunResult]:
    """Train Helmholtz 2-D (a1 = 1, a2 = 4) with fixed weights and with each named strategy,
    print the comparison table and, when matplotlib is installed and ``plots``, write the figures
    to ``out``. Returns the results (fixed weights first)."""
    stdout = sys.stdout if stdout is None else stdout
    names = resolve_strategies(strategies)
    specs = [RunSpec(name, problem="helmholtz", problem_options={"a1": 1.0, "a2": 4.0}, steps=steps,
                     lr_decay_every=lr_decay_every, seed=seed, device=device, eval_n=eval_n)
             for name in names]
    procs = min(len(specs), os.cpu_count() or 1) if workers is None else workers
    print(f"Helmholtz 2-D (a1=1, a2=4): MLP [2, 50, 50, 50, 1] tanh; Adam 1e-3 x 0.9^(step/{lr_decay_every}); "
          f"batch 128 per term; {steps} steps; seed {seed}; {device}", file=stdout)
    print(f"runs: {', '.join(names)} ({procs} process{'es' if procs > 1 else ''} side by side, 1 thread each)"
          if procs > 1 else f"runs: {', '.join(names)} (one after the other in this process)", file=stdout, flush=True)
    start = time.perf_counter()
    results = run_many(specs, workers=workers, progress=progress)
    total = time.perf_counter() - start
    print(file=stdout)
    print(format_table(results), file=stdout)
    print(f"\ntotal wall time {total:.1f} s", file=stdout)
    if plots and out is not None:
        for path in write_figures(results, out, stdout=stdout):
            print(f"wrote {path}", file=stdout)
    stdout.flush()
    return results
