"""Scale runs on the disjoint workload: the number of terms K and the parameter count.

Each point times the balancer (LRAnnealing, update_every=1, memory="keep"), every round paired
with a block of plain steps on a model of its own; ``benchmarks/table.py`` prints the ratio.
K in {2, 4, 8, 16}: one residual term on 1024 points and K - 1 boundary terms on 128 points
each. Parameters from 1e4 to 1e6: the 2-w-w-w-1 MLP widened (K = 4).
"""
from __future__ import annotations

import pytest

import workloads as W

KS = (2, 4, 8, 16)
PARAMS = (1e4, 3e4, 1e5, 3e5, 1e6)


@pytest.mark.parametrize("k", KS)
def test_scale_terms(measure, k):
    w = W.make("disjoint", k=k)
    measure.benchmark.group = "scale-terms"
    measure(W.variant(w, "lra_every1"), baseline=W.plain(W.make("disjoint", k=k)), suite="scale_terms",
            workload="disjoint", variant="lra_every1", K=k, params=w.n_params, width=W.WIDTH)


@pytest.mark.parametrize("size", PARAMS, ids=[f"{p:.0e}" for p in PARAMS])
def test_scale_params(measure, size):
    width = W.width_for(size)
    w = W.make("disjoint", width=width)
    measure.benchmark.group = "scale-params"
    measure(W.variant(w, "lra_every1"), baseline=W.plain(W.make("disjoint", width=width)), suite="scale_params",
            workload="disjoint", variant="lra_every1", K=len(w.names), params=w.n_params, width=width)
