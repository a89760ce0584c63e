"""Bad input: a clear error naming the term and the fix, raised before anything changes.

The misuse matrix. Every case checks the exception type, a message that names the offending term
(where there is one) and says what to do, and that the parameters, their ``.grad``, the optimizer
state, the weights, the step counter and the rest of ``balancer.state_dict()`` (strategy state,
random generator) are exactly as they were before the bad call. Loss-dict cases run through
``step(losses)``, ``backward(losses)`` and ``step(closure=...)``, on a balancer whose step computes
per-term gradients (``lra``) and on one whose step is one plain backward (``static``).

Cases that the library does not meet yet are marked ``xfail(strict=True)`` with the reason; they
turn into failures (XPASS) once the library is fixed, so the marker is removed then.
"""
import copy

import pytest
import torch

from lossbalance import LossBalancer, LRAnnealing

from _models import InfiniteGradient, PINN1D, mlp


class _Tagged(torch.Tensor):
    """A tensor subclass, as PINA's LabelTensor."""


def fresh(strategy="lra", **options):
    problem = PINN1D(seed=1)
    chosen = LRAnnealing("pde") if strategy == "lra" else strategy
    balancer = LossBalancer(torch.optim.Adam(problem.model.parameters(), lr=1e-2), chosen, **options)
    balancer.step(problem.losses())  # optimizer state, weights and .grad all exist now
    return problem, balancer


def snapshot(problem, balancer):
    return (
        [p.detach().clone() for p in problem.model.parameters()],
        [p.grad.clone() for p in problem.model.parameters()],
        copy.deepcopy(balancer.optimizer.state_dict()),
        balancer.weights,
        balancer.step_count,
        copy.deepcopy(balancer.state_dict()),
    )


