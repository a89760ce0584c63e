"""Declarative configuration: round trips, one error listing every problem, published presets."""
import pytest
import torch
from torch import nn

from lossbalance import LossBalancer, LRAnnealing
from lossbalance.config import PRESETS, ConfigError


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 1))
        self.coef = nn.Parameter(torch.tensor(1.0))


def test_round_trip_rebuilds_an_equivalent_balancer():
    model = Model()
    opt = torch.optim.Adam(model.parameters())
    original = LossBalancer(
        opt, LRAnnealing("pde", alpha=0.2, stat="mean"), update_every=5, weights={"data": 3.0},
        min_weight=0.1, max_weight={"data": 50.0}, warmup=2, terms=["pde", "data"], optional=["extra"],
        scope={"pde": [model.coef], "data": list(model.net.parameters())}, combine="pcgrad", history=7,
        diagnose_every=4, seed=11, nonfinite="skip",
    )
    config = original.config(model)
    assert config["scope"] == {"pde": ["coef"], "data": ["net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias"]}
    rebuilt = LossBalancer.from_config(opt, config, model=model)
    assert rebuilt.config(model) == config
    assert repr(rebuilt) == repr(original)
    assert rebuilt.weights == original.weights == {"pde": 1.0, "data": 3.0}


def test_scope_by_prefix():
    model = Model()
    balancer = LossBalancer.from_config(
        torch.optim.Adam(model.parameters()), {"strategy": "static", "scope": {"pde": ["coef"], "data": ["net."]}},
        model=model,
    )
    assert balancer.config(model)["scope"]["pde"] == ["coef"]
    assert len(balancer.config(model)["scope"]["data"]) == 4


def test_one_error_lists_every_problem():
    model = Model()
    bad = {
        "stratgy": "lra",
        "update_every": 0,
        "weights": {"pde": "high"},
        "memory": "tiny",
        "strategy": "lra",
        "strategy_options": {"alpah": 0.5},
        "combine": "pcgard",
        "scope": {"pde": ["decoder"]},
        "frozen": "yes",
    }
    with pytest.raises(ConfigError) as info:
        LossBalancer.from_config(torch.optim.Adam(model.parameters()), bad, model=model)
    problems = info.value.problems
    expected = [
        "unknown key 'stratgy' (did you mean 'strategy'?)",
        "update_every must be a positive integer, got 0",
        "weights['pde'] must be a number",
        "memory must be 'keep' or 'lean'",
        "unknown strategy option 'alpah' (did you mean 'alpha'?)",
        "unknown combiner 'pcgard'. Did you mean 'pcgrad'?",
        "['decoder'] match no parameter",
        "frozen must be true or false",
    ]
    for text in expected:
        assert any(text in p for p in problems), (text, problems)
    assert len(problems) == len(expected)


def test_out_of_range_strategy_option_and_missing_model():
    with pytest.raises(ConfigError, match="alpha must be in"):
        LossBalancer.from_config(torch.optim.Adam(Model().parameters()), {"strategy_options": {"alpha": 3.0}})
    with pytest.raises(ConfigError, match="pass model="):
        LossBalancer.from_config(torch.optim.Adam(Model().parameters()), {"scope": {"pde": ["coef"]}})


# The numbers below are copied from the sources named, not from lossbalance.
SOURCES = {
    # GradientPathologiesPINNs/Helmholtz/Helmholtz2D_model_tf.py: beta = 0.9 (old value), "it % 10 == 0",
    # max over self.weights (matrices) of |grad res|, reduce_mean of per-layer reduce_mean |grad bcs|,
    # loss_bcs = adaptive_constant * (...) (weight inside the denominator).
    "wang2021": ("lra", 10, dict(alpha=0.1, stat="max", weighted_denominator=True, layerwise_mean=True,
                                 include_bias=False, eps=0.0)),
    # PhysicsNeMo-Sym 2.4 LRAnnealing: update_freq=1, alpha=0.01 on the new value, eps=1e-8,
    # mean |grad| over all parameters concatenated, unweighted terms.
    "physicsnemo": ("lra", 1, dict(alpha=0.01, stat="mean", weighted_denominator=False, layerwise_mean=False,
                                   include_bias=True, eps=1e-8)),
    # jaxpi (Wang et al. 2023): grad norms, mean_grad_norm / (norm + 1e-5 * mean), momentum 0.9,
    # update_weight_every_steps = 1000.
    "jaxpi": ("gradnorm_ratio", 1000, dict(normalize="mean", alpha=0.1, eps=1e-5)),
    # rbischof/relative_balancing src/train.py: --alpha .999, --T 1., --rho 1.; update_rules.py: 1e-12.
    "bischof2021": ("relobralo", 1, dict(alpha=0.999, expected_rho=1.0, tau=1.0, eps=1e-12)),
}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_resolve_to_their_sources_numbers(name):
    strategy, update_every, options = SOURCES[name]
    balancer = LossBalancer.from_config(torch.optim.Adam(Model().parameters()), {"preset": name})
    assert balancer.strategy.name == strategy
    assert balancer.update_every == update_every
    resolved = balancer.strategy.options()
    for key, value in options.items():
        assert resolved[key] == value, (name, key)


def test_preset_options_can_be_overridden():
    config = {"preset": "wang2021", "strategy_options": {"reference": "pde"}, "update_every": 100}
    balancer = LossBalancer.from_config(torch.optim.Adam(Model().parameters()), config)
    assert balancer.strategy.options()["reference"] == "pde"
    assert balancer.strategy.options()["alpha"] == 0.1
    assert balancer.update_every == 100
    other = LossBalancer.from_config(torch.optim.Adam(Model().parameters()), {"preset": "wang2021", "strategy": "static"})
    assert other.strategy.name == "static"


def test_physicsnemo_preset_matches_the_classmethod():
    balancer = LossBalancer.from_config(torch.optim.Adam(Model().parameters()), {"preset": "physicsnemo"})
    assert balancer.strategy.options() == LRAnnealing.physicsnemo().options()
