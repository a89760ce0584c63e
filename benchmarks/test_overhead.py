"""Overhead of the balancer on three K = 4 workloads, as a ratio to the plain step.

Every variant times whole training steps, forward pass included, with a fresh model, the same
points and SGD(lr=1e-6). Each round is 10 consecutive steps, so ``update_every=10`` variants
hold exactly one weight update per round, and each round is paired with a block of 10 plain
steps on a model of its own (see ``conftest.Measure``). The plain variant paired with itself
shows the noise of the run: its ratio should be 1.00.
Nothing here asserts a timing; ``benchmarks/table.py`` turns the JSON into the README table.
"""
from __future__ import annotations

import pytest

import workloads as W

ITERATIONS = 10  # one update_every=10 cycle per round
CASES = [(w, v) for w in W.WORKLOADS for v in W.VARIANTS]


def _skip_unavailable(variant: str) -> None:
    if variant == "relobralo" and not W.relobralo_available():
        pytest.skip("strategy 'relobralo' is not registered")
    if variant == "torchjd_mean":
        pytest.importorskip("torchjd", reason="torchjd not installed (pip install lossbalance[bench])")


@pytest.mark.parametrize(("workload", "variant"), CASES, ids=[f"{w}-{v}" for w, v in CASES])
def test_overhead(measure, workload, variant):
    _skip_unavailable(variant)
    w = W.make(workload)
    measure.benchmark.group = f"overhead-{workload}"
    measure(W.variant(w, variant), baseline=W.plain(W.make(workload)), iterations=ITERATIONS,
            suite="overhead", workload=workload, variant=variant, K=len(w.names), params=w.n_params)
