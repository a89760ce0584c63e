"""Adapters for training frameworks that own the backward pass and the optimizer step.

Each submodule imports its framework only when used, and says how to install it when missing:

* :mod:`lossbalance.integrations.deepxde`: ``balance(model, strategy)`` after ``model.compile``
  (``pip install 'lossbalance[deepxde]'``, PyTorch backend).
* :mod:`lossbalance.integrations.lightning`: ``LossBalancerCallback`` (``[lightning]``).
* :mod:`lossbalance.integrations.pina`: ``BalancedWeighting`` for PINA solvers (``[pina]``).
* :mod:`lossbalance.integrations.aggregator`: ``BalancedAggregator``, a PhysicsNeMo-style
  ``nn.Module`` aggregator (no extra dependency).
"""
