"""Per-term scopes: each term trains only its own parameters, in every mode and on every step."""
import math
import re

import pytest
import torch
from torch import nn

from lossbalance import LossBalancer, LRAnnealing
from lossbalance.scope import constant_call, parameters_by_prefix


class Inverse(nn.Module):
    """-k u'' = f with unknown k: the data term trains the network, the residual only k."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(1, 32), nn.Tanh(), nn.Linear(32, 1))
        self.coef = nn.Parameter(torch.tensor(0.5))
        g = torch.Generator().manual_seed(seed)
        self.x = torch.rand(24, 1, generator=g)
        self.xd = torch.rand(64, 1, generator=g)

    def losses(self):
        x = self.x.clone().requires_grad_(True)
        u = self.net(x)
        (du,) = torch.autograd.grad(u.sum(), x, create_graph=True)
        (d2u,) = torch.autograd.grad(du.sum(), x, create_graph=True)
        f = 2.0 * math.pi**2 * torch.sin(math.pi * x)  # k = 2
        return {
            "pde": (-self.coef * d2u - f).pow(2).mean(),
            "data": (self.net(self.xd) - torch.sin(math.pi * self.xd)).pow(2).mean(),
            "smooth": 1e-3 * sum(p.pow(2).sum() for p in self.net.parameters()),
        }


def scopes_of(model):
    return {"pde": [model.coef], "data": list(model.net.parameters())}


def masked_reference_step(model, optimizer, weights):
    """Gradient masks: each term's gradient is taken w.r.t. everything, then cut to its scope."""
    params = list(model.parameters())
    scopes = {k: {id(p) for p in v} for k, v in scopes_of(model).items()}
    total = [torch.zeros_like(p) for p in params]
    reached = [False] * len(params)
    for name, loss in model.losses().items():
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        for j, (p, g) in enumerate(zip(params, grads)):
            if g is not None and (name not in scopes or id(p) in scopes[name]):
                total[j] += weights[name] * g
                reached[j] = True
    for p, g, hit in zip(params, total, reached):
        p.grad = g if hit else None
    optimizer.step()


