"""lossbalance: adaptive weighting of named loss terms for PyTorch (PINNs, multi-task learning)."""
from .balancer import LossBalancer
from .gradients import GradientEngine, GradStats
from .strategies import (
    GradNorm, GradNormRatio, LRAnnealing, Static, StepRecord, Strategy, available_strategies, register,
)

__version__ = "0.1.0"

__all__ = [
    "LossBalancer", "GradientEngine", "GradStats", "GradNorm", "GradNormRatio", "LRAnnealing", "Static",
    "StepRecord", "Strategy",
    "available_strategies", "register", "__version__",
]
