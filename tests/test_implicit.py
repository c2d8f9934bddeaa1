"""The implicit fixed point as an autograd primitive (:mod:`hodl_plugin.implicit`, :ref:`math-implicit`):
every autograd entry point (reverse, double backward, torch.func, forward-mode dual numbers, vmap) gives
the derivative of u*(x). References: closed forms on T(u; x) = u − s(Qu − Bx) (Q SPD or nonsymmetric),
gradcheck / gradgradcheck and central differences on a nonsymmetric tanh equilibrium, unrolled limits.
"""

from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from _assertions import assert_right_or_named, zeros
from _oracles import DT, make_linear, reference, rel_err, small_linear
from torch.autograd import gradcheck, gradgradcheck

import hodl_plugin as hp

MODES = {"implicit": {}, "inexact": {"eps": 1e-13, "delta": 1e-13}}


@pytest.fixture(params=[True, False], ids=["spd", "nonsym"])
def problem(request):
    Q, B, y, s = small_linear(sym=request.param)
    if not request.param:  # a contraction: ||I - sQ|| < 1 needs s small for the nonsymmetric Q
        s = 0.3
        assert float(torch.linalg.matrix_norm(torch.eye(5, dtype=DT) - s * Q, 2)) < 1
    return Q, B, y, s


def solver_for(mode, Q, B, s):
    return hp.GKMSolver(lambda u, x: u - s * (Q @ u - B @ x), max_steps=100000, tol=1e-13,
                        hypergrad=mode, **MODES[mode])


