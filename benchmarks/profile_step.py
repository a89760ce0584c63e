"""Profile training steps of one variant on one workload (cProfile, or torch.profiler).

    python benchmarks/profile_step.py -w disjoint -v lra_every1            # cProfile, by own time
    python benchmarks/profile_step.py -w residual -v lra_every1 --torch    # torch.profiler, by op
    python benchmarks/profile_step.py -w heads -v relobralo --ops plain    # tensor ops per step beyond plain

``--ops BASE`` counts the top-level ATen operations per step (those not called by another ATen op)
of the variant and of ``BASE`` on the tiny model of ``fixed_cost.py``, and prints the difference
by operation: what the balancer adds, in operations (each costs a few microseconds of dispatch on
a CPU, a kernel launch on a GPU, whatever the model's size).
"""
from __future__ import annotations

import argparse
import collections
import cProfile
import io
import pstats
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
for path in (str(HERE.parent), str(HERE)):
    if path not in sys.path:
        sys.path.insert(0, path)

import torch  # noqa: E402

import workloads as W  # noqa: E402


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-w", "--workload", default="disjoint", choices=W.WORKLOADS)
    parser.add_argument("-v", "--variant", default="lra_every1", choices=list(W.VARIANTS))
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--sort", default="tottime", help="pstats sort key (tottime, cumtime, ...)")
    parser.add_argument("--torch", action="store_true", help="torch.profiler op table instead of cProfile")
    parser.add_argument("--ops", metavar="BASE", choices=list(W.VARIANTS), help="count tensor ops per step against BASE")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.ops:
        print_op_counts(args.workload, args.variant, args.ops)
        return
    step = W.variant(W.make(args.workload), args.variant)
    for _ in range(5):
        step()
    start = time.perf_counter()
    if args.torch:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(args.steps):
                step()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top))
    else:
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(args.steps):
            step()
        profiler.disable()
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats(args.sort).print_stats(args.top)
        print(out.getvalue())
    elapsed = time.perf_counter() - start
    print(f"{args.workload}/{args.variant}: {args.steps} steps, {elapsed / args.steps * 1e3:.2f} ms/step (profiled)")


def op_counts(workload: str, variant: str, steps: int = 20) -> collections.Counter:
    """Top-level ATen operations per step of ``variant`` on the tiny model of ``fixed_cost.py``."""
    from torch.profiler import ProfilerActivity, profile

    step = W.variant(W.make(workload, width=8, depth=1, n_interior=16, n_boundary=8), variant)
    for _ in range(20):
        step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    counts: collections.Counter = collections.Counter()
    for event in prof.events():
        parent = event.cpu_parent
        if event.name.startswith("aten::") and (parent is None or not parent.name.startswith("aten::")):
            counts[event.name] += 1
    return collections.Counter({name: n / steps for name, n in counts.items()})


def print_op_counts(workload: str, variant: str, base: str) -> None:
    mine, theirs = op_counts(workload, variant), op_counts(workload, base)
    diff = {name: mine[name] - theirs[name] for name in set(mine) | set(theirs)}
    diff = {name: d for name, d in diff.items() if abs(d) > 0.01}
    print(f"{workload}/{variant}: {sum(mine.values()):.0f} top-level ops per step, {base}: {sum(theirs.values()):.0f}, "
          f"difference {sum(diff.values()):+.0f}")
    for name, d in sorted(diff.items(), key=lambda item: -item[1]):
        print(f"  {name:<50} {d:+.1f}")


if __name__ == "__main__":
    main()
