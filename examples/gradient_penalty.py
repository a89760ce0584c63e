r"""A loss term that is itself a gradient: the WGAN-GP critic, with its penalty weight set by LRA.

A critic network ``D: R^2 -> R`` estimates the Wasserstein-1 distance between two 2-D Gaussians
(``real``: mean 0; ``fake``: mean ``m`` with ``|m| = --shift``, both with standard deviation
0.5). Two terms, on fresh samples every step (Gulrajani et al., "Improved Training of Wasserstein
GANs", NeurIPS 2017):

* ``"critic"``: ``E[D(fake)] - E[D(real)]`` (minus the estimate; negative values are fine);
* ``"penalty"``: ``E[(||grad_x D(x_hat)|| - 1)^2]`` on random interpolates
  ``x_hat = e real + (1 - e) fake``. The input gradient comes from
  ``torch.autograd.grad(D(x_hat).sum(), x_hat, create_graph=True)``, so the term's own gradient
  with respect to the weights is a double backward. The balancer handles it like any other
  term: one ``autograd.grad`` per term on the one graph.

Why the weight matters, and what to expect. Both Gaussians share their covariance, so the optimal
1-Lipschitz critic is linear, ``D(x) = -u.x`` with ``u = m / |m|``, and ``W1 = |m|``. For a critic
``D = -c u.x`` the weighted objective is ``-c |m| + lambda (c - 1)^2``: its minimum is at
``c = 1 + |m| / (2 lambda)``, so the estimate is ``|m| (1 + |m| / (2 lambda))``. With
``|m| = 2``: 4.0 for ``lambda = 1``, 2.2 for ``lambda = 10`` (the WGAN-GP default). The penalty
weight fixes the bias of the estimate.

``LRAnnealing(reference="critic")`` (Wang, Teng & Perdikaris 2021) sets it from the gradients.
Near a minimum of the weighted sum, ``lambda g_penalty ~ -g_critic``. The authors' formula
(the default, weight inside the denominator) then gives ``lambda_hat = max|g_critic| /
mean|lambda g_penalty| ~ max|g_critic| / mean|g_critic|``, a ratio of the critic's own
gradient statistics, and the weight settles there: at the end of the run below, on fresh
batches, that ratio is 5.4 to 5.6 against a weight of 5.4, the cosine of ``g_critic`` and
``g_penalty`` is -1.00 and ``|lambda g_penalty| / |g_critic|`` is 0.99 to 1.01. The paper's
formula (``weighted_denominator=False``) gives ``lambda_hat ~ lambda * max / mean > lambda``,
so the weight keeps growing (to 1.5e4 after 150 updates here). The penalty becomes a hard
constraint and the estimate tends to ``|m|``, but the weight has no bound (cap it with
``LossBalancer(..., max_weight=...)``).

Measured (``python examples/gradient_penalty.py``: 1500 Adam steps, 256 samples per
distribution, ``update_every=10``, seed 0, about 2.5 s per run on one thread; estimate on 20 000
fresh samples per distribution, true ``W1 = 2``):

=======================  ================  ========
run                      penalty weight    estimate
=======================  ================  ========
static, lambda = 1       1                 4.01
static, lambda = 10      10                2.19
lra (authors' code)      5.4               2.38
lra (paper formula)      1.5e4             1.99
=======================  ================  ========

The fixed weights land where the formula above says (4.0 and 2.2), and so does the authors' LRA
with its settled weight (``2 (1 + 1 / 5.4) = 2.37``).

    python examples/gradient_penalty.py --steps 3000 --shift 3
"""
from __future__ import annotations

import argparse
import math
import time
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from lossbalance import LossBalancer, LRAnnealing
from lossbalance.problems import MLP

STD = 0.5


def sample(n: int, mean: Tensor, generator: torch.Generator) -> Tensor:
    return STD * torch.randn(n, 2, generator=generator) + mean


