"""Inexact (ISGD/MAID) mode: accuracy schedules, warm starts, a-posteriori error bound (SPEC T3c)."""

from __future__ import annotations

import pytest
import torch

import hodl_plugin as hp
from conftest import DT, make_quadratic, rel_err


def run(q, x0, **opts):
    solver = hp.GKMSolver(q.T, max_steps=100000, hypergrad="inexact", upper=q.F, alpha=0, **opts)
    x = x0.clone().requires_grad_(True)
    u = solver(torch.zeros(q.n, dtype=DT), x)
    q.F(u, x).backward()
    return x.grad, solver


def test_error_below_bound_and_linear_in_eps_and_delta():
    q = make_quadratic(n=40, cond=20.0, seed=5)
    x0 = torch.tensor([0.3, -0.6, 1.1], dtype=DT)
    exact = q.hypergrad(x0)
    errs_eps, errs_delta = [], []
    for e in (1e-3, 1e-4, 1e-5):
        g, s = run(q, x0, eps=e, delta=1e-13, solver="cg", warm_start=False)
        err = float((g - exact).norm())
        assert s.info.eps == e and s.info.error_bound is not None
        assert err <= s.info.error_bound  # the a-posteriori bound holds ...
        assert s.info.error_bound < 1e3 * max(err, 1e-14)  # ... and is not vacuous
        errs_eps.append(err)
    for d in (1e-3, 1e-4, 1e-5):
        g, s = run(q, x0, eps=1e-13, delta=d, solver="cg", warm_start=False)
        err = float((g - exact).norm())
        assert err <= s.info.error_bound
        errs_delta.append(err)
    # errors shrink with the accuracies (log-log slope about 1: a decade per decade, loosely)
    for errs in (errs_eps, errs_delta):
        assert errs[2] < errs[0] / 10


def test_known_constants_give_the_textbook_bound():
    q = make_quadratic(n=30, cond=10.0, seed=6)
    ev = torch.linalg.eigvalsh(q.Q)
    rho = float((1 - q.s * ev).abs().max())
    c = hp.BoundConstants(rho=rho, jx_norm=q.s * float(torch.linalg.matrix_norm(q.B, 2)), lip_upper=1.0)
    x0 = torch.tensor([1.0, 0.0, -1.0], dtype=DT)
    g, s = run(q, x0, eps=1e-5, delta=1e-6, constants=c, solver="cg")
    assert float((g - q.hypergrad(x0)).norm()) <= s.info.error_bound
    assert s.info.error_bound <= c.bound(1e-5, 1e-6) * (1 + 1e-9)


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
    """T3(d): with tiny ε, δ the inexact hypergradient equals the exact one."""
    q = make_quadratic(n=30, cond=10.0, seed=9)
    x0 = torch.tensor([0.1, 0.2, 0.3], dtype=DT)
    g, _ = run(q, x0, eps=1e-13, delta=1e-13, constants=None)
    assert rel_err(g, q.hypergrad(x0)) < 1e-9


def test_no_upper_no_estimated_bound():
    q = make_quadratic(n=10, cond=10.0, seed=2)
    solver = hp.GKMSolver(q.T, max_steps=1000, hypergrad="inexact", eps=1e-6)
    x = torch.ones(3, dtype=DT, requires_grad=True)
    q.F(solver(torch.zeros(q.n, dtype=DT), x), x).backward()
    assert solver.info.error_bound is None and "upper" in solver.info.message


def test_bad_accuracy_schedule():
    with pytest.raises(hp.ScheduleError):
        hp.Inexact(eps=-1.0)
