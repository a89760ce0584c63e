"""Several runs side by side: :func:`run_many`, one spawned process per run (or all in this
process), progress through one queue."""
from __future__ import annotations

import multiprocessing
import os
import queue
import sys
import traceback
from typing import Any, Sequence, TextIO

import torch

from ..problems import PROBLEMS
from .progress import Progress
from .runner import RunResult, RunSpec, run_spec, strategy_settings

__all__ = ["run_many"]


def _worker(index: int, spec: RunSpec, messages: Any) -> None:
    """Entry point of one run's process: one thread, progress and result through ``messages``."""
    torch.set_num_threads(1)
    try:
        result = run_spec(spec, lambda step, steps, loss: messages.put(("progress", index, (step, steps, loss))))
        messages.put(("done", index, result.portable()))
    except BaseException:  # noqa: BLE001 - reported to the parent, which raises
        messages.put(("error", index, traceback.format_exc()))


def run_many(
    specs: Sequence[RunSpec],
    *,
    workers: int | None = None,
    progress: str = "auto",
    stream: TextIO | None = None,
) -> list[RunResult]:
    """Run every spec and return the results in the same order.

    ``workers``: processes side by side (``spawn``; default: one per run, at most the number of
    CPU cores); each process uses one thread, and a result crosses back without its model.
    ``workers=1`` runs the specs one after the other in this process, also on one thread
    (results keep ``model`` and ``balancer``). Unknown problem or strategy names raise
    ``ValueError`` before anything starts; a run that fails in its process raises
    ``RuntimeError`` with its traceback and stops the others.

    ``progress``: ``"auto"`` (tqdm bars if installed and ``stream`` is a terminal, else a line
    every 10 %), ``"tqdm"``, ``"print"`` or ``"none"``; written to ``stream`` (default stderr).
    """
    specs = list(specs)
    workers = _check_options(specs, workers, progress)
    bars = Progress(specs, progress, sys.stderr if stream is None else stream)
    try:
        if workers == 1 or len(specs) <= 1:
            results = _run_here(specs, bars)
        else:
            results = _Fanout(specs, workers, bars).run()
    finally:
        bars.close()
    return [r for r in results if r is not None]


def _check_options(specs: Sequence[RunSpec], workers: int | None, progress: str) -> int:
    """The number of workers; raises ``ValueError`` for a bad option or an unknown problem or strategy
    (before any process starts)."""
    if progress not in ("auto", "tqdm", "print", "none"):
        raise ValueError(f"progress must be 'auto', 'tqdm', 'print' or 'none', got {progress!r}")
    if workers is None:
        workers = min(len(specs), os.cpu_count() or 1)
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    for spec in specs:
        if spec.problem not in PROBLEMS:
            raise ValueError(f"run {spec.name!r}: unknown problem {spec.problem!r}; choose from {sorted(PROBLEMS)}")
        strategy_settings(spec.strategy, spec.strategy_options, spec.update_every)
    return workers


def _run_here(specs: Sequence[RunSpec], bars: Progress) -> list[RunResult | None]:
    """The runs one after the other in this process, on one thread (results keep their model)."""
    results: list[RunResult | None] = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small networks: more threads only add overhead and contention
    try:
        for index, spec in enumerate(specs):
            bars.start(index)
            results.append(run_spec(spec, lambda s, n, loss, i=index: bars.update(i, s, n, loss)))
    finally:
        torch.set_num_threads(threads)
    return results


class _Fanout:
    """The runs in up to ``workers`` spawned processes at a time; messages come back through one queue."""

    def __init__(self, specs: Sequence[RunSpec], workers: int, bars: Progress):
        self.specs, self.workers, self.bars = specs, workers, bars
        self.context = multiprocessing.get_context("spawn")
        self.messages = self.context.Queue()
        self.waiting = list(range(len(specs)))
        self.running: dict[int, Any] = {}
        self.results: list[RunResult | None] = [None] * len(specs)

    def run(self) -> list[RunResult | None]:
        """Every run's result, in order; a failed or dead run raises ``RuntimeError`` and stops the others."""
        try:
            while self.waiting or self.running:
                self._start_waiting()
                self._receive()
        finally:
            self._stop()
        return self.results

    def _start_waiting(self) -> None:
        """Start waiting runs while fewer than ``workers`` are running."""
        while self.waiting and len(self.running) < self.workers:
            index = self.waiting.pop(0)
            process = self.context.Process(target=_worker, args=(index, self.specs[index], self.messages), daemon=True)
            process.start()
            self.running[index] = process
            self.bars.start(index)

    def _receive(self) -> None:
        """Handle the next message; after half a second without one, check that no process died."""
        try:
            kind, index, payload = self.messages.get(timeout=0.5)
        except queue.Empty:
            self._check_alive()
            return
        if kind == "progress":
            self.bars.update(index, *payload)
        elif kind == "done":
            self.results[index] = payload
            self.running.pop(index).join()
        else:
            raise RuntimeError(f"run {self.specs[index].name!r} failed:\n{payload}")

    def _check_alive(self) -> None:
        """Raise ``RuntimeError`` if a running process exited with an error code."""
        for index, process in self.running.items():
            if not process.is_alive() and process.exitcode != 0:
                raise RuntimeError(f"run {self.specs[index].name!r} died (exit code {process.exitcode})")

    def _stop(self) -> None:
        """Terminate the processes still running and close the queue."""
        for process in self.running.values():
            process.terminate()
        for process in self.running.values():
            process.join()
        self.messages.close()
