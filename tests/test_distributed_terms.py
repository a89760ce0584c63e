"""Distributed ranks that disagree on the terms (issue 14, item 3), two gloo processes.

Same names in another order: reduced in rank 0's order, identical to one process. Different
names: a clear RuntimeError on every rank (no hang, no abort), and the group still works. An
optional term that one rank holds and the other lacks: present on both, its value the mean
over the ranks that hold it, identical weights and parameters on both ranks.
"""
import datetime
import os

import pytest
import torch
import torch.multiprocessing as mp

from lossbalance import LossBalancer, LRAnnealing

from _models import PINN1D
from _gloo import gloo_group

STEPS = 6
# one rank's terms fail its own checks at step 2: it raised alone and the other waited in the
# agreement collective (a hang, or a gloo abort once the first rank exited)
REFUSED = {
    "missing": lambda losses: {k: v for k, v in losses.items() if k != "neumann"},
    "extra": lambda losses: {**losses, "ic": losses["pde"] * 2},
    "detached": lambda losses: {**losses, "neumann": losses["neumann"].detach()},
    "not a scalar": lambda losses: {**losses, "neumann": losses["neumann"].expand(3)},
    # on the first step (a term's path is checked at its first appearance): a graph that reaches no parameter
    "no path": lambda losses: {**losses, "neumann": torch.ones((), requires_grad=True) * 2.0},
}


def _losses(problem, rank, case, step=0):
    losses = problem.losses()
    if case in REFUSED and rank == 1 and step == (0 if case == "no path" else 2):
        return REFUSED[case](losses)
    if case == "reordered" and rank == 1:
        return dict(reversed(list(losses.items())))  # e.g. a dict built from a set
    if case == "renamed" and rank == 1:
        return {("robin" if k == "neumann" else k): v for k, v in losses.items()}
    if case.startswith("optional") and rank == 1:
        del losses["neumann"]
    return losses


def _balancer(problem, case, rank=0):
    strategy = "static" if case == "optional-plain" else LRAnnealing("pdee" if case == "reference typo" and rank == 1 else "pde")
    options = dict(terms=["pde", "dirichlet"], optional=["neumann"]) if case.startswith("optional") else {}
    return LossBalancer(torch.optim.Adam(problem.model.parameters(), lr=1e-2), strategy, **options)


def run(case, rank=None, world=1):
    problem = PINN1D(seed=0, n=64)
    if rank is not None:
        problem.x = problem.x[rank::world]
    balancer = _balancer(problem, case, 0 if rank is None else rank)
    local = []
    for step in range(STEPS):
        losses = _losses(problem, 0 if rank is None else rank, case, step)
        local.append({k: v.detach().reshape(-1)[0].item() for k, v in losses.items()})
        balancer.step(losses)
    return {
        "params": [p.detach().clone() for p in problem.model.parameters()], "weights": balancer.weights,
        "stats": balancer.stats, "local": local[-1], "names": list(balancer.weights),
    }


def worker(rank, world, init_file, out_dir):
    torch.set_num_threads(1)
    with gloo_group(rank, world, init_file, timeout=datetime.timedelta(seconds=60)):
        results = {}
        for case in ["reordered", "renamed", *REFUSED, "reference typo", "optional-update", "optional-plain"]:
            try:
                results[case] = run(case, rank, world)
            except (RuntimeError, KeyError, ValueError, TypeError) as error:
                results[case] = {"error": str(error), "type": type(error).__name__}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("terms")
    mp.spawn(worker, args=(2, str(out / "init"), str(out)), nprocs=2, join=True)
    return [torch.load(out / f"rank{r}.pt") for r in range(2)]


def _identical(a, b):
    assert a["weights"] == b["weights"]
    for x, y in zip(a["params"], b["params"]):
        assert torch.equal(x, y)


def test_the_same_names_in_another_order_are_reduced_in_one_order(ranks):
    a, b = (r["reordered"] for r in ranks)
    _identical(a, b)
    assert a["names"] == b["names"] == ["pde", "dirichlet", "neumann"]  # rank 0's order
    single = run("reordered")
    for x, y in zip(single["params"], a["params"]):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


def test_different_names_raise_a_clear_error_on_every_rank(ranks):
    for rank, result in enumerate(ranks):
        assert "disagree on the loss terms" in result["renamed"]["error"]
    assert "'neumann'" in ranks[0]["renamed"]["error"] and "'robin'" in ranks[1]["renamed"]["error"]


@pytest.mark.parametrize("case", list(REFUSED))
def test_terms_one_rank_refuses_raise_on_every_rank(case, ranks):
    refused, other = ranks[1][case], ranks[0][case]
    assert refused["type"] in ("KeyError", "ValueError")
    assert "neumann" in refused["error"] or "'ic'" in refused["error"]
    assert other["type"] == "RuntimeError" and "other process(es) refused their loss terms" in other["error"]


@pytest.mark.parametrize("case", ["optional-update", "optional-plain"])
def test_an_optional_term_on_one_rank_only_is_averaged_over_the_ranks_holding_it(case, ranks):
    a, b = (r[case] for r in ranks)  # and the cases after the error above still ran: no hang
    _identical(a, b)
    assert a["names"] == b["names"] == ["pde", "dirichlet", "neumann"]
    # rank 1 lacks neumann: its value on both ranks is rank 0's own (the mean over one rank)
    assert a["stats"]["neumann"]["loss"] == pytest.approx(a["local"]["neumann"], rel=1e-6)
    assert b["stats"]["neumann"]["loss"] == a["stats"]["neumann"]["loss"]
    for name in ("pde", "dirichlet"):  # the other terms: the mean over both ranks
        mean = (a["local"][name] + b["local"][name]) / 2
        assert a["stats"][name]["loss"] == pytest.approx(mean, rel=1e-5)


def test_a_strategy_refusing_the_terms_on_one_rank_raises_on_every_rank(ranks):
    """LRAnnealing(reference="pdee") on one rank: its check of the terms ran after the ranks'
    agreement, so that rank raised alone and the other waited in the gradient all-reduce (a hang)."""
    refused, other = ranks[1]["reference typo"], ranks[0]["reference typo"]
    assert refused["type"] == "KeyError" and "'pdee'" in refused["error"]
    assert other["type"] == "RuntimeError" and "other process(es) refused their loss terms" in other["error"]
