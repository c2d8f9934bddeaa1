"""The implicit solve as a PyTorch primitive (issue 12) and the silent-wrong cases of issue 11 that
live in the hypergradient methods. References: closed forms on T(u; x) = u - s(Qu - Bx), finite
differences (gradcheck / gradgradcheck) on a nonsymmetric tanh equilibrium, unrolled limits."""

from __future__ import annotations

import io
import warnings

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch.autograd import gradcheck, gradgradcheck

import hodl_plugin as hp
from conftest import nonsingleton

D = torch.float64
MODES = {"implicit": {}, "inexact": {"eps": 1e-13, "delta": 1e-13}}


def quad(n=5, m=3, seed=0, sym=True):
    g = torch.Generator().manual_seed(seed)
    M = torch.randn(n, n, generator=g, dtype=D)
    Q = M @ M.T / n + torch.eye(n, dtype=D) if sym else torch.eye(n, dtype=D) + 0.3 * M / n**0.5
    B = torch.randn(n, m, generator=g, dtype=D)
    y = torch.randn(n, generator=g, dtype=D)
    s = 0.9 / float(torch.linalg.matrix_norm(Q, 2))
    return Q, B, y, s


@pytest.fixture(params=[True, False], ids=["spd", "nonsym"])
def problem(request):
    Q, B, y, s = quad(sym=request.param)
    if not request.param:  # a contraction: ||I - sQ|| < 1 needs s small for the nonsymmetric Q
        s = 0.3
        assert float(torch.linalg.matrix_norm(torch.eye(5, dtype=D) - s * Q, 2)) < 1
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
        return solver(torch.zeros(5, dtype=D), x)

    def f(x):
        return 0.5 * ((u_of(x) - y) ** 2).sum()

    x = torch.tensor([0.3, -0.7, 1.1], dtype=D)
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
    xdot = torch.tensor([1.0, 2.0, -1.0], dtype=D)
    with fwAD.dual_level():
        t = fwAD.unpack_dual(u_of(fwAD.make_dual(x, xdot))).tangent
    torch.testing.assert_close(t, Qi_B @ xdot, **close)
    # vmap over x: per-sample solutions and per-sample hypergradients
    xs = torch.randn(4, 3, dtype=D, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(torch.func.vmap(u_of)(xs), xs @ Qi_B.T, **close)
    torch.testing.assert_close(torch.func.vmap(torch.func.grad(f))(xs), (xs @ Qi_B.T - y) @ Qi_B, **close)


@pytest.mark.parametrize("mode", list(MODES))
def test_gradcheck_and_gradgradcheck_on_a_nonsymmetric_tanh_equilibrium(mode):
    g = torch.Generator().manual_seed(1)
    W = torch.randn(4, 4, generator=g, dtype=D)
    W = 0.6 * W / torch.linalg.matrix_norm(W, 2)  # a contraction, ∂T/∂u nonsymmetric
    Bm = torch.randn(4, 2, generator=g, dtype=D)
    solver = hp.GKMSolver(lambda u, x, b: torch.tanh(W @ u + Bm @ x + b), max_steps=100000, tol=1e-14,
                          hypergrad=mode, **MODES[mode])
    x = torch.randn(2, generator=g, dtype=D, requires_grad=True)
    b = torch.randn(4, generator=g, dtype=D, requires_grad=True)
    fn = lambda x, b: solver(torch.zeros(4, dtype=D), x, b)  # noqa: E731
    assert gradcheck(fn, (x, b))
    assert gradgradcheck(fn, (x, b))


def test_truncated_differentiates_exactly_k_steps_when_k_exceeds_check_every():
    x = torch.ones(1, dtype=D, requires_grad=True)
    hp.GKMSolver(lambda u, x: 0.9 * u + x, hypergrad="truncated", steps=50)(torch.zeros(1, dtype=D), x).backward()
    assert float(x.grad) == pytest.approx(sum(0.9**i for i in range(50)), rel=1e-12)  # 9.948, not 6.513


@pytest.mark.parametrize("mode", list(MODES))
def test_selection_with_x_only_in_the_upper_objective_raises(mode):
    """SPEC T5: Fix T = {Au = b}, F = ½||u - x||²: du_sel/dx is the projector, which implicit
    differentiation of u = T(u) cannot see. It must raise, not return du/dx = 0."""
    A, b, s, z, proj = nonsingleton()
    solver = hp.GKMSolver(lambda u, x: u - s * A.T @ (A @ u - b), max_steps=2000, tol=0.0,
                          upper=lambda u, x: 0.5 * ((u - x) ** 2).sum(), hypergrad=mode)
    x = z.clone().requires_grad_(True)
    u = solver(torch.zeros(12, dtype=D), x)
    assert u.requires_grad
    with pytest.raises(hp.LinearSolveError, match="not a singleton"):
        (0.5 * (u**2).sum()).backward()


def test_consistent_singular_adjoint_returns_the_derivative_of_the_plain_iterations_limit():
    """Without aggregation, a consistent singular adjoint system (CG) gives the minimum-norm solution,
    which for an affine T is the derivative of x -> lim_k u_k(x; u0): compare with unrolled."""
    A, b, s, z, proj = nonsingleton()
    Bx = torch.randn(A.shape[0], 2, dtype=D, generator=torch.Generator().manual_seed(0))
    T = lambda u, x: u - s * A.T @ (A @ u - b - Bx @ x)  # noqa: E731
    x0 = torch.tensor([0.2, -0.4], dtype=D)
    u0 = torch.randn(12, dtype=D, generator=torch.Generator().manual_seed(1))
    grads = {}
    for mode, kw in [("implicit", {"solver": "cg"}), ("unrolled", {})]:
        x = x0.clone().requires_grad_(True)
        u = hp.GKMSolver(T, max_steps=3000, tol=0.0, hypergrad=mode, **kw)(u0, x)
        (0.5 * ((A @ (u - z)) ** 2).sum()).backward()  # ∇_u = Aᵀ(...) lies in the range: consistent
        grads[mode] = x.grad
    torch.testing.assert_close(grads["implicit"], grads["unrolled"], rtol=1e-7, atol=1e-9)
    with pytest.raises(hp.LinearSolveError, match="not a singleton"):
        x = x0.clone().requires_grad_(True)
        u = hp.GKMSolver(T, max_steps=3000, tol=0.0, solver="cg", check_unique=True)(u0, x)
        (0.5 * ((A @ (u - z)) ** 2).sum()).backward()


def test_cg_on_a_nonsymmetric_jacobian_is_detected():
    W = torch.tensor([[0.0, 0.5], [-0.5, 0.0]], dtype=D)
    x = torch.ones(2, dtype=D, requires_grad=True)
    u = hp.GKMSolver(lambda u, x: W @ u + x, solver="cg", tol=1e-12)(torch.zeros(2, dtype=D), x)
    with pytest.raises(hp.LinearSolveError, match="symmetric"):
        u.sum().backward()


@pytest.mark.parametrize("mode,kw", [("inexact", {}), ("implicit", {"on_fail": "warn"})])
def test_nan_upstream_gradient_is_never_a_zero_hypergradient(mode, kw):
    x = torch.ones(3, dtype=D, requires_grad=True)
    u = hp.GKMSolver(lambda u, x: 0.5 * u + x, hypergrad=mode, **kw)(torch.zeros(3, dtype=D), x)
    with pytest.warns(hp.ConvergenceWarning, match="NaN"):
        u.backward(torch.tensor([float("nan"), 1.0, 1.0], dtype=D))
    assert torch.isnan(x.grad).all()
    x.grad = None
    u = hp.GKMSolver(lambda u, x: 0.5 * u + x)(torch.zeros(3, dtype=D), x)
    with pytest.raises(hp.LinearSolveError, match="NaN"):
        u.backward(torch.tensor([float("nan"), 1.0, 1.0], dtype=D))
    # the differentiable path (create_graph) too
    u = hp.GKMSolver(lambda u, x: 0.5 * u + x, hypergrad=mode, **kw)(torch.zeros(3, dtype=D), x)
    with pytest.warns(hp.ConvergenceWarning, match="NaN"):
        (g,) = torch.autograd.grad(u, x, torch.tensor([float("nan"), 1.0, 1.0], dtype=D), create_graph=True)
    assert torch.isnan(g).all()


def test_float32_defaults_reach_their_adjoint_tolerance():
    Q, B, y, s = quad(n=6, seed=2)
    Q = Q + 0 * torch.eye(6, dtype=D)
    ev = torch.linalg.eigvalsh(Q)
    Q = (Q - ev[0] * torch.eye(6, dtype=D)) + (ev[-1] - ev[0]) / 19 * torch.eye(6, dtype=D)  # cond 20
    Qf, Bf, yf = Q.float(), B.float(), y.float()
    s = 1.0 / float(torch.linalg.eigvalsh(Q)[-1])
    x = torch.tensor([0.5, -1.0, 0.25], requires_grad=True)
    u = hp.GKMSolver(lambda u, x: u - s * (Qf @ u - Bf @ x), max_steps=20000, tol=1e-6)(torch.zeros(6), x)
    (0.5 * ((u - yf) ** 2).sum()).backward()
    Qi_B = torch.linalg.solve(Q, B)
    ref = Qi_B.T @ (Qi_B @ x.detach().double() - y)
    torch.testing.assert_close(x.grad.double(), ref, rtol=1e-4, atol=1e-4)


def test_inexact_warm_start_keys_state_and_ownership():
    inexact = hp.Inexact(eps=1e-10)
    solver = hp.GKMSolver(lambda u, x: 0.5 * u + x, hypergrad=inexact)
    for _ in range(3):
        x = torch.ones(3, dtype=D, requires_grad=True)
        solver(torch.zeros(3, dtype=D), x, key=torch.tensor(7)).sum().backward()
    assert list(inexact.u_cache) == [7] and solver.info.warm_started  # a 0-d tensor key is its value
    with pytest.raises(TypeError, match="key"):
        solver(torch.zeros(3, dtype=D), x, key=torch.ones(2))
    with pytest.raises(ValueError, match="another GKMSolver"):
        hp.GKMSolver(lambda u, x: 0.5 * u + x, hypergrad=inexact)(torch.zeros(3, dtype=D), x)
    buf = io.BytesIO()
    torch.save(solver.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    fresh = hp.GKMSolver(lambda u, x: 0.5 * u + x, hypergrad="inexact", eps=1e-10)
    fresh.load_state_dict(state)
    assert fresh.method.k == 3 and torch.equal(fresh.method.u_cache[7], inexact.u_cache[7])
    with pytest.raises(ValueError, match="not the state of an Inexact"):
        fresh.load_state_dict(hp.GKMSolver(lambda u, x: 0.5 * u + x).state_dict())


def test_inexact_gradcheck_with_warm_started_adjoints():
    solver = hp.GKMSolver(lambda u, x: 0.5 * u + torch.sin(x), hypergrad="inexact", eps=1e-13, delta=1e-13)
    x = torch.randn(3, dtype=D, requires_grad=True)
    fn = lambda x: solver(torch.zeros(3, dtype=D), x, key=0)  # noqa: E731
    for _ in range(2):  # warm starts in play
        fn(x).sum().backward()
    assert gradcheck(fn, (x,))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"solver": "qr"}, "unknown linear solver"),
        ({"on_fail": "rasie"}, "on_fail"),
        ({"adjoint_maxiter": 2.5}, "adjoint_maxiter"),
    ],
)
@pytest.mark.parametrize("mode", ["implicit", "inexact"])
def test_method_options_are_validated_at_construction(mode, kwargs, match):
    with pytest.raises(ValueError, match=match):
        hp.GKMSolver(lambda u, x: 0.5 * u + x, hypergrad=mode, **kwargs)


