"""Declarative configuration: plain dicts (what YAML, TOML or Hydra give) and published presets.

``LossBalancer.from_config(optimizer, config, model=model)`` builds a balancer from a dict;
``balancer.config(model)`` returns the dict that rebuilds it. A bad config raises one
:class:`ConfigError` that lists every problem at once, before anything is built.

Keys: ``preset``, ``strategy``, ``strategy_options``, ``update_every``, ``weights``,
``min_weight``, ``max_weight``, ``warmup``, ``frozen``, ``terms``, ``optional``, ``scope``
(``{term: [parameter-name prefixes]}``, resolved against ``model.named_parameters()``),
``probe`` (prefixes), ``combine``, ``combine_options``, ``memory``, ``grad_mode``, ``nonfinite``, ``check_paths``, ``history``,
``diagnose_every``, ``seed``. A ``preset`` fills in the strategy, its options and the schedule;
the other keys override it.
"""
from __future__ import annotations

import difflib
import inspect
import numbers
from typing import Any, Callable, Mapping

from torch import nn

from .combine import available_combiners, make_combiner
from .scope import parameters_by_prefix
from .strategies.base import _REGISTRY, available_strategies

__all__ = ["ConfigError", "PRESETS", "available_presets", "option_problems", "parse_config", "export_config"]


