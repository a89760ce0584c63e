"""Published results for the reference problems' setups, drawn beside a sweep's own curves.

Only numbers found stated in a source go here (``value``, with the source: the paper's table or figure,
or the authors' repository file); where the setup is published but no number could be confirmed,
``value`` is ``None`` (printed "not confirmed") and ``note`` says why. The papers'
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
        "method": "PINN with fixed weights and with LRA; [2, 50, 50, 50, 1] tanh, Adam, 40 000 steps, batch 128",
        "metric": "rel_l2",
        "value": None,
        "note": "not confirmed: the paper's numbers were not at hand and the authors' code "
                "(PredictiveIntelligenceLab/GradientPathologiesPINNs, Helmholtz/Helmholtz2D.py) prints the "
                "error without storing it; our own reproduction: README, Results",
    }],
    "wave": [{
        "source": "Wang, Yu & Perdikaris, J. Comput. Phys. 449 (2022) 110768, arXiv:2007.14527; authors' notebook "
                  "PredictiveIntelligenceLab/PINNsNTK, PINNsNTK_Wave1D.ipynb",
        "figure": "the notebook's stored output of its NTK-weighted run",
        "method": "PINN with NTK weights (trace ratios every 100 steps); [2, 500, 500, 500, 1] tanh, Adam 1e-3 "
                  "x 0.9^(step/1000), 80 001 steps, 300 residual points and 100 per initial/boundary set",
        "metric": "rel_l2",
        "value": 3.857674e-3,
        "note": "a 500-wide network at 16x our steps; ic, bc at x=0 and bc at x=1 share one weight there",
    }, {
        "source": "Wang, Yu & Perdikaris, J. Comput. Phys. 449 (2022) 110768, arXiv:2007.14527",
        "figure": "wave-equation example, fixed weights",
        "method": "PINN with fixed unit weights, same network and budget",
        "metric": "rel_l2",
        "value": None,
        "note": "not confirmed: the paper's numbers were not at hand and the notebook keeps only the NTK run",
    }],
    "klein_gordon": [{
        "source": "Wang, Teng & Perdikaris, SIAM J. Sci. Comput. 43 (2021) A3055, arXiv:2001.04536",
        "figure": "Klein-Gordon example (fixed weights vs. learning-rate annealing)",
        "method": "PINN with fixed weights and with LRA; [2, 50, 50, 50, 50, 50, 1] tanh, Adam, 40 000 steps, "
                  "batch 128",
        "metric": "rel_l2",
        "value": None,
        "note": "not confirmed: the paper's numbers were not at hand and the authors' code "
                "(GradientPathologiesPINNs, Klein Gordon/Klein_Gordon.py) prints the error without storing it",
    }],
    "burgers_config": [{
        "source": "Liu, Chu & Thuerey, 'ConFIG: Towards Conflict-free Training of Physics Informed Neural Networks', "
                  "ICLR 2025; authors' notebook tum-pbs/ConFIG, docs/examples/pinn_burgers.ipynb",
        "figure": "the notebook's stored best test MSE",
        "method": "Adam, plain weighted sum (lr 1e-4); 2 -> 50, 4 x 50 tanh, Xavier-normal, 5 000 steps, fresh Latin-hypercube points "
                  "each step (2 000 residual, 50 initial, 50 boundary)",
        "metric": "mse",
        "value": 0.031,
        "note": "one seed; as quoted in this project's issue 18 from the notebook",
    }, {
        "source": "Liu, Chu & Thuerey, 'ConFIG: Towards Conflict-free Training of Physics Informed Neural Networks', "
                  "ICLR 2025; authors' notebook tum-pbs/ConFIG, docs/examples/pinn_burgers.ipynb",
        "figure": "the notebook's stored best test MSE",
        "method": "ConFIG with Adam (lr 1e-4); 2 -> 50, 4 x 50 tanh, Xavier-normal, 5 000 steps, fresh Latin-hypercube points "
                  "each step (2 000 residual, 50 initial, 50 boundary)",
        "metric": "mse",
        "value": 0.00638,
        "note": "one seed; as quoted in this project's issue 18 from the notebook",
    }, {
        "source": "Liu, Chu & Thuerey, 'ConFIG: Towards Conflict-free Training of Physics Informed Neural Networks', "
                  "ICLR 2025; authors' notebook tum-pbs/ConFIG, docs/examples/pinn_burgers.ipynb",
        "figure": "the notebook's stored best test MSE",
        "method": "momentum ConFIG with SGD (lr 5e-4); 2 -> 50, 4 x 50 tanh, Xavier-normal, 5 000 steps, fresh Latin-hypercube points "
                  "each step (2 000 residual, 50 initial, 50 boundary)",
        "metric": "mse",
        "value": 0.00186,
        "note": "one seed; as quoted in this project's issue 18 from the notebook",
    }],
    "allen_cahn": [{
        "source": "Wang, Sankaran, Wang & Perdikaris, 'An expert's guide to training physics-informed neural "
                  "networks', arXiv:2308.08468 (2023), jaxpi (PredictiveIntelligenceLab/jaxpi)",
        "figure": "the Allen-Cahn ablation (grad-norm weights + causal weights)",
        "method": "grad-norm + causal weights, jaxpi's modified MLP 4 x 256 with Fourier features and periodic "
                  "embedding, 200 000 Adam steps",
        "metric": "rel_l2",
        "value": 5.84e-4,
        "note": "as quoted in this project's issue 17 from the paper's ablation (1.59e-3 without causal, 7.51e-3 "
                "without grad-norm weights); not re-read here; a network and budget far beyond our CPU runs",
    }],
    "kovasznay": [{
        "source": "Jin, Cai, Li & Karniadakis, J. Comput. Phys. 426 (2021) 109951, arXiv:2006.04178 (NSFnets)",
        "figure": "Kovasznay flow, VP-NSFnet",
        "method": "PINN, Re = 40 on [-0.5, 1] x [-0.5, 1.5], velocity on the boundary "
                  "(network and budget not confirmed)",
        "metric": "rel_l2",
        "value": None,
        "note": "not confirmed: the paper's text was not at hand; DeepXDE's "
                "examples/pinn_forward/Kovasznay_flow.py (Re = 20, [2] + 4 x [50] + [3] tanh, 2601 domain and "
                "400 boundary points, Adam 1e-3 30 000 steps then L-BFGS) prints its errors without storing them",
    }],
}


def published_for(problem: str) -> list[dict[str, Any]]:
    """The published entries for a registered problem name (empty for others)."""
    return [dict(entry) for entry in PUBLISHED.get(problem, [])]
