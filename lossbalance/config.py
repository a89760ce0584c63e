"""Declarative configuration: plain dicts (what YAML, TOML or Hydra give) and published presets.

``LossBalancer.from_config(optimizer, config, model=model)`` builds a balancer from a dict;
``balancer.config(model)`` returns the dict that rebuilds it. A bad config raises one
:class:`ConfigError` that lists every problem at once, before anything is built.

Keys: ``preset``, ``strategy``, ``strategy_options``, ``update_every``, ``weights``,
``min_weight``, ``max_weight``, ``warmup``, ``frozen``, ``terms``, ``optional``, ``scope``
(``{term: [parameter names or module paths]}``, resolved against ``model.named_parameters()``:
``"coef"`` selects the parameter ``coef`` and everything under the module ``coef``, never
``coef_net``), ``probe`` and ``shared`` (the same kind of names), ``combine``, ``combine_options``, and the plain
options of :data:`lossbalance.options.PLAIN_OPTIONS` (``memory``, ``grad_mode``, ``nonfinite``,
``check_paths``, ``history``, ``diagnose_every``, ``seed``, ...). A ``preset`` fills in the
strategy, its options and the schedule; the other keys override it.

Containers: the config and every table or list in it may be any ``Mapping`` / ``Sequence``
(not a string): dicts and lists, tuples, OmegaConf/Hydra ``DictConfig`` and ``ListConfig``.

Types: every value is checked against its option's type -- the plain options against their
table, ``strategy_options`` and ``combine_options`` against the annotations of the strategy's
or combiner's constructor -- and a wrong type is reported as ``strategy_options.alpha must be a
number, got '1e-1' ...``. Numbers written as strings are **refused, not coerced**: a quoted
``"10"`` is as likely a mistake as a deliberate string, and silently converting would make
``balancer.config()`` differ from the file it came from. The message says how to write it;
note that PyYAML follows YAML 1.1, which reads ``1e-1`` and ``1.0e3`` as *strings* (a YAML 1.1
float needs a dot and a signed exponent): write ``1.0e-1`` and ``1.0e+3`` (OmegaConf's loader and
YAML 1.2 readers read all of them as floats). Integers are accepted where a float is expected,
never the other way round, and ``true``/``false`` are never numbers.
"""
from __future__ import annotations

import difflib
import inspect
import numbers
import typing
from collections.abc import Mapping, Sequence
from typing import Any, Callable

from torch import nn

from .combine import Combiner, available_combiners, make_combiner
from .options import PLAIN_NAMES, option_problems, string_hint, value_problem
from .scope import parameters_by_prefix
from .strategies.base import _REGISTRY, available_strategies

__all__ = ["ConfigError", "PRESETS", "available_presets", "parse_config", "export_config"]


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
    # the mean norm, 1e-5 guard, momentum 0.9 on the old weight, update every 1000 steps. jaxpi
    # updates the weights after its step (they act from the next step); here they act on the
    # step that computed them, one call earlier (GradNormRatio, "Timing").
    "jaxpi": {
        "strategy": "gradnorm_ratio",
        "strategy_options": {"normalize": "mean", "alpha": 0.1, "eps": 1e-5},
        "update_every": 1000,
    },
    # Wang, Yu & Perdikaris 2022 (NTK), Algorithm 1: lambda_i = sum_j tr K_j / tr K_i, no EMA,
    # updated every 100 steps (the loss terms must be Residual(r, kind="residual")).
    "ntk2022": {
        "strategy": "ntk",
        "strategy_options": {"points": "sum", "normalize": "sum", "alpha": 1.0, "eps": 0.0},
        "update_every": 100,
    },
    # jaxpi weighting.scheme = "ntk" (pirate branch, jaxpi/models.py compute_weights): means of the
    # diagonals, mean_j m_j / (m_i + 1e-5 mean_j m_j), momentum 0.9 on the old weight, every 1000 steps.
    "jaxpi_ntk": {
        "strategy": "ntk",
        "strategy_options": {"points": "mean", "normalize": "mean", "alpha": 0.1, "eps": 1e-5},
        "update_every": 1000,
    },
    # Bischof & Kraus 2021 (arXiv 2110.09813), the authors' code (rbischof/relative_balancing,
    # src/train.py and src/update_rules.py): --alpha .999, --T 1., --rho 1. (Bernoulli mean: no
    # random lookback unless set), 1e-12 inside the ratio. The paper tunes these per problem.
    # train.py's alpha schedule [1, 0, .999, ...] with L(0) taken after the second step is
    # schedule="authors": at the second step the weights are K softmax(L(1) / L(0)), not ~1.
    "bischof2021": {
        "strategy": "relobralo",
        "strategy_options": {"alpha": 0.999, "expected_rho": 1.0, "tau": 1.0, "eps": 1e-12, "schedule": "authors"},
        "update_every": 1,
    },
    # Liu, Liu, Jin, Stone & Liu 2023 (FAMO), the authors' famo.py (Cranial-XIX/FAMO): logits'
    # Adam lr 0.025, weight decay (gamma) 0.01; the FAMO defaults are LibMTL's (weight decay 1e-3).
    "liu2023": {
        "strategy": "famo",
        "strategy_options": {"lr": 0.025, "weight_decay": 0.01, "eps": 1e-8},
        "update_every": 1,
    },
}

