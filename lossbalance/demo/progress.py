"""The progress display of several runs (:func:`~lossbalance.demo.run_many`)."""
from __future__ import annotations

import time
from typing import Any, Sequence, TextIO

from .runner import RunSpec

__all__ = ["Progress"]


class Progress:
    """Progress of several runs: one tqdm bar each if tqdm is installed, else periodic lines."""

    def __init__(self, specs: Sequence[RunSpec], mode: str, stream: TextIO):
        self.specs, self.stream = specs, stream
        self.started: dict[int, float] = {}
        self.printed: dict[int, int] = {}
        self.bars: dict[int, Any] = {}
        self.tqdm = None
        interactive = bool(getattr(stream, "isatty", lambda: False)())
        if mode == "tqdm" or (mode == "auto" and interactive):
            try:
                from tqdm.auto import tqdm
                self.tqdm = tqdm
            except ImportError:
                if mode == "tqdm":
                    raise ImportError("progress bars need tqdm: pip install 'lossbalance[progress]'") from None
        self.enabled = mode != "none"
        self.width = max(len(s.name) for s in specs) if specs else 0

    def start(self, index: int) -> None:
        """Run ``index`` has started: its clock (and bar) start."""
        self.started[index] = time.perf_counter()
        if self.enabled and self.tqdm is not None:
            spec = self.specs[index]
            self.bars[index] = self.tqdm(total=spec.steps, desc=spec.name.ljust(self.width), position=index,
                                         leave=True, file=self.stream, dynamic_ncols=True)

    def update(self, index: int, step: int, steps: int, loss: float) -> None:
        """Run ``index`` is at ``step`` of ``steps``: move its bar, or print a line every 10 %."""
        if not self.enabled:
            return
        if index in self.bars:
            bar = self.bars[index]
            bar.update(step - bar.n)
            bar.set_postfix_str(f"loss {loss:.3e}", refresh=False)
            return
        tenth = (10 * step) // max(steps, 1)
        if tenth > self.printed.get(index, 0):
            self.printed[index] = tenth
            elapsed = time.perf_counter() - self.started.get(index, time.perf_counter())
            print(f"  [{self.specs[index].name:<{self.width}}] step {step:>{len(str(steps))}}/{steps}  "
                  f"loss {loss:.3e}  {elapsed:6.1f} s", file=self.stream, flush=True)

    def close(self) -> None:
        """Close the bars."""
        for bar in self.bars.values():
            bar.close()
        self.bars.clear()
