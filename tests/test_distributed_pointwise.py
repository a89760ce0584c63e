"""Per-point tables of RBA, SA-PINN and BRDR under DDP (issue 17), two gloo processes.

On an update the ranks gather the ids and detached per-point values of the batch, update the
table on the union (one occurrence per id) exactly as one process would on the union batch,
identically on every rank. Two ranks on different points: identical tables on both ranks, equal
to one process stepping on the union of the points. The same points on both ranks: exactly the
one-process result. The state_dict is the same on both ranks.
"""
import datetime
import os

import pytest
import torch
import torch.multiprocessing as mp

from lossbalance import BRDR, RBA, SAPINN, LossBalancer, Residual
from _gloo import gloo_group

STEPS, POOL, PER_RANK = 4, 24, 6
CASES = ("rba", "sapinn", "brdr")


def _weighting(case):
    return {"rba": RBA(gamma=0.9, eta=0.1), "sapinn": SAPINN(lr=0.05), "brdr": BRDR(beta_c=0.9, beta_w=0.9)}[case]


def _batches():
    """Per step, the ids of both ranks' points: a fresh draw from the pool, so that new ids
    appear and points come back after gaps."""
    generator = torch.Generator().manual_seed(1)
    return [torch.randperm(POOL, generator=generator)[: 2 * PER_RANK] for _ in range(STEPS)]


def _losses(model, x, ids, case):
    out = model(x[:, None]).squeeze(-1)
    r_pde, r_data = out - torch.sin(3 * x), out - x
    if case == "rba":
        return {"pde": Residual(r_pde, ids=ids, kind="residual"), "data": Residual(r_data, ids=ids, kind="residual")}
    return {"pde": Residual(r_pde**2, ids=ids), "data": Residual(r_data**2, ids=ids)}


def run(case, pick):
    """Steps on the points ``pick(batch ids)``; the tables after every step and the last state."""
    torch.manual_seed(0)
    model = torch.nn.Linear(1, 1, dtype=torch.float64)
    x_pool = torch.linspace(-1, 1, POOL, dtype=torch.float64)
    balancer = LossBalancer(torch.optim.SGD(model.parameters(), lr=0.05), "static",
                            pointwise={"pde": _weighting(case), "data": _weighting(case)})
    tables = []
    for batch in _batches():
        ids = pick(batch)
        balancer.step(_losses(model, x_pool[ids], ids, case))
        tables.append({name: {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in s.items()}
                       for name, s in balancer.state_dict()["pointwise"].items()})
    return {"tables": tables, "state": balancer.state_dict(), "params": [p.detach().clone() for p in model.parameters()]}


def _gather_check(rank):
    """gather_points with uneven sizes and an id on both ranks (kept once, rank 0's value)."""
    from lossbalance.distributed import ProcessGroupMean
    ids = torch.tensor([5, 1, 9]) if rank == 0 else torch.tensor([7, 9, 3, 2, 8])
    values = ids.double() + 100 * rank
    return ProcessGroupMean().gather_points(ids, values)


def _missing_on_one_rank(rank):
    """Rank 1 leaves the weighted term "data" out of its dict: both ranks raise (no hang), and
    nothing changed (the step counter)."""
    model = torch.nn.Linear(1, 1, dtype=torch.float64)
    balancer = LossBalancer(torch.optim.SGD(model.parameters(), lr=0.05), "static",
                            terms=["pde", "data"], optional=["data"], pointwise={"data": RBA()})
    x, ids = torch.linspace(-1, 1, 4, dtype=torch.float64), torch.arange(4)
    losses = _losses(model, x, ids, "rba")
    if rank == 1:
        del losses["data"]
    try:
        balancer.step({"pde": losses["pde"].values.square().mean(), **({"data": losses["data"]} if "data" in losses else {})})
    except ValueError as error:
        return str(error), balancer.step_count
    return None, balancer.step_count


