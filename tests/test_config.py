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


@pytest.mark.parametrize("bounds", [{"min_weight": 2.0, "max_weight": 1.0}, {"min_weight": {"bc": 3.0}, "max_weight": 2.0}])
def test_min_weight_above_max_weight_is_refused_when_built(bounds):
    # accepted until the first step (or a terms= declaration) before
    with pytest.raises(ConfigError, match=r"min_weight (2.0|3.0) > max_weight"):
        LossBalancer.from_config(torch.optim.Adam(Model().parameters()), {"strategy": "lra", **bounds})
    with pytest.raises(ValueError, match=r"min_weight (2.0|3.0) > max_weight"):
        LossBalancer(torch.optim.Adam(Model().parameters()), "lra", **bounds)


@pytest.mark.parametrize("bounds", [{"min_weight": float("nan")}, {"min_weight": -1.0}, {"max_weight": {"bc": float("nan")}}])
def test_bounds_that_are_not_weights_are_refused_when_built(bounds):
    # NaN and negative bounds were accepted (NaN compares false with everything)
    with pytest.raises(ConfigError, match=r"(min|max)_weight(\[.bc.\])? must be"):
        LossBalancer.from_config(torch.optim.Adam(Model().parameters()), {"strategy": "lra", **bounds})
    with pytest.raises(ValueError, match="min_weight must be a finite number >= 0 and max_weight a number > 0"):
        LossBalancer(torch.optim.Adam(Model().parameters()), "lra", **bounds)


def test_a_per_term_option_outside_terms_is_a_config_error():
    with pytest.raises(ConfigError, match=r"weights names term\(s\) \['zz'\]"):
        LossBalancer.from_config(torch.optim.Adam(Model().parameters()), {"terms": ["a"], "weights": {"zz": 1.0}})


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
    # Cranial-XIX/FAMO famo.py: FAMO(gamma=0.01, w_lr=0.025), D = losses - min_losses + 1e-8.
    "liu2023": ("famo", 1, dict(lr=0.025, weight_decay=0.01, eps=1e-8)),
    # Wang, Yu & Perdikaris 2022, Algorithm 1: sum_j tr K_j / tr K_i, no EMA, every 100 steps.
    "ntk2022": ("ntk", 100, dict(points="sum", normalize="sum", alpha=1.0, eps=0.0)),
    # jaxpi (pirate branch) models.py compute_weights: mean_ntk / (m_i + 1e-5 mean_ntk), momentum 0.9, every 1000.
    "jaxpi_ntk": ("ntk", 1000, dict(points="mean", normalize="mean", alpha=0.1, eps=1e-5)),
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


# ---------------------------------------------------------------- types and containers (YAML, Hydra)
YAML_DOC = """
strategy: relobralo
strategy_options:
  alpha: 1e-1        # a string under YAML 1.1 (PyYAML)
  tau: 1.0
update_every: "10"
min_weight: 1e-3
weights: {pde: 2}
combine: pcgrad
combine_options: {double: "yes"}
"""


def test_strings_for_numbers_from_pyyaml_are_refused_naming_the_option():
    yaml = pytest.importorskip("yaml")
    config = yaml.safe_load(YAML_DOC)
    assert config["strategy_options"]["alpha"] == "1e-1"  # what PyYAML really gives
    with pytest.raises(ConfigError) as info:
        LossBalancer.from_config(torch.optim.Adam(Model().parameters()), config)
    assert info.value.problems == [
        "update_every must be a positive integer, got '10' (a string: write 10 without quotes)",
        "min_weight must be a number or a table {term: number}, got '1e-3' (a string: YAML 1.1 readers such as "
        "PyYAML read 1e-3 as a string, a float needs a dot and a signed exponent: write 1.0e-3)",
        "strategy_options.alpha must be a number, got '1e-1' (a string: YAML 1.1 readers such as PyYAML read 1e-1 "
        "as a string, a float needs a dot and a signed exponent: write 1.0e-1)",
        "combine_options.double must be true or false, got 'yes'",
    ]
    fixed = yaml.safe_load(YAML_DOC.replace("1e-1", "1.0e-1").replace('"10"', "10").replace("1e-3", "1.0e-3")
                           .replace('"yes"', "true"))
    balancer = LossBalancer.from_config(torch.optim.Adam(Model().parameters()), fixed)
    assert balancer.strategy.alpha == 0.1 and balancer.update_every == 10


