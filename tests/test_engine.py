"""The gradient engine: the balancer's .grad equals a plain weighted backward, in every mode."""
import warnings

import pytest
import torch
from hypothesis import given, settings, strategies as st

from lossbalance import LossBalancer, LRAnnealing
from lossbalance.gradients import GradientEngine

from _models import PINN1D, TwoHeads, grads_of

warnings.filterwarnings("ignore", message="LRAnnealing: no reference")

MODES = [dict(memory="keep"), dict(memory="lean"), dict(probe="last"), dict(update_every=3), dict(grad_mode="batched")]


def build(problem, mode, strategy):
    params = list(problem.model.parameters())
    opt = torch.optim.SGD(params, lr=1e-6)
    mode = dict(mode)
    if mode.get("probe") == "last":
        mode["probe"] = params[-2:]
    return LossBalancer(opt, strategy, **mode)


def reference_grads(params, losses, weights):
    for p in params:
        p.grad = None
    sum(weights[n] * losses[n] for n in losses).backward(inputs=params)
    return grads_of(params)


def assert_same(got, want, rtol=1e-5):
    for g, w in zip(got, want):
        assert (g is None) == (w is None)
        if g is not None:
            torch.testing.assert_close(g, w, rtol=rtol, atol=1e-7 * max(1.0, w.abs().max().item()))


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    scales=st.lists(st.floats(1e-3, 1e3), min_size=3, max_size=3),
    mode=st.sampled_from(MODES),
    strategy=st.sampled_from(["lra", "static"]),
    steps=st.integers(1, 4),
)
def test_grad_equals_weighted_backward(seed, scales, mode, strategy, steps):
    problem = PINN1D(seed=seed % 7, dtype=torch.float64)  # float32 summation order alone exceeds rtol 1e-5
    params = list(problem.model.parameters())
    balancer = build(problem, mode, strategy)

    def scaled():
        return {k: v * c for (k, v), c in zip(problem.losses().items(), scales)}

    for _ in range(steps):
        balancer.step(scaled())
    balancer.backward(scaled())
    got = grads_of(params)
    assert_same(got, reference_grads(params, scaled(), balancer.weights))


@settings(max_examples=15, deadline=None)
@given(perm=st.permutations(["pde", "dirichlet", "neumann"]), mode=st.sampled_from(MODES))
def test_result_does_not_depend_on_dict_order(perm, mode):
    runs = []
    for order in (["pde", "dirichlet", "neumann"], perm):
        problem = PINN1D(seed=3)
        balancer = build(problem, mode, LRAnnealing(reference="pde"))
        for _ in range(3):
            losses = problem.losses()
            balancer.step({k: losses[k] for k in order})
        runs.append(([p.detach().clone() for p in problem.model.parameters()], balancer.weights))
    (p1, w1), (p2, w2) = runs
    assert w1 == pytest.approx(w2, rel=1e-6)
    for a, b in zip(p1, p2):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("mode", MODES)
def test_shared_trunk_two_heads(mode):
    model = TwoHeads()
    model.model = model
    balancer = build(model, mode, LRAnnealing(reference="a"))
    params = list(model.parameters())
    balancer.backward(model.losses())
    got = grads_of(params)
    want = reference_grads(params, model.losses(), balancer.weights)
    assert_same(got, want)


@pytest.mark.parametrize("mode", MODES)
def test_unreached_parameters_keep_none_and_inputs_untouched(mode):
    problem = PINN1D()
    spare = torch.nn.Parameter(torch.ones(3))
    params = list(problem.model.parameters())
    opt = torch.optim.SGD([*params, spare], lr=0.1)
    mode = dict(mode)
    if mode.get("probe") == "last":
        mode["probe"] = params[-2:]
    balancer = LossBalancer(opt, LRAnnealing(reference="pde"), **mode)
    x = torch.rand(8, 1, requires_grad=True)
    losses = problem.losses()
    losses["extra"] = problem.model(x).pow(2).mean()
    balancer.step(losses)
    assert spare.grad is None
    assert x.grad is None
    torch.testing.assert_close(spare.detach(), torch.ones(3))


