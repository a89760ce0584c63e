"""Weighting strategies, one module each; ``base`` holds the protocol and the registry."""
from .base import StepRecord, Strategy, available_strategies, make_strategy, register
from .gradnorm import GradNorm
from .gradnorm_ratio import GradNormRatio
from .lra import LRAnnealing
from .static import Static

__all__ = [
    "StepRecord", "Strategy", "available_strategies", "make_strategy", "register",
    "GradNorm", "GradNormRatio", "LRAnnealing", "Static",
]
