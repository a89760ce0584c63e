"""The plain options of ``LossBalancer``, each declared once, and the checks of option values.

:data:`PLAIN_OPTIONS` holds one :class:`Option` per plain option of ``LossBalancer.__init__``
(the ones a config gives as a bare number, boolean or string): its name, default, type, rule
and, in words, what a valid value is. It drives :func:`option_problems` (the one rule book of
``LossBalancer`` and :func:`lossbalance.config.parse_config`), the keys a config accepts and the
plain keys ``LossBalancer.config()`` exports (:data:`PLAIN_NAMES`).

:func:`value_problem` checks a value against a type annotation (``float``, ``int``, ``bool``,
``str``, ``None``, ``Literal[...]``, unions, ``Mapping[str, X]``, classes): the config checks the
options of strategies and combiners with it, from their constructors' annotations.

A number written as a string is refused, never coerced, with a hint: PyYAML (YAML 1.1) reads
``1e-1`` and ``1.0e3`` as strings (a YAML 1.1 float needs a dot and a signed exponent: write
``1.0e-1``, ``1.0e+3``), and ``"10"`` in quotes is a string in every YAML version.
"""
from __future__ import annotations

import numbers
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable, Literal

__all__ = ["Option", "PLAIN_OPTIONS", "PLAIN_NAMES", "option_problems", "value_problem", "string_hint"]


def _anything(value: Any) -> bool:
    return True


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


_KINDS: dict[type, tuple[Callable[[Any], bool], str]] = {
    int: (_is_int, "an integer"),
    float: (_is_real, "a number"),
    bool: (lambda v: isinstance(v, bool), "true or false"),
    str: (lambda v: isinstance(v, str), "a string"),
    type(None): (lambda v: v is None, "null"),
}

def _alternatives(texts: list[str]) -> str:
    """``"a"``, ``"a or b"``, ``"a, b or c"``."""
    return texts[0] if len(texts) == 1 else ", ".join(texts[:-1]) + " or " + texts[-1]


_EXPONENT = re.compile(r"([+-]?(?:\d+\.?\d*|\.\d+))[eE]([+-]?)(\d+)")


def string_hint(value: Any, kind: type = float) -> str:
    """Why a string ``value`` given for a number of ``kind`` (``int`` or ``float``) is refused,
    and how to write it (empty unless ``value`` is a string that reads as a number)."""
    if not isinstance(value, str):
        return ""
    try:
        number = float(value)
    except ValueError:
        return ""
    if kind is int and number.is_integer():
        return f" (a string: write {int(number)} without quotes)"
    match = _EXPONENT.fullmatch(value.strip())
    if match:
        mantissa, sign, exponent = match.groups()
        mantissa = mantissa if "." in mantissa else mantissa + ".0"
        return (
            f" (a string: YAML 1.1 readers such as PyYAML read {value} as a string, a float needs a dot "
            f"and a signed exponent: write {mantissa}e{sign or '+'}{exponent})"
        )
    return " (a string: write the number without quotes)"


@dataclass(frozen=True)
class Option:
    """One plain option of ``LossBalancer``: ``kind`` is its type (``int``, ``bool`` or ``str``),
    ``rule`` what a value of that type must also satisfy, ``expected`` both in words."""

    name: str
    default: Any
    kind: type
    expected: str
    rule: Callable[[Any], bool] = _anything

    def problem(self, value: Any) -> str | None:
        """What is wrong with ``value`` for this option (``None``: nothing)."""
        has_kind, _ = _KINDS[self.kind]
        if has_kind(value) and self.rule(value):
            return None
        return f"{self.name} must be {self.expected}, got {value!r}{string_hint(value, self.kind)}"


def _count(name: str, default: int, minimum: int) -> Option:
    expected = "a positive integer" if minimum == 1 else "a non-negative integer"
    return Option(name, default, int, expected, lambda v: v >= minimum)


def _choice(name: str, default: str, *choices: str) -> Option:
    return Option(name, default, str, _alternatives([repr(c) for c in choices]), lambda v: v in choices)


PLAIN_OPTIONS: tuple[Option, ...] = (
    _count("update_every", 1, minimum=1),
    _count("warmup", 0, minimum=0),
    Option("frozen", False, bool, "true or false"),
    _count("diagnose_every", 0, minimum=0),
    _choice("memory", "keep", "keep", "lean"),
    _choice("grad_mode", "loop", "loop", "batched"),
    _choice("nonfinite", "raise", "raise", "skip"),
    _count("history", 0, minimum=0),
    _count("check_every", 1, minimum=1),
    _choice("check_paths", "first", "first", "always"),
    Option("seed", 0, int, "an integer"),
)
PLAIN_NAMES: tuple[str, ...] = tuple(option.name for option in PLAIN_OPTIONS)
_BY_NAME = {option.name: option for option in PLAIN_OPTIONS}


def option_problems(options: Mapping[str, Any]) -> list[str]:
    """What is wrong with the plain options (``update_every``, ``memory``, ...) among ``options``;
    the one rule book for ``LossBalancer`` and :func:`~lossbalance.config.parse_config`.

    A key that is not a plain option raises ``KeyError`` (a programming error, not a bad value).
    """
    unknown = [key for key in options if key not in _BY_NAME]
    if unknown:
        raise KeyError(f"{unknown} are not plain options of LossBalancer; they are: {list(PLAIN_NAMES)}")
    problems = (_BY_NAME[key].problem(value) for key, value in options.items())
    return [problem for problem in problems if problem is not None]


# ---------------------------------------------------------------------- values against annotations
Check = tuple[Callable[[Any], bool], str]


def _literal(choices: tuple[Any, ...]) -> Check:
    # 1 == True: a literal matches only a value of its own type
    return (lambda v: any(v == c and type(v) is type(c) for c in choices)), _alternatives([repr(c) for c in choices])


def _union(members: tuple[Any, ...]) -> Check | None:
    checks = [_check(member) for member in members]
    if any(check is None for check in checks):
        return None
    return (lambda v: any(accepts(v) for accepts, _ in checks)), _alternatives([text for _, text in checks])


def _table(value_type: Any) -> Check:
    inner = _check(value_type)
    accepts, text = inner if inner is not None else (_anything, "values")

    def table(value: Any) -> bool:
        return isinstance(value, Mapping) and all(accepts(v) for v in value.values())

    return table, f"a table {{name: {text}}}" if inner is not None else "a table"


def _check(annotation: Any) -> Check | None:
    """How to check a value against ``annotation``, and what it must be in words (``None``: the
    annotation says nothing checkable, e.g. ``Any``; the constructor checks such values)."""
    if annotation in _KINDS:
        return _KINDS[annotation]
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Literal:
        return _literal(args)
    if origin in (typing.Union, types.UnionType):
        return _union(args)
    if origin is not None and isinstance(origin, type) and issubclass(origin, Mapping):
        return _table(args[1] if len(args) == 2 else Any)
    if origin is type:
        return (lambda v: isinstance(v, type)), "a class"
    return None


def value_problem(label: str, value: Any, annotation: Any) -> str | None:
    """What is wrong with ``value`` given for the option ``label`` annotated ``annotation``
    (``None``: nothing the annotation can tell). Only the type (and a ``Literal``'s choices) is
    checked; ranges are the constructor's business."""
    check = _check(annotation)
    if check is None or check[0](value):
        return None
    accepts, expected = check
    kind = int if accepts is _is_int else float
    return f"{label} must be {expected}, got {value!r}{string_hint(value, kind)}"
