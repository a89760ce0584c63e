"""What the integrations' path costs: ``balancer.loss(losses).backward()`` against ``backward()``
and ``step()``, and a Lightning automatic-optimisation step with ``balancer.loss()`` against a
plain Lightning step.

``test_loss_path``: on the three K = 4 workloads, each variant's rounds of 10 steps bracketed by
blocks of 10 plain steps (``conftest.Measure``, ``paired_ratio`` in the JSON):

* ``loss_lra_every1``: ``zero_grad(); balancer.loss(losses).backward(); opt.step()`` with a
  balancer built from the parameters (the path of Lightning, DeepXDE, PINA, aggregators);
* ``backward_lra_every1``: ``balancer.backward(losses); opt.step()``;
* ``step_lra_every1``: ``balancer.step(losses)`` (the README's ``lra_every1``);
* ``loss_lra_every10`` and ``loss_static``: ``loss()`` on plain steps (one backward, then the
  surrogate's, O(P)).

``test_lightning_step``: the 1-D Poisson PINN of ``examples/lightning_module.py`` (MLP 1-32-32-1,
batch 64) under ``Trainer(max_steps=...)``; a callback times ``on_train_batch_start`` to
``on_train_batch_end`` (forward, Lightning's backward, optimizer step). Fits of 40 steps
alternate between the plain module (``sum(losses)``) and the balanced one (``balancer.loss``,
LRA every step); ``extra_info["ratio"]`` is the median over the pairs of the balanced fit's
median step over the plain fit's. Needs Lightning.
"""
from __future__ import annotations

import math
import statistics
import time
import warnings

import pytest
import torch
from torch import nn

import workloads as W

ITERATIONS = 10


def loss_variant(w: W.Workload, strategy: str = "lra", update_every: int = 1):
    from lossbalance import LossBalancer, LRAnnealing

    strat = LRAnnealing(reference=w.reference) if strategy == "lra" else strategy
    lb = LossBalancer(w.params, strat, update_every=update_every, weights=w.weights)
    opt = w.optimizer

    def step():
        opt.zero_grad()
        total = lb.loss(w.losses())
        total.backward()
        opt.step()
        return total

    return step


def backward_variant(w: W.Workload):
    from lossbalance import LossBalancer, LRAnnealing

    lb = LossBalancer(w.optimizer, LRAnnealing(reference=w.reference), weights=w.weights)

    def step():
        total = lb.backward(w.losses())
        w.optimizer.step()
        return total

    return step


VARIANTS = {
    "loss_lra_every1": lambda w: loss_variant(w),
    "backward_lra_every1": backward_variant,
    "step_lra_every1": lambda w: W.balancer(w, update_every=1),
    "loss_lra_every10": lambda w: loss_variant(w, update_every=10),
    "loss_static": lambda w: loss_variant(w, "static"),
}
CASES = [(w, v) for w in W.WORKLOADS for v in VARIANTS]


@pytest.mark.parametrize(("workload", "variant"), CASES, ids=[f"{w}-{v}" for w, v in CASES])
def test_loss_path(measure, workload, variant):
    w = W.make(workload)
    measure.benchmark.group = f"loss-path-{workload}"
    measure(VARIANTS[variant](w), baseline=W.plain(W.make(workload)), iterations=ITERATIONS,
            suite="loss_path", workload=workload, variant=variant, K=len(w.names), params=w.n_params)


def test_lightning_step(benchmark):
    pl = pytest.importorskip("lightning.pytorch", reason="needs Lightning: pip install 'lossbalance[lightning]'")
    from lossbalance import LossBalancer, LRAnnealing

    def poisson(net, x):
        x = x.detach().requires_grad_(True)
        u = net(x)
        (u_x,) = torch.autograd.grad(u.sum(), x, create_graph=True)
        (u_xx,) = torch.autograd.grad(u_x.sum(), x, create_graph=True)
        ends = torch.tensor([[0.0], [1.0]])
        return {"pde": (u_xx + math.pi**2 * torch.sin(math.pi * x)).pow(2).mean(), "bc": net(ends).pow(2).sum()}

    class Module(pl.LightningModule):
        def __init__(self, balanced: bool):
            super().__init__()
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Linear(1, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 1))
            self.balancer = LossBalancer(self.parameters(), LRAnnealing(reference="pde")) if balanced else None

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-3)

        def training_step(self, batch, batch_idx):
            losses = poisson(self.net, batch[0])
            return self.balancer.loss(losses) if self.balancer is not None else sum(losses.values())

    class Timer(pl.Callback):
        def __init__(self):
            self.times, self._start = [], 0.0

        def on_train_batch_start(self, *args):
            self._start = time.perf_counter()

        def on_train_batch_end(self, *args):
            self.times.append(time.perf_counter() - self._start)

    data = torch.utils.data.TensorDataset(torch.rand(1024, 1, generator=torch.Generator().manual_seed(1)))
    loader = torch.utils.data.DataLoader(data, batch_size=64, shuffle=False)

    def fit(balanced: bool) -> float:
        timer = Timer()
        trainer = pl.Trainer(max_steps=40, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False, callbacks=[timer])
        trainer.fit(Module(balanced), loader)
        return statistics.median(timer.times[5:])  # the first steps warm up

    pairs = 3 if getattr(benchmark, "disabled", False) else 7
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit(False)  # warm-up
        rows = [(fit(False), fit(True)) for _ in range(pairs)]
        benchmark.pedantic(fit, args=(True,), rounds=1, iterations=1)
    ratios = [balanced / plain for plain, balanced in rows]
    benchmark.group = "lightning-step"
    benchmark.extra_info.update(
        suite="lightning", ratio=statistics.median(ratios), plain_step=statistics.median(p for p, _ in rows),
        balanced_step=statistics.median(b for _, b in rows), threads=torch.get_num_threads(),
    )
