"""Profile training steps of one variant on one workload (cProfile, or torch.profiler).

    python benchmarks/profile_step.py -w disjoint -v lra_every1            # cProfile, by own time
    python benchmarks/profile_step.py -w residual -v lra_every1 --torch    # torch.profiler, by op
"""
from __future__ import annotations

import argparse
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
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
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


if __name__ == "__main__":
    main()
