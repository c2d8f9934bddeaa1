"""Broyden acceleration: the update against a dense good-Broyden reference and TorchDEQ's solver,
finite termination on linear maps, fixed points and hypergradients against closed forms / Newton,
memory, restarts, safeguards, refusals."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import hodl_plugin as hp

D = torch.float64


def affine(n=8, rho=0.9, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = rho * torch.linalg.qr(torch.randn(n, n, generator=g, dtype=D))[0]
    c = torch.randn(n, generator=g, dtype=D)
    return A, c


def tanh_eq(n=100):
    """u = tanh(A u + x), A nonsymmetric with ‖A‖₂ = 1 (the Anderson tests' problem)."""
    g = torch.Generator().manual_seed(2)
    U, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=D))
    Q = (U * torch.logspace(0, 3, n, dtype=D)) @ U.T
    K = torch.randn(n, n, dtype=D, generator=torch.Generator().manual_seed(3))
    K = (K - K.T) / torch.linalg.matrix_norm(K - K.T, 2)
    A = torch.eye(n, dtype=D) - Q / 1e3 + 0.01 * K
    A = A / torch.linalg.matrix_norm(A, 2)
    x = 0.01 * torch.randn(n, dtype=D, generator=torch.Generator().manual_seed(4))
    return A, x


def newton(A, x, iters=50):
    u = torch.zeros_like(x)
    for _ in range(iters):
        z = A @ u + x
        J = torch.eye(len(x), dtype=D) - (1 - torch.tanh(z) ** 2)[:, None] * A
        u = u - torch.linalg.solve(J, u - torch.tanh(z))
    return u


@pytest.mark.parametrize("path", ["host", "numpy", "masked"])
def test_the_inverse_is_the_dense_good_broyden_update(path):
    """M_k = -J_k⁻¹ with J_0 = -I/β and the good Broyden update J₊ = J + (y - Js)sᵀ/(sᵀs) of the
    Jacobian of f(u) = T(u) - u, computed densely; the secant condition M y = -s holds."""
    A, c = affine(n=6, rho=0.95)
    beta, L = 0.8, 10
    acc = hp.Broyden(L)
    acc._host_decisions, acc._compiled = path != "masked", path != "numpy"
    u = torch.zeros(6, dtype=D)
    st = acc.init(u, 0)
    J = -torch.eye(6, dtype=D) / beta
    prev = None
    for k in range(5):
        f = A @ u + c - u
        u_next = acc.step(st, u, f, f.norm(), beta)
        if prev is not None:
            s, y = u - prev[0], f - prev[1]
            J = J + torch.outer(y - J @ s, s) / (s @ s)
            Av, Vv = (torch.as_tensor(st.A)[0], torch.as_tensor(st.V)[0])
            M = beta * torch.eye(6, dtype=D) + Av.T @ Vv
            assert torch.allclose(M, -torch.linalg.inv(J), rtol=1e-9, atol=1e-11), k
            assert torch.allclose(M @ y, -s, rtol=1e-9, atol=1e-12)
            assert torch.allclose(u_next, u + M @ f, rtol=1e-12, atol=1e-13)  # the step is u + M f
        prev = (u, f)
        u = u_next


def test_iterates_equal_torchdeq_broyden_solver():
    torchdeq = pytest.importorskip("torchdeq")
    g = torch.Generator().manual_seed(5)
    W = 0.9 * torch.linalg.qr(torch.randn(10, 10, generator=g, dtype=D))[0]
    x = 0.5 * torch.randn(3, 10, generator=g, dtype=D)
    T = lambda z, x: torch.tanh(z @ W.T + x)  # noqa: E731
    for k in (3, 8):
        ref, _, _ = torchdeq.solver.broyden_solver(lambda z: T(z, x), torch.zeros(3, 10, dtype=D), max_iter=k,
                                                   tol=0.0, return_final=True)
        with torch.no_grad():
            u, _ = hp.GKMSolver(T, max_steps=k, tol=0, batch_dims=1, acceleration=hp.Broyden(20)).solve(
                torch.zeros(3, 10, dtype=D), x)
        assert torch.allclose(u, ref, rtol=1e-10, atol=1e-12), (k, (u - ref).abs().max())


def test_finite_termination_on_a_linear_map():
    """Gay (1979): Broyden's good method solves an n-dimensional linear system in at most 2n steps."""
    A, c = affine(n=8, rho=0.99, seed=1)
    exact = torch.linalg.solve(torch.eye(8, dtype=D) - A, c)
    u, info = hp.GKMSolver(lambda u, c: A @ u + c, max_steps=100, tol=1e-12, check_every=1,
                           acceleration=hp.Broyden(40)).solve(torch.zeros(8, dtype=D), c)
    assert info.converged and info.steps <= 2 * 8 + 2, info.steps  # plain KM: ln(1e12)/0.01 ≈ 2800 steps
    assert torch.allclose(u, exact, rtol=1e-10)


