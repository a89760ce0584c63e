"""The native UPGrad and MGDA combiners against torchjd's aggregators on the same matrices.

Each point times the native combiner, every round bracketed by blocks of the torchjd aggregator on
the same ``(K, P)`` float32 matrix (``conftest.Measure``), so ``paired_ratio`` is native time over
torchjd time (target: <= 0.5). The rows are Gaussian with rows 1..K-1 pushed against row 0, so
the projections and the min-norm point are not trivial. K in {2, 4, 8, 16}, P in {1e4, 1e6};
``benchmarks/table.py`` prints the ratios. Skipped without torchjd (``pip install lossbalance[bench]``).
"""
from __future__ import annotations

import pytest
import torch

from lossbalance.combine import MGDA, UPGrad

KS = (2, 4, 8, 16)
PARAMS = (10_000, 1_000_000)
NATIVE = {"UPGrad": UPGrad, "MGDA": MGDA}
CASES = [(name, k, p) for name in NATIVE for k in KS for p in PARAMS]


def matrix(k: int, p: int) -> torch.Tensor:
    g = torch.randn(k, p, generator=torch.Generator().manual_seed(k * 7919 + p))
    g[1:] -= 0.5 * g[0]
    return g


@pytest.mark.parametrize(("name", "k", "p"), CASES, ids=[f"{n}-K{k}-P{p:.0e}" for n, k, p in CASES])
def test_native_vs_torchjd(measure, name, k, p):
    aggregation = pytest.importorskip("torchjd.aggregation", reason="torchjd not installed (pip install lossbalance[bench])")
    g = matrix(k, p)
    native, theirs = NATIVE[name](), getattr(aggregation, name)()
    measure.benchmark.group = f"combiners-{name}"
    measure(lambda: native(g), baseline=lambda: theirs(g), suite="combiners", combiner=name, K=k, params=p)
