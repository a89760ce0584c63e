"""The benchmark workloads and the step variants timed on them.

Three PINN-style workloads, each built from a tanh MLP (default 2-50-50-50-1) with K loss terms:

``disjoint``
    the usual PINN: a Poisson residual ``u_xx + u_yy - f`` (second derivatives by autograd) on
    1024 interior points, and K - 1 boundary MSE terms on 128 points each; every term comes from
    its own forward pass on its own points.
``heads``
    multi-task: one forward of 1024 points through a shared trunk (2-50-50-50), K linear heads
    (50 -> 1), one MSE per head against its own target.
``residual``
    all K terms are different reductions of one residual graph (the residual above on 1024
    points): mean r^2, mean |r|, mean r^4 and mean r^2 over half of the points (then mean |r|^3,
    ... for K > 4).

A *variant* is a ``step()`` callable that builds the losses (the forward pass is part of every
timed step), differentiates and steps the optimizer (SGD, lr=1e-6, so the model barely moves).
Everything here is deterministic: one seed per workload, fresh model and optimizer per variant.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor, nn

WORKLOADS = ("disjoint", "heads", "residual")
WIDTH = 50
DEPTH = 3  # hidden layers
N_INTERIOR = 1024
N_BOUNDARY = 128
LR = 1e-6


def mlp_params(width: int, depth: int = DEPTH, d_in: int = 2, d_out: int = 1) -> int:
    """Parameter count of a d_in-width x depth-d_out MLP."""
    return (d_in + 1) * width + (depth - 1) * (width + 1) * width + (width + 1) * d_out


def width_for(params: float, depth: int = DEPTH) -> int:
    """The hidden width whose 2-w-...-w-1 MLP has about ``params`` parameters."""
    return min(range(4, 4096), key=lambda w: abs(mlp_params(w, depth) - params))


def mlp(sizes: tuple[int, ...]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), nn.Tanh()]
    return nn.Sequential(*layers[:-1])


class Heads(nn.Module):
    """A shared tanh trunk and K linear heads; ``forward`` returns (N, K)."""

    def __init__(self, width: int, depth: int, k: int):
        super().__init__()
        self.trunk = nn.Sequential(*mlp((2,) + (width,) * depth), nn.Tanh())
        self.heads = nn.ModuleList(nn.Linear(width, 1) for _ in range(k))

    def forward(self, x: Tensor) -> Tensor:
        h = self.trunk(x)
        return torch.cat([head(h) for head in self.heads], 1)


def laplacian_residual(model: nn.Module, x: Tensor) -> Tensor:
    """Per-point residual ``u_xx + u_yy - f`` of a Poisson problem (f = -2 pi^2 sin(pi x) sin(pi y))."""
    x = x.detach().requires_grad_(True)
    u = model(x)
    (du,) = torch.autograd.grad(u.sum(), x, create_graph=True)
    (u_xx,) = torch.autograd.grad(du[:, 0].sum(), x, create_graph=True)
    (u_yy,) = torch.autograd.grad(du[:, 1].sum(), x, create_graph=True)
    f = -2 * math.pi**2 * torch.sin(math.pi * x[:, 0]) * torch.sin(math.pi * x[:, 1])
    return u_xx[:, 0] + u_yy[:, 1] - f


def _reductions(k: int) -> list[tuple[str, Callable[[Tensor], Tensor]]]:
    base: list[tuple[str, Callable[[Tensor], Tensor]]] = [
        ("l2", lambda r: r.pow(2).mean()),
        ("l1", lambda r: r.abs().mean()),
        ("l4", lambda r: r.pow(4).mean()),
        ("half", lambda r: r[: r.shape[0] // 2].pow(2).mean()),
    ]
    extra = [(f"p{p}", (lambda p: lambda r: r.abs().pow(p).mean())(p)) for p in range(3, 3 + max(0, k - 4))]
    return (base + extra)[:k]


@dataclass
class Workload:
    """A model, its optimizer and ``losses()``: the dict of K terms from a fresh forward pass."""

    name: str
    model: nn.Module
    losses: Callable[[], dict[str, Tensor]]
    optimizer: torch.optim.Optimizer
    weights: dict[str, float]
    reference: str
    first_layer: list[Tensor] = field(default_factory=list)
    last_layer: list[Tensor] = field(default_factory=list)

    @property
    def params(self) -> list[Tensor]:
        return [p for p in self.model.parameters() if p.requires_grad]

    @property
    def n_params(self) -> int:
        return sum(p.numel() for p in self.params)

    @property
    def names(self) -> list[str]:
        return list(self.weights)


def make(name: str, *, k: int = 4, width: int = WIDTH, depth: int = DEPTH, seed: int = 0,
         n_interior: int = N_INTERIOR, n_boundary: int = N_BOUNDARY) -> Workload:
    """Build a workload (fresh model, points and optimizer) from its name."""
    if name not in WORKLOADS:
        raise ValueError(f"unknown workload {name!r}; known: {WORKLOADS}")
    if k < 2:
        raise ValueError("k must be at least 2")
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    interior = torch.rand(n_interior, 2, generator=g)

    if name == "disjoint":
        model = mlp((2,) + (width,) * depth + (1,))
        boundary = []
        for i in range(k - 1):  # points on the four sides in turn, then again at other positions
            t = torch.rand(n_boundary, 1, generator=g)
            side = i % 4
            fixed = torch.full_like(t, float(side % 2))
            xy = torch.cat([t, fixed], 1) if side < 2 else torch.cat([fixed, t], 1)
            boundary.append((f"bc{i}", xy, torch.zeros(n_boundary, 1)))

        def losses() -> dict[str, Tensor]:
            terms = {"pde": laplacian_residual(model, interior).pow(2).mean()}
            for key, xy, target in boundary:
                terms[key] = (model(xy) - target).pow(2).mean()
            return terms

        first, last = model[0], model[-1]
        names = ["pde"] + [b[0] for b in boundary]
    elif name == "heads":
        model = Heads(width, depth, k)
        targets = torch.stack(
            [torch.sin((i + 1) * math.pi * interior[:, 0]) * torch.cos(math.pi * interior[:, 1]) for i in range(k)], 1
        )
        names = [f"task{i}" for i in range(k)]

        def losses() -> dict[str, Tensor]:
            out = model(interior)
            errors = (out - targets).pow(2)
            return {n: errors[:, i].mean() for i, n in enumerate(names)}

        first, last = model.trunk[0], model.heads[-1]
        # the "last layer" probe: every head (the layer after the trunk)
        last_params = [p for h in model.heads for p in h.parameters()]
    else:
        model = mlp((2,) + (width,) * depth + (1,))
        reductions = _reductions(k)
        names = [n for n, _ in reductions]

        def losses() -> dict[str, Tensor]:
            r = laplacian_residual(model, interior)
            return {n: f(r) for n, f in reductions}

        first, last = model[0], model[-1]

    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    weights = {n: 1.0 for n in names}
    last_layer = last_params if name == "heads" else list(last.parameters())
    return Workload(name, model, losses, optimizer, weights, names[0], list(first.parameters()), last_layer)


# ---------------------------------------------------------------------------------------------- variants
def plain(w: Workload) -> Callable[[], object]:
    """``zero_grad(); sum(w_i L_i).backward(); step()`` with fixed weights."""
    opt, weights = w.optimizer, w.weights

    def step():
        opt.zero_grad()
        losses = w.losses()
        total = sum(weights[n] * loss for n, loss in losses.items())
        total.backward()
        opt.step()
        return total

    return step


def floor(w: Workload) -> Callable[[], object]:
    """The floor of exact per-term gradients: K ``autograd.grad`` calls, their sum into ``.grad``.

    No statistics, no weights, no checks: one backward per term (the term with the largest graph
    last, so that its graph is not retained), which is what any method that needs each term's
    full gradient pays. On shared graphs it is about K backward passes of the shared part.
    """
    from lossbalance.graph import graph_size

    opt, params = w.optimizer, w.params
    order: list[str] = []

    def step():
        opt.zero_grad()
        losses = w.losses()
        if not order:
            order.extend(sorted(losses, key=lambda n: graph_size(losses[n])))
        total: list = [None] * len(params)
        for n in order:
            grads = torch.autograd.grad(losses[n], params, retain_graph=n != order[-1], allow_unused=True)
            total = [g if t is None else (t if g is None else t + g) for t, g in zip(total, grads)]
        for p, g in zip(params, total):
            p.grad = g
        opt.step()

    return step


def naive(w: Workload) -> Callable[[], object]:
    """PhysicsNeMo-style LRA loop: K ``autograd.grad`` calls (retain_graph), then a full backward.

    The per-term gradients only feed the statistics (max |g| of the reference, mean |g| of the
    others); the step itself comes from a second, full backward of the weighted sum.
    """
    opt, params, names, ref = w.optimizer, w.params, w.names, w.reference
    weights = {n: torch.tensor(v) for n, v in w.weights.items()}
    alpha = 0.1

    def step():
        opt.zero_grad()
        losses = w.losses()
        grads = {n: torch.autograd.grad(losses[n], params, retain_graph=True, allow_unused=True) for n in names}
        flat = {n: torch.cat([g.reshape(-1) for g in gs if g is not None]) for n, gs in grads.items()}
        top = flat[ref].abs().max()
        for n in names:
            if n != ref:
                hat = top / (weights[n] * flat[n].abs().mean() + 1e-8)
                weights[n] = (1 - alpha) * weights[n] + alpha * hat
        total = sum(weights[n] * losses[n] for n in names)
        total.backward()
        opt.step()
        return total

    return step


def balancer(w: Workload, strategy: str = "lra", *, update_every: int = 1, memory: str = "keep",
             probe: bool = False, scope: bool = False, check_every: int = 1) -> Callable[[], object]:
    """``LossBalancer(opt, strategy, ...).step(losses)``.

    ``strategy="lra"``: ``LRAnnealing(reference=<first term>)``. ``probe``: statistics on the last
    layer's parameters. ``scope``: every term but the reference may train all parameters except
    the first layer's.
    """
    from lossbalance import LossBalancer, LRAnnealing
    from lossbalance.strategies import make_strategy

    strat = LRAnnealing(reference=w.reference) if strategy == "lra" else make_strategy(strategy)
    kwargs: dict = dict(update_every=update_every, memory=memory, weights=w.weights, check_every=check_every)
    if probe:
        kwargs["probe"] = w.last_layer
    if scope:
        first = {id(p) for p in w.first_layer}
        rest = [p for p in w.params if id(p) not in first]
        kwargs["scope"] = {n: rest for n in w.names if n != w.reference}
    lb = LossBalancer(w.optimizer, strat, **kwargs)

    def step():
        return lb.step(w.losses())

    step.balancer = lb  # type: ignore[attr-defined]
    return step


def torchjd_available() -> bool:
    try:
        import torchjd  # noqa: F401
    except ImportError:
        return False
    return True


def torchjd_mean(w: Workload) -> Callable[[], object]:
    """Jacobian descent with torchjd's ``Mean`` aggregator (the K per-term gradients, averaged).

    torchjd >= 0.8 splits it in two: ``autojac.backward(losses)`` fills ``.jac``, then
    ``autojac.jac_to_grad(params, Mean())`` aggregates into ``.grad``; older releases take the
    aggregator in ``torchjd.backward(losses, aggregator, inputs=...)``.
    """
    import torchjd
    from torchjd.aggregation import Mean

    opt, params, aggregator = w.optimizer, w.params, Mean()
    try:
        from torchjd.autojac import backward as jd_backward, jac_to_grad
    except ImportError:
        jd_backward, jac_to_grad = torchjd.backward, None
    if jac_to_grad is None or "aggregator" in inspect.signature(jd_backward).parameters:
        def differentiate(losses: list[Tensor]) -> None:
            jd_backward(losses, aggregator, inputs=params)
    else:
        def differentiate(losses: list[Tensor]) -> None:
            jd_backward(losses, inputs=params)
            jac_to_grad(params, aggregator)

    def step():
        opt.zero_grad()
        losses = w.losses()
        differentiate(list(losses.values()))
        opt.step()

    return step


def relobralo_available() -> bool:
    """Whether "relobralo" is registered (importing its module registers it, if it exists)."""
    from lossbalance.strategies import available_strategies

    if "relobralo" not in available_strategies():
        try:
            import lossbalance.strategies.relobralo  # noqa: F401
        except ImportError:
            return False
    return "relobralo" in available_strategies()


# name -> (factory, options); the order is the table's column order
VARIANTS: dict[str, tuple[Callable[..., Callable[[], object]], dict]] = {
    "plain": (plain, {}),
    "lra_every1": (balancer, dict(update_every=1)),
    "lra_every10": (balancer, dict(update_every=10)),
    "static": (balancer, dict(strategy="static")),
    "relobralo": (balancer, dict(strategy="relobralo")),
    "static_deferred": (balancer, dict(strategy="static", check_every=1000)),
    "lra10_deferred": (balancer, dict(update_every=10, check_every=1000)),
    "probe_every1": (balancer, dict(update_every=1, probe=True)),
    "lean_every1": (balancer, dict(update_every=1, memory="lean")),
    "scope_every1": (balancer, dict(update_every=1, scope=True)),
    "floor": (floor, {}),
    "naive": (naive, {}),
    "torchjd_mean": (torchjd_mean, {}),
}


# ---------------------------------------------------------------------------------------------
# Balancing at the cost of a plain step (issue 18): FAMO and momentum ConFIG need no per-term
# gradients through the shared graph (targets: <= 1.10x the plain step on every workload).
def one_backward(w: Workload, strategy: str = "static", combine: str | None = None) -> Callable[[], object]:
    """``LossBalancer(opt, strategy, combine=combine).step(losses)``: "famo" (one backward of the
    weighted sum, the logits learn from the next step's losses) or ``combine="mconfig"`` (one
    term's backward per step in turn, with the workloads' SGD: the documented pairing)."""
    from lossbalance import LossBalancer

    options: dict = {"weights": w.weights} if strategy == "static" else {}
    if combine is not None:
        options["combine"] = combine
    lb = LossBalancer(w.optimizer, strategy, **options)

    def step():
        return lb.step(w.losses())

    step.balancer = lb  # type: ignore[attr-defined]
    return step


VARIANTS["famo"] = (one_backward, {"strategy": "famo"})
VARIANTS["mconfig"] = (one_backward, {"combine": "mconfig"})


def variant(w: Workload, name: str) -> Callable[[], object]:
    factory, options = VARIANTS[name]
    return factory(w, **options)