def test_tanh_equilibrium_steps_and_fixed_point():
    A, x = tanh_eq()
    ref = newton(A, x)
    u_p, plain = hp.GKMSolver(lambda u, x: torch.tanh(A @ u + x), max_steps=100000, tol=1e-9).solve(
        torch.zeros(100, dtype=D), x)
    u, info = hp.GKMSolver(lambda u, x: torch.tanh(A @ u + x), max_steps=100000, tol=1e-9,
                           acceleration=hp.Broyden()).solve(torch.zeros(100, dtype=D), x)
    assert info.converged and float((u - ref).norm() / ref.norm()) < 1e-6
    assert info.steps <= 0.2 * plain.steps, (info.steps, plain.steps)  # measured 130 / 1070


@pytest.mark.parametrize("mode", ["implicit", "inexact", "first_order"])
def test_hypergradient_with_a_broyden_forward(mode):
    A, x0 = tanh_eq()
    ref = newton(A, x0)
    D_ = 1 - torch.tanh(A @ ref + x0) ** 2
    exact = torch.linalg.solve(torch.eye(100, dtype=D) - D_[:, None] * A, torch.diag(D_)).T @ ref  # F = ½‖u*‖²
    opts = {"eps": 1e-10, "constants": None} if mode == "inexact" else {"tol": 1e-12}
    x = x0.clone().requires_grad_(True)
    solver = hp.GKMSolver(lambda u, x: torch.tanh(A @ u + x), max_steps=100000, hypergrad=mode,
                          acceleration=hp.Broyden(), **opts)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", hp.ConvergenceWarning)
        u = solver(torch.zeros(100, dtype=D), x)
    (0.5 * (u**2).sum()).backward()
    # first_order drops the (I - ∂T)⁻¹ term: only its agreement with the dense formula's first factor
    if mode == "first_order":
        assert torch.allclose(x.grad, D_ * ref, rtol=1e-6)
    else:
        assert float((x.grad - exact).norm() / exact.norm()) < 1e-7


def test_memory_full_clears_it():
    A, c = affine(n=6)
    acc = hp.Broyden(3)
    u = torch.zeros(6, dtype=D)
    st = acc.init(u, 0)
    rows = []
    for _ in range(6):
        f = A @ u + c - u
        u = acc.step(st, u, f, f.norm(), 1.0)
        rows.append(int((abs(st.A).sum(-1) > 0).sum()))
    assert rows == [0, 1, 2, 3, 1, 2]  # three updates, then a restart from M_0 with the newest pair


@pytest.mark.parametrize("path", ["host", "numpy", "masked"])
def test_a_degenerate_update_restarts_with_the_km_step(path):
    """s ⊥ y makes sᵀM₀y = β sᵀy = 0: the update is undefined, the memory stays empty and the step is KM."""
    acc = hp.Broyden(5)
    acc._host_decisions, acc._compiled = path != "masked", path != "numpy"
    u0 = torch.zeros(3, dtype=D)
    f0 = torch.tensor([1.0, 0.0, 0.0], dtype=D)
    st = acc.init(u0, 0)
    u1 = acc.step(st, u0, f0, f0.norm(), 0.5)
    f1 = f0 + torch.tensor([0.0, 1.0, 0.0], dtype=D)  # y = e₂ ⊥ s = 0.5 e₁
    u2 = acc.step(st, u1, f1, f1.norm(), 0.5)
    assert torch.allclose(u2, u1 + 0.5 * f1)
    assert int(torch.as_tensor(st.restarts).max()) == 1 and float(abs(torch.as_tensor(st.A)).sum()) == 0.0


@pytest.mark.parametrize("path", ["host", "numpy", "masked"])
def test_a_degenerate_update_restarts_that_sample_only(path):
    """Per sample: sample 0 gets the degenerate pair (s ⊥ y), sample 1 a generic one."""
    acc = hp.Broyden(5)
    acc._host_decisions, acc._compiled = path != "masked", path != "numpy"
    u0 = torch.zeros(2, 3, dtype=D)
    f0 = torch.tensor([[1.0, 0.0, 0.0], [1.0, 2.0, -1.0]], dtype=D)
    st = acc.init(u0, 1)
    u1 = acc.step(st, u0, f0, f0.norm(dim=1), 0.5)
    f1 = f0 + torch.tensor([[0.0, 1.0, 0.0], [-0.3, -0.5, 0.2]], dtype=D)
    u2 = acc.step(st, u1, f1, f1.norm(dim=1), 0.5)
    assert torch.allclose(u2[0], u1[0] + 0.5 * f1[0])  # restart: the KM step
    assert not torch.allclose(u2[1], u1[1] + 0.5 * f1[1])  # the generic sample is updated
    assert [int(v) for v in torch.as_tensor(st.restarts)] == [1, 0]
    A = torch.as_tensor(st.A)
    assert float(A[0].abs().sum()) == 0.0 and float(A[1].abs().sum()) > 0