def losses(model: nn.Module, real: Tensor, fake: Tensor, generator: torch.Generator) -> dict[str, Tensor]:
    """The critic term and the gradient penalty on random interpolates."""
    e = torch.rand(real.shape[0], 1, generator=generator)
    x_hat = (e * real + (1.0 - e) * fake).requires_grad_(True)
    (grad_x,) = torch.autograd.grad(model(x_hat).sum(), x_hat, create_graph=True)
    return {
        "critic": model(fake).mean() - model(real).mean(),
        "penalty": (torch.linalg.vector_norm(grad_x, dim=1) - 1.0).pow(2).mean(),
    }


def run(label: str, strategy: Any, penalty_weight: float, args: argparse.Namespace) -> dict[str, Any]:
    model = MLP([2, *args.hidden, 1], generator=torch.Generator().manual_seed(args.seed))  # tanh: smooth, so the penalty's double backward is informative
    generator = torch.Generator().manual_seed(args.seed + 1)
    shift = torch.full((2,), args.shift / math.sqrt(2.0))
    zero = torch.zeros(2)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    balancer = LossBalancer(optimizer, strategy, update_every=args.update_every,
                            weights={"critic": 1.0, "penalty": penalty_weight})

    def batch_losses() -> dict[str, Tensor]:  # fresh samples every call
        return losses(model, sample(args.batch, zero, generator), sample(args.batch, shift, generator), generator)

    start = time.perf_counter()
    for _ in range(args.steps):
        balancer.step(batch_losses())
    wall_time = time.perf_counter() - start
    final = batch_losses()
    with torch.no_grad():
        real, fake = sample(args.eval_n, zero, generator), sample(args.eval_n, shift, generator)
        estimate = float(model(real).mean() - model(fake).mean())
    return {
        "label": label, "weights": balancer.weights, "terms": {k: v.item() for k, v in final.items()},
        "estimate": estimate, "true": args.shift, "wall_time": wall_time, "model": model, "balancer": balancer,
    }


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=1500, help="Adam steps (default 1500)")
    parser.add_argument("--shift", type=float, default=2.0, help="distance of the two means = true W1 (default 2)")
    parser.add_argument("--batch", type=int, default=256, help="samples per distribution and step (default 256)")
    parser.add_argument("--hidden", type=int, nargs="+", default=[64, 64], help="critic hidden widths (default 64 64)")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default 1e-3)")
    parser.add_argument("--update-every", type=int, default=10, help="LRA update interval (default 10, the authors')")
    parser.add_argument("--eval-n", type=int, default=20_000, help="samples per distribution for the estimate")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on a network this small more threads only add overhead)")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.update_every < 1 or args.shift <= 0:
        parser.error("need --steps >= 1, --update-every >= 1 and --shift > 0")

    specs = [
        ("static, lambda = 1", "static", 1.0),
        ("static, lambda = 10", "static", 10.0),
        ("lra (authors' code)", LRAnnealing(reference="critic"), 1.0),
        ("lra (paper formula)", LRAnnealing(reference="critic", weighted_denominator=False), 1.0),
    ]
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        runs = {label: run(label, strategy, weight, args) for label, strategy, weight in specs}
    finally:
        torch.set_num_threads(threads)

    print(f"WGAN-GP critic, two 2-D Gaussians {args.shift:g} apart (true W1 = {args.shift:g}): "
          f"{args.steps} Adam steps, LRA every {args.update_every}")
    print(f"{'run':20} | {'W1 estimate':>11} | {'critic':>8} | {'penalty':>9} | {'penalty weight':>14} | wall time")
    for label, r in runs.items():
        print(f"{label:20} | {r['estimate']:>11.3f} | {r['terms']['critic']:>8.3f} | {r['terms']['penalty']:>9.2e} | "
              f"{r['weights']['penalty']:>14.4g} | {r['wall_time']:.2f} s")
    return runs


if __name__ == "__main__":
    main()
