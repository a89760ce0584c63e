"""Per-step fixed cost of the balancer in microseconds: variant minus plain step on a tiny model.

    python benchmarks/fixed_cost.py                  # all workloads, the default variants
    python benchmarks/fixed_cost.py -w heads -v static relobralo

The model is 2-8-1 (tanh), 16 interior and 8 boundary points, K = 4 terms, one thread: the
backward passes cost almost nothing, so what is left is the balancer's own work per step (Python,
small tensor ops, host syncs). Each variant's rounds are interleaved with plain rounds and the
median of the per-round differences is reported.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
for path in (str(HERE.parent), str(HERE)):
    if path not in sys.path:
        sys.path.insert(0, path)

import torch  # noqa: E402

import workloads as W  # noqa: E402

DEFAULT_VARIANTS = ("static", "relobralo", "lra_every1", "lra_every10", "floor")


def _round(step, n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        step()
    return (time.perf_counter() - start) / n


def fixed_cost(workload: str, variant: str, *, rounds: int = 15, steps: int = 200) -> tuple[float, float]:
    """(plain µs per step, variant minus plain µs per step), medians over interleaved rounds."""
    tiny = dict(width=8, depth=1, n_interior=16, n_boundary=8)
    plain = W.variant(W.make(workload, **tiny), "plain")
    other = W.variant(W.make(workload, **tiny), variant)
    for _ in range(50):
        plain(), other()
    base, extra = [], []
    for _ in range(rounds):
        p = _round(plain, steps)
        v = _round(other, steps)
        base.append(p)
        extra.append(v - p)
    return statistics.median(base) * 1e6, statistics.median(extra) * 1e6


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-w", "--workload", nargs="*", default=list(W.WORKLOADS), choices=W.WORKLOADS)
    parser.add_argument("-v", "--variant", nargs="*", default=list(DEFAULT_VARIANTS), choices=list(W.VARIANTS))
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print(f"{'workload':<10} {'variant':<14} {'plain us':>9} {'extra us':>9}")
    for w in args.workload:
        for v in args.variant:
            base, extra = fixed_cost(w, v, rounds=args.rounds)
            print(f"{w:<10} {v:<14} {base:9.0f} {extra:+9.0f}")


if __name__ == "__main__":
    main()