@pytest.mark.parametrize("path", ["host", "numpy", "masked"])
def test_safeguard_on_one_problem(path):
    acc = hp.Broyden(5, safeguard=2.0)
    acc._host_decisions, acc._compiled = path != "masked", path != "numpy"
    a = torch.tensor([0.5, 0.6, 0.7, 0.8, 0.9], dtype=D)
    c = torch.tensor([1.0, -2.0, 0.5, 3.0, -1.0], dtype=D)
    u = torch.zeros(5, dtype=D)
    st = acc.init(u, 0)
    for _ in range(3):
        f = a * u + c - u
        last = (u, f)
        u = acc.step(st, u, f, f.norm(), 0.7)
    bad = torch.full((5,), 100 * float(last[1].norm()), dtype=D)
    out = acc.step(st, u, bad, bad.norm(), 0.7)
    assert torch.allclose(out, last[0] + 0.7 * last[1], rtol=0, atol=1e-15)
    assert int(torch.as_tensor(st.restarts).max()) == 1 and float(abs(torch.as_tensor(st.A)).sum()) == 0.0


def test_nan_raises_a_divergence_error_naming_the_step():
    def T(u, x):
        return torch.where(u.abs().sum() > 1.0, torch.full_like(u, math.nan), 0.9 * u + x)

    with pytest.raises(hp.DivergenceError, match="non-finite"):
        hp.GKMSolver(T, acceleration=hp.Broyden()).solve(torch.zeros(3, dtype=D), torch.ones(3, dtype=D))


@pytest.mark.parametrize(
    "kwargs", [dict(history_size=0), dict(history_size=2.5), dict(history_size=True), dict(mixing=0.0),
               dict(mixing=1.5), dict(restart_cond=1.0), dict(safeguard=0.5)]
)
def test_bad_arguments(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        hp.Broyden(**kwargs)


@pytest.mark.parametrize("mode", ["unrolled", "truncated"])
def test_refused_with_differentiated_iterations_and_aggregation(mode):
    with pytest.raises(hp.ConfigurationError, match=r"Broyden\(\.\.\.\).*hypergrad"):
        hp.GKMSolver(lambda u, x: 0.5 * u + x, hypergrad=mode, acceleration=hp.Broyden())
    with pytest.raises(hp.ConfigurationError, match="aggregation"):
        hp.GKMSolver(lambda u, x: 0.5 * u + x, upper=lambda u, x: (u**2).sum(), acceleration=hp.Broyden())


def test_betty_config_takes_broyden():
    hb = pytest.importorskip("hodl_plugin.betty")
    assert isinstance(hb.HODLConfig(acceleration=hp.Broyden(10)).acceleration, hp.Broyden)


def test_a_divergence_of_the_accelerated_iterates_says_so():
    """Broyden(1) (one rank-one update, renewed at every step) drifts away on this contraction (‖A‖₂ = 0.99)
    by steps the safeguard accepts; the DivergenceError says the accelerated iterates diverged and how to
    tell (it blamed T only), and the plain iteration converges to the closed form."""
    A = torch.tensor([[0.77417048706371827, -0.51587808646081157, -0.11640006190325691],
                      [0.22402113444223118, 0.70356761698535675, -0.45171940483016354],
                      [-0.00890701861828208, -0.15132986191471301, -0.00777320136819323]], dtype=D)
    b = torch.tensor([-0.69143938018429452, 0.26287687491884698, 1.30356991026887115], dtype=D)
    T = lambda u, A, b: A @ u + b  # noqa: E731
    with pytest.raises(hp.DivergenceError, match=r"acceleration=Broyden\(\.\.\.\).*acceleration=None"):
        hp.GKMSolver(T, tol=1e-10, acceleration=hp.Broyden(1), max_steps=5000)(torch.zeros(3, dtype=D), A, b)
    u = hp.GKMSolver(T, tol=1e-12, max_steps=5000)(torch.zeros(3, dtype=D), A, b)
    assert torch.allclose(u, torch.linalg.solve(torch.eye(3, dtype=D) - A, b), rtol=1e-9)


def test_an_overflow_at_an_extrapolated_point_names_the_acceleration():
    """float32 with |u*| ~ 4e37 (9× below the largest float32): a Broyden step overshoots and T overflows at
    the extrapolated point. The DivergenceError blamed T alone ('check it, e.g. a log or a division'); it
    now says the point was the accelerator's and how to tell (the plain iteration converges here)."""
    g = torch.Generator().manual_seed(1)
    Q, _ = torch.linalg.qr(torch.randn(4, 8, 8, generator=g, dtype=torch.float64))
    c0 = torch.randn(4, 8, generator=g, dtype=torch.float64)
    W, c = (0.9 * Q[[1]]).float(), (c0[[1]] * 1e37).float()
    T = lambda u: torch.einsum("bij,bj->bi", W, u) + c  # noqa: E731
    try:
        u, info = hp.GKMSolver(T, batch_dims=1, acceleration=hp.Broyden(10)).solve(torch.zeros(1, 8))
    except hp.DivergenceError as e:
        assert "acceleration=None" in str(e)
    else:  # (no overflow on this machine: the result must then be right)
        ref = torch.linalg.solve(torch.eye(8, dtype=torch.float64) - W.double()[0], c.double()[0])
        assert info.converged and float((u.double()[0] - ref).norm() / ref.norm()) < 1e-4
    u, info = hp.GKMSolver(T, batch_dims=1).solve(torch.zeros(1, 8))
    assert info.converged