@pytest.mark.parametrize("config, problem", [
    ({"strategy": "softadapt", "strategy_options": {"beta": "0.5"}},
     "strategy_options.beta must be a number or null, got '0.5' (a string: write the number without quotes)"),
    ({"strategy": "softadapt", "strategy_options": {"variant": "nomalized"}},
     "strategy_options.variant must be 'difference', 'normalized', 'loss_weighted' or 'ratio', got 'nomalized'"),
    ({"strategy": "lra", "strategy_options": {"weighted_denominator": 1}},
     "strategy_options.weighted_denominator must be true or false, got 1"),
    ({"strategy": "uncertainty", "strategy_options": {"init_log_var": {"pde": "0"}}},
     "strategy_options.init_log_var must be a number or a table {name: a number}, got {'pde': '0'}"),
    ({"combine": "config", "combine_options": {"rtol": "1e-3"}},
     "combine_options.rtol must be a number or null, got '1e-3'"),
    ({"weights": {"pde": "3"}}, "weights['pde'] must be a number, got '3'"),
])
def test_every_wrong_type_is_a_config_error_naming_the_option(config, problem):
    with pytest.raises(ConfigError) as info:
        LossBalancer.from_config(torch.optim.Adam(Model().parameters()), config)
    assert len(info.value.problems) == 1 and info.value.problems[0].startswith(problem), info.value.problems


def _hydra_config():
    omegaconf = pytest.importorskip("omegaconf")
    return omegaconf.OmegaConf.create({
        "strategy": "uncertainty",
        "strategy_options": {"optimizer": "Adam", "optimizer_options": {"betas": [0.8, 0.99]}, "init_log_var": {"bc": -0.5}},
        "terms": ["pde", "bc"], "optional": ["extra"], "weights": {"bc": 2.0}, "min_weight": {"pde": 0.1},
        "max_weight": 10.0, "scope": {"pde": ["coef"], "bc": ["net"]},
        "combine": "pcgrad", "combine_options": {"order": "fixed"}, "update_every": 2,
    })


def test_omegaconf_containers_build_end_to_end():
    config = _hydra_config()
    model = Model()
    balancer = LossBalancer.from_config(torch.optim.Adam(model.parameters()), config, model=model)
    expected = {
        "strategy_options": {"init_log_var": {"bc": -0.5}, "lr": 1e-3, "optimizer": "Adam",
                             "optimizer_options": {"betas": [0.8, 0.99]}},
        "terms": ["pde", "bc"], "optional": ["extra"], "weights": {"bc": 2.0}, "min_weight": {"pde": 0.1},
        "max_weight": 10.0, "combine": "pcgrad", "update_every": 2,
        "scope": {"pde": ["coef"], "bc": ["net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias"]},
    }
    exported = balancer.config(model)
    for key, value in expected.items():
        assert exported[key] == value, key
    assert exported["combine_options"]["order"] == "fixed"
    assert all(type(v) in (dict, list, str, int, float, bool) for v in exported.values())  # plain data again
    x = torch.linspace(0, 1, 5)[:, None]
    total = balancer.step({"pde": (model.net(x) * model.coef).pow(2).mean(), "bc": model.net(x).mean().pow(2)})
    assert torch.isfinite(total)


def test_omegaconf_load_of_a_yaml_file(tmp_path):
    omegaconf = pytest.importorskip("omegaconf")
    path = tmp_path / "balance.yaml"
    path.write_text("preset: bischof2021\nterms: [pde, bc]\nstrategy_options:\n  tau: 1e-1\nscope:\n  pde: [coef]\nprobe: [net]\n")
    config = omegaconf.OmegaConf.load(path)  # OmegaConf reads 1e-1 as a float (unlike PyYAML)
    model = Model()
    balancer = LossBalancer.from_config(torch.optim.Adam(model.parameters()), config, model=model)
    assert balancer.strategy.tau == 0.1 and balancer.strategy.alpha == 0.999
    assert balancer.config(model)["scope"] == {"pde": ["coef"]}
    assert balancer.config(model)["probe"] == ["net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias"]


def test_a_string_is_not_a_list_even_when_it_is_a_sequence():
    with pytest.raises(ConfigError, match="terms must be a list of strings, got 'pde'"):
        LossBalancer.from_config(torch.optim.Adam(Model().parameters()), {"terms": "pde"})