@pytest.mark.parametrize(
    "mode", [dict(memory="keep"), dict(memory="lean"), dict(update_every=3), dict(strategy="static")]
)
def test_scoped_balancer_equals_masked_reference(mode):
    mode = dict(mode)
    strategy = mode.pop("strategy", LRAnnealing("data", stat="mean", include_bias=True))
    model, ref = Inverse(), Inverse()
    balancer = LossBalancer(torch.optim.Adam(model.parameters(), lr=1e-2), strategy, scope=scopes_of(model), **mode)
    ref_opt = torch.optim.Adam(ref.parameters(), lr=1e-2)
    for _ in range(6):
        balancer.step(model.losses())
        masked_reference_step(ref, ref_opt, balancer.weights)  # the weights this step used
        for a, b in zip(model.parameters(), ref.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("update_every", [1, 2])
def test_no_term_reaches_outside_its_scope(update_every):
    model = Inverse()
    balancer = LossBalancer(
        torch.optim.SGD(model.parameters(), lr=0.0), LRAnnealing("data", include_bias=True), scope=scopes_of(model),
        update_every=update_every,
    )
    for _ in range(3):
        losses = model.losses()
        balancer.backward(losses)
        w = balancer.weights
        want_coef = torch.autograd.grad(w["pde"] * model.losses()["pde"], model.coef)[0]
        torch.testing.assert_close(model.coef.grad, want_coef)
        data_and_smooth = w["data"] * model.losses()["data"] + w["smooth"] * model.losses()["smooth"]
        want_net = torch.autograd.grad(data_and_smooth, list(model.net.parameters()))
        for p, g in zip(model.net.parameters(), want_net):
            torch.testing.assert_close(p.grad, g)


def test_statistics_over_scope_or_shared():
    model = Inverse()
    losses = model.losses()
    net = list(model.net.parameters())
    balancer = LossBalancer(
        torch.optim.SGD(model.parameters(), lr=0.0), LRAnnealing("data", stat="mean", layerwise_mean=False,
                                                                 include_bias=True, over="shared", alpha=1.0),
        scope={"data": net, "smooth": net},
    )
    balancer.backward(losses)
    losses = model.losses()
    mean = {k: torch.cat([g.reshape(-1) for g in torch.autograd.grad(v, net, materialize_grads=True)]).abs().mean()
            for k, v in losses.items()}
    assert balancer.weights["pde"] == pytest.approx((mean["data"] / mean["pde"]).item(), rel=1e-5)


def test_lbfgs_every_closure_evaluation_respects_the_scopes():
    """With scopes the combined gradient is not the gradient of one scalar (a term does not train
    everything it depends on), so L-BFGS gets no convergence promise; what must hold is that every
    evaluation inside the line search writes the scoped gradient with the step's fixed weights."""
    model, ref = Inverse(seed=1), Inverse(seed=1)
    checked = []

    class Checked(torch.optim.LBFGS):
        def step(self, closure):
            def wrapped():
                value = closure()
                got = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
                for p, q in zip(model.parameters(), ref.parameters()):
                    q.data.copy_(p.data)
                masked_reference_step(ref, torch.optim.SGD(ref.parameters(), lr=0.0), balancer.weights)
                for g, q in zip(got, ref.parameters()):
                    torch.testing.assert_close(g, q.grad)
                checked.append(value)
                return value
            return super().step(wrapped)

    balancer = LossBalancer(
        Checked(model.parameters(), max_iter=5, line_search_fn="strong_wolfe"), LRAnnealing("data", include_bias=True),
        scope=scopes_of(model),
    )
    for _ in range(3):
        balancer.step(closure=model.losses)
    assert len(checked) > 3


def test_scope_errors():
    model = Inverse()
    opt = torch.optim.SGD(model.net.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="scope of term 'pde' names a parameter the optimizer does not hold"):
        LossBalancer(opt, "static", scope={"pde": [model.coef]})
    with pytest.raises(ValueError, match="scope of term 'data' is empty"):
        LossBalancer(opt, "static", scope={"data": []})
    full = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(KeyError, match=r"\['bc'\]"):
        LossBalancer(full, "static", scope={"bc": [model.coef]}, terms=["pde", "data", "smooth"])
    balancer = LossBalancer(full, "static", scope={"bc": [model.coef]})
    with pytest.raises(KeyError, match="scope names the term 'bc'"):
        balancer.step(model.losses())
    balancer = LossBalancer(full, "static", scope={"data": [model.coef]})
    with pytest.raises(ValueError, match="'data' has no path to any parameter of its scope"):
        balancer.step(model.losses())
    assert balancer.weights == {}


def test_constant_call_trains_only_the_first_application():
    torch.manual_seed(0)
    layer, opt_layer = nn.Linear(3, 3), None
    twin = nn.Linear(3, 3)
    twin.load_state_dict(layer.state_dict())
    x = torch.randn(5, 3)
    target = torch.randn(5, 3)
    opt_layer = torch.optim.Adam(layer.parameters(), lr=0.1)
    opt_twin = torch.optim.Adam(twin.parameters(), lr=0.1)
    for _ in range(3):
        # twice in one forward; the second application is a constant map
        x1 = x.clone().requires_grad_(True)
        h = layer(x1)
        h.retain_grad()
        out = constant_call(layer, torch.tanh(h))
        loss = (out - target).pow(2).mean()
        balancer = LossBalancer(opt_layer, "static")
        balancer.backward({"fit": loss})
        # reference: the same loss with the second application's weights frozen copies
        w, b = twin.weight.detach().clone(), twin.bias.detach().clone()
        h_ref = twin(x)
        loss_ref = ((torch.tanh(h_ref) @ w.T + b) - target).pow(2).mean()
        grads_ref = torch.autograd.grad(loss_ref, list(twin.parameters()))
        for p, g in zip(layer.parameters(), grads_ref):
            torch.testing.assert_close(p.grad, g)
        # the input of the second application still receives gradient
        (gh,) = torch.autograd.grad((constant_call(layer, torch.tanh(h)) - target).pow(2).mean(), h)
        assert gh.abs().sum() > 0
        opt_layer.step()
        for p, g in zip(twin.parameters(), grads_ref):
            p.grad = g
        opt_twin.step()
        for a, c in zip(layer.parameters(), twin.parameters()):
            torch.testing.assert_close(a, c)
    assert all(p.requires_grad for p in layer.parameters())


def test_parameters_by_prefix():
    model = Inverse()
    assert parameters_by_prefix(model, ["coef"]) == [model.coef]
    assert parameters_by_prefix(model, ["net."]) == list(model.net.parameters())
    with pytest.raises(ValueError, match=r"\['decoder'\] match no parameter"):
        parameters_by_prefix(model, ["decoder"])


class _Siblings(nn.Module):
    """Names that share a string prefix across module boundaries: coef, coef_net.*, net.*, net2.*."""

    def __init__(self):
        super().__init__()
        self.coef = nn.Parameter(torch.tensor(1.0))
        self.coef_net = nn.Linear(1, 1)
        self.net = nn.Sequential(nn.Linear(1, 2), nn.Linear(2, 1))
        self.net2 = nn.Linear(1, 1)


def test_prefixes_match_on_module_boundaries():
    model = _Siblings()
    assert parameters_by_prefix(model, ["coef"]) == [model.coef]  # not coef_net.*
    assert parameters_by_prefix(model, ["net"]) == list(model.net.parameters())  # not net2.*
    assert parameters_by_prefix(model, ["net."]) == list(model.net.parameters())
    assert parameters_by_prefix(model, ["net.1"]) == list(model.net[1].parameters())
    assert parameters_by_prefix(model, ["coef_net.bias"]) == [model.coef_net.bias]
    for partial in ("coe", "net.0.w", "ne"):
        with pytest.raises(ValueError, match=rf"\['{re.escape(partial)}'\] match no parameter.*'\.' boundaries"):
            parameters_by_prefix(model, [partial])


def test_config_scope_selects_the_module_not_its_string_siblings():
    model = _Siblings()
    balancer = LossBalancer.from_config(
        torch.optim.Adam(model.parameters()), {"strategy": "static", "scope": {"pde": ["coef"], "bc": ["net"]}},
        model=model,
    )
    assert balancer.config(model)["scope"] == {"pde": ["coef"], "bc": ["net.0.weight", "net.0.bias", "net.1.weight",
                                                                      "net.1.bias"]}
