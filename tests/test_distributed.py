"""Distributed data parallel: two gloo processes on this machine equal one process on all points."""
import os

import pytest
import torch
import torch.multiprocessing as mp

from lossbalance import LossBalancer, LRAnnealing

from _models import PINN1D
from _gloo import gloo_group

STEPS = 12
CASES = {  # name: (balancer options, wrap the model in DistributedDataParallel)
    "lra": (dict(strategy="lra", update_every=1), False),
    "lra_every_10_ddp": (dict(strategy="lra", update_every=10), True),
    "relobralo": (dict(strategy="relobralo", update_every=1), False),
    "lean": (dict(strategy="lra", update_every=3, memory="lean"), False),
    "pcgrad": (dict(strategy="lra", update_every=1, combine="pcgrad"), False),
}


def train(case, problem, rank=None, world=1):
    options = dict(CASES[case][0])
    strategy = LRAnnealing("pde") if options.pop("strategy") == "lra" else "relobralo"
    if rank is not None:
        problem.x = problem.x[rank::world]  # this rank's half of the collocation points
    balancer = LossBalancer(torch.optim.Adam(problem.model.parameters(), lr=1e-2), strategy, **options)
    for _ in range(STEPS):
        balancer.step(problem.losses())
    return [p.detach() for p in problem.model.parameters()], balancer


def worker(rank, world, init_file, out_dir):
    torch.set_num_threads(1)
    with gloo_group(rank, world, init_file):
        results = {}
        for case, (_, wrap_ddp) in CASES.items():
            problem = PINN1D(seed=0, n=64)
            if wrap_ddp:
                problem.model = torch.nn.parallel.DistributedDataParallel(problem.model)
            params, balancer = train(case, problem, rank, world)
            results[case] = {"params": params, "weights": balancer.weights}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(worker, args=(2, str(out / "init"), str(out)), nprocs=2, join=True)
    return [torch.load(out / f"rank{r}.pt") for r in range(2)]


@pytest.mark.parametrize("case", list(CASES))
def test_two_ranks_match_one_process_on_the_union(case, two_ranks):
    ranks = [r[case] for r in two_ranks]
    assert ranks[0]["weights"] == ranks[1]["weights"]  # identical, not just close
    for a, b in zip(ranks[0]["params"], ranks[1]["params"]):
        assert torch.equal(a, b)
    params, balancer = train(case, PINN1D(seed=0, n=64))
    for a, b in zip(params, ranks[0]["params"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert balancer.weights == pytest.approx(ranks[0]["weights"], rel=1e-5)


def test_distributed_true_without_a_process_group_is_refused():
    with pytest.raises(ValueError, match="initialised torch.distributed"):
        LossBalancer(torch.optim.SGD(PINN1D().model.parameters(), lr=0.1), "lra", distributed=True)