def test_negative_adjoint_rtol_is_refused():
    with pytest.raises(ValueError, match="adjoint_rtol"):
        hp.Implicit(adjoint_rtol=-1)


def test_upper_objective_independent_of_u_is_named():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match="does not depend on u"):
            hp.GKMSolver(lambda u, x: 0.5 * u + x, upper=lambda u, x: (x**2).sum())(
                torch.zeros(2, dtype=D), torch.ones(2, dtype=D))


@pytest.mark.parametrize("mode", list(MODES))
def test_tensors_read_from_the_operators_closure(mode):
    """Tensors captured by T (as a Betty node's operator reads its parents) get the exact derivative
    at every order: first, second (double backward) and forward mode, against the closed forms."""
    Q, B, y, s = quad()
    theta = torch.tensor([0.3, -0.7, 1.1], dtype=D, requires_grad=True)
    solver = hp.GKMSolver(lambda u: u - s * (Q @ u - B @ theta), max_steps=100000, tol=1e-13,
                          hypergrad=mode, **MODES[mode])
    Qi_B = torch.linalg.solve(Q, B)
    (0.5 * ((solver(torch.zeros(5, dtype=D)) - y) ** 2).sum()).backward()
    torch.testing.assert_close(theta.grad, Qi_B.T @ (Qi_B @ theta.detach() - y), rtol=1e-8, atol=1e-10)
    loss = 0.5 * ((solver(torch.zeros(5, dtype=D)) - y) ** 2).sum()
    (g,) = torch.autograd.grad(loss, theta, create_graph=True)
    w = torch.tensor([1.0, -2.0, 0.5], dtype=D)
    (hv,) = torch.autograd.grad(g @ w, theta)
    torch.testing.assert_close(hv, Qi_B.T @ (Qi_B @ w), rtol=1e-8, atol=1e-10)
    with fwAD.dual_level():
        dual = fwAD.make_dual(theta.detach(), torch.ones(3, dtype=D))
        solver2 = hp.GKMSolver(lambda u: u - s * (Q @ u - B @ dual), tol=1e-12, hypergrad=mode, **MODES[mode])
        tangent = fwAD.unpack_dual(solver2(torch.zeros(5, dtype=D))).tangent
    torch.testing.assert_close(tangent, Qi_B @ torch.ones(3, dtype=D), rtol=1e-8, atol=1e-10)


