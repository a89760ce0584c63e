"""``step(closure=...)`` with L-BFGS (1e6 parameters, history_size=50, max_iter=1) as a ratio to a
plain closure step in the same run, each round between two plain blocks (``conftest.Measure``).
Nothing here asserts a timing; ``benchmarks/table.py`` prints the figures."""
from __future__ import annotations

import closure as C

def test_lbfgs_closure(measure):
    """Fixed weights: what the closure path itself adds (its undo snapshot), nothing else."""
    w = C.workload()
    measure.benchmark.group = "closure-lbfgs"
    measure(C.warmed(C.balanced(w)), baseline=C.warmed(C.plain(C.workload())), iterations=5,
            suite="closure", workload="lbfgs-1e6", variant="static", K=len(w.names), params=w.n_params)
