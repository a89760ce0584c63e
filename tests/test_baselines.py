"""Baselines from a trained balancer (issue 18, item 6): freeze() and static_from()."""
from __future__ import annotations

import io

import pytest
import torch

from _strategy_checks import NAMES, tiny_pinn
from lossbalance import LossBalancer, Static, static_from


def trained(steps=5, strategy="relobralo"):
    model, losses = tiny_pinn(4)
    balancer = LossBalancer(torch.optim.Adam(model.parameters(), lr=1e-2), strategy)
    for _ in range(steps):
        balancer.step(losses())
    return model, losses, balancer


def test_freeze_keeps_the_learned_weights_and_unfreeze_resumes() -> None:
    model, losses, balancer = trained()
    learned = balancer.weights
    assert learned != {n: 1.0 for n in NAMES}
    updates = balancer.state_dict()["updates"]
    balancer.freeze()
    assert balancer.frozen
    for _ in range(3):
        balancer.step(losses())
    assert balancer.weights == learned and balancer.state_dict()["updates"] == updates
    balancer.unfreeze()
    balancer.step(losses())
    assert balancer.weights != learned


def test_frozen_is_saved_and_restored() -> None:
    model, losses, balancer = trained()
    balancer.freeze()
    buffer = io.BytesIO()
    torch.save(balancer.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=False)
    assert state["frozen"] is True
    fresh = LossBalancer(torch.optim.Adam(model.parameters(), lr=1e-2), "relobralo")
    fresh.load_state_dict(state)
    assert fresh.frozen and fresh.weights == balancer.weights
    fresh.step(losses())
    assert fresh.weights == balancer.weights
    old = dict(state)
    del old["frozen"]  # a state from before freeze() existed: the balancer keeps its own setting
    other = LossBalancer(torch.optim.Adam(model.parameters(), lr=1e-2), "relobralo")
    other.load_state_dict(old)
    assert not other.frozen


def test_static_from_reruns_with_the_learned_weights() -> None:
    _, _, balancer = trained()
    learned = balancer.weights
    assert static_from(balancer, as_dict=True) == learned
    strategy = static_from(balancer)
    assert isinstance(strategy, Static) and strategy.weights == learned
    model, losses = tiny_pinn(9)
    rerun = LossBalancer(torch.optim.SGD(model.parameters(), lr=1e-3), strategy)
    terms = losses()
    total = rerun.step(terms)
    assert rerun.weights == pytest.approx(learned)
    assert total.item() == pytest.approx(sum(learned[n] * terms[n].item() for n in NAMES), rel=1e-6)
    for _ in range(2):
        rerun.step(losses())
    assert rerun.weights == pytest.approx(learned)
    # the balancer's own weights= win per term; the config round trip rebuilds the same weights
    mixed = LossBalancer(torch.optim.SGD(model.parameters(), lr=1e-3), strategy, weights={"pde": 3.0})
    mixed.step(losses())
    assert mixed.weights == pytest.approx({**learned, "pde": 3.0})
    again = LossBalancer.from_config(torch.optim.SGD(model.parameters(), lr=1e-3), mixed.config())
    again.step(losses())
    assert again.weights == pytest.approx(mixed.weights)


def test_static_weights_are_checked() -> None:
    with pytest.raises(ValueError):
        Static(weights={"pde": float("nan")})
    with pytest.raises(TypeError):
        Static(weights=[1.0, 2.0])
    assert Static().options() == {} and Static(weights={"a": 2}).options() == {"weights": {"a": 2.0}}
