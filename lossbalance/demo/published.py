"""Published results for the reference problems' setups, drawn beside a sweep's own curves.

Only numbers checked against the paper go here (``value``); where the setup is published but the
number was not checked, ``value`` is ``None`` and the entry only names the source. The papers'
figures themselves are not redistributed: ``figure`` says where to find the one for the setup.
"""
from __future__ import annotations

from typing import Any

__all__ = ["PUBLISHED", "published_for"]

PUBLISHED: dict[str, list[dict[str, Any]]] = {
    "burgers": [{
        "source": "Raissi, Perdikaris & Karniadakis, J. Comput. Phys. 378 (2019) 686-707",
        "figure": "Fig. 1 (Burgers' equation, continuous-time inference)",
        "method": "PINN, fixed unit weights, L-BFGS; 9 layers x 20 tanh, N_u = 100, N_f = 10 000",
        "metric": "rel_l2",
        "value": 6.7e-4,
        "note": "a different network and optimizer (full-batch L-BFGS), not our Adam budget",
    }],
    "helmholtz": [{
        "source": "Wang, Teng & Perdikaris, SIAM J. Sci. Comput. 43 (2021) A3055, arXiv:2001.04536",
        "figure": "Helmholtz example (fixed weights vs. learning-rate annealing)",
        "method": "PINN with fixed weights and with LRA; [2, 50, 50, 50, 1] tanh, Adam, 40 000 steps",
        "metric": "rel_l2",
        "value": None,
        "note": "number not checked here; our own reproduction: README, Results",
    }],
    "wave": [{
        "source": "Wang, Yu & Perdikaris, J. Comput. Phys. 449 (2022) 110768, arXiv:2007.14527",
        "figure": "wave-equation example (fixed weights vs. NTK weights)",
        "method": "PINN with fixed weights and with NTK-based adaptive weights",
        "metric": "rel_l2",
        "value": None,
        "note": "number not checked here",
    }],
    "klein_gordon": [{
        "source": "Wang, Teng & Perdikaris, SIAM J. Sci. Comput. 43 (2021) A3055, arXiv:2001.04536",
        "figure": "Klein-Gordon example",
        "method": "PINN with fixed weights and with LRA",
        "metric": "rel_l2",
        "value": None,
        "note": "number not checked here",
    }],
}


def published_for(problem: str) -> list[dict[str, Any]]:
    """The published entries for a registered problem name (empty for others)."""
    return [dict(entry) for entry in PUBLISHED.get(problem, [])]
