"""The inexact mode under ``torch.func.vmap`` keeps its warm starts, accuracies and error bound (issue 12).

Same per-sample problem as ``test_vmap_batched`` (``T(u; d, c) = u − s(Q(d)u − c)``, samples of
condition 2 / 10 / 100, closed forms ``u* = Q⁻¹c`` and the hypergradient of ``f = ½‖u* − y‖²``).
The references are the closed forms, not the code: a warm start from a batch's own fixed points must
cost (almost) no steps *per sample* (a start taken from another sample would cost as much as a cold
one), the hypergradient of a warm-started call must still match the closed form, and the certified
bound of each sample must lie above that sample's true error.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from test_vmap_batched import CS, DS, B, Counted, D, N, Q, R, S, X, Y, grad_ref, u_star

import hodl_plugin as hp


def upper(u, x):
    return 0.5 * ((u - Y) ** 2).sum()


def make(eps=1e-10, **kw):
    T = Counted()
    kw.setdefault("warm_start", True)
    method = hp.Inexact(eps=eps, **kw)
    return T, hp.GKMSolver(T, hypergrad=method, upper=upper, alpha=0, max_steps=100000)


def fns(solver, key="batch"):
    def solve(x):
        return solver(torch.zeros(N, dtype=D), x, key=key)

    def f(x):
        return upper(solve(x), x)

    return solve, f


def rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Inexact warm start")
        yield


def test_a_vmapped_call_warm_starts_each_sample_from_its_own_iterate():
    _, solver = make(eps=1e-10, estimate_every=1000)
    solve, _ = fns(solver)
    with torch.no_grad():
        cold = torch.func.vmap(solve)(X)
    cold_steps = solver.info.steps_per_sample.clone()
    assert not solver.info.warm_started and bool((cold_steps > 20).all())
    assert tuple(solver.method.u_cache["batch"].shape) == (B, N)  # the batch is cached, not one sample
    with torch.no_grad():
        warm = torch.func.vmap(solve)(X)
    # started at its own fixed point (to eps), every sample stops at its first check: u_0 is returned
    assert solver.info.warm_started
    assert solver.info.steps_per_sample.tolist() == [0] * B, solver.info.steps_per_sample
    ref = torch.stack([u_star(x) for x in X])
    # error ≤ ‖(I − ∂T)⁻¹‖·residual ≤ cond · eps · scale = 100 · 1e-10 · scale
    assert rel(cold, ref) < 1e-7 and rel(warm, ref) < 1e-7
    # a new batch size does not fit the cached batch: a cold start from u0, no error
    with torch.no_grad():
        torch.func.vmap(solve)(X[:2])
    assert not solver.info.warm_started
    assert solver.info.steps_per_sample.tolist() == cold_steps[:2].tolist()


def test_an_unbatched_iterate_warm_starts_every_sample_of_a_vmapped_call():
    _, solver = make(eps=1e-10)
    solve, _ = fns(solver)
    with torch.no_grad():
        solve(X[1])  # caches sample 1's fixed point (shape (N,))
        out = torch.func.vmap(solve)(X)
    assert solver.info.warm_started
    steps = solver.info.steps_per_sample.tolist()
    assert steps[1] == 0 and steps[0] > 1 and steps[2] > 1  # only sample 1 started at its own point
    assert rel(out, torch.stack([u_star(x) for x in X])) < 1e-7


@pytest.mark.parametrize("solver_name", ["cg", "gmres", "bicgstab"])  # per-sample mode / one by one
def test_vmap_grad_warm_starts_the_adjoint_and_stays_exact(solver_name):
    _, solver = make(eps=1e-11, solver=solver_name, estimate_every=1000)
    _, f = fns(solver)
    g1 = torch.func.vmap(torch.func.grad(f))(X)
    it1 = solver.info.adjoint.iterations
    assert tuple(solver.method.v_cache["batch"].shape) == (B, N)
    g2 = torch.func.vmap(torch.func.grad(f))(X)
    it2 = solver.info.adjoint.iterations
    ref = torch.stack([grad_ref(x, "implicit") for x in X])
    assert rel(g1, ref) < 1e-7 and rel(g2, ref) < 1e-7
    assert it2 < it1, (it1, it2)  # the cached adjoints (this batch's own) were used


def test_a_sample_with_zero_upstream_gradient_keeps_an_exactly_zero_hypergradient():
    """The warm start is dropped per sample where it is worse than 0, so A⁻ᵀ0 = 0 exactly even when
    the cached adjoint of that sample is not zero (the adjoint stays linear in the upstream gradient)."""
    _, solver = make(eps=1e-10, solver="cg", estimate_every=1000)
    solve, _ = fns(solver)

    def f(x, w):
        return w * upper(solve(x), x)

    W = torch.ones(B, dtype=D)
    torch.func.vmap(torch.func.grad(f))(X, W)  # fills the adjoint cache with nonzero v's
    W0 = W.clone()
    W0[1] = 0.0
    g = torch.func.vmap(torch.func.grad(f))(X, W0)
    assert bool((g[1] == 0).all()), g[1]
    ref = torch.stack([grad_ref(x, "implicit") for x in X])
    assert rel(g[[0, 2]], ref[[0, 2]]) < 1e-7


class Affine:
    """T(u; d, c) = u − s(Q(d)u − c): affine in u with ∂_cT = sI independent of u, so the bound is
    certified for the hypergradient in c (d is data: per-sample spectra, no gradient)."""

    def __call__(self, u, d, c):
        return u - S * (R @ (d * (R.T @ u)) - c)


@pytest.mark.parametrize("adjoint", ["cg", "gmres", "bicgstab", "fixed_point"])  # batched / one by one
@pytest.mark.parametrize("entry", ["vmap_grad", "grad_vmap", "backward_vmap"])
def test_each_sample_gets_a_certified_bound_above_its_true_error(entry, adjoint):
    # loose accuracies, so the errors are visible; no warm starts, so each call is the same. Each
    # sample's bound uses its own adjoint residual (not the batch's worst or last)
    solver = hp.GKMSolver(Affine(), upper=lambda u, d, c: upper(u, None), alpha=0, max_steps=100000,
                          hypergrad=hp.Inexact(eps=1e-4, warm_start=False, estimate_every=1, solver=adjoint))

    # samples of very different scales (so their adjoint residuals differ by orders of magnitude)
    Cs = CS * torch.tensor([1.0, 1e3, 1e-2], dtype=D)[:, None]

    def f(d, c):
        return upper(solver(torch.zeros(N, dtype=D), d, c), None)

    # closed form: ∂f/∂c = Q(d)⁻¹(u* − y)
    ref = torch.stack([torch.linalg.solve(Q(d), u_star(torch.cat([d, c])) - Y) for d, c in zip(DS, Cs)])
    if entry == "vmap_grad":
        g = torch.func.vmap(torch.func.grad(f, argnums=1))(DS, Cs)
    elif entry == "grad_vmap":
        g = torch.func.grad(lambda cs: torch.func.vmap(f)(DS, cs).sum())(Cs)
    else:
        cs = Cs.clone().requires_grad_(True)
        torch.func.vmap(f)(DS, cs).sum().backward()
        g = cs.grad
    info = solver.info
    bounds = info.error_bound_per_sample
    assert bounds is not None and bounds.shape == (B,), info.message
    errs = (g - ref).norm(dim=1)
    assert bool((errs > 0).all())
    assert bool((bounds >= errs).all()), (bounds, errs)
    assert info.error_bound == pytest.approx(float(bounds.max()))
    # and a bound is not vacuous: within a few orders of magnitude of the error of its sample
    assert bool((bounds <= 1e4 * errs).all()), (bounds, errs)
    # each sample's bound is the one its own unbatched call certifies
    for i in range(B):
        solver.info.error_bound = None
        ci = Cs[i].clone().requires_grad_(True)
        f(DS[i], ci).backward()
        assert solver.info.error_bound == pytest.approx(float(bounds[i]), rel=1e-6)


def test_the_warm_started_adjoint_under_vmap_passes_gradcheck_and_gradgradcheck():
    _, solver = make(eps=1e-14, solver="gmres", estimate_every=1000)
    solve, f = fns(solver)
    # samples of condition 2 and 10: with warm starts the forward starts elsewhere at every
    # evaluation, so finite differences of the condition-100 sample carry cond² · eps / h noise
    # (unbatched too); the analytical side must be reentrant (gradcheck compares two passes)
    xs = X[:2].clone().requires_grad_(True)
    torch.func.vmap(f)(xs).sum().backward()  # primes both caches with this batch
    assert "batch" in solver.method.v_cache

    def batch_loss(xs):
        return torch.func.vmap(f)(xs)

    assert torch.autograd.gradcheck(batch_loss, (xs,))
    assert torch.autograd.gradgradcheck(batch_loss, (xs,))


@pytest.mark.filterwarnings("ignore::hodl_plugin.errors.SummableScheduleWarning")
def test_with_hodl_aggregation_the_samples_solved_one_by_one_keep_their_own_warm_starts():
    T = Counted()
    solver = hp.GKMSolver(T, hypergrad=hp.Inexact(eps=1e-10, check_unique=False), upper=upper,
                          alpha=hp.Geometric(1e-3, 0.5), max_steps=100000)
    solve, f = fns(solver)
    with torch.no_grad():
        torch.func.vmap(solve)(X)
    cold = solver.info.steps_per_sample.clone()
    assert tuple(solver.method.u_cache["batch"].shape) == (B, N)
    with torch.no_grad():
        out = torch.func.vmap(solve)(X)
    warm = solver.info.steps_per_sample
    assert solver.info.warm_started
    # the aggregated steps push every start off Fix T by O(α_0), so the gain is partial; sample 0 is
    # dominated by that push (its steps do not change)
    assert bool((warm[1:] < cold[1:]).all()) and int(warm.sum()) < 0.75 * int(cold.sum()), (cold, warm)
    with torch.no_grad():  # started from another sample's iterate, samples 1 and 2 need more steps
        torch.func.vmap(solve)(X[[0, 2, 1]])
    crossed = solver.info.steps_per_sample
    assert int(crossed[1]) > int(warm[2]) and int(crossed[2]) > int(warm[1]), (warm, crossed)
    assert rel(out, torch.stack([u_star(x) for x in X])) < 1e-6
    g = torch.func.vmap(torch.func.grad(f))(X)
    assert rel(g, torch.stack([grad_ref(x, "implicit") for x in X])) < 1e-6


def test_nested_vmap_keeps_warm_starts_of_the_whole_batch():
    _, solver = make(eps=1e-10, estimate_every=1000)
    solve, f = fns(solver)
    XX = torch.stack([X, X.flip(0)])  # (2, B, 2N)
    vv = torch.func.vmap(torch.func.vmap(torch.func.grad(f)))
    g1 = vv(XX)
    assert tuple(solver.method.u_cache["batch"].shape) == (2, B, N)
    g2 = vv(XX)
    assert solver.info.warm_started and int(solver.info.steps) == 0
    ref = torch.stack([torch.stack([grad_ref(x, "implicit") for x in row]) for row in XX])
    assert rel(g1, ref) < 1e-7 and rel(g2, ref) < 1e-7


def test_the_warm_start_notice_points_at_the_users_line_under_vmap():
    _, solver = make(eps=1e-8)
    _, f = fns(solver)
    torch.func.vmap(torch.func.grad(f))(X)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        torch.func.vmap(torch.func.grad(f))(X)
    notes = [w for w in seen if "Inexact warm start" in str(w.message)]
    assert len(notes) == 1 and notes[0].filename == __file__, [(w.filename, w.lineno) for w in notes]


def test_per_sample_diagnostics_are_plain_tensors_after_outer_transforms():
    """info's per-sample tensors are made outside the transforms (no GradTrackingTensor escapes)."""
    from torch._C._functorch import is_batchedtensor, is_gradtrackingtensor

    def plain(t):
        return isinstance(t, torch.Tensor) and not is_gradtrackingtensor(t) and not is_batchedtensor(t)

    solver = hp.GKMSolver(Affine(), upper=lambda u, d, c: upper(u, None), alpha=0, max_steps=100000,
                          hypergrad=hp.Inexact(eps=1e-6, estimate_every=1, solver="cg"))
    torch.func.grad(lambda cs: torch.func.vmap(lambda d, c: upper(solver(torch.zeros(N, dtype=D), d, c),
                                                                  None))(DS, cs).sum())(CS)
    assert plain(solver.info.error_bound_per_sample) and plain(solver.info.steps_per_sample)
    T = Counted()
    agg = hp.GKMSolver(T, hypergrad=hp.Implicit(check_unique=False), upper=upper, alpha=hp.Harmonic(0.1),
                       tol=1e-8, max_steps=200)
    torch.func.jacrev(lambda xs: torch.func.vmap(lambda x: agg(torch.zeros(N, dtype=D), x))(xs))(X)
    assert plain(agg.info.steps_per_sample) and agg.info.steps_per_sample.tolist() == [200] * B
