"""Long runs: 10 000 steps of the three-term PINN keep memory flat.

LRA with ``update_every=10`` (per-term gradients on every tenth step, one plain backward on the
others) and ``history=100``. After a warm-up (allocator pools, optimizer state, history filled)
the resident set size is measured, the run continues to 10 000 steps, and it is measured again:
it must not grow (no retained graphs, no unbounded lists), the history holds exactly the last
100 steps and the number of live tensors is the same. The figures are printed (``pytest -s``).

``LOSSBALANCE_LONG_RUN_STEPS`` sets the number of steps (default 10 000).
"""
import gc
import os
import resource
import time
import weakref

import torch

from lossbalance import LossBalancer
from lossbalance.strategies.lra import LRAnnealing

from _models import PINN1D

STEPS = int(os.environ.get("LOSSBALANCE_LONG_RUN_STEPS", "10000"))
WARMUP = min(500, STEPS // 10)
HISTORY = 100
MAX_GROWTH = 20 * 2**20  # bytes


def resident_bytes() -> int:
    """Current resident set size (``/proc/self/statm``); the peak (``ru_maxrss``) where there is no /proc."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def live_tensors() -> int:
    gc.collect()
    # type(o), not isinstance: isinstance reads o.__class__, which a deprecated torch proxy warns about
    return sum(1 for o in gc.get_objects() if issubclass(type(o), torch.Tensor))


def test_long_run_memory_is_flat_and_history_bounded():
    torch.manual_seed(0)
    problem = PINN1D(seed=0)
    balancer = LossBalancer(
        torch.optim.Adam(problem.model.parameters(), lr=1e-3), LRAnnealing("pde"), update_every=10, history=HISTORY,
    )
    start_loss = sum(v.item() for v in problem.losses().values())
    for _ in range(WARMUP):
        balancer.step(problem.losses())
    tensors_start = live_tensors()
    rss_start = resident_bytes()
    began = time.perf_counter()
    for _ in range(STEPS - WARMUP):
        balancer.step(problem.losses())
    seconds = time.perf_counter() - began
    gc.collect()
    rss_end = resident_bytes()
    tensors_end = live_tensors()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    # No retained graph: once stepped and dropped, a loss dict is freed with its whole graph.
    losses = problem.losses()
    alive = weakref.ref(losses["pde"])
    balancer.step(losses)
    del losses
    gc.collect()

    mib = 2.0**20
    print(
        f"\nlong run: {STEPS} steps (warm-up {WARMUP}), RSS after warm-up {rss_start / mib:.1f} MiB, "
        f"at the end {rss_end / mib:.1f} MiB, growth {(rss_end - rss_start) / mib:+.2f} MiB "
        f"(peak {peak / mib:.1f} MiB); live tensors {tensors_start} -> {tensors_end}; "
        f"{STEPS - WARMUP} steps in {seconds:.1f} s ({1e3 * seconds / max(STEPS - WARMUP, 1):.2f} ms/step); "
        f"raw loss {start_loss:.3g} -> {sum(v.item() for v in problem.losses().values()):.3g}"
    )
    assert alive() is None, "the balancer kept a reference to the loss terms (and their graph)"
    assert balancer.step_count == STEPS + 1
    assert len(balancer.history) == HISTORY
    assert [h["step"] for h in balancer.history] == list(range(STEPS + 1 - HISTORY, STEPS + 1))
    assert tensors_end <= tensors_start, "tensors accumulate over the run"
    assert rss_end - rss_start < MAX_GROWTH, f"resident memory grew by {(rss_end - rss_start) / mib:.1f} MiB"
    assert all(0 < w < float("inf") for w in balancer.weights.values())
