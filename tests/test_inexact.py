"""The inexact mode (:mod:`hodl_plugin.inexact`, ISGD / MAID, :ref:`math-inexact`): accuracy schedules and their
counter, warm starts per key (and their state), one method object per solver, the exact limit; gradcheck
and double backward with warm-started adjoints. The certified bound has its own tests (``test_bound.py``).
"""

from __future__ import annotations

import io
import re
import warnings

import pytest
import torch
from _assertions import assert_right_or_named, run_recording, zeros
from _oracles import DT, make_linear, make_quadratic, make_tanh, nonsingleton_projector, rel_err, small_linear
from torch.autograd import gradcheck, gradgradcheck

import hodl_plugin as hp


def run(q, x0, **opts):
    solver = hp.GKMSolver(q.T, max_steps=100000, hypergrad="inexact", upper=q.F, alpha=0, **opts)
    x = x0.clone().requires_grad_(True)
    u = solver(torch.zeros(q.n, dtype=DT), x)
    q.F(u, x).backward()
    return x.grad, solver


def test_accuracy_schedule_counter_and_warm_starts():
    q = make_quadratic(n=30, cond=10.0, seed=7)
    solver = hp.GKMSolver(q.T, max_steps=100000, hypergrad="inexact",
                          eps=hp.Polynomial(1e-2, 1.0), delta=hp.Polynomial(1e-2, 1.0), solver="cg")
    x = torch.tensor([1.0, 0.5, -0.5], dtype=DT, requires_grad=True)
    steps, eps = [], []
    for _ in range(4):
        u = solver(torch.zeros(q.n, dtype=DT), x, key="batch0")
        q.F(u, x).backward()
        steps.append(solver.info.steps)
        eps.append(solver.info.eps)
    assert eps == [1e-2, 5e-3, pytest.approx(1e-2 / 3), 2.5e-3]
    assert steps[1] < steps[0]  # warm start from the previous iterate of the same key
    assert solver.method.k == 4
    # a different key starts cold
    solver(torch.zeros(q.n, dtype=DT), x, key="batch1")
    assert solver.info.steps > steps[1]


def test_state_dict_roundtrip_restores_counter_and_warm_starts():
    q = make_quadratic(n=20, cond=10.0, seed=8)
    mk = lambda: hp.GKMSolver(q.T, max_steps=10000, hypergrad="inexact", eps=hp.Polynomial(1e-3, 0.5))  # noqa: E731
    a = mk()
    x = torch.ones(3, dtype=DT, requires_grad=True)
    for _ in range(3):
        q.F(a(torch.zeros(q.n, dtype=DT), x, key=0), x).backward()
    b = mk()
    b.load_state_dict(a.state_dict())
    assert b.method.k == 3
    ua = a(torch.zeros(q.n, dtype=DT), x, key=0)
    ub = b(torch.zeros(q.n, dtype=DT), x, key=0)
    assert torch.equal(ua, ub) and a.info.steps == b.info.steps


def test_exact_limit_equals_implicit():
    """With tiny ε, δ the inexact hypergradient equals the exact one."""
    q = make_quadratic(n=30, cond=10.0, seed=9)
    x0 = torch.tensor([0.1, 0.2, 0.3], dtype=DT)
    g, _ = run(q, x0, eps=1e-13, delta=1e-13, constants=None)
    assert rel_err(g, q.hypergrad(x0)) < 1e-9


def test_bad_accuracy_schedule():
    with pytest.raises(hp.ScheduleError):
        hp.Inexact(eps=-1.0)


def test_a_forward_tolerance_given_to_the_inexact_mode_is_said_unused():
    """The inexact forward stops at its ε_k: tol= was silently unused (1e-4 accuracy for tol=1e-12)."""
    for bad in ({"tol": 1e-12}, {"atol": 1e-9}):
        with pytest.warns(hp.errors.UnusedOptionWarning, match="eps="):
            hp.GKMSolver(lambda u, x: 0.5 * u + x, hypergrad="inexact", **bad)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hp.GKMSolver(lambda u, x: 0.5 * u + x, hypergrad="inexact", eps=1e-12)  # the way to ask for it


