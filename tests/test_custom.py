"""The implicit derivative of any solver (:mod:`hodl_plugin.custom`, :ref:`math-implicit`): a function decorated
with ``custom_fixed_point(T)`` or ``custom_root(G)`` is differentiated by the implicit function theorem at
every order and under torch.func, whatever solver computes its value. References: closed forms of linear
problems (u* = Q⁻¹Bx), and central differences of a nonlinear solver's own output (Newton on a logistic
ridge problem, solved to 1e-13)."""

from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from _oracles import DT, rel_err, small_linear

import hodl_plugin as hp


def _linear(sym: bool):
    """T(u; x) = u − s(Qu − Bx), its closed-form solver, and the references du*/dx = Q⁻¹B, ∇²f = (Q⁻¹B)ᵀQ⁻¹B
    for f = ½‖u*‖²."""
    Q, B, y, s = small_linear(sym=sym)
    if not sym:  # a contraction needs a smaller step for the nonsymmetric Q
        s = 0.3

    def T(u, x):
        return u - s * (Q @ u - B @ x)

    @hp.custom_fixed_point(T)
    def solve(u0, x):
        return torch.linalg.solve(Q, B @ x)  # a closed form: no iteration at all

    return T, solve, torch.linalg.solve(Q, B)


@pytest.mark.parametrize("sym", [True, False], ids=["spd", "nonsym"])
def test_fixed_point_of_a_closed_form_solver_every_entry_point(sym):
    _, solve, QiB = _linear(sym)
    x = torch.tensor([0.3, -0.7, 1.1], dtype=DT)
    u0 = torch.zeros(QiB.shape[0], dtype=DT)

    def f(x):
        return 0.5 * (solve(u0, x) ** 2).sum()

    close = dict(rtol=1e-8, atol=1e-10)
    xr = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(f(xr), xr, create_graph=True)
    torch.testing.assert_close(g, QiB.T @ (QiB @ x), **close)
    H = torch.stack([torch.autograd.grad(g[i], xr, retain_graph=True)[0] for i in range(3)])
    torch.testing.assert_close(H, QiB.T @ QiB, **close)
    torch.testing.assert_close(torch.func.jacrev(lambda x: solve(u0, x))(x), QiB, **close)
    torch.testing.assert_close(torch.func.jacfwd(lambda x: solve(u0, x))(x), QiB, **close)
    torch.testing.assert_close(torch.func.hessian(f)(x), QiB.T @ QiB, **close)
    xdot = torch.tensor([1.0, 2.0, -1.0], dtype=DT)
    with fwAD.dual_level():
        t = fwAD.unpack_dual(solve(u0, fwAD.make_dual(x, xdot))).tangent
    torch.testing.assert_close(t, QiB @ xdot, **close)
    xs = torch.randn(4, 3, dtype=DT, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(torch.func.vmap(torch.func.grad(f))(xs), xs @ (QiB.T @ QiB).T, **close)


def test_tensors_read_by_T_get_their_derivative_and_init_gets_none():
    """θ read from T's closure (not an argument of the solver) is differentiated too: u*(θ) = Q⁻¹Bθ."""
    Q, B, y, s = small_linear()
    theta = torch.tensor([0.5, -1.0, 2.0], dtype=DT, requires_grad=True)

    @hp.custom_fixed_point(lambda u: u - s * (Q @ u - B @ theta))
    def solve(u0):
        return torch.linalg.solve(Q, B @ theta.detach())

    u0 = torch.ones(Q.shape[0], dtype=DT, requires_grad=True)
    (0.5 * ((solve(u0) - y) ** 2).sum()).backward()
    QiB = torch.linalg.solve(Q, B)
    torch.testing.assert_close(theta.grad, QiB.T @ (QiB @ theta.detach() - y), rtol=1e-8, atol=1e-10)
    assert u0.grad is None  # the start point does not change the fixed point


def _logistic_ridge():
    """G(w; λ) = ∇_w [Σ log(1 + exp(−y_i a_iᵀw)) + λ/2‖w‖²], solved by Newton's method to 1e-13."""
    g = torch.Generator().manual_seed(5)
    A = torch.randn(30, 4, generator=g, dtype=DT)
    y = torch.sign(torch.randn(30, generator=g, dtype=DT))

    def G(w, lam):
        return -A.T @ (y * torch.sigmoid(-y * (A @ w))) + lam * w

    def newton(w0, lam):
        w = w0.clone()
        for _ in range(50):
            p = torch.sigmoid(y * (A @ w))
            H = A.T @ (A * (p * (1 - p))[:, None]) + lam * torch.eye(4, dtype=DT)
            step = torch.linalg.solve(H, G(w, lam))
            w = w - step
            if float(step.norm()) < 1e-13:
                break
        return w

    return G, newton


@pytest.mark.parametrize("solve", [None, "cg"])
def test_root_of_a_newton_solver_matches_central_differences(solve):
    """A nonlinear root: dw*/dλ and the Jacobian in λ against central differences of the solver itself."""
    G, newton = _logistic_ridge()
    root = hp.custom_root(G, solve=None if solve is None else hp.linear_solve.cg())(newton)
    w0 = torch.zeros(4, dtype=DT)
    lam = torch.tensor(0.7, dtype=DT, requires_grad=True)
    w = root(w0, lam)
    assert float(G(w.detach(), lam.detach()).norm()) < 1e-10
    (dw,) = torch.autograd.grad(w.sum(), lam)
    h = 1e-5
    with torch.no_grad():
        fd = (newton(w0, torch.tensor(0.7 + h, dtype=DT)) - newton(w0, torch.tensor(0.7 - h, dtype=DT))) / (2 * h)
    assert rel_err(dw, fd.sum()) < 1e-7
    J = torch.func.jacrev(lambda lam: root(w0, lam))(lam.detach())
    assert rel_err(J, fd) < 1e-7


def test_without_a_graph_the_decorated_function_is_the_solver():
    calls = []
    Q, B, _, s = small_linear()

    @hp.custom_fixed_point(lambda u, x, note: u - s * (Q @ u - B @ x))
    def solve(u0, x, note):
        calls.append(note)  # a non-tensor argument reaches T and the solver as a constant
        return torch.linalg.solve(Q, B @ x)

    x = torch.ones(3, dtype=DT)
    with torch.no_grad():
        u = solve(torch.zeros(5, dtype=DT), x, "plain")
    assert u.grad_fn is None and calls == ["plain"]
    torch.testing.assert_close(u, torch.linalg.solve(Q, B @ x))
    xr = x.clone().requires_grad_(True)
    u = solve(torch.zeros(5, dtype=DT), xr, "differentiated")
    assert u.requires_grad and calls == ["plain", "differentiated"]


def test_bad_use_is_named():
    T, solve, _ = _linear(sym=True)
    x = torch.ones(3, dtype=DT, requires_grad=True)
    with pytest.raises(TypeError, match="initial point"):
        solve([0.0] * 5, x)
    with pytest.raises(TypeError, match="must be callable"):
        hp.custom_fixed_point(3.0)
    with pytest.raises(TypeError, match="must be callable"):
        hp.custom_root(None)
    with pytest.raises(ValueError, match="on_fail"):
        hp.custom_fixed_point(T, on_fail="rasie")

    @hp.custom_fixed_point(T)
    def wrong_shape(u0, x):
        return torch.zeros(2, dtype=DT)

    with pytest.raises(TypeError, match="shaped like its first argument"):
        wrong_shape(torch.zeros(5, dtype=DT), x)
