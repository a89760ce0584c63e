"""lossbalance.options: one table of the plain options, and the checks of option values."""
import inspect
import typing

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lossbalance import LossBalancer
from lossbalance.config import _KEYS
from lossbalance.options import PLAIN_NAMES, PLAIN_OPTIONS, option_problems, string_hint, value_problem

# The keyword arguments of LossBalancer.__init__ that are not plain options: objects, tables and
# lists, each handled by a key group of its own in the config (or not configurable at all).
STRUCTURED = {"optimizer", "strategy", "weights", "min_weight", "max_weight", "terms", "optional", "scope", "probe", "shared",
              "combine", "scaler", "distributed", "process_group", "pointwise"}


def test_the_table_matches_the_signature_of_the_balancer():
    parameters = inspect.signature(LossBalancer.__init__).parameters
    plain = [name for name in parameters if name not in STRUCTURED | {"self"}]
    assert list(PLAIN_NAMES) == plain
    assert {o.name: o.default for o in PLAIN_OPTIONS} == {name: parameters[name].default for name in plain}
    hints = typing.get_type_hints(LossBalancer.__init__)
    for option in PLAIN_OPTIONS:
        choices = typing.get_args(hints[option.name])
        if typing.get_origin(hints[option.name]) is typing.Literal:  # the same choices, in words
            assert all(repr(c) in option.expected for c in choices) and option.problem(choices[-1]) is None
        else:
            assert hints[option.name] is option.kind, option.name
        assert option.problem(option.default) is None, option.name
    assert set(PLAIN_NAMES) <= set(_KEYS)


def test_messages_name_the_option_the_value_and_what_was_expected():
    assert option_problems({"update_every": 0, "memory": "tiny", "frozen": "yes", "seed": 3}) == [
        "update_every must be a positive integer, got 0",
        "memory must be 'keep' or 'lean', got 'tiny'",
        "frozen must be true or false, got 'yes'",
    ]
    assert option_problems({"update_every": "10"}) == [
        "update_every must be a positive integer, got '10' (a string: write 10 without quotes)"
    ]
    assert option_problems({"warmup": True}) == ["warmup must be a non-negative integer, got True"]
    with pytest.raises(KeyError, match="'strategy'.*not plain options"):
        option_problems({"strategy": "lra"})


def test_the_balancer_raises_the_same_messages():
    import torch
    with pytest.raises(ValueError, match="grad_mode must be 'loop' or 'batched', got 'vmap'"):
        LossBalancer(torch.optim.Adam(torch.nn.Linear(1, 1).parameters()), grad_mode="vmap")


@pytest.mark.parametrize("text, hint", [
    ("1e-1", "write 1.0e-1"), ("1.0e3", "write 1.0e+3"), ("-2E-5", "write -2.0e-5"), ("0.5", "without quotes"),
    ("abc", ""),
])
def test_yaml_1_1_hint(text, hint):
    got = string_hint(text)
    assert (hint in got) if hint else got == ""
    if hint.startswith("write"):
        import yaml
        assert isinstance(yaml.safe_load(f"a: {hint.split()[-1]}")["a"], float)  # the fix is a float in PyYAML


@given(st.floats(allow_nan=False, allow_infinity=False) | st.integers())
def test_numbers_pass_and_their_strings_are_refused(number):
    annotation = float | None
    assert value_problem("strategy_options.alpha", number, annotation) is None
    problem = value_problem("strategy_options.alpha", str(number), annotation)
    assert problem.startswith(f"strategy_options.alpha must be a number or null, got {str(number)!r} (a string")


def test_annotations_understood():
    Mode = typing.Literal["sum", "mean"]
    assert value_problem("x", "max", Mode) == "x must be 'sum' or 'mean', got 'max'"
    assert value_problem("x", True, typing.Literal[1, 2]) is not None  # True == 1, but not a literal 1
    assert value_problem("x", {"a": 1.0}, typing.Mapping[str, float]) is None
    assert value_problem("x", {"a": "1"}, typing.Mapping[str, float]).startswith("x must be a table {name: a number}")
    assert value_problem("x", object(), typing.Any) is None
    assert value_problem("x", 1.5, int) == "x must be an integer, got 1.5"
