"""Small reference PINN problems: 2-D Helmholtz, 1-D Burgers, 1-D Poisson, 1-D wave, Klein-Gordon, Kovasznay, Allen-Cahn.

Each problem implements the :class:`Problem` protocol (``make_model``, ``sample``,
``losses``, ``exact``, ``relative_l2``); :class:`MLP` is the shared tanh network with
built-in input normalisation. :func:`make_problem` also builds a problem of your own given as
``"package.module:Name"`` or ``"path/to/file.py:Name"`` (a :class:`Problem` subclass or a function
returning a problem).
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import inspect
import os
import sys
from typing import Any, Callable

from .allen_cahn import AllenCahn1D
from .base import MLP, Problem, gradient
from .burgers import Burgers1D, BurgersConFIG
from .helmholtz import Helmholtz2D
from .klein_gordon import KleinGordon1D
from .kovasznay import Kovasznay2D
from .poisson import Poisson1D
from .wave import Wave1D

__all__ = [
    "MLP",
    "PROBLEMS",
    "AllenCahn1D",
    "Burgers1D",
    "BurgersConFIG",
    "Helmholtz2D",
    "KleinGordon1D",
    "Kovasznay2D",
    "Poisson1D",
    "Problem",
    "ProblemError",
    "Wave1D",
    "gradient",
    "make_problem",
    "resolve_problem",
]

#: name -> problem class
PROBLEMS: dict[str, type[Problem]] = {
    "helmholtz": Helmholtz2D,
    "burgers": Burgers1D,
    "burgers_config": BurgersConFIG,  # ConFIG's Burgers notebook: fixed LHS points, test MSE
    "poisson": Poisson1D,
    "wave": Wave1D,
    "klein_gordon": KleinGordon1D,
    "allen_cahn": AllenCahn1D,
    "kovasznay": Kovasznay2D,
}

#: the methods a problem object needs (the :class:`Problem` protocol the runner uses)
_PROTOCOL = ("term_names", "sample", "losses", "make_model", "evaluation_data")


class ProblemError(ValueError):
    """A problem name or ``module:attr`` path that does not give a problem."""


def resolve_problem(name: str) -> Callable[..., Problem]:
    """The factory behind a problem name: ``PROBLEMS[name]``, or the attribute ``attr`` of
    ``"package.module:attr"`` / ``"path/to/file.py:attr"`` (imported here; a class or a function
    returning a problem). Raises :class:`ProblemError` (a ``ValueError``) for an unknown name (with
    the closest known one), a module that fails to import or an attribute that is missing."""
    if not isinstance(name, str) or not name:
        raise ProblemError(f"a problem is a name or 'module:attr', got {name!r}")
    if ":" not in name:
        if name in PROBLEMS:
            return PROBLEMS[name]
        close = difflib.get_close_matches(name.lower(), PROBLEMS, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ProblemError(f"unknown problem {name!r}.{hint} Known: {', '.join(sorted(PROBLEMS))}, "
                           "or 'package.module:ProblemClass' / 'path/to/file.py:ProblemClass' for your own")
    module_name, _, attr = name.rpartition(":")
    if not module_name or not attr:
        raise ProblemError(f"problem {name!r}: write 'package.module:ProblemClass' or 'file.py:ProblemClass'")
    module = _import(name, module_name)
    try:
        target = getattr(module, attr)
    except AttributeError:
        public = [n for n in dir(module) if not n.startswith("_")]
        close = difflib.get_close_matches(attr, public, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ProblemError(f"problem {name!r}: module {module_name!r} has no attribute {attr!r}.{hint}") from None
    if not callable(target):
        raise ProblemError(f"problem {name!r}: {attr!r} is neither a Problem class nor a function returning one")
    if inspect.isclass(target) and not _is_problem_class(target):
        raise ProblemError(f"problem {name!r}: class {attr!r} lacks {', '.join(_missing(target))} "
                           "(subclass lossbalance.problems.Problem)")
    return target


def _import(name: str, module_name: str) -> Any:
    """The module of a ``module:attr`` problem path; a file path is loaded from that file."""
    try:
        if module_name.endswith(".py") or os.sep in module_name or "/" in module_name:
            path = os.path.abspath(module_name)
            if not os.path.isfile(path):
                raise ProblemError(f"problem {name!r}: no such file {path}")
            key = "lossbalance_user_problem_" + str(abs(hash(path)))
            if key in sys.modules:
                return sys.modules[key]
            spec = importlib.util.spec_from_file_location(key, path)
            module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
            sys.modules[key] = module
            try:
                spec.loader.exec_module(module)  # type: ignore[union-attr]
            except BaseException:
                sys.modules.pop(key, None)
                raise
            return module
        return importlib.import_module(module_name)
    except ProblemError:
        raise
    except Exception as exc:  # noqa: BLE001 - any import failure is the user's module's
        raise ProblemError(f"problem {name!r}: importing {module_name!r} failed: {type(exc).__name__}: {exc}") from exc


def _missing(obj: Any) -> list[str]:
    return [attr for attr in _PROTOCOL if not hasattr(obj, attr)]


def _is_problem_class(cls: type) -> bool:
    return issubclass(cls, Problem) or not _missing(cls)


def make_problem(name: str, **kwargs: Any) -> Problem:
    """Instantiate the problem ``name`` (see :func:`resolve_problem`) with ``kwargs``.

    A function given as ``module:function`` that takes no ``device`` / ``dtype`` argument is called
    without them when they are ``None``."""
    factory = resolve_problem(name)
    if not inspect.isclass(factory):
        accepted = inspect.signature(factory).parameters
        takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values())
        for key in ("device", "dtype"):
            if key in kwargs and kwargs[key] is None and key not in accepted and not takes_any:
                kwargs.pop(key)
    problem = factory(**kwargs)
    missing = _missing(problem)
    if missing:
        raise ProblemError(f"problem {name!r} returned {type(problem).__name__}, which lacks {', '.join(missing)}")
    return problem