@pytest.mark.parametrize("mode", list(MODES))
def test_every_entry_point_matches_the_closed_form(mode, problem):
    Q, B, y, s = problem
    solver = solver_for(mode, Q, B, s)
    Qi_B = torch.linalg.solve(Q, B)

    def u_of(x):
        return solver(torch.zeros(5, dtype=DT), x)

    def f(x):
        return 0.5 * ((u_of(x) - y) ** 2).sum()

    x = torch.tensor([0.3, -0.7, 1.1], dtype=DT)
    grad_ref = Qi_B.T @ (Qi_B @ x - y)
    hess_ref = Qi_B.T @ Qi_B
    close = dict(rtol=1e-8, atol=1e-10)
    # reverse mode, first and second order
    xr = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(f(xr), xr, create_graph=True)
    torch.testing.assert_close(g, grad_ref, **close)
    H = torch.stack([torch.autograd.grad(g[i], xr, retain_graph=True)[0] for i in range(3)])
    torch.testing.assert_close(H, hess_ref, **close)
    # torch.func
    torch.testing.assert_close(torch.func.grad(f)(x), grad_ref, **close)
    torch.testing.assert_close(torch.func.jacrev(u_of)(x), Qi_B, **close)
    torch.testing.assert_close(torch.func.jacfwd(u_of)(x), Qi_B, **close)
    torch.testing.assert_close(torch.func.hessian(f)(x), hess_ref, **close)
    # reverse over forward: differentiates the non-transposed solve of the tangent
    torch.testing.assert_close(torch.func.jacrev(torch.func.jacfwd(f))(x), hess_ref, **close)
    # forward-mode dual numbers
    xdot = torch.tensor([1.0, 2.0, -1.0], dtype=DT)
    with fwAD.dual_level():
        t = fwAD.unpack_dual(u_of(fwAD.make_dual(x, xdot))).tangent
    torch.testing.assert_close(t, Qi_B @ xdot, **close)
    # vmap over x: per-sample solutions and per-sample hypergradients
    xs = torch.randn(4, 3, dtype=DT, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(torch.func.vmap(u_of)(xs), xs @ Qi_B.T, **close)
    torch.testing.assert_close(torch.func.vmap(torch.func.grad(f))(xs), (xs @ Qi_B.T - y) @ Qi_B, **close)


@pytest.mark.parametrize("mode", list(MODES))
def test_gradcheck_and_gradgradcheck_on_a_nonsymmetric_tanh_equilibrium(mode):
    g = torch.Generator().manual_seed(1)
    W = torch.randn(4, 4, generator=g, dtype=DT)
    W = 0.6 * W / torch.linalg.matrix_norm(W, 2)  # a contraction, ∂T/∂u nonsymmetric
    Bm = torch.randn(4, 2, generator=g, dtype=DT)
    solver = hp.GKMSolver(lambda u, x, b: torch.tanh(W @ u + Bm @ x + b), max_steps=100000, tol=1e-14,
                          hypergrad=mode, **MODES[mode])
    x = torch.randn(2, generator=g, dtype=DT, requires_grad=True)
    b = torch.randn(4, generator=g, dtype=DT, requires_grad=True)
    fn = lambda x, b: solver(torch.zeros(4, dtype=DT), x, b)  # noqa: E731
    assert gradcheck(fn, (x, b))
    assert gradgradcheck(fn, (x, b))


@pytest.mark.parametrize("mode", list(MODES))
def test_reverse_over_forward_on_a_nonlinear_equilibrium_matches_finite_differences(mode):
    """jacrev(jacfwd(f)) differentiates the non-transposed solve of the tangent; with a nonlinear T its
    pairing term ∇⟨y, ∂_uT x⟩ is not zero. Reference: central differences of the (gradcheck-ed) gradient."""
    g = torch.Generator().manual_seed(2)
    W = torch.randn(4, 4, generator=g, dtype=DT)
    W = 0.6 * W / torch.linalg.matrix_norm(W, 2)
    Bm = torch.randn(4, 3, generator=g, dtype=DT)
    y = torch.randn(4, generator=g, dtype=DT)
    solver = hp.GKMSolver(lambda u, x: torch.tanh(W @ u + Bm @ x), max_steps=100000, tol=1e-14,
                          hypergrad=mode, **MODES[mode])
    f = lambda x: 0.5 * ((solver(torch.zeros(4, dtype=DT), x) - y) ** 2).sum()  # noqa: E731
    x = torch.randn(3, generator=g, dtype=DT)
    h = 1e-5
    grad = torch.func.grad(f)
    fd = torch.stack([(grad(x + h * e) - grad(x - h * e)) / (2 * h) for e in torch.eye(3, dtype=DT)])
    torch.testing.assert_close(torch.func.jacrev(torch.func.jacfwd(f))(x), fd, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(torch.func.hessian(f)(x), fd, rtol=1e-6, atol=1e-8)


def tanh_problem(n=8, m=3, seed=0, norm=0.7):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(n, n, generator=g, dtype=DT)
    W = norm * W / torch.linalg.matrix_norm(W, 2)
    U = torch.randn(n, m, generator=g, dtype=DT)
    y = torch.randn(n, generator=g, dtype=DT)
    return W, U, y


def test_implicit_matches_unrolled_to_convergence():
    W, U, y = tanh_problem()
    T = lambda u, x, b: torch.tanh(W @ u + U @ x + b)  # noqa: E731
    grads = {}
    for mode in ("implicit", "unrolled"):
        x = torch.tensor([0.5, -0.3, 1.2], dtype=DT, requires_grad=True)
        b = torch.full((8,), 0.1, dtype=DT, requires_grad=True)
        solver = hp.GKMSolver(T, max_steps=500, tol=1e-14, hypergrad=mode)
        u = solver(torch.zeros(8, dtype=DT), x, b)
        (((u - y) ** 2).sum() + (u**3).sum()).backward()
        grads[mode] = (x.grad, b.grad)
        assert solver.info.converged
    for a, c in zip(grads["implicit"], grads["unrolled"]):
        assert rel_err(a, c) < 1e-9


def test_gradcheck_implicit_and_unrolled():
    W, U, y = tanh_problem(n=6, seed=3)
    T = lambda u, x: torch.tanh(W[:6, :6] @ u + U[:6] @ x)  # noqa: E731
    for mode in ("implicit", "unrolled"):
        solver = hp.GKMSolver(T, max_steps=500, tol=1e-15, hypergrad=mode, check_every=1)

        def f(x, solver=solver):
            u = solver(torch.zeros(6, dtype=DT), x)
            return ((u - y[:6]) ** 2).sum().reshape(1)

        x = torch.tensor([0.4, -0.2, 0.9], dtype=DT, requires_grad=True)
        assert torch.autograd.gradcheck(f, (x,), eps=1e-6, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("mode,solver", [("implicit", "cg"), ("implicit", "gmres"), ("implicit", "bicgstab"),
                                         ("implicit", "fixed_point"), ("inexact", "cg"), ("inexact", "gmres")])
def test_double_backward_hessian_with_every_adjoint_solver(mode, solver):
    p = make_linear("spd", seed=4)
    T = hp.GradientStep(grad=lambda u, x: p.Q @ u - p.B @ x, step=p.s)
    opts = dict(eps=1e-12, delta=1e-12) if mode == "inexact" else dict(tol=1e-12)
    sol = hp.GKMSolver(T, hypergrad=mode, solver=solver, max_steps=3000, **opts)

    def hess():
        x = p.x0.clone().requires_grad_(True)
        (gr,) = torch.autograd.grad(p.F(sol(zeros(p.n), x)), x, create_graph=True)
        return torch.stack([torch.autograd.grad(gr[i], x, retain_graph=True)[0] for i in range(x.numel())])

    assert_right_or_named(hess, reference(p, ("fixed",), p.x0).hess, 1e-7, what=f"{mode}/{solver}")


@pytest.mark.parametrize("kind", ["spd", "nonsym"])
def test_default_adjoint_accuracy_on_n60(kind):
    """Default implicit adjoint accuracy on a problem where GMRES/CG need many products (n = 60; on
    the n = 4 problems of the matrix Krylov solves are exact and an adjoint rtol of 1e-4 passes)."""
    p = make_linear(kind, n=60, m=4, seed=32, cond=10.0)
    solver = hp.GKMSolver(p.T, hypergrad="implicit", tol=1e-12, max_steps=20000)
    x = p.x0.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(p.F(solver(zeros(p.n), x)), x)
    assert rel_err(g, reference(p, ("fixed",), p.x0).grad) < 1e-8


def test_implicit_forward_keeps_no_graph_and_no_grad_returns_plain_tensor(quad):
    x = torch.ones(3, dtype=DT, requires_grad=True)
    solver = hp.GKMSolver(quad.T, max_steps=5000, tol=1e-12)
    with torch.no_grad():
        u = solver(torch.zeros(quad.n, dtype=DT), x)
    assert not u.requires_grad
    u = solver(torch.zeros(quad.n, dtype=DT), x)
    # one operator application is on the graph, whatever K: the graph is a single T evaluation
    assert u.grad_fn is not None and solver.info.steps > 50


@pytest.mark.parametrize("mode,kw", [("inexact", {}), ("implicit", {"on_fail": "warn"})])
def test_nan_upstream_gradient_is_never_a_zero_hypergradient(mode, kw):
    x = torch.ones(3, dtype=DT, requires_grad=True)
    u = hp.GKMSolver(lambda u, x: 0.5 * u + x, hypergrad=mode, **kw)(torch.zeros(3, dtype=DT), x)
    with pytest.warns(hp.ConvergenceWarning, match="NaN"):
        u.backward(torch.tensor([float("nan"), 1.0, 1.0], dtype=DT))
    assert torch.isnan(x.grad).all()
    x.grad = None
    u = hp.GKMSolver(lambda u, x: 0.5 * u + x)(torch.zeros(3, dtype=DT), x)
    with pytest.raises(hp.LinearSolveError, match="NaN"):
        u.backward(torch.tensor([float("nan"), 1.0, 1.0], dtype=DT))
    # the differentiable path (create_graph) too
    u = hp.GKMSolver(lambda u, x: 0.5 * u + x, hypergrad=mode, **kw)(torch.zeros(3, dtype=DT), x)
    with pytest.warns(hp.ConvergenceWarning, match="NaN"):
        (g,) = torch.autograd.grad(u, x, torch.tensor([float("nan"), 1.0, 1.0], dtype=DT), create_graph=True)
    assert torch.isnan(g).all()


def test_maid_quadratic_problem_hypergradient_and_optimum():
    """MAID's quadratic test problem (smaller): the implicit hypergradient and the optimum θ* in closed
    form, and L-BFGS driven by the hypergradient reaching θ*."""
    g = torch.Generator().manual_seed(29)
    n, m = 200, 10
    A1, A2, A3 = (torch.rand(n, m, generator=g, dtype=DT) for _ in range(3))
    x1, x2, th_e = (torch.rand(m, generator=g, dtype=DT) for _ in range(3))
    b1 = A1 @ x1 + 0.01 * torch.randn(n, generator=g, dtype=DT)
    b2 = A2 @ x2 + A3 @ th_e + 0.01 * torch.randn(n, generator=g, dtype=DT)
    H = A2.T @ A2
    s = 1.0 / torch.linalg.eigvalsh(H).max().item()
    T = hp.GradientStep(grad=lambda x, th: A2.T @ (A2 @ x + A3 @ th - b2), step=s)
    G = lambda x, th: 0.5 * ((A1 @ x - b1) ** 2).sum()  # noqa: E731
    c = torch.linalg.solve(H, A2.T @ b2)
    M = torch.linalg.solve(H, A2.T @ A3)
    A1M = A1 @ M
    theta_star = torch.linalg.solve(A1M.T @ A1M, A1M.T @ (A1 @ c - b1))
    theta = torch.zeros(m, dtype=DT, requires_grad=True)
    solver = hp.GKMSolver(T, max_steps=200000, tol=1e-11, hypergrad="implicit")
    u = solver(torch.zeros(m, dtype=DT), theta)
    G(u, theta).backward()
    exact = -A1M.T @ (A1 @ c - A1M @ theta.detach() - b1)
    assert rel_err(theta.grad, exact) < 1e-8
    # the hypergradient vanishes at θ* (closed form) ...
    th = theta_star.clone().requires_grad_(True)
    G(solver(c - M @ theta_star, th), th).backward()
    assert float(th.grad.norm()) < 1e-7 * float(exact.norm())
    # ... and L-BFGS driven by the implicit hypergradient reaches θ*
    opt = torch.optim.LBFGS([theta], lr=1.0, max_iter=200, tolerance_grad=1e-12,
                            tolerance_change=0, history_size=20, line_search_fn="strong_wolfe")
    warm = [torch.zeros(m, dtype=DT)]

    def closure():
        opt.zero_grad()
        u = solver(warm[0], theta)
        warm[0] = u.detach()
        loss = G(u, theta)
        loss.backward()
        return loss

    opt.step(closure)
    assert rel_err(theta.detach(), theta_star) < 1e-5


def test_forward_over_forward_is_refused_by_name_and_every_other_order_is_exact():
    """jacfwd(jacfwd(f)) through the primitive gave a silently wrong second derivative (torch's forward
    rules of custom Functions do not see the outer tangents): now a named error; the other compositions
    (hessian = jacfwd∘jacrev, jacrev∘jacfwd, jacrev∘jacrev, third orders with one forward level) are
    exact against the unrolled iteration."""
    W = torch.tensor([[0.3, -0.2], [0.1, 0.4]], dtype=DT)
    x = torch.tensor([0.5, -1.0], dtype=DT)

    def f_of(mode):
        s = hp.GKMSolver(lambda u, c: torch.tanh(c * W @ u + x), max_steps=500, tol=1e-14, hypergrad=mode)
        return lambda c: (s(torch.zeros(2, dtype=DT), c) ** 3).sum()

    c = torch.tensor(1.2, dtype=DT)
    J, R, G = torch.func.jacfwd, torch.func.jacrev, torch.func.grad
    for comb in (lambda f: R(R(f)), lambda f: J(R(f)), lambda f: R(J(f)), lambda f: J(R(G(f))),
                 lambda f: R(R(G(f)))):
        assert float((comb(f_of("implicit"))(c) - comb(f_of("unrolled"))(c)).abs().max()) < 1e-10
    for comb in (lambda f: J(J(f)), lambda f: J(J(R(f)))):
        with pytest.raises(hp.HODLError, match="forward-over-forward"):
            comb(f_of("implicit"))(c)


@pytest.mark.parametrize("mode", ["implicit", "inexact"])
@pytest.mark.parametrize("solver", ["gmres", "fixed_point", "bicgstab", "anderson"])
@pytest.mark.parametrize("scale", [1e-9, 1e-170, 1e160])
def test_each_sample_of_a_batch_gets_its_own_adjoint_accuracy(mode, solver, scale):
    """batch_dims=1: u*_i = (I - A_i)⁻¹x_i, so ∇_{x_i}⟨v, u*⟩ = (I - A_i)⁻ᵀv_i. Sample 0's cotangent is `scale`
    times sample 1's: one threshold for the batch left sample 1 at a 15 % error (1e-9, GMRES), and beyond 1e±154 the
    squared norm of the cotangent under- or overflowed (gradients exactly 0, 'converged' after 0 products)."""
    g = torch.Generator().manual_seed(0)
    n, B = 3, 2
    A = torch.randn(B, n, n, dtype=DT, generator=g)
    A = 0.6 * A / torch.linalg.matrix_norm(A, 2)[:, None, None]
    x = torch.randn(B, n, dtype=DT, generator=g).requires_grad_(True)
    v = torch.randn(B, n, dtype=DT, generator=g) * torch.tensor([[scale], [1.0]], dtype=DT)
    method = hp.Inexact(1e-12, 1e-12, solver=solver) if mode == "inexact" else hp.Implicit(solver, adjoint_rtol=1e-12)
    s = hp.GKMSolver(lambda u, A, x: (A @ u.unsqueeze(-1)).squeeze(-1) + x, batch_dims=1, tol=1e-13,
                     hypergrad=method)
    s(torch.zeros(B, n, dtype=DT), A, x).backward(v)
    ref = torch.linalg.solve((torch.eye(n, dtype=DT) - A).transpose(-1, -2), v / v.abs().amax(1, keepdim=True))
    got = x.grad / v.abs().amax(1, keepdim=True)  # per sample, at scale 1
    # (bicgstab and anderson have no per-sample mode: they solve the batch jointly, each sample's right-hand
    # side scaled to unit size, so each gets about adjoint_rtol·√B)
    assert float(((got - ref).norm(dim=1) / ref.norm(dim=1)).max()) < 1e-9
    assert s.info.adjoint.converged
    if solver in ("gmres", "fixed_point"):
        assert s.info.adjoint.iterations_per_sample.shape == (B,)


@pytest.mark.parametrize("solver", ["gmres", "fixed_point"])
def test_a_batch_adjoint_that_fails_names_the_sample(solver):
    """Sample 1 has ∂T/∂u = diag(1, 0.5): I - ∂T/∂u is singular and its adjoint has no solution; the error says
    which sample (it gave the batch's worst residual only)."""
    A = torch.stack([torch.diag(torch.tensor([0.5, 0.3], dtype=DT)), torch.diag(torch.tensor([1.0, 0.5], dtype=DT))])
    x = torch.tensor([[1.0, 1.0], [0.0, 1.0]], dtype=DT, requires_grad=True)  # sample 1: Fix T = {(t, 2)}
    s = hp.GKMSolver(lambda u, A, x: (A @ u.unsqueeze(-1)).squeeze(-1) + x, batch_dims=1,
                     hypergrad=hp.Implicit(solver, adjoint_maxiter=200))
    u = s(torch.zeros(2, 2, dtype=DT), A, x)
    with pytest.raises(hp.LinearSolveError, match=r"not solved for 1 of 2 samples, e\.g\. \[1\]"):
        u.backward(torch.ones(2, 2, dtype=DT))


@pytest.mark.parametrize("mode", ["implicit", "inexact", "fd", "custom_fixed_point", "unrolled"])
def test_legacy_vectorized_reverse_mode_is_exact_or_named(mode):
    """torch's legacy vmap (jacobian(vectorize=True), autograd.grad(is_grads_batched=True)) cannot run a
    backward that solves with host-side stopping: the exact Jacobian (2I for u* = 2x), or a named error
    pointing at torch.func; never torch's raw batching-rule error."""
    T = lambda u, x: 0.5 * u + x  # noqa: E731
    if mode == "custom_fixed_point":
        solve = hp.custom_fixed_point(T)(lambda u0, x: 2 * x.detach())
        f = lambda x: solve(torch.zeros(3, dtype=DT), x)  # noqa: E731
    else:
        kw = {"tol": 0, "max_steps": 80} if mode in ("unrolled", "fd") else {"tol": 1e-13}
        if mode == "fd":
            T = hp.GradientStep(objective=lambda u, x: 0.5 * ((u - 2 * x) ** 2).sum(), step=0.25)
        solver = hp.GKMSolver(T, hypergrad=mode, **kw)
        f = lambda x: solver(torch.zeros(3, dtype=DT), x)  # noqa: E731
    x = torch.tensor([1.0, -2.0, 3.0], dtype=DT)
    xr = x.clone().requires_grad_(True)
    calls = [lambda: torch.autograd.functional.jacobian(f, x, vectorize=True),
             lambda: torch.autograd.grad(f(xr), xr, torch.eye(3, dtype=DT), is_grads_batched=True)[0]]
    for call in calls:
        if mode == "unrolled":
            assert torch.allclose(call(), 2 * torch.eye(3, dtype=DT), atol=1e-12)
        else:
            with pytest.raises(hp.HODLError, match="legacy vectorized reverse mode.*torch.func.jacrev"):
                call()


@pytest.mark.parametrize("transpose", [True, False])
@pytest.mark.parametrize("entry", ["dual", "func.jvp"])
def test_linear_solve_forward_mode_in_both_orientations(transpose, entry):
    """``LinearSolve`` with T(u; θ) = θu: x = b / (1 - θ), dx/dθ = b / (1 - θ)² = 4 at θ = 1/2, b = 1 — with
    forward-mode dual numbers and torch.func.jvp, for A and for Aᵀ."""
    from hodl_plugin.implicit import FixedPointProblem, LinearSolve

    problem = FixedPointProblem(lambda u, ts: ts[0] * u, lambda *a: None, hp.linear_solve.gmres(rtol=1e-13))
    b, u = torch.ones(2, dtype=DT), torch.zeros(2, dtype=DT)
    theta, one = torch.tensor(0.5, dtype=DT), torch.ones((), dtype=DT)

    def solve(th):
        return LinearSolve.apply(problem, transpose, "higher", b, u, th)

    if entry == "dual":
        with fwAD.dual_level():
            tangent = fwAD.unpack_dual(solve(fwAD.make_dual(theta, one))).tangent
    else:
        tangent = torch.func.jvp(solve, (theta,), (one,))[1]
    assert torch.allclose(tangent, torch.full((2,), 4.0, dtype=DT), rtol=1e-11)
