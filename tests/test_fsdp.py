"""FSDP2 (fully_shard): two gloo processes, each holding half the points and half of every
parameter, equal one process with the unsharded model on all the points."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from lossbalance import LossBalancer, LRAnnealing
from _gloo import gloo_group

fsdp = pytest.importorskip("torch.distributed.fsdp")
if not hasattr(fsdp, "fully_shard"):
    pytest.skip("this torch has no FSDP2 (torch.distributed.fsdp.fully_shard)", allow_module_level=True)

STEPS = 8
CASES = {  # name: (balancer options, fully_shard's reshard_after_forward; "last dim": sharded on the last dim)
    "lra": ({"update_every": 1}, True),
    "lra_last_dim": ({"update_every": 2}, "last dim"),
    "lra_every_3_no_reshard": ({"update_every": 3}, False),
    "static": ({"strategy": "static", "weights": {"fit": 1.0, "small": 4.0}}, True),
    "relobralo": ({"strategy": "relobralo"}, True),
}
REFUSED = {  # options an FSDP2 model cannot be balanced with: the words of the error
    "lean": ({"memory": "lean"}, "memory='lean'"),
    "pcgrad": ({"combine": "pcgrad"}, "combine='pcgrad'"),
    "diagnose": ({"diagnose_every": 5}, "diagnose_every="),
    "deferred checks": ({"check_every": 10}, "check_every > 1"),
    "ntk": ({"strategy": "ntk"}, "strategy 'ntk' (NTK traces)"),
}
REFUSED_AT_THE_STEP = {  # what only the first step can tell (on both ranks): the words of the error
    "loss()": "balancer.loss() cannot be used",
    "mixed": "is not sharded, next to FSDP2-sharded ones",
    "unbalanced": "reaches 2 parameter(s) that the balancer does not balance",
    "unreducible": "FSDP2 reduced the gradient of a parameter of shape (1, 16) before the backward of loss term 'joint'",
    "nan on rank 0, lra": "non-finite loss value (averaged over processes) for term(s) 'fit' = nan",
    "nan on rank 0, static": "non-finite loss value (averaged over processes) for term(s) 'fit' = nan",
}


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 1))


def data():
    x = torch.rand(32, 2, generator=torch.Generator().manual_seed(1))
    return x, torch.sin(3 * x[:, :1]) + x[:, 1:]


def losses(model, x, y):
    u = model(x)
    return {"fit": (u - y).pow(2).mean(), "small": 0.1 * u.pow(2).mean()}  # means over the points: mean of the halves = whole


def balancer_for(model, case):
    options = dict(CASES[case][0] if case in CASES else REFUSED[case][0])
    strategy = options.pop("strategy", None) or LRAnnealing("fit")
    return LossBalancer(torch.optim.Adam(model.parameters(), lr=1e-2), strategy, **options)


def train(case, model, x, y):
    balancer = balancer_for(model, case)
    for _ in range(STEPS):
        balancer.step(losses(model, x, y))
    return balancer


def shard(model, reshard):
    from torch.distributed.tensor import Shard

    placement = {"shard_placement_fn": lambda p: Shard(p.dim() - 1)} if reshard == "last dim" else {}
    for layer in model:
        if isinstance(layer, nn.Linear):
            fsdp.fully_shard(layer, reshard_after_forward=bool(reshard), **placement)
    return fsdp.fully_shard(model)


def optional_run(model, rank, x, y):
    """Rank 1 never holds "small" (declared optional): its gradient is averaged over both ranks."""
    balancer = LossBalancer(torch.optim.Adam(model.parameters(), lr=1e-2), LRAnnealing("fit"),
                            terms=["fit"], optional=["small"])
    for _ in range(STEPS):
        terms = losses(model, x, y)
        if rank == 1:
            del terms["small"]
        balancer.step(terms)
    return {"weights": balancer.weights, "params": [getattr(p, "full_tensor", p.detach)() for p in model.parameters()]}


def unreducible_terms(model, x):
    """A term built from an input derivative and a second forward pass: FSDP2's post-backward hook
    reduces the last layer's gradient before this term's backward has reached it all."""
    x = x.clone().requires_grad_(True)
    u = model(x)
    (du,) = torch.autograd.grad(u.sum(), x, create_graph=True)
    return {"joint": du.pow(2).mean() + model(x.detach() + 1).pow(2).mean(), "fit": u.pow(2).mean()}


def refused_at_the_step(case, x, y):
    """The error of the first step, and whether the sharded parameters and their .grad are untouched."""
    model = shard(mlp(), reshard=case != "unreducible")
    params = list(model.parameters())
    before = [p.detach().full_tensor() for p in params]
    terms = unreducible_terms(model, x) if case == "unreducible" else losses(model, x, y)
    if case == "unreducible":
        model.set_reshard_after_backward(False)  # (else the derivative's backward frees the weights)
    if case.startswith("nan") and dist.get_rank() == 0:
        terms["fit"] = terms["fit"] * float("nan")
    extra = {"mixed": [nn.Parameter(torch.zeros(3))], "unbalanced": []}.get(case, params[-2:])
    strategy = "static" if "static" in case else LRAnnealing("fit")
    try:  # unbalanced: the last layer is trained by nobody; mixed: a plain parameter next to the shards
        balancer = LossBalancer(torch.optim.Adam(params[:-2] + extra, lr=1e-2), strategy)
        balancer.loss(terms) if case == "loss()" else balancer.step(terms)
    except ValueError as error:
        untouched = all(p.grad is None and torch.equal(p.detach().full_tensor(), b) for p, b in zip(params, before))
        return {"error": str(error), "untouched": untouched}
    return {"error": "none"}


def worker(rank, world, init_file, out_dir):
    torch.set_num_threads(1)
    with gloo_group(rank, world, init_file):
        x, y = data()
        results = {}
        for case, (_, reshard) in CASES.items():
            model = shard(mlp(), reshard)
            balancer = train(case, model, x[rank::world], y[rank::world])
            results[case] = {"weights": balancer.weights, "params": [p.full_tensor() for p in model.parameters()],
                             "grads": [None if p.grad is None else type(p.grad).__name__ for p in model.parameters()],
                             "placements": {str(p.placements) for p in model.parameters()}}
        half = x[rank::world], y[rank::world]
        results["optional"] = [optional_run(shard(mlp(), True), rank, *half), optional_run(mlp(), rank, *half)]
        for case in REFUSED:
            try:
                balancer_for(shard(mlp(), True), case)
            except ValueError as error:
                results[case] = str(error)
        for case in REFUSED_AT_THE_STEP:
            results[case] = refused_at_the_step(case, *half)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    mp.spawn(worker, args=(2, str(out / "init"), str(out)), nprocs=2, join=True)
    return [torch.load(out / f"rank{r}.pt") for r in range(2)]


@pytest.mark.parametrize("case", list(CASES))
def test_two_sharded_ranks_match_one_unsharded_process(case, two_ranks):
    ranks = [r[case] for r in two_ranks]
    assert ranks[0]["weights"] == ranks[1]["weights"]  # identical, not just close
    for a, b in zip(ranks[0]["params"], ranks[1]["params"]):
        assert torch.equal(a, b)
    assert set(ranks[0]["grads"]) == {"DTensor"}  # the step's gradient is written sharded
    assert ranks[0]["placements"] == ({"(Shard(dim=1),)", "(Shard(dim=0),)"} if case == "lra_last_dim" else {"(Shard(dim=0),)"})
    model = mlp()
    balancer = train(case, model, *data())
    for a, b in zip(model.parameters(), ranks[0]["params"]):
        torch.testing.assert_close(a.detach(), b, rtol=1e-5, atol=1e-6)
    assert balancer.weights == pytest.approx(ranks[0]["weights"], rel=1e-5)
    if case != "static":
        assert ranks[0]["weights"] != balancer_for(mlp(), case).weights  # the weights did adapt


@pytest.mark.parametrize("case", list(REFUSED))
def test_what_needs_the_full_gradients_is_refused_with_the_fix(case, two_ranks):
    for rank in two_ranks:
        assert REFUSED[case][1] in rank[case] and "FSDP2" in rank[case] and "DistributedDataParallel" in rank[case]


def test_an_optional_term_one_rank_lacks_matches_the_unsharded_distributed_path(two_ranks):
    (sharded, plain), (sharded_1, _) = (r["optional"] for r in two_ranks)
    assert sharded["weights"] == sharded_1["weights"]
    assert sharded["weights"] == pytest.approx(plain["weights"], rel=1e-5)
    for a, b in zip(sharded["params"], plain["params"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", list(REFUSED_AT_THE_STEP))
def test_what_the_sharded_engine_cannot_do_is_refused_on_every_rank(case, two_ranks):
    for rank in two_ranks:
        assert REFUSED_AT_THE_STEP[case] in rank[case]["error"]
        assert rank[case]["untouched"]  # raised before anything changed: parameters and .grad
