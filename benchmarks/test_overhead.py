"""Overhead of the balancer on three K = 4 workloads, as a ratio to the plain step of the same run.

Every variant times whole training steps, forward pass included, with a fresh model, the same
points and SGD(lr=1e-6). Each round is 10 consecutive steps, so ``update_every=10`` variants
hold exactly one weight update per round. ``plain_again`` repeats the plain step at the end of
each workload's block: ``plain_again / plain`` far from 1 means the machine was busy.
Nothing here asserts a timing; ``benchmarks/table.py`` turns the JSON into the README table.
"""
from __future__ import annotations

import pytest

import workloads as W

ITERATIONS = 10  # one update_every=10 cycle per round
VARIANTS = [v for v in W.VARIANTS] + ["plain_again"]
CASES = [(w, v) for w in W.WORKLOADS for v in VARIANTS]


def _skip_unavailable(variant: str) -> None:
    if variant == "relobralo" and not W.relobralo_available():
        pytest.skip("strategy 'relobralo' is not registered")
    if variant == "torchjd_mean":
        pytest.importorskip("torchjd", reason="torchjd not installed (pip install lossbalance[bench])")


@pytest.mark.parametrize(("workload", "variant"), CASES, ids=[f"{w}-{v}" for w, v in CASES])
def test_overhead(measure, workload, variant):
    _skip_unavailable(variant)
    w = W.make(workload)
    step = W.variant(w, "plain" if variant == "plain_again" else variant)
    measure.benchmark.group = f"overhead-{workload}"
    measure(step, iterations=ITERATIONS, suite="overhead", workload=workload, variant=variant,
            K=len(w.names), params=w.n_params)
