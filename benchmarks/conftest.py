"""Shared set-up of the benchmark suite: 2 threads, import paths, and the ``measure`` helper.

Run it with ``pytest benchmarks/ --benchmark-only --benchmark-json=FILE`` (or
``python benchmarks/table.py --run``). The root ``setup.cfg`` limits plain ``pytest`` to
``tests/``, so the benchmarks only run when asked for.

How long each benchmark runs follows pytest-benchmark's own options: a benchmark runs
``max(--benchmark-min-rounds, ceil(--benchmark-max-time / time of one round))`` rounds after one
calibration round and one warm-up round. Where the command line does not set them, this suite
uses 5 s and 7 rounds (pytest-benchmark's defaults are 1 s and 5; the plain blocks that bracket
the rounds come on top): about 7 minutes for the whole suite. A quick check of the whole suite:
``--benchmark-max-time=0.05 --benchmark-min-rounds=2``.
"""
from __future__ import annotations

import math
import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for path in (str(ROOT), str(HERE)):
    if path not in sys.path:
        sys.path.insert(0, path)

import pytest  # noqa: E402
import torch  # noqa: E402

# 2 threads, as in the README table; LOSSBALANCE_BENCH_THREADS=1 is steadier on a busy machine
# (a descheduled OpenMP thread stalls the other one). The count is recorded with every figure.
THREADS = int(os.environ.get("LOSSBALANCE_BENCH_THREADS", "2"))
torch.set_num_threads(THREADS)


def pytest_configure(config):
    torch.set_num_threads(THREADS)


MAX_TIME = 5.0  # seconds of the timed variant per benchmark, unless --benchmark-max-time is given
MIN_ROUNDS = 7  # unless --benchmark-min-rounds is given


def _given(config, flag: str) -> bool:
    args = list(config.invocation_params.args) + os.environ.get("PYTEST_ADDOPTS", "").split()
    return any(str(a) == flag or str(a).startswith(flag + "=") for a in args)


def _option(config, name: str, default):
    """pytest-benchmark's option ``--name`` where given on the command line, else ``default``."""
    if not _given(config, "--" + name.replace("_", "-")):
        return default
    try:
        value = config.getoption(name)
    except ValueError:
        return default
    return default if value is None else value


class Measure:
    """``measure(step, baseline=plain_step, iterations=..., **info)``: time ``step`` with
    ``benchmark.pedantic``, each round between two blocks of ``baseline`` steps.

    Each round runs ``iterations`` consecutive steps, so with ``iterations`` a multiple of
    ``update_every`` every round holds the same number of weight updates; ``iterations=None``
    picks 1..10 steps to make a round last about 0.1 s. Before each round (in pedantic's untimed
    ``setup``) and after the last one, the same number of ``baseline`` steps is timed, so every
    round sits between two baseline blocks; the JSON's ``extra_info`` gets the median over the
    rounds of ``round / geometric mean of its two baseline blocks`` (``paired_ratio``, with its
    quartiles) and the baseline's median time per step: a machine that speeds up or slows down
    during the run moves a round and its bracket alike, so the ratio survives it. ``info`` also goes
    to ``extra_info`` (with the thread count and the load average).
    """

    def __init__(self, benchmark, config):
        self.benchmark = benchmark
        self.max_time = float(_option(config, "benchmark_max_time", MAX_TIME))
        self.min_rounds = int(_option(config, "benchmark_min_rounds", MIN_ROUNDS))

    def __call__(self, step, *, baseline, iterations: int | None = None, **info):
        benchmark = self.benchmark
        torch.set_num_threads(THREADS)
        info.update(threads=torch.get_num_threads(), load_before=os.getloadavg()[0])
        if getattr(benchmark, "disabled", False):
            step()
            benchmark.extra_info.update(info)
            return benchmark(step)
        start = time.perf_counter()
        step()  # first call: lazy buffers, registry look-ups, first-term checks
        baseline()
        first = time.perf_counter() - start
        if iterations is None:
            iterations = max(1, min(10, round(0.1 / max(first, 1e-6))))
        times: dict[str, list[float]] = {"step": [], "baseline": []}

        def block(which: str, fn) -> None:
            start = time.perf_counter()
            for _ in range(iterations):
                fn()
            times[which].append(time.perf_counter() - start)

        block("baseline", baseline)  # calibration (also a warm-up)
        block("step", step)
        rounds = max(self.min_rounds, math.ceil(self.max_time / max(times["step"][-1], 1e-9)))
        rounds = min(rounds, 1000)
        result = benchmark.pedantic(
            block, args=("step", step), setup=lambda: block("baseline", baseline), rounds=rounds, warmup_rounds=1
        )
        block("baseline", baseline)  # closes the bracket of the last round
        steps, plain = times["step"][-rounds:], times["baseline"][-rounds - 1 :]
        ratios = [s / math.sqrt(before * after) for s, before, after in zip(steps, plain, plain[1:])]
        q1, _, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
        info.update(
            load_after=os.getloadavg()[0], iterations=iterations, paired_ratio=statistics.median(ratios),
            paired_q1=q1, paired_q3=q3, baseline_step=statistics.median(plain) / iterations,
        )
        benchmark.extra_info.update(info)
        return result


@pytest.fixture
def measure(benchmark, request, _warm_process):
    return Measure(benchmark, request.config)


@pytest.fixture(scope="session")
def _warm_process():
    """Run each workload's plain step for a moment before the first timing (thread pools, allocator)."""
    import workloads as W

    torch.set_num_threads(THREADS)
    for name in W.WORKLOADS:
        step = W.plain(W.make(name))
        end = time.perf_counter() + 0.3
        while time.perf_counter() < end:
            step()
