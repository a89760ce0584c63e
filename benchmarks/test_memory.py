"""Peak extra memory of plain vs memory="keep" / "lean" / probe on the ~1e6-parameter model.

The figures come from ``benchmarks/memory.py`` (one fresh subprocess per mode, RSS high-water
mark) and go to the JSON's ``extra_info["memory"]``, which ``benchmarks/table.py`` prints; the
recorded time is only how long the measurement took.
"""
from __future__ import annotations

import memory


def test_memory(benchmark):
    benchmark.group = "memory"
    results = benchmark.pedantic(memory.measure, rounds=1, iterations=1)
    benchmark.extra_info.update(suite="memory", memory=results)
