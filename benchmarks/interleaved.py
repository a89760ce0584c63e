"""Round-robin timing of the variants: a quick check that tolerates a busy machine.

pytest-benchmark times one variant after the other, so a load that comes and goes between two
benchmarks shows up in their ratio. Here every round times a block of steps of *each* variant
in turn (the order shuffled per round), takes each variant's ratio to the plain block of the
same round, and reports the median of those ratios. Not the README table (that is
``table.py``); use it to check a change, or when the machine cannot be had quiet.

    python benchmarks/interleaved.py                       # all workloads, all variants
    python benchmarks/interleaved.py -w residual -v lra_every1 probe_every1 --rounds 30
"""
from __future__ import annotations

import argparse
import random
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


def available(variant: str) -> bool:
    if variant == "relobralo":
        return W.relobralo_available()
    if variant == "torchjd_mean":
        return W.torchjd_available()
    return True


def run(workload: str, variants: list[str], rounds: int, block: int, seed: int = 0, **make) -> dict[str, dict]:
    steps = {}
    for v in ["plain"] + [v for v in variants if v != "plain"]:
        if available(v):
            steps[v] = W.variant(W.make(workload, **make), v)
    for step in steps.values():  # warm-up: lazy buffers, first-term checks
        for _ in range(2):
            step()
    times: dict[str, list[float]] = {v: [] for v in steps}
    order = list(steps)
    rng = random.Random(seed)
    for _ in range(rounds):
        rng.shuffle(order)
        for v in order:
            start = time.perf_counter()
            for _ in range(block):
                steps[v]()
            times[v].append((time.perf_counter() - start) / block)
    out = {}
    for v, ts in times.items():
        ratios = [t / p for t, p in zip(ts, times["plain"])]
        q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
        out[v] = {"median_ms": statistics.median(ts) * 1e3, "ratio": statistics.median(ratios),
                  "ratio_q1": q[0], "ratio_q3": q[2]}
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-w", "--workloads", nargs="+", default=list(W.WORKLOADS), choices=W.WORKLOADS)
    parser.add_argument("-v", "--variants", nargs="+", default=list(W.VARIANTS), choices=list(W.VARIANTS))
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--block", type=int, default=10, help="steps per timed block (10: one update_every=10 cycle)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("-k", type=int, default=4, help="number of terms")
    parser.add_argument("--width", type=int, default=W.WIDTH)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"threads {torch.get_num_threads()}, rounds {args.rounds}, block {args.block} steps, K {args.k}, "
          f"width {args.width}; ratio = median over rounds of variant/plain in the same round [q1, q3]")
    for workload in args.workloads:
        res = run(workload, args.variants, args.rounds, args.block, k=args.k, width=args.width)
        print(f"\n{workload}: plain {res['plain']['median_ms']:.2f} ms")
        for v, r in res.items():
            if v != "plain":
                print(f"  {v:14s} {r['ratio']:5.2f}  [{r['ratio_q1']:.2f}, {r['ratio_q3']:.2f}]  "
                      f"({r['median_ms']:.2f} ms)")


if __name__ == "__main__":
    main()