# -- warm starts: keys, state, ownership ------------------------------------------------------------------
def test_inexact_warm_start_keys_state_and_ownership():
    inexact = hp.Inexact(eps=1e-10)
    solver = hp.GKMSolver(lambda u, x: 0.5 * u + x, hypergrad=inexact)
    for _ in range(3):
        x = torch.ones(3, dtype=DT, requires_grad=True)
        solver(torch.zeros(3, dtype=DT), x, key=torch.tensor(7)).sum().backward()
    assert list(inexact.u_cache) == [7] and solver.info.warm_started  # a 0-d tensor key is its value
    with pytest.raises(TypeError, match="key"):
        solver(torch.zeros(3, dtype=DT), x, key=torch.ones(2))
    with pytest.raises(ValueError, match="another GKMSolver"):
        hp.GKMSolver(lambda u, x: 0.5 * u + x, hypergrad=inexact)(torch.zeros(3, dtype=DT), x)
    buf = io.BytesIO()
    torch.save(solver.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    fresh = hp.GKMSolver(lambda u, x: 0.5 * u + x, hypergrad="inexact", eps=1e-10)
    fresh.load_state_dict(state)
    assert fresh.method.k == 3 and torch.equal(fresh.method.u_cache[7], inexact.u_cache[7])
    with pytest.raises(ValueError, match="not the state of an Inexact"):
        fresh.load_state_dict(hp.GKMSolver(lambda u, x: 0.5 * u + x).state_dict())


def test_a_0d_tensor_key_warm_starts_and_the_cache_does_not_grow():
    p = make_linear("spd", seed=15, cond=30.0)
    solver = hp.GKMSolver(p.T, hypergrad="inexact", eps=1e-10, delta=1e-10, warm_start=True, max_steps=5000)
    steps = []
    try:
        for _ in range(4):
            x = p.x0.clone().requires_grad_(True)
            p.F(solver(zeros(p.n), x, key=torch.tensor(7))).backward()
            steps.append(solver.info.steps)
    except (TypeError, ValueError, hp.HODLError) as e:
        assert "key" in str(e), f"refused without naming key: {e}"
        return
    assert steps[1] <= steps[0] // 2, f"the second call with the same key was not warm-started: steps {steps}"
    cache = solver.method.state_dict().get("u_cache", {})
    assert len(cache) <= 1, f"the warm-start cache grows with equal tensor keys: {len(cache)} entries"


def test_one_inexact_object_in_two_solvers_shares_no_counter():
    p = make_linear("spd", seed=17)
    method = hp.Inexact(eps=hp.Polynomial(1e-2, 1.0))
    s1 = hp.GKMSolver(p.T, hypergrad=method)
    try:
        s2 = hp.GKMSolver(p.T, hypergrad=method)
    except (ValueError, TypeError, hp.HODLError) as e:
        assert re.search(r"(?i)shar|already|hypergrad|Inexact", str(e)), str(e)
        return
    for _ in range(3):
        x = p.x0.clone().requires_grad_(True)
        p.F(s1(zeros(p.n), x)).backward()
    x = p.x0.clone().requires_grad_(True)
    p.F(s2(zeros(p.n), x)).backward()
    assert s2.info.eps == pytest.approx(1e-2), f"s2's first call used eps_3 of s1's schedule: {s2.info.eps}"
    x = p.x0.clone().requires_grad_(True)
    p.F(s1(zeros(p.n), x)).backward()
    assert s1.info.eps == pytest.approx(1e-2 / 4), f"s1's 4th call: eps {s1.info.eps}"


def test_u0_is_not_ignored_silently_after_a_key():
    """Plain KM on Fix T = {Au = b} lands on the projection of its start: the u0 of the second call
    must be used (result proj(z2)), or a warning must say that u0 is ignored."""
    A, b, s, P, proj, g = nonsingleton_projector(seed=17)
    n = A.shape[1]
    z1, z2 = torch.randn(n, generator=g, dtype=DT), torch.randn(n, generator=g, dtype=DT)
    solver = hp.GKMSolver(lambda u: u - s * A.T @ (A @ u - b), hypergrad="inexact", eps=1e-10, max_steps=20000)
    with torch.no_grad():
        solver(z1, key="k")
        out, err, rec = run_recording(lambda: solver(z2, key="k"))
    if err is not None:
        assert isinstance(err, hp.HODLError) and "u0" in str(err), f"{type(err).__name__}: {err}"
        return
    if rel_err(out, proj(z2)) < 1e-6:
        return
    assert any("u0" in str(w.message) for w in rec), (
        f"u0 silently ignored: result is {rel_err(out, proj(z1)):.1e} from proj(z1), {rel_err(out, proj(z2)):.1e} "
        "from proj(z2)")


# -- gradcheck and double backward with warm-started adjoints ---------------------------------------------
def test_inexact_gradcheck_with_warm_started_adjoints():
    solver = hp.GKMSolver(lambda u, x: 0.5 * u + torch.sin(x), hypergrad="inexact", eps=1e-13, delta=1e-13)
    x = torch.randn(3, dtype=DT, requires_grad=True)
    fn = lambda x: solver(torch.zeros(3, dtype=DT), x, key=0)  # noqa: E731
    for _ in range(2):  # warm starts in play
        fn(x).sum().backward()
    assert gradcheck(fn, (x,))


@pytest.mark.parametrize("warm_start", [True, False])
def test_inexact_gradcheck_with_and_without_warm_starts(warm_start):
    p = make_tanh(seed=24)
    solver = hp.GKMSolver(p.T, hypergrad="inexact", eps=1e-12, delta=1e-12, warm_start=warm_start, max_steps=500)
    x = p.x0.clone().requires_grad_(True)
    assert_right_or_named(lambda: torch.autograd.gradcheck(lambda z: solver(zeros(p.n), z), (x,), nondet_tol=1e-9),
                          True, 0.0, what="gradcheck")


def test_inexact_double_backward_is_reentrant_with_warm_starts():
    """gradgradcheck runs each backward twice and compares bit for bit: the adjoint's warm start must
    not change between passes through one call."""
    Q, B, y, s = small_linear()
    solver = hp.GKMSolver(lambda u, x: u - s * (Q @ u - B @ x), max_steps=100000, tol=1e-13,
                          hypergrad="inexact", eps=1e-12, delta=1e-12)
    x = torch.randn(3, dtype=DT, requires_grad=True, generator=torch.Generator().manual_seed(4))
    fn = lambda x: solver(torch.zeros(5, dtype=DT), x)  # noqa: E731
    torch.func.jacrev(fn)(x.detach())  # earlier calls leave adjoints of other upstream gradients cached
    assert gradcheck(fn, (x,))
    assert gradgradcheck(lambda x: fn(x) ** 2, (x,))


@pytest.mark.parametrize("acceleration", [None, "anderson"])
def test_the_bound_of_a_batch_dims_batch_whose_samples_differ_in_scale(acceleration):
    """``batch_dims=1``: the adjoint is solved per sample, the bound certifies the whole batch's gradient. A
    sample 1000× smaller than the others made the bound compare the batch's recomputed adjoint residual with
    that sample's alone and withhold itself ("the back-propagated loss is not `upper`", which it was)."""
    torch.manual_seed(0)
    M = torch.randn(40, 40, dtype=DT)
    M = 0.9 * M / torch.linalg.matrix_norm(M, 2)
    F = lambda z, x: 0.5 * (z**2).sum()  # noqa: E731
    x = (torch.randn(3, 40, dtype=DT) * torch.tensor([[1e-3], [1.0], [1.0]], dtype=DT)).requires_grad_(True)
    s = hp.GKMSolver(lambda z, x: z @ M.T + x, batch_dims=1, upper=F, alpha=0,
                     acceleration=hp.Anderson(5) if acceleration else None,
                     hypergrad=hp.Inexact(eps=1e-6, warm_start=False))
    F(s(torch.zeros(3, 40, dtype=DT), x), x).backward()
    A = torch.eye(40, dtype=DT) - M
    exact = torch.linalg.solve(A.T, torch.linalg.solve(A, x.detach().T)).T  # ∇f = A⁻ᵀ u*, u* = A⁻¹x
    err = float((x.grad - exact).norm())
    assert s.info.error_bound is not None, s.info.message
    assert err <= s.info.error_bound and not s.info.message