def _refused_on_one_rank(rank, weighting):
    """Rank 1's pointwise term fails its own check (duplicate ids; Causal: fewer points than
    chunks, as on an uneven last batch) on the second step: every rank raises, and the ranks
    stay in step (a third step on both succeeds). Before, rank 1 raised alone and rank 0 waited,
    or averaged its step with rank 1's next one."""
    from lossbalance import Causal

    model = torch.nn.Linear(1, 1, dtype=torch.float64)
    make = {"rba": lambda: RBA(), "causal": lambda: Causal(chunks=4)}[weighting]
    balancer = LossBalancer(torch.optim.SGD(model.parameters(), lr=0.05), "static", pointwise={"pde": make()})
    x, ids = torch.linspace(-1, 1, 8, dtype=torch.float64), torch.arange(8)

    def losses(bad):
        r = model(x[:, None]).squeeze(-1) - torch.sin(3 * x)
        if bad and weighting == "rba":
            return {"pde": Residual(r, ids=torch.zeros(8, dtype=torch.long), kind="residual"), "bc": r[0] ** 2}
        if bad:
            return {"pde": Residual(r[:2] ** 2, t=x[:2]), "bc": r[0] ** 2}
        extra = {"ids": ids} if weighting == "rba" else {"t": x}
        return {"pde": Residual(r if weighting == "rba" else r**2, kind="residual" if weighting == "rba" else "loss",
                                **extra), "bc": r[0] ** 2}

    balancer.step(losses(False))
    try:
        balancer.step(losses(rank == 1))
        error = None
    except (ValueError, RuntimeError) as raised:
        error = (type(raised).__name__, str(raised))
    balancer.step(losses(False))
    return error, balancer.step_count


def worker(rank, world, init_file, out_dir):
    torch.set_num_threads(1)
    with gloo_group(rank, world, init_file, timeout=datetime.timedelta(seconds=60)):
        results = {"gather": _gather_check(rank), "missing": _missing_on_one_rank(rank),
                   "refused rba": _refused_on_one_rank(rank, "rba"), "refused causal": _refused_on_one_rank(rank, "causal")}
        for case in CASES:
            results[case, "different"] = run(case, lambda b: b[rank * PER_RANK:(rank + 1) * PER_RANK])
            results[case, "same"] = run(case, lambda b: b[:PER_RANK])
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("pointwise")
    context = mp.start_processes(worker, args=(2, str(out / "init"), str(out)), nprocs=2, join=False, start_method="spawn")
    for _ in range(240):  # a hang fails the test instead of blocking the suite
        if context.join(timeout=1):
            break
    else:
        for process in context.processes:
            process.kill()
        pytest.fail("the distributed pointwise workers did not finish in 240 s")
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


def _equal(a, b, exact=True):
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _equal(a[k], b[k], exact)
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _equal(x, y, exact)
    elif isinstance(a, torch.Tensor):
        if exact or not a.is_floating_point():
            assert a.dtype == b.dtype and torch.equal(a, b)
        else:
            torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    else:
        assert a == b


def test_gather_points_pads_trims_and_keeps_one_occurrence_per_id(ranks):
    for rank, (ids, values, own) in enumerate(r["gather"] for r in ranks):
        assert ids.tolist() == [5, 1, 9, 7, 3, 2, 8]  # rank order, the duplicate 9 kept at rank 0
        assert values.tolist() == [5.0, 1.0, 9.0, 107.0, 103.0, 102.0, 108.0]
        mine = [5, 1, 9] if rank == 0 else [7, 9, 3, 2, 8]
        assert ids[own].tolist() == mine


@pytest.mark.parametrize("case", CASES)
def test_ranks_on_different_points_hold_one_table_equal_to_one_process_on_the_union(case, ranks):
    a, b = (r[case, "different"] for r in ranks)
    _equal(a["tables"], b["tables"])  # identical on both ranks, every step
    single = run(case, lambda batch: batch)  # one process on both ranks' points (rank 0's first)
    _equal(single["tables"], a["tables"], exact=False)
    assert a["tables"][-1]["pde"]["ids"].numel() > 2 * PER_RANK  # the union of several draws


@pytest.mark.parametrize("case", CASES)
def test_ranks_on_the_same_points_give_exactly_the_one_process_result(case, ranks):
    single = run(case, lambda batch: batch[:PER_RANK])
    for rank in ranks:
        _equal(rank[case, "same"]["tables"], single["tables"])
        _equal(rank[case, "same"]["params"], single["params"])


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("points", ["different", "same"])
def test_the_state_dict_is_the_same_on_both_ranks(case, points, ranks):
    a, b = (r[case, points]["state"] for r in ranks)
    _equal(a["pointwise"], b["pointwise"])
    _equal(a["weights"], b["weights"])


@pytest.mark.parametrize("weighting", ["rba", "causal"])
def test_a_pointwise_term_one_rank_refuses_raises_on_every_rank(weighting, ranks):
    (other, steps0), (refused, steps1) = (r[f"refused {weighting}"] for r in ranks)
    assert refused[0] == "ValueError" and "'pde'" in refused[1]
    assert other[0] == "RuntimeError" and "other process(es) refused their loss terms" in other[1]
    assert steps0 == steps1 == 2  # the refused step changed nothing, the next one ran on both


def test_a_weighted_term_missing_on_one_rank_raises_on_every_rank(ranks):
    for message, steps in (r["missing"] for r in ranks):
        assert message is not None and "'data'" in message and "every process" in message
        assert steps == 0