def assert_same(a, b):
    """Nested dicts/lists/tuples of tensors and plain values are exactly equal."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys()
        for key in a:
            assert_same(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    else:
        assert a == b


def assert_unchanged(before, after):
    (p0, g0, o0, w0, s0, b0), (p1, g1, o1, w1, s1, b1) = before, after
    for a, b in zip(p0 + g0, p1 + g1):
        assert torch.equal(a, b)
    assert w0 == w1 and s0 == s1
    for key, state in o0["state"].items():
        for name, value in state.items():
            if isinstance(value, (torch.Tensor, float, int)):
                assert torch.equal(torch.as_tensor(value), torch.as_tensor(o1["state"][key][name]))
    assert_same(o0, o1)  # every entry, L-BFGS's history lists included
    assert_same(b0, b1)  # weights, bounds, step/update/skip counters, strategy state, generator


def with_term(**extra):
    def make(problem):
        losses = problem.losses()
        losses.update(extra)
        return losses
    return make


def replace(term, value):
    def make(problem):
        losses = problem.losses()
        losses[term] = value(losses[term]) if callable(value) else value
        return losses
    return make


def drop(term):
    def make(problem):
        losses = problem.losses()
        del losses[term]
        return losses
    return make


def rename(old, new):
    def make(problem):
        losses = problem.losses()
        losses[new] = losses.pop(old)
        return losses
    return make


def no_grad_term(problem):
    with torch.no_grad():
        return problem.model(problem.x).pow(2).mean()


def inference_term(problem):
    with torch.inference_mode():
        return problem.model(problem.x).pow(2).mean()


def collocation_only(problem):
    x = problem.x.clone().requires_grad_(True)  # inputs that require grad, no parameter involved
    return torch.sin(x).pow(2).mean()


def other_model(problem):
    return mlp(seed=7)(problem.x).pow(2).mean()  # parameters the optimizer does not hold


def replace_with(term, build):
    def make(problem):
        losses = problem.losses()
        losses[term] = build(problem)
        return losses
    return make


NAN, INF = float("nan"), float("inf")

CASES = {
    # --- the container
    "empty dict": (lambda p: {}, ValueError, "empty"),
    "not a dict": (lambda p: [p.losses()["pde"]], TypeError, "dict of named loss terms"),
    "the summed total instead of the dict": (
        lambda p: sum(p.losses().values()), TypeError, r"dict of named loss terms, e\.g\. \{'pde'.*got Tensor",
    ),
    "non-string key": (lambda p: {**p.losses(), 3: p.losses()["pde"]}, TypeError, "key 3"),
    # --- what a term is
    "an empty name": (lambda problem: {**problem.losses(), "": problem.losses()["pde"]}, ValueError,
                      "a loss term is named '' .*give every term a name"),
    "python float": (replace("dirichlet", 0.5), TypeError, "'dirichlet' is a float"),
    "python int": (replace("dirichlet", 3), TypeError, "'dirichlet' is an int.*scalar torch.Tensor computed from the model"),
    "None": (replace("pde", None), TypeError, "'pde' is a NoneType.*torch.Tensor"),
    "numpy-like list": (replace("dirichlet", [0.5]), TypeError, "'dirichlet' is a list"),
    "non-scalar": (replace("neumann", lambda v: v.expand(4)), ValueError, r"'neumann' has shape \(4,\).*mean"),
    "empty tensor": (replace("neumann", lambda v: v.reshape(1)[:0]), ValueError, r"'neumann' has shape \(0,\).*\.mean\(\)"),
    "integer tensor": (replace("neumann", torch.tensor(3)), TypeError, "'neumann' has dtype torch.int64"),
    "bool tensor": (replace("pde", lambda v: v > 0), TypeError, "'pde' has dtype torch.bool; expected a floating-point"),
    "complex tensor": (
        replace("pde", lambda v: v.to(torch.complex64)), TypeError, "'pde' has dtype torch.complex64; expected a floating",
    ),
    # --- the graph
    "no grad": (replace("pde", lambda v: v.detach()), ValueError, "'pde' does not require grad"),
    "computed under torch.no_grad()": (
        replace_with("neumann", no_grad_term), ValueError, r"'neumann' does not require grad: .*torch\.no_grad\(\)",
    ),
    "computed under torch.inference_mode()": (
        replace_with("neumann", inference_term), ValueError, "'neumann' does not require grad",
    ),
    "no path to the parameters": (
        replace("dirichlet", lambda v: torch.ones((), requires_grad=True) * 2), ValueError,
        "'dirichlet' has no path to any balanced parameter",
    ),
    "a leaf tensor (a cached value made requires_grad)": (  # caught on every step, plain ones too
        replace("dirichlet", lambda v: v.detach().clone().requires_grad_()), ValueError,
        "'dirichlet' has no path to any balanced parameter",
    ),
    "a leaf tensor next to a tensor-subclass term (PINA's LabelTensor)": (
        lambda problem: {**(lambda d: {**d, "pde": d["pde"].as_subclass(_Tagged)})(problem.losses()),
                         "dirichlet": torch.tensor(0.5, requires_grad=True)},
        ValueError, "'dirichlet' has no path to any balanced parameter",
    ),
    "depends only on collocation points": (
        replace_with("pde", collocation_only), ValueError, "'pde' has no path to any balanced parameter.*only on inputs",
    ),
    "depends on parameters the optimizer does not hold": (
        replace_with("neumann", other_model), ValueError, "'neumann' has no path to any balanced parameter",
    ),
    # --- device and dtype
    "another device (meta)": (
        replace("pde", lambda v: torch.ones((), device="meta", requires_grad=True) * 2), ValueError,
        "'pde' is on meta, the balanced parameters on cpu: compute every term on the parameters' device",
    ),
    "other dtype": (replace("pde", lambda v: v.double()), None, None),
    "float16 term": (replace("neumann", lambda v: v.half()), None, None),
    "bfloat16 term": (replace("neumann", lambda v: v.to(torch.bfloat16)), None, None),
    # --- values
    "nan": (replace("neumann", lambda v: v * NAN), ValueError, "non-finite loss value for term.*'neumann'"),
    "inf": (replace("pde", lambda v: v * INF), ValueError, "'pde' = inf"),
    "-inf": (replace("dirichlet", lambda v: v * -INF), ValueError, "non-finite loss value for term.*'dirichlet' = -inf"),
    "nan in two terms": (
        lambda p: {k: v * NAN if k != "pde" else v for k, v in p.losses().items()}, ValueError,
        "'dirichlet' = nan, 'neumann' = nan",
    ),
    "finite loss, infinite gradient": (  # on a plain-backward step: names the terms of the weighted sum
        replace("neumann", InfiniteGradient.apply), ValueError, "non-finite gradient .*term.*'neumann'",
    ),
    # --- the key set
    "unknown term": (with_term(extra=torch.ones((), requires_grad=True)), KeyError, "unknown term.*'extra'.*optional"),
    "missing term": (drop("neumann"), KeyError, "missing term.*'neumann'.*remove_term"),
    "renamed term": (
        rename("neumann", "robin"), KeyError, r"unknown term\(s\) \['robin'\].*missing term\(s\) \['neumann'\].*add_term",
    ),
}

# On a plain-backward step the path check runs only on a term's first appearance (README:
# "checked on each term's first appearance and on every gradient step"): a term that later loses
# its path to the parameters is silently ignored there.
PATH_CHECKED_ONCE = {
    "no path to the parameters", "depends only on collocation points", "depends on parameters the optimizer does not hold",
}
PATH_CHECKED_ONCE_REASON = (
    "documented default (check_paths='first'): on plain-backward steps a term is checked for a path to "
    "the parameters only on its first appearance; check_paths='always' closes this (tested below)"
)


@pytest.mark.parametrize("path", ["step", "backward", "closure"])
@pytest.mark.parametrize("case", list(CASES))
def test_bad_losses_change_nothing(case, path):
    make, error, message = CASES[case]
    problem, balancer = fresh()
    losses = make(problem)
    before = snapshot(problem, balancer)
    call = {
        "step": lambda: balancer.step(losses),
        "backward": lambda: balancer.backward(losses),
        "closure": lambda: balancer.step(closure=lambda: losses),
    }[path]
    if error is None:  # accepted: a float64/float16/bfloat16 term on float32 parameters is fine
        total = call()
        assert torch.isfinite(total) and balancer.step_count == 2
        return
    if path == "closure" and not isinstance(losses, dict):
        error, message = TypeError, "the closure must return the dict of loss terms"
    with pytest.raises(error, match=message):
        call()
    assert_unchanged(before, snapshot(problem, balancer))
    if path == "step":  # and again: the failed call left nothing behind that changes the second one
        losses = make(problem)  # rebuilt: a call that got as far as differentiating has freed the graph
        with pytest.raises(error, match=message):
            balancer.backward(losses)
        assert_unchanged(before, snapshot(problem, balancer))


@pytest.mark.parametrize("case", [c for c, (_, error, _) in CASES.items() if error is not None])
def test_bad_losses_on_a_plain_backward_step(case, request):
    """Same matrix, balancer whose steps are one backward of the weighted sum (no per-term gradients)."""
    if case in PATH_CHECKED_ONCE:
        request.applymarker(pytest.mark.xfail(strict=True, reason=PATH_CHECKED_ONCE_REASON))
    make, error, message = CASES[case]
    problem, balancer = fresh("static")
    losses = make(problem)
    before = snapshot(problem, balancer)
    with pytest.raises(error, match=message):
        balancer.step(losses)
    assert_unchanged(before, snapshot(problem, balancer))


@pytest.mark.parametrize("case", sorted(PATH_CHECKED_ONCE))
def test_check_paths_always_closes_the_gap_on_plain_steps(case):
    make, error, message = CASES[case]
    problem, balancer = fresh("static", check_paths="always")
    losses = make(problem)
    before = snapshot(problem, balancer)
    with pytest.raises(error, match=message):
        balancer.step(losses)
    assert_unchanged(before, snapshot(problem, balancer))


@pytest.mark.parametrize("case", ["nan", "finite loss, infinite gradient"])
def test_nonfinite_message_names_the_fix(case):
    make, error, _ = CASES[case]
    problem, balancer = fresh()
    with pytest.raises(error, match="nonfinite='skip'"):
        balancer.step(make(problem))


@pytest.mark.parametrize("strategy", ["lra", "static"])
def test_graph_freed_by_the_users_backward(strategy):
    problem, balancer = fresh(strategy)
    losses = problem.losses()
    losses["neumann"].backward()
    before = snapshot(problem, balancer)
    with pytest.raises(RuntimeError, match="term 'neumann'"):
        balancer.step(losses)
    assert_unchanged(before, snapshot(problem, balancer))


@pytest.mark.parametrize("strategy", ["lra", "static"])
def test_the_same_loss_dict_stepped_twice(strategy):
    """The graph of a dict already stepped is freed (and its parameters moved): build it anew."""
    problem, balancer = fresh(strategy)
    losses = problem.losses()
    balancer.step(losses)
    before = snapshot(problem, balancer)
    with pytest.raises(RuntimeError, match="term '(pde|dirichlet|neumann)'"):
        balancer.step(losses)
    assert_unchanged(before, snapshot(problem, balancer))


@pytest.mark.parametrize("misuse", ["the user's backward()", "the same dict twice"])
def test_graph_errors_say_how_to_fix(misuse):
    problem, balancer = fresh()
    losses = problem.losses()
    if misuse == "the same dict twice":
        balancer.step(losses)
    else:
        losses["neumann"].backward()
    with pytest.raises(RuntimeError, match="(build|compute) the loss(es| terms| dict)? (anew|afresh|again)"):
        balancer.step(losses)


def test_unreachable_term_on_a_non_update_step_is_caught_on_first_appearance():
    problem = PINN1D()
    balancer = LossBalancer(torch.optim.Adam(problem.model.parameters()), "static", optional=["extra"])
    balancer.step(problem.losses())
    x = torch.rand(3, requires_grad=True)
    with pytest.raises(ValueError, match="'extra' has no path"):
        balancer.step({**problem.losses(), "extra": x.pow(2).sum()})


def test_term_outside_its_scope():
    problem = PINN1D()
    first, *rest = problem.model
    balancer = LossBalancer(
        torch.optim.Adam(problem.model.parameters()), "static", scope={"extra": list(rest[-1].parameters())},
        optional=["extra"],
    )
    balancer.step(problem.losses())
    before = [p.detach().clone() for p in problem.model.parameters()]
    extra = first(problem.x).pow(2).mean()  # depends on the first layer only, its scope is the last
    with pytest.raises(ValueError, match="'extra' has no path to any parameter of its scope"):
        balancer.step({**problem.losses(), "extra": extra})
    assert all(torch.equal(a, b) for a, b in zip(before, problem.model.parameters()))


def test_step_needs_exactly_one_of_losses_and_closure():
    problem, balancer = fresh()
    before = snapshot(problem, balancer)
    with pytest.raises(TypeError, match="exactly one"):
        balancer.step()
    with pytest.raises(TypeError, match="exactly one"):
        balancer.step(problem.losses(), closure=problem.losses)
    assert_unchanged(before, snapshot(problem, balancer))


def test_closure_returning_the_wrong_type():
    problem, balancer = fresh()
    before = snapshot(problem, balancer)
    with pytest.raises(TypeError, match="closure must return the dict"):
        balancer.step(closure=lambda: sum(problem.losses().values()))
    assert_unchanged(before, snapshot(problem, balancer))


@pytest.mark.parametrize(
    "returns, message",
    [
        (lambda p: None, "closure must return the dict of loss terms, got NoneType; the balancer does the backward"),
        (lambda p: list(p.losses().values()), "closure must return the dict of loss terms, got list"),
        (lambda p: float(sum(p.losses().values()).detach()), "closure must return the dict of loss terms, got float"),
        (lambda p: (p.losses(),), "closure must return the dict of loss terms, got tuple"),
    ],
    ids=["None", "list", "float", "tuple"],
)
@pytest.mark.parametrize("optimizer", ["Adam", "LBFGS"])
def test_closure_returning_other_wrong_types(returns, message, optimizer):
    problem = PINN1D(seed=1)
    params = problem.model.parameters()
    opt = torch.optim.LBFGS(params, max_iter=3) if optimizer == "LBFGS" else torch.optim.Adam(params, lr=1e-2)
    balancer = LossBalancer(opt, LRAnnealing("pde"))
    balancer.step(closure=problem.losses)
    before = snapshot(problem, balancer)
    with pytest.raises(TypeError, match=message):
        balancer.step(closure=lambda: returns(problem))
    assert_unchanged(before, snapshot(problem, balancer))


def test_not_an_optimizer():
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        LossBalancer(PINN1D().model, "lra")


def test_optimizer_without_trainable_parameters():
    p = torch.nn.Parameter(torch.zeros(2), requires_grad=False)
    with pytest.raises(ValueError, match="no parameter that requires grad"):
        LossBalancer(torch.optim.SGD([p], lr=0.1), "lra")


def test_optimizer_with_an_empty_parameter_group():
    with pytest.raises(ValueError, match="no parameter that requires grad: nothing to balance"):
        LossBalancer(torch.optim.SGD([{"params": []}], lr=0.1), "lra")


def test_every_parameter_frozen_mid_run():
    problem, balancer = fresh()
    for p in problem.model.parameters():
        p.requires_grad_(False)
    losses = {k: v for k, v in problem.losses().items()}  # built on frozen parameters: no grad
    state = copy.deepcopy(balancer.state_dict())
    with pytest.raises(ValueError, match="does not require grad|no parameter that requires grad"):
        balancer.step(losses)
    assert_same(state, balancer.state_dict())


@pytest.mark.parametrize(
    "typo, closest",
    [
        ("lar", "lra"), ("relobrlo", "relobralo"), ("gradnorm_ration", "gradnorm_ratio"), ("grad_norm", "gradnorm"),
        ("softadpt", "softadapt"), ("uncertainity", "uncertainty"), ("statc", "static"), ("dwaa", "dwa"),
        ("SoftAdapt", "softadapt"),
        ("LRA", "lra"),
    ],
)
def test_strategy_name_with_a_typo_suggests_the_closest(typo, closest):
    with pytest.raises(ValueError, match=f"unknown strategy '{typo}'. Did you mean '{closest}'.*Known: dwa, "):
        LossBalancer(torch.optim.SGD(PINN1D().model.parameters(), lr=0.1), typo)


def test_strategy_name_with_a_typo_suggests_the_closest_lra():
    with pytest.raises(ValueError, match="Did you mean 'lra'"):
        LossBalancer(torch.optim.SGD(PINN1D().model.parameters(), lr=0.1), "lar")


def test_combiner_name_with_a_typo_suggests_the_closest():
    with pytest.raises(ValueError, match="unknown combiner 'pcgard'. Did you mean 'pcgrad'"):
        LossBalancer(torch.optim.SGD(PINN1D().model.parameters(), lr=0.1), "lra", combine="pcgard")


@pytest.mark.parametrize("strategy", [LRAnnealing, None, 3], ids=["the class", "None", "int"])
def test_strategy_that_is_neither_a_name_nor_an_object(strategy):
    with pytest.raises(TypeError, match="strategy must be a short name or a Strategy object"):
        LossBalancer(torch.optim.SGD(PINN1D().model.parameters(), lr=0.1), strategy)


def test_reference_term_not_in_the_dict():
    problem, _ = fresh()
    balancer = LossBalancer(torch.optim.Adam(problem.model.parameters()), LRAnnealing("residual"))
    with pytest.raises(KeyError, match="reference term 'residual'"):
        balancer.step(problem.losses())


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(update_every=0), "update_every"),
        (dict(warmup=-1), "warmup"),
        (dict(nonfinite="ignore"), "nonfinite"),
        (dict(memory="small"), "memory"),
        (dict(weights={"pde": 0.0}, terms=["pde"]), "initial weight of term 'pde'"),
        (dict(probe=[torch.nn.Parameter(torch.zeros(1))]), "probe"),
        (dict(update_every=2.0), "update_every must be a positive integer, got 2.0"),
        (dict(history=-1), "history must be a non-negative integer"),
        (dict(diagnose_every=-1), "diagnose_every must be a non-negative integer"),
        (dict(weights={"pde": float("nan")}, terms=["pde"]), "initial weight of term 'pde' must be finite and positive"),
        (dict(weights={"pde": float("inf")}, terms=["pde"]), "initial weight of term 'pde' must be finite and positive"),
        (dict(min_weight=2.0, max_weight=1.0, terms=["pde"]), r"every term \(the defaults\): min_weight 2.0 > max_weight 1.0"),
        (dict(combine="pcgrad", memory="lean"), "combine= and diagnose_every= need the kept per-term gradients"),
        (dict(scope={"pde": []}), "the scope of term 'pde' is empty"),
        (dict(scope={"pde": [torch.nn.Parameter(torch.zeros(1))]}), "scope of term 'pde' names a parameter the optimizer"),
    ],
)
def test_bad_options(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LossBalancer(torch.optim.SGD(PINN1D().model.parameters(), lr=0.1), "lra", **kwargs)


def test_scope_naming_an_undeclared_term():
    params = list(PINN1D().model.parameters())
    with pytest.raises(KeyError, match=r"scope names term\(s\) \['bc'\] that are neither in terms= nor in optional="):
        LossBalancer(torch.optim.SGD(params, lr=0.1), "lra", terms=["pde"], scope={"bc": params})


def test_parameters_of_two_dtypes():
    params = [torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))]
    with pytest.raises(ValueError, match="share one device and dtype.*model.to\\(dtype\\)"):
        LossBalancer(torch.optim.SGD(params, lr=0.1), "lra")


def test_terms_given_as_one_string():
    with pytest.raises(TypeError, match="terms"):
        LossBalancer(torch.optim.SGD(PINN1D().model.parameters(), lr=0.1), "lra", terms="pde")


def test_add_and_remove_term_misuse():
    problem, balancer = fresh()
    before = snapshot(problem, balancer)
    with pytest.raises(ValueError, match="term 'pde' is already declared"):
        balancer.add_term("pde")
    with pytest.raises(KeyError, match=r"term 'bc' is not declared; declared: \['pde', 'dirichlet', 'neumann'\]"):
        balancer.remove_term("bc")
    with pytest.raises(TypeError, match="term names must be strings, got 3"):
        balancer.add_term(3)
    with pytest.raises(ValueError, match="initial weight of term 'bc' must be finite and positive, got 0.0"):
        balancer.add_term("bc", 0.0)
    assert_unchanged(before, snapshot(problem, balancer))


def test_load_state_dict_with_another_key_set_then_step():
    problem, balancer = fresh()
    state = balancer.state_dict()
    state["names"] = ["pde", "dirichlet", "robin"]
    other = LossBalancer(torch.optim.Adam(problem.model.parameters(), lr=1e-2), LRAnnealing("pde"))
    other.load_state_dict(state)
    with pytest.raises(KeyError, match="unknown term.*'neumann'.*missing term.*'robin'"):
        other.step(problem.losses())


def test_load_state_dict_with_another_key_set_then_step_changes_nothing():
    problem, balancer = fresh()
    for _ in range(2):
        balancer.step(problem.losses())
    state = balancer.state_dict()
    problem.model.zero_grad()
    balancer.remove_term("neumann")  # saved from a run that did not have the term
    losses = problem.losses()
    del losses["neumann"]
    balancer.step(losses)
    saved = balancer.state_dict()
    fresh_problem, other = fresh()
    fresh_problem.model.load_state_dict(problem.model.state_dict())
    other.load_state_dict(saved)
    other.step({k: v for k, v in fresh_problem.losses().items() if k != "neumann"})
    before = snapshot(fresh_problem, other)
    with pytest.raises(KeyError, match=r"unknown term\(s\) \['neumann'\].*add_term"):
        other.step(fresh_problem.losses())  # the phase came back without add_term
    assert_unchanged(before, snapshot(fresh_problem, other))
    assert state["names"] == ["pde", "dirichlet", "neumann"]


@pytest.mark.parametrize("state", [{"a": 1}, "model"], ids=["unrelated dict", "a model state_dict"])
def test_load_something_that_is_not_a_balancer_state(state):
    problem, balancer = fresh()
    before = snapshot(problem, balancer)
    with pytest.raises(KeyError, match="not a LossBalancer state_dict: missing"):
        balancer.load_state_dict(problem.model.state_dict() if state == "model" else state)
    assert_unchanged(before, snapshot(problem, balancer))


@pytest.mark.parametrize("saved_with", ["relobralo", "static"])
def test_load_state_dict_saved_with_another_strategy(saved_with):
    problem, source = fresh(saved_with)
    state = source.state_dict()
    problem, balancer = fresh("dwa")
    before = snapshot(problem, balancer)
    with pytest.raises(ValueError, match=f"saved by a balancer running strategy '{saved_with}'.*'dwa'.*same strategy"):
        balancer.load_state_dict(state)
    assert_unchanged(before, snapshot(problem, balancer))


def test_load_state_dict_for_another_model():
    problem, balancer = fresh()
    state = balancer.state_dict()
    other = LossBalancer(torch.optim.Adam(torch.nn.Linear(2, 2).parameters()), LRAnnealing("pde"))
    before = copy.deepcopy(other.state_dict())
    with pytest.raises(ValueError, match="parameter group that doesn't match"):
        other.load_state_dict(state)
    assert other.step_count == 0 and other.weights == {}
    assert_same(before, other.state_dict())


@pytest.mark.parametrize("case", ["complex", "meta"])
def test_parameters_the_balancer_cannot_differentiate_for_are_refused_when_built(case):
    """A complex parameter (raw torch errors from inside the step, before) or a model on the meta
    device (a bare .item() error): refused at construction, naming the parameter and the fix."""
    if case == "complex":
        params = [torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2, dtype=torch.cdouble))]
        error, message = TypeError, r"parameter 1 of the optimizer \(shape \(2,\), torch.complex128\) is complex.*view_as_complex"
    else:
        params = list(torch.nn.Linear(2, 1).to("meta").parameters())
        error, message = ValueError, "parameter 0 .* is on the meta device.*to_empty"
    with pytest.raises(error, match=message):
        LossBalancer(torch.optim.SGD(params, lr=0.1), "static")
    with pytest.raises(error, match=message):
        LossBalancer(params, "lra")
