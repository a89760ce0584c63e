"""FSDP2 (``fully_shard``) on two gloo CPU processes: what fails, and the balancer on a sharded PINN.

Each of two processes (forked here, ``torch.distributed`` with the gloo backend and a file
store: no ``torchrun`` needed) holds half the collocation points of a 1-D Poisson problem
(``-u'' = pi^2 sin(pi x)`` on [0, 1], ``u(0) = u(1) = 0``: terms ``pde`` and ``bc``) and half
of every parameter of a ``1 -> 32 -> 32 -> 1`` tanh MLP, each ``nn.Linear`` and the root wrapped
by ``fully_shard``. Three things are shown:

1. **The smallest repro**: ``torch.autograd.grad(loss, model.parameters())`` raises "The differentiated
   Tensor at index 0 appears to not have been used in the graph". The optimizer's
   parameters are the sharded DTensors; the forward computes with FSDP's separate *unsharded*
   parameters (all-gathered in a pre-forward hook), so no graph reaches the sharded ones.
   ``LossBalancer`` therefore differentiates each term through FSDP's own backward hooks
   (:mod:`lossbalance.sharded`).
2. **Input derivatives under the default FSDP2 settings**: the second
   ``torch.autograd.grad(du.sum(), x, create_graph=True)`` of the PDE residual raises
   "setStorage: ... out of bounds for storage of size 0", in the loss code, before any balancer:
   the first derivative's backward ran FSDP's post-backward hook, which reshards (frees the
   storage of) the unsharded weights that the second-order graph saved.
3. **The workaround, and the balancer on it**: ``fully_shard(..., reshard_after_forward=False)``
   and ``model.set_reshard_after_backward(False)`` keep the unsharded weights through the step;
   ``reshard()`` on every FSDP module after each step (a step hook of the balancer) makes the next
   forward gather the updated shards: without it every step would silently compute with the
   first step's weights. ``LossBalancer(optimizer, LRAnnealing("pde"), update_every=10)`` trains
   it: the update steps differentiate each term through FSDP's hooks; on the steps between, one
   backward of the weighted sum leaves part of the last layer's gradient unreduced in FSDP (the
   same happens to a plain ``loss.backward()``), which the balancer detects, and from then on
   it runs one backward per term there too (with a warning). Both ranks end with identical
   weights and parameters, equal to one process on all the points.

Run: ``python examples/fsdp2.py [--steps 200]`` (a few seconds on two cores).
"""
from __future__ import annotations

import argparse
import math
import os
import tempfile
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from lossbalance import LossBalancer, LRAnnealing


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(1, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 1))


def points(rank: int | None = None, world: int = 2) -> torch.Tensor:
    x = torch.rand(64, 1, generator=torch.Generator().manual_seed(1))
    return x if rank is None else x[rank::world]  # this rank's half


def losses(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    x = x.clone().requires_grad_(True)
    u = model(x)
    (du,) = torch.autograd.grad(u.sum(), x, create_graph=True)
    (d2u,) = torch.autograd.grad(du.sum(), x, create_graph=True)
    ends = torch.tensor([[0.0], [1.0]])
    return {"pde": (d2u + math.pi**2 * torch.sin(math.pi * x)).pow(2).mean(), "bc": model(ends).pow(2).mean()}


def shard(model: nn.Module, keep_unsharded: bool) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, reshard_after_forward=not keep_unsharded)
    fully_shard(model, reshard_after_forward=not keep_unsharded)
    if keep_unsharded:
        model.set_reshard_after_backward(False)  # recursive: every FSDP module of the model
    return model


def reshard(model: nn.Module) -> None:
    """Free every FSDP module's unsharded parameters (``reshard()`` is not recursive)."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def failure(call) -> str:
    try:
        call()
    except RuntimeError as error:
        return str(error).splitlines()[0]
    return "no error"


def train(model: nn.Module, x: torch.Tensor, steps: int, sharded: bool) -> LossBalancer:
    balancer = LossBalancer(torch.optim.Adam(model.parameters(), lr=1e-2), LRAnnealing("pde"), update_every=10)
    if sharded:
        balancer.register_step_hook(lambda _: reshard(model))  # the next forward gathers the new shards
    for _ in range(steps):
        balancer.step(losses(model, x))
    return balancer


def worker(rank: int, world: int, init_file: str, steps: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        x = points(rank, world)
        model = shard(mlp(), keep_unsharded=False)
        fit = model(x).pow(2).mean()
        result: dict[str, Any] = {
            "autograd.grad": failure(lambda: torch.autograd.grad(fit, list(model.parameters()))),
            "input derivatives": failure(lambda: losses(shard(mlp(), keep_unsharded=False), x)),
        }
        model = shard(mlp(), keep_unsharded=True)
        balancer = train(model, x, steps, sharded=True)
        result.update(weights=balancer.weights, losses={k: v.item() for k, v in losses(model, x).items()},
                      params=[p.detach().full_tensor() for p in balancer.param_groups[0]["params"]])
        torch.save(result, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200, help="Adam steps (default 200)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as out:
        # fork: the workers need not import this file by name (it may be loaded from a path)
        mp.start_processes(worker, args=(2, os.path.join(out, "init"), args.steps, out), nprocs=2, start_method="fork")
        ranks = [torch.load(os.path.join(out, f"rank{r}.pt")) for r in range(2)]
    single = mlp()
    reference = train(single, points(), args.steps, sharded=False)
    gap = max(float((a - b.detach()).abs().max()) for a, b in zip(ranks[0]["params"], single.parameters()))
    print(f"1. autograd.grad w.r.t. the sharded parameters: {ranks[0]['autograd.grad']}")
    print(f"2. input derivatives, default fully_shard:      {ranks[0]['input derivatives']}")
    print(f"3. LossBalancer, {args.steps} steps, unsharded through the step and resharded after it:")
    print(f"   weights rank 0 {ranks[0]['weights']}, rank 1 {ranks[1]['weights']}")
    print(f"   one process on all the points: {reference.weights}; largest parameter difference {gap:.2e}")
    print(f"   this rank's losses after training: {ranks[0]['losses']}")
    return {"ranks": ranks, "reference": reference.weights, "gap": gap}


if __name__ == "__main__":
    main()
