"""Lazy imports of optional frameworks with an install hint."""
from __future__ import annotations

import importlib
from types import ModuleType


def require(module: str, extra: str, what: str) -> ModuleType:
    """``import module``, or an ImportError saying which extra installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(
            f"{what} needs the {module.partition('.')[0]!r} package, which is not installed: "
            f"pip install 'lossbalance[{extra}]'"
        ) from error
