"""Conflict diagnostics and gradient combiners, driven through the balancer."""
import pytest
import torch

from lossbalance import LossBalancer, LRAnnealing
from lossbalance.combine import ConFIG, PCGrad

from _models import PINN1D, TwoHeads


def flat_term_grads(model, losses):
    params = list(model.parameters())
    return torch.stack([
        torch.cat([g.reshape(-1) for g in torch.autograd.grad(v, params, retain_graph=True, materialize_grads=True)])
        for v in losses.values()
    ])


def test_diagnostics_match_direct_computation_and_enter_the_history():
    model = TwoHeads()
    balancer = LossBalancer(torch.optim.SGD(model.parameters(), lr=1e-3), LRAnnealing("a"), update_every=2, history=10)
    for _ in range(4):
        balancer.step(model.losses())
    g = flat_term_grads(model, model.losses())
    balancer.backward(model.losses())  # step 4: an update step
    d = balancer.diagnostics
    assert d["step"] == 4 and d["names"] == ["a", "b"]
    cos = torch.nn.functional.cosine_similarity(g[0], g[1], dim=0).item()
    assert d["cosine"][0][1] == pytest.approx(cos, rel=1e-4, abs=1e-6)
    assert d["conflict_fraction"] == float(cos < 0)
    assert d["grad_norm"]["b"] == pytest.approx(g[1].norm().item(), rel=1e-5)
    steps_with_figures = [h["step"] for h in balancer.history if "cosine" in h]
    assert steps_with_figures == [0, 2, 4]


def test_diagnose_every_for_a_loss_value_strategy():
    problem = PINN1D()
    balancer = LossBalancer(torch.optim.SGD(problem.model.parameters(), lr=1e-3), "static", diagnose_every=3, history=10)
    for _ in range(7):
        balancer.step(problem.losses())
    assert [h["step"] for h in balancer.history if "cosine" in h] == [0, 3, 6]
    assert len(balancer.diagnostics["cosine"]) == 3
    assert 0.0 <= balancer.diagnostics["conflict_fraction"] <= 1.0


@pytest.mark.parametrize("combiner", [PCGrad(order="fixed"), ConFIG(), "config"])
def test_combiner_receives_the_weighted_gradients(combiner):
    model = TwoHeads()
    balancer = LossBalancer(
        torch.optim.SGD(model.parameters(), lr=0.0), "static", weights={"a": 2.0, "b": 0.5}, combine=combiner
    )
    balancer.backward(model.losses())
    got = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    weighted = torch.tensor([[2.0], [0.5]]) * flat_term_grads(model, model.losses())
    want = balancer.combiner(weighted)  # deterministic combiners: the order of columns does not matter
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(got, weighted.sum(0))  # the heads conflict: the combination is not the sum


def test_combiners_need_the_kept_gradients():
    problem = PINN1D()
    with pytest.raises(ValueError, match="memory='keep'"):
        LossBalancer(torch.optim.SGD(problem.model.parameters(), lr=0.1), "lra", combine="pcgrad", memory="lean")
    with pytest.raises(ValueError, match="unknown combiner|Did you mean"):
        LossBalancer(torch.optim.SGD(problem.model.parameters(), lr=0.1), "lra", combine="pcgard")


def test_pcgrad_trains_two_conflicting_heads():
    model = TwoHeads()
    balancer = LossBalancer(torch.optim.Adam(model.parameters(), lr=1e-2), "static", combine="pcgrad")
    start = {k: v.item() for k, v in model.losses().items()}
    for _ in range(100):
        balancer.step(model.losses())
    end = {k: v.item() for k, v in model.losses().items()}
    assert end["a"] < start["a"] and end["b"] < start["b"]