def _partly_reached(grad_mode, terms, optimizer=torch.optim.SGD, **options):
    """TwoHeads and a parameter no term reaches; term "c" reaches head a's weight only."""
    model = TwoHeads()
    model.spare = torch.nn.Parameter(torch.ones(3))
    opt = optimizer(model.parameters(), lr=0.05, **options)
    balancer = LossBalancer(opt, LRAnnealing(reference="a"), grad_mode=grad_mode)

    def losses():
        found = {**model.losses(), "c": model.a.weight.pow(2).sum()}
        return {name: found[name] for name in terms}

    return model, balancer, losses


def _apply(route, balancer, losses):
    if route == "step":
        return balancer.step(losses)
    balancer.optimizer.zero_grad(set_to_none=True)
    balancer.backward(losses) if route == "backward" else balancer.loss(losses).backward()
    balancer.optimizer.step()


@pytest.mark.parametrize("terms", [("a", "b", "c"), ("a", "c")])
@pytest.mark.parametrize("route", ["step", "backward", "loss"])
def test_batched_gives_the_loops_grad_and_none_where_no_term_reaches(route, terms):
    runs = [_partly_reached(grad_mode, terms) for grad_mode in ("loop", "batched")]
    for _ in range(3):
        for model, balancer, losses in runs:
            _apply(route, balancer, losses())
        (loop, *_), (batched, batched_balancer, _) = runs
        assert not batched_balancer._engine._vmap_failed  # the batched path ran, not the loop
        want, got = grads_of(loop.parameters()), grads_of(batched.parameters())
        assert [g is None for g in got] == [w is None for w in want]
        assert loop.spare.grad is None and (loop.b.weight.grad is None) == ("b" not in terms)
        for g, w in zip(got, want):
            if w is not None:
                torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-7)  # (bit for bit on CPU)


@pytest.mark.parametrize("route", ["step", "backward", "loss"])
def test_batched_adamw_weight_decay_leaves_an_unreached_parameter_alone(route):
    model, balancer, losses = _partly_reached("batched", ("a", "b"), torch.optim.AdamW, weight_decay=0.5)
    trunk = model.trunk[0].weight.detach().clone()
    for _ in range(3):
        _apply(route, balancer, losses())
    assert model.spare.grad is None and torch.equal(model.spare.detach(), torch.ones(3))
    assert not torch.equal(model.trunk[0].weight.detach(), trunk)


def test_term_not_reaching_a_layer_contributes_zero_there():
    model = TwoHeads()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    balancer = LossBalancer(opt, LRAnnealing(reference="a"))
    balancer.backward(model.losses())
    got = model.a.weight.grad.clone()
    w = balancer.weights
    model.zero_grad()
    (w["a"] * model.losses()["a"]).backward()
    torch.testing.assert_close(got, model.a.weight.grad)


def test_statistics_match_direct_autograd():
    problem = PINN1D(seed=1)
    params = list(problem.model.parameters())
    engine = GradientEngine(params)
    losses = problem.losses()
    stats, _ = engine.measure(list(losses), list(losses.values()), [None] * 3, torch.zeros(3))
    for i, loss in enumerate(problem.losses().values()):
        grads = torch.autograd.grad(loss, params, allow_unused=True, materialize_grads=True)
        flat = torch.cat([g.reshape(-1) for g in grads])
        matrices = torch.cat([g.reshape(-1) for g in grads if g.dim() >= 2])
        close = lambda a, b: torch.testing.assert_close(a, b, check_dtype=False)  # noqa: E731  (stats: float64)
        close(stats.mean_abs()[i], flat.abs().mean())
        close(stats.max_abs_over()[i], flat.abs().max())
        close(stats.norm()[i], flat.norm())
        close(stats.mean_abs("matrices")[i], matrices.abs().mean())
        layerwise = torch.stack([g.abs().mean() for g in grads if g.dim() >= 2]).mean()
        close(stats.mean_abs("matrices", layerwise=True)[i], layerwise)


