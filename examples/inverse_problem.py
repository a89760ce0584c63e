"""Inverse problem: recover the unknown coefficient of a 1-D Poisson equation, configured from TOML.

``-k u'' = f`` on ``[0, 1]`` with ``u = sin(pi x)`` and ``f = k_true pi^2 sin(pi x)``; ``f`` and
noise-free observations of ``u`` are known, ``k`` is not (``k_true = 2.5``). The model is a
network ``u(x)`` (``net.``) plus one trainable scalar ``coef`` (the estimate of ``k``). Two terms:

* ``"data"``: ``mean (u(x_i) - u_i)^2`` on the observation points; its scope is the network
  (``"net."``);
* ``"pde"``: ``mean (-coef u''(x_j) - f(x_j))^2`` on the collocation points; its scope is the
  coefficient (``"coef"``): the residual's gradient flows through ``u''`` but only ``coef``
  receives it, so the residual cannot bend the network towards a wrong ``k``.

Everything comes from ``inverse_problem.toml`` (read with the standard library's ``tomllib``):
the ``[balancer]`` table goes to ``LossBalancer.from_config(optimizer, config["balancer"],
model=model)`` (strategy, ``update_every``, ``scope`` by parameter-name prefix), the other
tables hold the problem and the training settings.

Why Adam and not L-BFGS: with scopes, the step direction ``sum_i w_i scope_i(grad L_i)`` is not
the gradient of one scalar, so a line search (which assumes one objective) does not apply.
Both learning rates decay continuously (``lr * lr_decay ** (step / lr_decay_every)``).

The TOML balances with ReLoBRaLo (loss values only: a step costs one plain backward). With
disjoint scopes and Adam (invariant to a constant scale of each parameter's gradient) the
weights matter little here; the example shows the scoped configuration. LRA with its defaults
would keep the weights: it measures weight matrices, and the ``"pde"`` scope holds only the
scalar ``coef``.

    python examples/inverse_problem.py                     # default budget: k within 1 %
    python examples/inverse_problem.py --steps 500 --config my.toml
"""
from __future__ import annotations

import argparse
import math
import time
import tomllib
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn

from lossbalance import LossBalancer
from lossbalance.problems import MLP

DEFAULT_CONFIG = Path(__file__).with_suffix(".toml")


class InverseModel(nn.Module):
    """``net``: MLP ``[1, *hidden, 1]`` with tanh (input mapped to ``[-1, 1]``); ``coef``: the
    unknown coefficient, one trainable scalar."""

    def __init__(self, hidden: Sequence[int], k_init: float, generator: torch.Generator):
        super().__init__()
        self.net = MLP([1, *hidden, 1], generator=generator)
        self.coef = nn.Parameter(torch.tensor(float(k_init)))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(2.0 * x - 1.0)


def exact(x: Tensor) -> Tensor:
    return torch.sin(math.pi * x)


def losses(model: InverseModel, x_data: Tensor, u_data: Tensor, x_pde: Tensor, f: Tensor) -> dict[str, Tensor]:
    x = x_pde.detach().requires_grad_(True)
    u = model(x)
    (u_x,) = torch.autograd.grad(u.sum(), x, create_graph=True)
    (u_xx,) = torch.autograd.grad(u_x.sum(), x, create_graph=True)
    return {
        "pde": (-model.coef * u_xx - f).pow(2).mean(),
        "data": (model(x_data) - u_data).pow(2).mean(),
    }


def make_data(problem: Mapping[str, Any]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(x_data, u_data, x_pde, f)``: the observations and the collocation points with ``f`` there."""
    x_data = torch.linspace(0.0, 1.0, int(problem["n_data"]))[:, None]
    n = int(problem["n_collocation"])
    x_pde = torch.linspace(0.0, 1.0, n + 2)[1:-1, None]
    return x_data, exact(x_data), x_pde, float(problem["k_true"]) * math.pi**2 * exact(x_pde)


def load_config(path: str | Path) -> dict[str, Any]:
    with open(path, "rb") as handle:
        config = tomllib.load(handle)
    missing = [table for table in ("problem", "training", "balancer") if table not in config]
    if missing:
        raise ValueError(f"{path}: missing table(s) {missing}")
    return config


def run(config: Mapping[str, Any], *, steps: int | None = None, seed: int | None = None) -> dict[str, Any]:
    """Train as ``config`` says (``steps`` / ``seed`` override ``[training]``); returns the figures."""
    problem, training = config["problem"], config["training"]
    steps = int(training["steps"] if steps is None else steps)
    seed = int(training.get("seed", 0) if seed is None else seed)
    k_true = float(problem["k_true"])

    generator = torch.Generator().manual_seed(seed)
    model = InverseModel(training.get("hidden", [32, 32]), problem.get("k_init", 1.0), generator)
    data = make_data(problem)

    lr = float(training.get("lr", 1e-3))
    optimizer = torch.optim.Adam([
        {"params": model.net.parameters(), "lr": lr},
        {"params": [model.coef], "lr": float(training.get("lr_coef", lr))},
    ])
    balancer = LossBalancer.from_config(optimizer, config["balancer"], model=model)
    decay, every = float(training.get("lr_decay", 1.0)), float(training.get("lr_decay_every", 1000))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: decay ** (step / every))

    start = time.perf_counter()
    for _ in range(steps):
        balancer.step(losses(model, *data))
        scheduler.step()
    wall_time = time.perf_counter() - start

    k = model.coef.item()
    x_eval = torch.linspace(0.0, 1.0, 1001)[:, None]
    with torch.no_grad():
        u_exact = exact(x_eval)
        u_error = float(torch.linalg.vector_norm(model(x_eval) - u_exact) / torch.linalg.vector_norm(u_exact))
    return {
        "k_true": k_true, "k": k, "rel_error": abs(k - k_true) / abs(k_true), "u_error": u_error,
        "steps": steps, "wall_time": wall_time, "weights": balancer.weights,
        "config": balancer.config(model), "model": model, "balancer": balancer,
    }


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="TOML file (default: inverse_problem.toml here)")
    parser.add_argument("--steps", type=int, default=None, help="Adam steps (default: [training] steps)")
    parser.add_argument("--seed", type=int, default=None, help="seed of the network (default: [training] seed)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on a network this small more threads only add overhead)")
    args = parser.parse_args(argv)
    if args.steps is not None and args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    config = load_config(args.config)

    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        result = run(config, steps=args.steps, seed=args.seed)
    finally:
        torch.set_num_threads(threads)
    settings = config["balancer"]
    print(f"-k u'' = f on [0, 1], u = sin(pi x): {result['steps']} Adam steps, balancer "
          f"{settings.get('strategy', 'lra')!r} every {settings.get('update_every', 1)}, scope {settings.get('scope')}")
    print(f"true k      {result['k_true']:.6g}")
    print(f"recovered k {result['k']:.6g}")
    print(f"relative error {100 * result['rel_error']:.3f} %  (u: rel. L2 {result['u_error']:.2e}; "
          f"weights " + ", ".join(f"{k}={v:.3g}" for k, v in result["weights"].items())
          + f"; {result['wall_time']:.1f} s)")
    return result


if __name__ == "__main__":
    main()
