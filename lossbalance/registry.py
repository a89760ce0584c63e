"""Registries of short names: the strategies' and the combiners' (one mechanism for both)."""
from __future__ import annotations

import difflib
from typing import Any, TypeVar

__all__ = ["Registry", "did_you_mean"]

T = TypeVar("T", bound=type)


def did_you_mean(word: str, known: list[str]) -> str:
    """``" Did you mean 'x'?"`` with the closest of ``known``, or ``""``."""
    close = difflib.get_close_matches(word, known, n=1)
    return f" Did you mean {close[0]!r}?" if close else ""


class Registry(dict[str, Any]):
    """``{short name: class}`` for one kind of pluggable class (``kind``: for the messages)."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind

    def register(self, cls: T) -> T:
        """Class decorator: make ``cls`` known under ``cls.name``."""
        if not cls.name or cls.name in self:
            raise ValueError(f"{self.kind} name {cls.name!r} is empty or taken")
        self[cls.name] = cls
        return cls

    def names(self) -> list[str]:
        """The registered short names, sorted."""
        return sorted(self)
