"""lossbalance: adaptive weighting of named loss terms for PyTorch (PINNs, multi-task learning)."""
from .balancer import LossBalancer
from .combine import ConFIG, PCGrad, WeightedSum, available_combiners
from .config import ConfigError, available_presets
from .gradients import GradientEngine, GradStats
from .pointwise import BRDR, RBA, SAPINN, Causal, Residual
from .scope import constant_call
from .strategies import (
    DWA, FAMO, GradNorm, GradNormRatio, LRAnnealing, NTKWeighting, ReLoBRaLo, SoftAdapt, Static, StepRecord, Strategy,
    UncertaintyWeighting, available_strategies, register, static_from,
)

__version__ = "0.1.0"

__all__ = [
    "LossBalancer", "GradientEngine", "GradStats", "StepRecord", "Strategy", "register",
    "available_strategies", "available_combiners", "static_from", "available_presets", "ConfigError", "constant_call",
    "DWA", "FAMO", "GradNorm", "GradNormRatio", "LRAnnealing", "NTKWeighting", "ReLoBRaLo", "SoftAdapt", "Static", "UncertaintyWeighting",
    "ConFIG", "PCGrad", "WeightedSum", "Residual", "Causal", "RBA", "SAPINN", "BRDR", "__version__",
]
