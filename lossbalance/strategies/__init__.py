"""Weighting strategies, one module each; ``base`` holds the protocol and the registry."""
from .base import StepRecord, Strategy, available_strategies, make_strategy, register
from .dwa import DWA
from .famo import FAMO
from .gradnorm import GradNorm
from .gradnorm_ratio import GradNormRatio
from .lra import LRAnnealing
from .ntk import NTKWeighting
from .relobralo import ReLoBRaLo
from .softadapt import SoftAdapt
from .static import Static, static_from
from .uncertainty import UncertaintyWeighting

__all__ = [
    "StepRecord", "Strategy", "available_strategies", "make_strategy", "register",
    "DWA", "FAMO", "GradNorm", "GradNormRatio", "LRAnnealing", "NTKWeighting", "ReLoBRaLo", "SoftAdapt", "Static", "UncertaintyWeighting", "static_from",
]
