"""Small reference PINN problems: 2-D Helmholtz, 1-D Burgers, 1-D Poisson.

Each problem implements the :class:`Problem` protocol (``make_model``, ``sample``,
``losses``, ``exact``, ``relative_l2``); :class:`MLP` is the shared tanh network with
built-in input normalisation.
"""

from __future__ import annotations

from typing import Any

from .base import MLP, Problem, gradient
from .burgers import Burgers1D
from .helmholtz import Helmholtz2D
from .poisson import Poisson1D

__all__ = [
    "MLP",
    "PROBLEMS",
    "Burgers1D",
    "Helmholtz2D",
    "Poisson1D",
    "Problem",
    "gradient",
    "make_problem",
]

#: name -> problem class
PROBLEMS: dict[str, type[Problem]] = {
    "helmholtz": Helmholtz2D,
    "burgers": Burgers1D,
    "poisson": Poisson1D,
}


def make_problem(name: str, **kwargs: Any) -> Problem:
    """Instantiate ``PROBLEMS[name](**kwargs)``."""
    try:
        cls = PROBLEMS[name]
    except KeyError:
        raise ValueError(f"unknown problem {name!r}; choose from {sorted(PROBLEMS)}") from None
    return cls(**kwargs)