def test_inexact_double_backward_is_reentrant_with_warm_starts():
    """gradgradcheck runs each backward twice and compares bit for bit: the adjoint's warm start must
    not change between passes through one call."""
    Q, B, y, s = quad()
    solver = hp.GKMSolver(lambda u, x: u - s * (Q @ u - B @ x), max_steps=100000, tol=1e-13,
                          hypergrad="inexact", eps=1e-12, delta=1e-12)
    x = torch.randn(3, dtype=D, requires_grad=True, generator=torch.Generator().manual_seed(4))
    fn = lambda x: solver(torch.zeros(5, dtype=D), x)  # noqa: E731
    torch.func.jacrev(fn)(x.detach())  # earlier calls leave adjoints of other upstream gradients cached
    assert gradcheck(fn, (x,))
    assert gradgradcheck(lambda x: fn(x) ** 2, (x,))


@pytest.mark.parametrize("mode", list(MODES))
def test_reverse_over_forward_on_a_nonlinear_equilibrium_matches_finite_differences(mode):
    """jacrev(jacfwd(f)) differentiates the non-transposed solve of the tangent; with a nonlinear T its
    pairing term ∇⟨y, ∂_uT x⟩ is not zero. Reference: central differences of the (gradcheck-ed) gradient."""
    g = torch.Generator().manual_seed(2)
    W = torch.randn(4, 4, generator=g, dtype=D)
    W = 0.6 * W / torch.linalg.matrix_norm(W, 2)
    Bm = torch.randn(4, 3, generator=g, dtype=D)
    y = torch.randn(4, generator=g, dtype=D)
    solver = hp.GKMSolver(lambda u, x: torch.tanh(W @ u + Bm @ x), max_steps=100000, tol=1e-14,
                          hypergrad=mode, **MODES[mode])
    f = lambda x: 0.5 * ((solver(torch.zeros(4, dtype=D), x) - y) ** 2).sum()  # noqa: E731
    x = torch.randn(3, generator=g, dtype=D)
    h = 1e-5
    grad = torch.func.grad(f)
    fd = torch.stack([(grad(x + h * e) - grad(x - h * e)) / (2 * h) for e in torch.eye(3, dtype=D)])
    torch.testing.assert_close(torch.func.jacrev(torch.func.jacfwd(f))(x), fd, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(torch.func.hessian(f)(x), fd, rtol=1e-6, atol=1e-8)
