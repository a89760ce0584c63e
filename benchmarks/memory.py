"""Peak extra memory of one training step: plain vs the balancer's memory="keep" / "lean" / probe.

Each mode runs in a fresh subprocess on the disjoint workload widened to about 1e6 parameters
(K = 4, 1024 interior points). The child builds the model, points, optimizer and balancer,
notes its current resident set size, runs a few steps, and reports
``ru_maxrss (high-water mark) - RSS before the steps``: the peak memory a step adds on top of
what the model and its set-up hold (the graph of the forward pass, the gradients, the
balancer's buffers). tracemalloc does not see torch's CPU allocator, hence RSS. glibc's
dynamic mmap threshold is pinned (``MALLOC_MMAP_THRESHOLD_``) so that large tensors are
mapped and unmapped and RSS follows the live memory.

    python benchmarks/memory.py            # prints the table (MB)
    python benchmarks/memory.py --json     # the figures as JSON
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

MODES = ("plain", "keep", "lean", "probe", "lbfgs_plain", "lbfgs_balancer")
PARAMS = 1e6
STEPS = 3
MB = 1024 * 1024


def _rss_now() -> int:
    """Current resident set size in bytes (Linux /proc; falls back to the high-water mark)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return _rss_peak()


def _rss_peak() -> int:
    """This process's RSS high-water mark in bytes: Linux's ``VmHWM`` (its own, reset by exec),
    not ``ru_maxrss``, which a child inherits from the process it was forked from (a large pytest
    process would set every child's peak)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # kB on Linux, bytes on macOS


def child(mode: str, params: float, steps: int) -> dict:
    for path in (str(ROOT), str(HERE)):
        if path not in sys.path:
            sys.path.insert(0, path)
    import torch

    import workloads as W

    torch.set_num_threads(int(os.environ.get("LOSSBALANCE_BENCH_THREADS", "2")))
    width = W.width_for(params)
    if mode.startswith("lbfgs"):  # a full history first: the state a step's undo must not copy
        import closure as C

        w = C.workload(params)
        step = C.warmed(C.plain(w) if mode == "lbfgs_plain" else C.balanced(w))
    else:
        w = W.make("disjoint", width=width)
        step = W.plain(w) if mode == "plain" else W.balancer(
            w, update_every=1, memory="lean" if mode == "lean" else "keep", probe=mode == "probe"
        )
    before = _rss_now()
    for _ in range(steps):
        step()
    peak = _rss_peak()
    return {
        "mode": mode, "params": w.n_params, "width": width, "K": len(w.names),
        "rss_before_mb": before / MB, "peak_mb": peak / MB, "extra_mb": (peak - before) / MB,
        "param_mb": w.n_params * 4 / MB,
    }


def measure(modes=MODES, params: float = PARAMS, steps: int = STEPS) -> dict[str, dict]:
    """Run every mode in its own subprocess; returns ``{mode: figures}``."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", PYTHONPATH=os.pathsep.join([str(ROOT), str(HERE)]))
    results = {}
    for mode in modes:
        out = subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), "--child", mode, "--params", str(params),
             "--steps", str(steps)],
            env=env, capture_output=True, text=True, check=True,
        )
        results[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    return results


def rst(results: dict[str, dict]) -> str:
    """An RST table of the peak extra memory per mode and its excess over the plain step."""
    if not results:
        return ""
    base = results.get("plain", {}).get("extra_mb")
    any_row = next(iter(results.values()))
    head = ("mode", "peak extra MB", "vs plain MB")
    labels = {"plain": "plain step", "keep": 'balancer, memory="keep"', "lean": 'balancer, memory="lean"',
              "probe": "balancer, probe= (last layer)", "lbfgs_plain": "L-BFGS (history 50), plain closure step",
              "lbfgs_balancer": "L-BFGS (history 50), balancer.step(closure=...)"}
    rows = []
    for mode, r in results.items():
        reference = results.get("lbfgs_plain", {}).get("extra_mb") if mode.startswith("lbfgs") else base
        diff = "" if reference is None or mode in ("plain", "lbfgs_plain") else f"{r['extra_mb'] - reference:+.1f}"
        rows.append((labels.get(mode, mode), f"{r['extra_mb']:.1f}", diff))
    title = (f"Peak extra memory of a step (RSS high-water mark over the set-up), disjoint workload, "
             f"{any_row['params']:,} parameters (width {any_row['width']}), K = {any_row['K']}, "
             f"update_every=1; one parameter copy = {any_row['param_mb']:.1f} MB")
    return title + "\n\n" + _rst_table(head, rows)


def _rst_table(head, rows) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    rule = "  ".join("=" * w for w in widths)
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([rule, line(head), rule, *map(line, rows), rule])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--params", type=float, default=PARAMS)
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.params, args.steps)))
        return
    results = measure(args.modes, args.params, args.steps)
    print(json.dumps(results, indent=1) if args.json else rst(results))


if __name__ == "__main__":
    main()
