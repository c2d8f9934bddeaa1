"""Derivative products on autograd graphs (:mod:`hodl_plugin._autodiff`): the vjp of one graph equals
autograd's; products with ∂_uT in the non-transposed solves (forward mode, second order).

They run on one graph of T(u*) by the transpose of a vjp (``_autodiff.make_jvp``), except where that
could be silently wrong: a custom ``autograd.Function`` inside T (its backward may not be
differentiable) goes through forward-mode AD, which uses the Function's own ``jvp`` or says it has
none. References: closed forms (u* = Q⁻¹Bx, ∇²f = BᵀQ⁻²B) and central differences.
"""

from __future__ import annotations

import pytest
import torch
from _oracles import DT

import hodl_plugin as hp
from hodl_plugin._autodiff import make_jvp, make_vjp


def _quad():
    g = torch.Generator().manual_seed(3)
    M = torch.randn(5, 5, generator=g, dtype=DT)
    Q = M @ M.T / 5 + torch.eye(5, dtype=DT)
    B = torch.randn(5, 3, generator=g, dtype=DT)
    s = 1.0 / float(torch.linalg.eigvalsh(Q).max())
    return Q, B, s


class Scale(torch.autograd.Function):
    """y = c·u with a correct backward and jvp (the backward written with differentiable ops)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(u, c):
        return c * u

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.c = inputs[1]

    @staticmethod
    def backward(ctx, g):
        return ctx.c * g, None

    @staticmethod
    def jvp(ctx, du, _dc):
        return ctx.c * du


class ScaleNoJvp(Scale):
    """Scale whose backward goes through numpy (not differentiable) and which has no jvp."""

    jvp = staticmethod(torch.autograd.Function.jvp)  # the base class's: raises, no forward mode

    @staticmethod
    def backward(ctx, g):
        return torch.from_numpy(ctx.c * g.detach().numpy()), None


def test_fast_vjp_equals_public_autograd():
    W = torch.randn(7, 7, dtype=DT)
    u = torch.randn(7, dtype=DT, requires_grad=True)
    out = torch.tanh(W @ u)
    v = torch.randn(7, dtype=DT)
    (ref,) = torch.autograd.grad(out, u, v, retain_graph=True)
    vjp = make_vjp(out, u)
    assert torch.equal(vjp(v), ref) and torch.equal(vjp(2 * v), 2 * ref)
    # unused input -> zeros
    w = torch.randn(3, dtype=DT, requires_grad=True)
    assert torch.equal(make_vjp(out, w)(v), torch.zeros(3, dtype=DT))


def test_make_jvp_is_the_jacobian_product():
    Q, _, s = _quad()
    u = torch.randn(5, dtype=DT, requires_grad=True)
    out = torch.tanh(u - s * (Q @ u))
    z = torch.randn(5, dtype=DT)
    J = torch.autograd.functional.jacobian(lambda v: torch.tanh(v - s * (Q @ v)), u.detach())
    assert torch.allclose(make_jvp(out, u)(z), J @ z, rtol=1e-13, atol=1e-14)
    # with a custom Function in the graph it declines (the caller then uses forward-mode AD)
    out2 = Scale.apply(u, 0.5)
    assert make_jvp(out2, u) is None


@pytest.mark.parametrize("fn", [Scale, None])
def test_forward_mode_and_hessian_are_exact_with_or_without_a_custom_function_in_T(fn):
    Q, B, s = _quad()

    def T(u, x):
        v = u - s * (Q @ u - B @ x)
        return v if fn is None else fn.apply(v, 1.0)

    solver = hp.GKMSolver(T, tol=1e-13, max_steps=100000)
    x = torch.randn(3, dtype=DT)
    QiB = torch.linalg.solve(Q, B)
    J = torch.func.jacfwd(lambda x: solver(torch.zeros(5, dtype=DT), x))(x)
    assert torch.allclose(J, QiB, rtol=1e-8)
    f = lambda x: 0.5 * (solver(torch.zeros(5, dtype=DT), x) ** 2).sum()  # noqa: E731
    xr = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(f(xr), xr, create_graph=True)
    w = torch.randn(3, dtype=DT)
    (hv,) = torch.autograd.grad(g, xr, w)
    assert torch.allclose(hv, QiB.T @ (QiB @ w), rtol=1e-8)


def test_a_custom_function_without_jvp_in_T_is_an_error_in_forward_mode_never_a_wrong_number():
    Q, B, s = _quad()
    solver = hp.GKMSolver(lambda u, x: ScaleNoJvp.apply(u - s * (Q @ u - B @ x), 1.0), tol=1e-13,
                          max_steps=100000)
    x = torch.randn(3, dtype=DT)
    with pytest.raises(RuntimeError):  # (its numpy backward cannot run under the transform)
        torch.func.jacfwd(lambda x: solver(torch.zeros(5, dtype=DT), x))(x)


def test_second_order_on_a_nonlinear_equilibrium_matches_central_differences():
    g = torch.Generator().manual_seed(8)
    W = torch.randn(4, 4, generator=g, dtype=DT)
    W = 0.6 * W / torch.linalg.matrix_norm(W, 2)
    Bm = torch.randn(4, 3, generator=g, dtype=DT)
    solver = hp.GKMSolver(lambda u, x: torch.tanh(W @ u + Bm @ x), tol=1e-14, max_steps=100000)
    f = lambda x: (solver(torch.zeros(4, dtype=DT), x) ** 3).sum()  # noqa: E731
    x = torch.randn(3, generator=g, dtype=DT)
    H = torch.func.hessian(f)(x)
    h = 1e-4
    grad = lambda z: torch.func.grad(f)(z)  # noqa: E731
    fd = torch.stack([(grad(x + h * e) - grad(x - h * e)) / (2 * h) for e in torch.eye(3, dtype=DT)])
    assert torch.allclose(H, fd, rtol=1e-6, atol=1e-8)