def test_cosine_matrix():
    model = TwoHeads()
    engine = GradientEngine(list(model.parameters()))
    losses = model.losses()
    stats, _ = engine.measure(list(losses), list(losses.values()), [None, None], torch.zeros(2))
    ga = torch.cat([g.reshape(-1) for g in torch.autograd.grad(model.losses()["a"], list(model.parameters()), allow_unused=True, materialize_grads=True)])
    gb = torch.cat([g.reshape(-1) for g in torch.autograd.grad(model.losses()["b"], list(model.parameters()), allow_unused=True, materialize_grads=True)])
    want = torch.nn.functional.cosine_similarity(ga, gb, dim=0)
    torch.testing.assert_close(stats.cosine()[0, 1], want, rtol=1e-5, atol=1e-6, check_dtype=False)
    torch.testing.assert_close(stats.cosine().diagonal(), torch.ones(2, dtype=torch.float64))
    assert stats.conflict_fraction().item() == float(want.item() < 0)


def test_mixed_dtypes_are_refused_with_a_clear_message():
    a = torch.nn.Parameter(torch.zeros(2))
    b = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
    with pytest.raises(ValueError, match="one device and dtype"):
        GradientEngine([a, b])


_SPECIALS = st.sampled_from([0.0, -0.0, 1.0, float("nan"), float("inf"), float("-inf"), 3e38, -3e38, 1e-45])


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from([(3,), (2, 4), (1,), (5, 1)]),
            st.sampled_from([torch.float32, torch.float64, torch.bfloat16]),
            st.lists(st.tuples(st.integers(0, 19), _SPECIALS), max_size=3),
            st.booleans(),
        ),
        min_size=1, max_size=5,
    )
)
def test_all_finite_agrees_with_isfinite_and_leaves_the_values(specs):
    """The fused check (and its fallback for expanded, overlapping tensors) says exactly whether
    every entry is finite, overflowing sums of finite entries included, and changes no value."""
    from lossbalance.gradients import all_finite

    tensors = []
    for shape, dtype, edits, expanded in specs:
        t = torch.linspace(-2, 2, int(torch.Size(shape).numel())).reshape(shape).to(dtype)
        for position, value in edits:
            t.view(-1)[position % t.numel()] = value
        tensors.append(t[..., :1].expand(*shape[:-1], 3) if expanded else t)
    before = [t.clone() for t in tensors]
    expected = all(bool(torch.isfinite(t).all()) for t in tensors)
    assert all_finite(tensors) == expected
    for t, b in zip(tensors, before):
        assert torch.equal(t.isnan(), b.isnan()) and torch.equal(t.nan_to_num(), b.nan_to_num())
        assert torch.equal(t.signbit(), b.signbit())


def test_an_expanded_gradient_is_checked_too():
    """``loss = w.sum()`` gives an expanded gradient, on which the fused check cannot run in
    place: the step still goes through, and a non-finite gradient elsewhere is still caught."""
    w, v = torch.nn.Parameter(torch.ones(3, 2)), torch.nn.Parameter(torch.zeros(2))
    assert torch.autograd.grad(w.sum(), w)[0].stride() == (0, 0)  # what the engine gets for w
    balancer = LossBalancer(torch.optim.SGD([w, v], lr=0.1), "static")
    balancer.step({"a": w.sum(), "b": v.pow(2).sum()})
    assert torch.equal(w.detach(), torch.full((3, 2), 0.9))
    before = (w.detach().clone(), v.detach().clone())
    with pytest.raises(ValueError, match="gradient"):
        balancer.step({"a": w.sum(), "b": v.abs().sqrt().sum()})  # value 0, gradient NaN at 0
    assert torch.equal(w.detach(), before[0]) and torch.equal(v.detach(), before[1])
