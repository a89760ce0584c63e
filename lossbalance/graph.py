"""What a loss term's autograd graph holds, found in one walk of it.

The balancer walks each term's graph once, at its first appearance (``check_paths="first"``):
which leaves it reaches (is there a path to the parameters the term may train?), how large it
is (the largest graph is differentiated last, so it alone need not be retained), whether it
goes through ``torch.utils.checkpoint(..., use_reentrant=True)`` (whose layers
``torch.autograd.grad`` cannot reach), whether it holds a ``torch.compile``'d backward (which
must always be retained: see :mod:`lossbalance.gradients`), and which ``nn.Parameter`` leaves
it reaches that the balancer does not balance (trained by another optimizer: they get the
gradient that ``total.backward()`` would give them).
"""
from __future__ import annotations

from typing import Any, Collection, Iterator, NamedTuple

import torch
from torch import Tensor

__all__ = ["GraphFacts", "graph_facts", "reaches", "graph_size"]

REENTRANT_CHECKPOINT = "CheckpointFunctionBackward"
COMPILED = "CompiledFunctionBackward"


class GraphFacts(NamedTuple):
    size: int  # autograd nodes (a proxy for the cost of a backward)
    leaves: frozenset[int]  # ids of the leaf tensors it reaches
    reentrant: bool  # goes through torch.utils.checkpoint(..., use_reentrant=True)
    compiled: bool  # holds a torch.compile'd backward
    others: tuple[Tensor, ...]  # nn.Parameter leaves that require grad and are not balanced


def _nodes(loss: Tensor) -> Iterator[Any]:
    """The autograd nodes behind ``loss``, each once (depth first)."""
    stack, seen = [loss.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        yield node
        stack.extend(child for child, _ in node.next_functions)


def graph_facts(loss: Tensor, balanced: Collection[int]) -> GraphFacts:
    """One walk of the graph of ``loss`` (``balanced``: the ids of the balanced parameters)."""
    size, leaves, kinds, others = 0, {id(loss)}, set(), {}
    for node in _nodes(loss):
        size += 1
        kinds.add(type(node).__name__)
        leaf = getattr(node, "variable", None)
        if leaf is None:
            continue
        leaves.add(id(leaf))
        if isinstance(leaf, torch.nn.Parameter) and leaf.requires_grad and id(leaf) not in balanced:
            others[id(leaf)] = leaf
    return GraphFacts(size, frozenset(leaves), REENTRANT_CHECKPOINT in kinds, COMPILED in kinds, tuple(others.values()))


def reaches(loss: Tensor, targets: Collection[int]) -> bool:
    """Whether the autograd graph of ``loss`` reaches a tensor whose ``id`` is in ``targets``."""
    if id(loss) in targets:
        return True
    return any(id(getattr(node, "variable", None)) in targets for node in _nodes(loss))


def graph_size(loss: Tensor) -> int:
    """The number of autograd nodes behind ``loss`` (a proxy for the cost of its backward)."""
    return sum(1 for _ in _nodes(loss))
