"""DeepXDE (PyTorch backend) with lossbalance: ``balance(model, "lra")`` after ``model.compile``.

The 1-D Poisson problem ``u'' = -pi^2 sin(pi x)`` on ``[0, 1]``, ``u(0) = u(1) = 0`` (solution
``sin(pi x)``), written the DeepXDE way: a ``dde.data.PDE`` with one residual and two
``DirichletBC`` (one per end), so the balancer sees the terms ``pde``, ``bc0``, ``bc1``.

1. Adam, balanced by learning-rate annealing (reference: the residual), updated every
   ``--update-every`` iterations. DeepXDE's ``model.train`` runs as usual: one balancer call per
   training iteration (DeepXDE's evaluation passes do not step it); the losses it displays are
   the unweighted terms.
2. ``model.compile("L-BFGS")`` and ``balance(model)`` again: the new balancer starts from the
   learned weights and holds them fixed (a fixed objective for the line search).

DeepXDE is optional (``pip install 'lossbalance[deepxde]'``; select the backend with
``DDE_BACKEND=pytorch``). Without it this script prints how to install it and returns.

    DDE_BACKEND=pytorch python examples/deepxde_poisson.py --steps 2000 --lbfgs-steps 500
"""
from __future__ import annotations

import argparse
import math
import os
import time
from typing import Any, Sequence

import numpy as np
import torch

INSTALL_HINT = "pip install 'lossbalance[deepxde]'"


def import_deepxde():
    """``deepxde`` on its PyTorch backend, or ``None`` when it is not installed."""
    os.environ.setdefault("DDE_BACKEND", "pytorch")
    try:
        import deepxde
    except ImportError:
        return None
    return deepxde


def build(dde, points: int, seed: int):
    dde.config.set_random_seed(seed)
    geom = dde.geometry.Interval(0, 1)

    def pde(x, y):
        return dde.grad.hessian(y, x) + math.pi**2 * torch.sin(math.pi * x)

    bcs = [dde.icbc.DirichletBC(geom, lambda x: 0, lambda x, on: on and np.isclose(x[0], 0)),
           dde.icbc.DirichletBC(geom, lambda x: 0, lambda x, on: on and np.isclose(x[0], 1))]
    data = dde.data.PDE(geom, pde, bcs, num_domain=points, num_boundary=2, num_test=100,
                        solution=lambda x: np.sin(np.pi * x))
    return dde.Model(data, dde.nn.FNN([1, 32, 32, 1], "tanh", "Glorot uniform"))


def error(model) -> float:
    x = np.linspace(0, 1, 201)[:, None]
    exact = np.sin(np.pi * x)
    return float(np.linalg.norm(model.predict(x) - exact) / np.linalg.norm(exact))


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=2000, help="Adam iterations (default 2000)")
    parser.add_argument("--lbfgs-steps", type=int, default=500, help="L-BFGS iterations (0: none; default 500)")
    parser.add_argument("--points", type=int, default=64, help="collocation points (default 64)")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default 1e-3)")
    parser.add_argument("--update-every", type=int, default=10, help="LRA update interval (default 10)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.points < 1 or args.update_every < 1 or args.lbfgs_steps < 0:
        parser.error("need --steps, --points and --update-every >= 1, --lbfgs-steps >= 0")

    dde = import_deepxde()
    if dde is None:
        message = f"DeepXDE is not installed; this example needs it: {INSTALL_HINT}"
        print(message)
        return {"skipped": True, "reason": message}
    from lossbalance import LRAnnealing
    from lossbalance.integrations.deepxde import balance

    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        model = build(dde, args.points, args.seed)
        model.compile("adam", lr=args.lr)
        start_error = error(model)  # predict needs a compiled model
        adam = balance(model, LRAnnealing(reference="pde"), update_every=args.update_every)
        start = time.perf_counter()
        model.train(iterations=args.steps, display_every=max(1, args.steps), verbose=0)
        adam_time, adam_error = time.perf_counter() - start, error(model)
        lbfgs, lbfgs_error, lbfgs_time = None, adam_error, 0.0
        if args.lbfgs_steps:
            model.compile("L-BFGS")
            lbfgs = balance(model, LRAnnealing(reference="pde"))  # the learned weights, frozen
            dde.optimizers.set_LBFGS_options(maxiter=args.lbfgs_steps)
            try:
                start = time.perf_counter()
                model.train(display_every=max(1, args.lbfgs_steps), verbose=0)
                lbfgs_time, lbfgs_error = time.perf_counter() - start, error(model)
            finally:
                dde.optimizers.set_LBFGS_options()
    finally:
        torch.set_num_threads(threads)

    def show(weights):
        return ", ".join(f"{k}={v:.4g}" for k, v in weights.items())

    print(f"DeepXDE {dde.__version__} (backend {dde.backend.backend_name}): 1-D Poisson, terms {list(adam.weights)}")
    print(f"{'phase':28} | {'rel. L2 error':>13} | weights")
    print(f"{'start':28} | {start_error:>13.3g} |")
    print(f"{f'Adam ({args.steps} iterations, lra)':28} | {adam_error:>13.3g} | {show(adam.weights)}  ({adam_time:.1f} s)")
    if lbfgs is not None:
        print(f"{'L-BFGS (frozen weights)':28} | {lbfgs_error:>13.3g} | {show(lbfgs.weights)}  ({lbfgs_time:.1f} s)")
    return {"skipped": False, "start_error": start_error, "adam_error": adam_error, "lbfgs_error": lbfgs_error,
            "adam": adam, "lbfgs": lbfgs, "weights": adam.weights, "model": model}


if __name__ == "__main__":
    main()
