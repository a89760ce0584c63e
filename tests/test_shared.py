"""``shared=``: a combiner acts on the shared parameters only (Sener & Koltun 2018, Algorithm 2;
LibMTL); the task heads get the weighted sum of their per-term gradients."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from lossbalance import LossBalancer

F64 = torch.float64


class TwoTasks(nn.Module):
    """A shared encoder and one head per task; each task's loss reaches the encoder and its own head."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.encoder = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 4), nn.Tanh()).to(F64)
        self.heads = nn.ModuleDict({"a": nn.Linear(4, 1).to(F64), "b": nn.Linear(4, 1).to(F64)})
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(16, 3, generator=g, dtype=F64)
        self.y = {"a": torch.randn(16, 1, generator=g, dtype=F64), "b": 5 * torch.randn(16, 1, generator=g, dtype=F64)}

    def losses(self) -> dict[str, torch.Tensor]:
        z = self.encoder(self.x)
        return {t: (self.heads[t](z) - self.y[t]).pow(2).mean() for t in ("a", "b")}


def min_norm_two(g1: torch.Tensor, g2: torch.Tensor) -> torch.Tensor:
    """The min-norm point of the segment [g1, g2] (Sener & Koltun, Algorithm 1, closed form)."""
    alpha = ((g2 - g1) @ g2 / (g1 - g2).pow(2).sum()).clamp(0, 1)
    return alpha * g1 + (1 - alpha) * g2


def naive_mgda_step(model: TwoTasks, lr: float) -> None:
    """One step of Sener & Koltun's Algorithm 2 in plain autograd: heads by their own task's
    gradient, the encoder by MGDA on the tasks' encoder gradients."""
    losses = model.losses()
    shared = list(model.encoder.parameters())
    per_task = {t: torch.autograd.grad(losses[t], shared + list(model.heads[t].parameters()), retain_graph=True)
                for t in ("a", "b")}
    flat = {t: torch.cat([g.reshape(-1) for g in per_task[t][: len(shared)]]) for t in per_task}
    direction = min_norm_two(flat["a"], flat["b"])
    with torch.no_grad():
        offset = 0
        for p in shared:
            p -= lr * direction[offset: offset + p.numel()].view_as(p)
            offset += p.numel()
        for t in ("a", "b"):
            for p, g in zip(model.heads[t].parameters(), per_task[t][len(shared):]):
                p -= lr * g


def test_mgda_on_the_shared_parameters_is_sener_and_koltun_algorithm_2():
    reference, model = TwoTasks(), TwoTasks()
    balancer = LossBalancer(torch.optim.SGD(model.parameters(), lr=0.05), "static", combine="mgda",
                            shared=model.encoder.parameters())
    for _ in range(5):
        naive_mgda_step(reference, 0.05)
        balancer.step(model.losses())
    for mine, theirs in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(mine, theirs, rtol=1e-9, atol=1e-12)


def test_without_shared_the_combiner_rescales_the_heads_too():
    """The default (the combiner on every balanced parameter) differs from Algorithm 2: the
    option matters, and the README says which is which."""
    def head_grads(**options):
        model = TwoTasks()
        balancer = LossBalancer(torch.optim.SGD(model.parameters(), lr=0.05), "static", combine="mgda", **options)
        balancer.backward(model.losses())
        own = torch.autograd.grad(model.losses()["b"], list(model.heads["b"].parameters()))
        return [p.grad for p in model.heads["b"].parameters()], own

    grads, own = head_grads()
    assert not all(torch.allclose(g, o) for g, o in zip(grads, own))
    model = TwoTasks()
    balancer = LossBalancer(torch.optim.SGD(model.parameters(), lr=0.05), "static", combine="mgda",
                            shared=model.encoder.parameters(), weights={"a": 1.0, "b": 3.0})
    balancer.backward(model.losses())
    own = torch.autograd.grad(model.losses()["b"], list(model.heads["b"].parameters()))
    for p, g in zip(model.heads["b"].parameters(), own):
        torch.testing.assert_close(p.grad, 3.0 * g)  # w_b times its own gradient


@pytest.mark.parametrize("combine", ["pcgrad", "upgrad", "config"])
def test_loss_gives_the_gradient_backward_writes(combine):
    def grads(path):
        model = TwoTasks()
        balancer = LossBalancer(torch.optim.SGD(model.parameters(), lr=0.05), "static", combine=combine,
                                shared=model.encoder.parameters())
        if path == "loss":
            balancer.loss(model.losses()).backward()
        else:
            balancer.backward(model.losses())
        return [p.grad.clone() for p in model.parameters()]

    for a, b in zip(grads("loss"), grads("backward")):
        assert torch.equal(a, b)


def test_a_frozen_encoder_leaves_the_weighted_sum_on_the_heads():
    model = TwoTasks()
    balancer = LossBalancer(torch.optim.SGD(model.parameters(), lr=0.05), "static", combine="mgda",
                            shared=model.encoder.parameters())
    model.encoder.requires_grad_(False)
    balancer.backward(model.losses())
    own = torch.autograd.grad(model.losses()["a"], list(model.heads["a"].parameters()))
    for p, g in zip(model.heads["a"].parameters(), own):
        torch.testing.assert_close(p.grad, g)
    assert all(p.grad is None for p in model.encoder.parameters())


@pytest.mark.parametrize("case", ["no combiner", "mconfig", "empty", "foreign"])
def test_bad_shared_is_refused_when_built(case):
    model = TwoTasks()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    options, message = {
        "no combiner": ({"shared": model.encoder.parameters()}, "shared= names the parameters a combiner acts on"),
        "mconfig": ({"shared": model.encoder.parameters(), "combine": "mconfig"}, "'mconfig' combines"),
        "empty": ({"shared": [], "combine": "mgda"}, "shared= is empty"),
        "foreign": ({"shared": nn.Linear(2, 2).parameters(), "combine": "mgda"}, "shared= item 0 is not a parameter"),
    }[case]
    with pytest.raises(ValueError, match=message):
        LossBalancer(optimizer, "static", **options)


def test_shared_round_trips_through_the_config():
    model = TwoTasks()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    balancer = LossBalancer(optimizer, "static", combine="mgda", shared=model.encoder.parameters())
    config = balancer.config(model)
    assert config["shared"] == [n for n, _ in model.encoder.named_parameters(prefix="encoder")]
    rebuilt = LossBalancer.from_config(optimizer, {"strategy": "static", "combine": "mgda", "shared": ["encoder"]}, model=model)
    assert rebuilt.config(model) == config
    rebuilt.backward(model.losses())
    first = [p.grad.clone() for p in model.parameters()]
    balancer.backward(model.losses())
    for a, p in zip(first, model.parameters()):
        assert torch.equal(a, p.grad)
    with pytest.raises(ValueError, match="shared: pass model="):
        balancer.config()
