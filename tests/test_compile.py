"""torch.compile'd models through every path of the balancer (issue 14, item 7).

The compiled backward is built lazily on the first backward through each compiled graph; built
by a backward without ``retain_graph`` it uses donated buffers and refuses every later
``retain_graph=True``. The balancer retains every graph that holds a compiled backward, so the
per-term gradients work whatever the order of plain and gradient steps, and a recompile never
happens after the first steps.
"""
import pytest
import torch
from torch import nn

from lossbalance import LossBalancer, LRAnnealing

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _fresh_compiler():
    torch._dynamo.reset()
    with torch.compiler.config.patch(force_disable_caches=True):  # a cache hit hides the bug
        yield
    torch._dynamo.reset()


class MultiTask(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh())
        self.a, self.b = nn.Linear(16, 1), nn.Linear(16, 1)

    def forward(self, x):
        h = self.trunk(x)
        return self.a(h), self.b(h)


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 1))


def _terms(outputs):
    if isinstance(outputs, tuple):
        a, b = outputs
        return {"a": a.pow(2).mean(), "b": (b - 1).abs().mean()}
    return {"a": outputs.pow(2).mean(), "b": (outputs - 1).abs().mean()}


@pytest.mark.parametrize("kind", ["mlp", "multitask"])
def test_compiled_models_train_exactly_through_every_path(kind):
    model = _mlp() if kind == "mlp" else MultiTask()
    compiled = torch.compile(model)
    x = torch.randn(32, 2, generator=torch.Generator().manual_seed(1))
    params = list(model.parameters())
    # a plain step first (warmup): the case that used to build the backward with donated buffers
    balancers = {
        "update": LossBalancer(torch.optim.SGD(params, lr=0.0), LRAnnealing("a"), warmup=1),
        "combine": LossBalancer(torch.optim.SGD(params, lr=0.0), "static", combine="pcgrad"),
    }
    torch._dynamo.utils.counters.clear()
    for name, balancer in balancers.items():
        for _ in range(3):
            balancer.step(_terms(compiled(x)))
        eager = _terms(model(x))
        if name == "update":
            w = balancer.weights
            want = torch.autograd.grad(sum(w[k] * v for k, v in eager.items()), params)
            for p, g in zip(params, want):
                torch.testing.assert_close(p.grad, g)
        else:
            assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in params)
    frames = torch._dynamo.utils.counters["frames"]
    assert frames["ok"] == frames["total"] == 1  # compiled once: no recompile in 6 steps of 3 kinds


def test_double_backward_through_a_compiled_model_says_what_to_do():
    """PINN residuals take input derivatives with create_graph=True: torch.compile's
    aot_autograd cannot differentiate those again; the error names the term."""
    model = _mlp()
    compiled = torch.compile(model)
    x = torch.randn(8, 2, requires_grad=True)
    u = compiled(x)
    (du,) = torch.autograd.grad(u.sum(), x, create_graph=True)
    balancer = LossBalancer(torch.optim.SGD(model.parameters(), lr=0.0), LRAnnealing("pde"))
    with pytest.raises(RuntimeError, match="while differentiating term 'pde'.*double backward"):
        balancer.step({"pde": du.pow(2).mean(), "bc": u.pow(2).mean()})