_STRUCTURED_KEYS = (
    "preset", "strategy", "strategy_options", "weights", "min_weight", "max_weight", "terms", "optional",
    "scope", "probe", "shared", "combine", "combine_options", "pointwise",
)
_KEYS = sorted({*_STRUCTURED_KEYS, *PLAIN_NAMES})


def available_presets() -> list[str]:
    return sorted(PRESETS)


def _suggest(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _plain(value: Any) -> Any:
    """``value`` with every ``Mapping`` (an OmegaConf ``DictConfig`` too) made a dict and every other
    ``Sequence`` (``ListConfig``, tuple; not a string) a list, all the way down."""
    if isinstance(value, Mapping):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        return [_plain(item) for item in value]
    return value


# ---------------------------------------------------------------------- options of strategies and combiners
def _annotations(factory: Callable[..., Any]) -> dict[str, Any]:
    try:
        return typing.get_type_hints(factory.__init__ if isinstance(factory, type) else factory)
    except NameError:  # a forward reference that cannot be resolved: the constructor checks alone
        return {}


def _option_problems(owner: str, factory: Callable[..., Any], options: Mapping[str, Any]) -> list[str]:
    """Keys of ``options`` that ``factory`` does not take, and values that do not have the types
    of its annotations (``strategy_options.alpha must be a number, got '1e-1' ...``)."""
    parameters = inspect.signature(factory).parameters.values()
    accepted = [p.name for p in parameters if p.kind is not p.VAR_KEYWORD]
    open_ended = len(accepted) < len(parameters)  # **kwargs: passed on (e.g. to a torchjd aggregator)
    unknown = [key for key in options if key not in accepted and not open_ended]
    hints = _annotations(factory)
    typed = (value_problem(f"{owner}_options.{key}", value, hints[key]) for key, value in options.items()
             if key in accepted and key in hints)
    return [
        f"unknown {owner} option {key!r}{_suggest(str(key), accepted)}; known: {accepted}" for key in unknown
    ] + [problem for problem in typed if problem is not None]


def _check_options(owner: str, factory: Callable[..., Any] | None, options: Any, problems: list[str]) -> bool:
    """Whether ``options`` (``<owner>_options``) is a table that ``factory`` (``None``: not known,
    reported elsewhere) can take; the problems found go to ``problems``."""
    if not isinstance(options, Mapping):
        problems.append(f"{owner}_options must be a table/dict, got {type(options).__name__}")
        return False
    found = [] if factory is None else _option_problems(owner, factory, options)
    problems += found
    return not found


def _build(owner: str, factory: Callable[..., Any], options: Mapping[str, Any], problems: list[str]) -> Any:
    try:
        return factory(**options)
    except (TypeError, ValueError) as error:
        problems.append(f"{owner} options: {error}")
        return None


def _combiner_class(name: str) -> type[Combiner] | None:
    """The class a combiner name (``"pcgrad"``, ``"torchjd:MGDA"``) builds, ``None`` if unknown."""
    key = name.strip().lower().split(":", 1)[0]
    if key not in available_combiners():
        return None
    return {cls.name: cls for cls in Combiner.__subclasses__()}.get(key)


# ---------------------------------------------------------------------- the key groups of a config
def _weight_problem(key: str, term: Any, weight: Any, *, allow_zero: bool) -> str | None:
    if not _is_number(weight):
        return f"{key}[{term!r}] must be a number, got {weight!r}{string_hint(weight)}"
    if not (weight > 0 or (allow_zero and weight == 0)):
        return f"{key}[{term!r}] must be positive, got {weight}"
    return None


def _weights_table(key: str, value: Any, problems: list[str], *, allow_scalar: bool) -> None:
    if allow_scalar and _is_number(value):
        if value < 0:
            problems.append(f"{key} must be >= 0, got {value}")
        return
    if not isinstance(value, Mapping):
        kind = "a number or a table {term: number}" if allow_scalar else "a table {term: number}"
        problems.append(f"{key} must be {kind}, got {value!r}{string_hint(value)}")
        return
    found = (_weight_problem(key, term, weight, allow_zero=allow_scalar) for term, weight in value.items())
    problems += [problem for problem in found if problem is not None]


def _names_list(key: str, value: Any, problems: list[str]) -> bool:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        problems.append(f"{key} must be a list of strings, got {value!r}")
        return False
    return True


def _unknown_keys(config: Mapping[str, Any]) -> list[str]:
    return [f"unknown key {key!r}{_suggest(str(key), _KEYS)}" for key in config if key not in _KEYS]


def _preset(name: Any, problems: list[str]) -> dict[str, Any]:
    if not isinstance(name, str) or name not in PRESETS:
        problems.append(f"unknown preset {name!r}{_suggest(str(name), list(PRESETS))}; known: {available_presets()}")
        return {}
    return {**PRESETS[name], "strategy_options": dict(PRESETS[name]["strategy_options"])}


def _merge_preset(config: Mapping[str, Any], problems: list[str]) -> dict[str, Any]:
    """The config with its preset filled in: the config's keys override the preset's, and its
    ``strategy_options`` override the preset's options unless it names a strategy of its own."""
    merged = _preset(config["preset"], problems) if config.get("preset") is not None else {}
    if "strategy" in config and "strategy_options" not in config:
        merged["strategy_options"] = {}  # another strategy than the preset's: its own defaults
    for key, value in config.items():
        if key == "strategy_options" and "strategy" not in config and isinstance(value, Mapping):
            merged.setdefault("strategy_options", {}).update(value)  # preset's options, overridden
        elif key != "preset":
            merged[key] = value
    return merged


def _plain_options(merged: dict[str, Any], kwargs: dict[str, Any], problems: list[str]) -> None:
    plain = {key: merged[key] for key in PLAIN_NAMES if key in merged}
    problems += option_problems(plain)
    kwargs.update(plain)  # used only when there is no problem at all


def _weight_tables(merged: dict[str, Any], kwargs: dict[str, Any], problems: list[str]) -> None:
    for key in ("weights", "min_weight", "max_weight"):
        if key in merged:
            _weights_table(key, merged[key], problems, allow_scalar=key != "weights")
            kwargs[key] = merged[key]


def _term_lists(merged: dict[str, Any], kwargs: dict[str, Any], problems: list[str]) -> None:
    for key in ("terms", "optional"):
        if key in merged and _names_list(key, merged[key], problems):
            kwargs[key] = list(merged[key])


def _strategy(merged: dict[str, Any], kwargs: dict[str, Any], problems: list[str]) -> None:
    name = merged.get("strategy", "lra")
    if not isinstance(name, str) or name not in _REGISTRY:
        problems.append(f"unknown strategy {name!r}{_suggest(str(name), available_strategies())}; known: {available_strategies()}")
        return
    options = merged.get("strategy_options", {})
    if _check_options("strategy", _REGISTRY[name], options, problems):
        kwargs["strategy"] = _build("strategy", _REGISTRY[name], options, problems)


def _combiner(merged: dict[str, Any], kwargs: dict[str, Any], problems: list[str]) -> None:
    if "combine" not in merged and "combine_options" not in merged:
        return
    combine, options = merged.get("combine", "sum"), merged.get("combine_options", {})
    if not isinstance(combine, str):
        problems.append(f"combine must be a combiner name, got {combine!r}; known: {available_combiners()}")
    elif _check_options("combine", _combiner_class(combine), options, problems):
        try:
            kwargs["combine"] = make_combiner(combine, **options)
        except (TypeError, ValueError) as error:
            problems.append(f"combine: {error}")


def _pointwise_kinds() -> dict[str, type]:
    """``{kind: class}`` of the pointwise weightings (:mod:`lossbalance.pointwise`: ``causal``, ``rba``, ...)."""
    from . import pointwise

    return {
        cls.__dict__["kind"]: cls for cls in vars(pointwise).values()
        if isinstance(cls, type) and isinstance(cls.__dict__.get("kind"), str)
    }


def pointwise_config(weightings: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """``{term: {"kind": ..., <constructor options>}}`` of the balancer's pointwise weightings
    (every constructor argument is kept as an attribute of the same name)."""
    def options(w: Any) -> dict[str, Any]:
        names = [n for n in inspect.signature(type(w)).parameters]
        return {n: list(v) if isinstance(v, tuple) else v for n in names if (v := getattr(w, n)) is not None}

    return {term: {"kind": w.kind, **options(w)} for term, w in weightings.items()}


def _pointwise(merged: dict[str, Any], kwargs: dict[str, Any], problems: list[str]) -> None:
    spec = merged.get("pointwise")
    if spec is None:
        return
    if not isinstance(spec, Mapping):
        problems.append(f"pointwise must be a table {{term: {{kind: causal|rba|..., options}}}}, got {type(spec).__name__}")
        return
    kinds, built = _pointwise_kinds(), {}
    for term, entry in spec.items():
        kind = entry.get("kind") if isinstance(entry, Mapping) else None
        if kind not in kinds:
            problems.append(f"pointwise.{term}.kind must be one of {sorted(kinds)}, got {kind!r}")
            continue
        options = {k: v for k, v in entry.items() if k != "kind"}
        if _check_options(f"pointwise.{term}", kinds[kind], options, problems):
            built[term] = _build(f"pointwise.{term}", kinds[kind], options, problems)
    kwargs["pointwise"] = built


def _scope(spec: Any, model: nn.Module, kwargs: dict[str, Any], problems: list[str]) -> None:
    if not isinstance(spec, Mapping):
        problems.append(f"scope must be a table {{term: [prefixes]}}, got {type(spec).__name__}")
        return
    kwargs["scope"] = {
        term: parameters_by_prefix(model, prefixes)
        for term, prefixes in spec.items() if _names_list(f"scope[{term!r}]", prefixes, problems)
    }


def _parameter_list(key: str) -> Callable[[Any, nn.Module, dict[str, Any], list[str]], None]:
    """The resolver of a list of parameter prefixes (``probe``, ``shared``)."""
    def resolve(spec: Any, model: nn.Module, kwargs: dict[str, Any], problems: list[str]) -> None:
        if _names_list(key, spec, problems):
            kwargs[key] = parameters_by_prefix(model, spec)

    return resolve


def _parameter_sets(
    merged: dict[str, Any], model: nn.Module | None, kwargs: dict[str, Any], problems: list[str]
) -> None:
    for key, resolve in (("scope", _scope), ("probe", _parameter_list("probe")), ("shared", _parameter_list("shared"))):
        if key not in merged:
            continue
        if model is None:
            problems.append(f"{key} names parameters by prefix: pass model= so they can be resolved")
            continue
        try:
            resolve(merged[key], model, kwargs, problems)
        except ValueError as error:
            problems.append(f"{key}: {error}")


def parse_config(config: Mapping[str, Any], *, model: nn.Module | None = None) -> dict[str, Any]:
    """Validate ``config`` and return the keyword arguments of ``LossBalancer`` (strategy included).

    ``config`` and every table or list in it may be any ``Mapping`` or ``Sequence`` (an OmegaConf
    ``DictConfig``/``ListConfig`` too). Raises :class:`ConfigError` listing every problem found.
    """
    if not isinstance(config, Mapping):
        raise ConfigError([f"the config must be a table/dict, got {type(config).__name__}"])
    config = _plain(config)
    problems = _unknown_keys(config)
    merged = _merge_preset(config, problems)
    kwargs: dict[str, Any] = {}
    for group in (_plain_options, _weight_tables, _term_lists, _strategy, _combiner, _pointwise):
        group(merged, kwargs, problems)
    _parameter_sets(merged, model, kwargs, problems)
    if problems:
        raise ConfigError(problems)
    return kwargs


def export_config(
    settings: Mapping[str, Any],
    scope: Mapping[str, list],
    lists: Mapping[str, list | None],
    model: nn.Module | None = None,
) -> dict[str, Any]:
    """The plain dict that rebuilds a balancer: its plain ``settings`` plus scope and the
    parameter ``lists`` (``probe``, ``shared``) named by the parameters' names in ``model``
    (required when there is any)."""
    config = dict(settings)
    lists = {key: params for key, params in lists.items() if params is not None}
    if not scope and not lists:
        return config
    if model is None:
        raise ValueError(f"this balancer has {'scopes' if scope else ' and '.join(lists)}: pass model= to name their parameters")
    named = _namer(model)
    if scope:
        config["scope"] = {term: named(params, f"scope of {term!r}") for term, params in scope.items()}
    for key, params in lists.items():
        config[key] = named(params, key)
    return config


def _namer(model: nn.Module) -> Callable[[list, str], list[str]]:
    """``named(params, what)``: the names of ``params`` in ``model`` (``what`` names them in the error)."""
    names = {id(p): n for n, p in model.named_parameters()}

    def named(params: list, what: str) -> list[str]:
        if any(id(p) not in names for p in params):
            raise ValueError(f"the {what} holds parameters that model= does not contain")
        return [names[id(p)] for p in params]

    return named
