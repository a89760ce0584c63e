"""Tiny models and loss dicts shared by the tests."""
from __future__ import annotations

import math

import torch
from torch import nn


def mlp(sizes=(1, 16, 16, 1), seed=0, dtype=torch.float32) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), nn.Tanh()]
    return nn.Sequential(*layers[:-1]).to(dtype)


class PINN1D:
    """-u'' = pi^2 sin(pi x) on [0, 1]: Dirichlet u(0) = 0, Neumann u'(1) = -pi, interior residual."""

    def __init__(self, seed=0, n=32, dtype=torch.float32):
        self.model = mlp(seed=seed, dtype=dtype)
        g = torch.Generator().manual_seed(seed)
        self.x = torch.rand(n, 1, generator=g, dtype=dtype)

    def losses(self) -> dict[str, torch.Tensor]:
        x = self.x.clone().requires_grad_(True)
        u = self.model(x)
        (du,) = torch.autograd.grad(u.sum(), x, create_graph=True)
        (d2u,) = torch.autograd.grad(du.sum(), x, create_graph=True)
        x0 = torch.zeros(1, 1, dtype=x.dtype)
        x1 = torch.ones(1, 1, dtype=x.dtype, requires_grad=True)
        u1 = self.model(x1)
        (du1,) = torch.autograd.grad(u1.sum(), x1, create_graph=True)
        return {
            "pde": (d2u + math.pi**2 * torch.sin(math.pi * x)).pow(2).mean(),
            "dirichlet": self.model(x0).pow(2).mean(),
            "neumann": (du1 + math.pi).pow(2).mean(),
        }


class TwoHeads(nn.Module):
    """A shared trunk with two heads: two regression tasks sharing most of the graph."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.trunk = nn.Sequential(nn.Linear(3, 24), nn.Tanh(), nn.Linear(24, 24), nn.Tanh())
        self.a = nn.Linear(24, 1)
        self.b = nn.Linear(24, 1)
        g = torch.Generator().manual_seed(seed + 1)
        self.x = torch.randn(64, 3, generator=g)
        self.ya = torch.sin(self.x.sum(1, keepdim=True))
        self.yb = 10.0 * self.x[:, :1] ** 2

    def losses(self) -> dict[str, torch.Tensor]:
        h = self.trunk(self.x)
        return {"a": (self.a(h) - self.ya).pow(2).mean(), "b": (self.b(h) - self.yb).pow(2).mean()}


class InfiniteGradient(torch.autograd.Function):
    """Identity forward, Inf backward: a finite loss whose gradient is not."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return torch.full_like(grad, math.inf)


def grads_of(params):
    return [None if p.grad is None else p.grad.detach().clone() for p in params]