class ConfigError(ValueError):
    """A configuration with one or more problems; ``problems`` lists them all."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid lossbalance config:\n  - " + "\n  - ".join(problems))


PRESETS: dict[str, dict[str, Any]] = {
    # Wang, Teng & Perdikaris 2021, authors' code (GradientPathologiesPINNs, Helmholtz2D_model_tf.py):
    # beta = 0.9 on the old value, max over weight matrices / mean of per-matrix means of the
    # weighted term, adaptive constant updated when it % 10 == 0.
    "wang2021": {
        "strategy": "lra",
        "strategy_options": {
            "alpha": 0.1, "stat": "max", "weighted_denominator": True, "layerwise_mean": True,
            "include_bias": False, "eps": 0.0,
        },
        "update_every": 10,
    },
    # NVIDIA PhysicsNeMo-Sym 2.4 LRAnnealing: mean |grad| over all parameters for both, unweighted
    # terms, lambda <- 0.99 lambda + 0.01 m_ref / (m_i + 1e-8), update_freq = 1.
    "physicsnemo": {
        "strategy": "lra",
        "strategy_options": {
            "alpha": 0.01, "stat": "mean", "weighted_denominator": False, "layerwise_mean": False,
            "include_bias": True, "eps": 1e-8,
        },
        "update_every": 1,
    },
    # Wang et al. 2023, "An expert's guide to training PINNs" (jaxpi): grad-norm ratio divided by
    # the mean norm, 1e-5 guard, momentum 0.9 on the old weight, update every 1000 steps.
    "jaxpi": {
        "strategy": "gradnorm_ratio",
        "strategy_options": {"normalize": "mean", "alpha": 0.1, "eps": 1e-5},
        "update_every": 1000,
    },
    # Bischof & Kraus 2021 (arXiv 2110.09813), the authors' code (rbischof/relative_balancing,
    # src/train.py and src/update_rules.py): --alpha .999, --T 1., --rho 1. (Bernoulli mean: no
    # random lookback unless set), 1e-12 inside the ratio. The paper tunes these per problem.
    "bischof2021": {
        "strategy": "relobralo",
        "strategy_options": {"alpha": 0.999, "expected_rho": 1.0, "tau": 1.0, "eps": 1e-12},
        "update_every": 1,
    },
}

_SCALAR_CHECKS: dict[str, tuple[type | tuple[type, ...], Callable[[Any], bool], str]] = {
    "update_every": (int, lambda v: v >= 1, "a positive integer"),
    "warmup": (int, lambda v: v >= 0, "a non-negative integer"),
    "history": (int, lambda v: v >= 0, "a non-negative integer"),
    "diagnose_every": (int, lambda v: v >= 0, "a non-negative integer"),
    "seed": (int, lambda v: True, "an integer"),
    "frozen": (bool, lambda v: True, "true or false"),
    "memory": (str, lambda v: v in ("keep", "lean"), "'keep' or 'lean'"),
    "grad_mode": (str, lambda v: v in ("loop", "batched"), "'loop' or 'batched'"),
    "nonfinite": (str, lambda v: v in ("raise", "skip"), "'raise' or 'skip'"),
    "check_paths": (str, lambda v: v in ("first", "always"), "'first' or 'always'"),
}
_KEYS = sorted(
    {"preset", "strategy", "strategy_options", "weights", "min_weight", "max_weight", "terms", "optional",
     "scope", "probe", "combine", "combine_options"} | set(_SCALAR_CHECKS)
)


def option_problems(options: Mapping[str, Any]) -> list[str]:
    """What is wrong with the plain options (``update_every``, ``memory``, ...) among ``options``;
    the one rule book for ``LossBalancer`` and :func:`parse_config`."""
    problems = []
    for key, value in options.items():
        kind, valid, expected = _SCALAR_CHECKS[key]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)) or not valid(value):
            problems.append(f"{key} must be {expected}, got {value!r}")
    return problems


def available_presets() -> list[str]:
    return sorted(PRESETS)


def _suggest(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_options(owner: str, factory: Callable[..., Any], options: Any, problems: list[str]) -> bool:
    if not isinstance(options, Mapping):
        problems.append(f"{owner}_options must be a table/dict, got {type(options).__name__}")
        return False
    accepted = [n for n, p in inspect.signature(factory).parameters.items() if p.kind is not p.VAR_KEYWORD]
    ok = True
    for key in options:
        if key not in accepted:
            problems.append(f"unknown {owner} option {key!r}{_suggest(str(key), accepted)}; known: {accepted}")
            ok = False
    return ok


def _build(owner: str, factory: Callable[..., Any], options: Mapping[str, Any], problems: list[str]) -> Any:
    try:
        return factory(**options)
    except (TypeError, ValueError) as error:
        problems.append(f"{owner} options: {error}")
        return None


def _weights_table(key: str, value: Any, problems: list[str], *, allow_scalar: bool) -> None:
    if allow_scalar and _is_number(value):
        if value < 0:
            problems.append(f"{key} must be >= 0, got {value}")
        return
    if not isinstance(value, Mapping):
        kind = "a number or a table {term: number}" if allow_scalar else "a table {term: number}"
        problems.append(f"{key} must be {kind}, got {type(value).__name__}")
        return
    for term, weight in value.items():
        if not _is_number(weight):
            problems.append(f"{key}[{term!r}] must be a number, got {type(weight).__name__}")
        elif not (weight > 0 or (allow_scalar and weight == 0)):
            problems.append(f"{key}[{term!r}] must be positive, got {weight}")


def _names_list(key: str, value: Any, problems: list[str]) -> bool:
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        problems.append(f"{key} must be a list of strings, got {value!r}")
        return False
    return True


def parse_config(config: Mapping[str, Any], *, model: nn.Module | None = None) -> dict[str, Any]:
    """Validate ``config`` and return the keyword arguments of ``LossBalancer`` (strategy included).

    Raises :class:`ConfigError` listing every problem found.
    """
    problems: list[str] = []
    if not isinstance(config, Mapping):
        raise ConfigError([f"the config must be a table/dict, got {type(config).__name__}"])
    for key in config:
        if key not in _KEYS:
            problems.append(f"unknown key {key!r}{_suggest(str(key), _KEYS)}")
    merged: dict[str, Any] = {}
    preset = config.get("preset")
    if preset is not None:
        if preset not in PRESETS:
            problems.append(f"unknown preset {preset!r}{_suggest(str(preset), list(PRESETS))}; known: {available_presets()}")
        else:
            merged.update(PRESETS[preset])
            merged["strategy_options"] = dict(PRESETS[preset]["strategy_options"])
    if "strategy" in config and "strategy_options" not in config:
        merged["strategy_options"] = {}  # another strategy than the preset's: its own defaults
    for key, value in config.items():
        if key == "strategy_options" and "strategy" not in config and isinstance(value, Mapping):
            merged.setdefault("strategy_options", {}).update(value)  # preset's options, overridden
        elif key != "preset":
            merged[key] = value

    kwargs: dict[str, Any] = {}
    scalars = {key: merged[key] for key in _SCALAR_CHECKS if key in merged}
    problems += option_problems(scalars)
    kwargs.update(scalars)  # used only when there is no problem at all
    if "weights" in merged:
        _weights_table("weights", merged["weights"], problems, allow_scalar=False)
        kwargs["weights"] = merged["weights"]
    for key in ("min_weight", "max_weight"):
        if key in merged:
            _weights_table(key, merged[key], problems, allow_scalar=True)
            kwargs[key] = merged[key]
    for key in ("terms", "optional"):
        if key in merged and _names_list(key, merged[key], problems):
            kwargs[key] = list(merged[key])

    name = merged.get("strategy", "lra")
    if not isinstance(name, str) or name not in _REGISTRY:
        problems.append(f"unknown strategy {name!r}{_suggest(str(name), available_strategies())}; known: {available_strategies()}")
    else:
        options = merged.get("strategy_options", {})
        if _check_options("strategy", _REGISTRY[name], options, problems):
            kwargs["strategy"] = _build("strategy", _REGISTRY[name], options, problems)

    if "combine" in merged or "combine_options" in merged:
        combine, options = merged.get("combine", "sum"), merged.get("combine_options", {})
        if not isinstance(combine, str):
            problems.append(f"combine must be a combiner name, got {combine!r}; known: {available_combiners()}")
        elif not isinstance(options, Mapping):
            problems.append(f"combine_options must be a table/dict, got {type(options).__name__}")
        else:
            try:
                kwargs["combine"] = make_combiner(combine, **options)
            except (TypeError, ValueError) as error:
                problems.append(f"combine: {error}")

    for key in ("scope", "probe"):
        if key not in merged:
            continue
        if model is None:
            problems.append(f"{key} names parameters by prefix: pass model= so they can be resolved")
            continue
        spec = merged[key]
        try:
            if key == "probe":
                if _names_list("probe", spec, problems):
                    kwargs["probe"] = parameters_by_prefix(model, spec)
            elif not isinstance(spec, Mapping):
                problems.append(f"scope must be a table {{term: [prefixes]}}, got {type(spec).__name__}")
            else:
                kwargs["scope"] = {
                    term: parameters_by_prefix(model, prefixes)
                    for term, prefixes in spec.items() if _names_list(f"scope[{term!r}]", prefixes, problems)
                }
        except ValueError as error:
            problems.append(f"{key}: {error}")
    if problems:
        raise ConfigError(problems)
    return kwargs


def export_config(
    settings: Mapping[str, Any],
    scope: Mapping[str, list],
    probe: list | None,
    model: nn.Module | None = None,
) -> dict[str, Any]:
    """The plain dict that rebuilds a balancer: its plain ``settings`` plus scope and probe named
    by the parameters' names in ``model`` (required when there is a scope or a probe)."""
    config = dict(settings)
    if not scope and probe is None:
        return config
    if model is None:
        raise ValueError("this balancer has scopes or a probe: pass model= to name their parameters")
    names = {id(p): n for n, p in model.named_parameters()}

    def named(params: list, what: str) -> list[str]:
        if any(id(p) not in names for p in params):
            raise ValueError(f"the {what} holds parameters that model= does not contain")
        return [names[id(p)] for p in params]

    if scope:
        config["scope"] = {term: named(params, f"scope of {term!r}") for term, params in scope.items()}
    if probe is not None:
        config["probe"] = named(probe, "probe")
    return config
