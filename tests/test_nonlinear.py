"""A nonlinear contraction (tanh layer, ||W|| < 1): implicit vs unrolled, and gradcheck."""

from __future__ import annotations

import torch

import hodl_plugin as hp
from conftest import DT, rel_err


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


def test_gradcheck_implicit_and_inexact_free_modes():
    W, U, y = tanh_problem(n=6, seed=3)
    T = lambda u, x: torch.tanh(W[:6, :6] @ u + U[:6] @ x)  # noqa: E731
    for mode in ("implicit", "unrolled"):
        solver = hp.GKMSolver(T, max_steps=500, tol=1e-15, hypergrad=mode, check_every=1)

        def f(x, solver=solver):
            u = solver(torch.zeros(6, dtype=DT), x)
            return ((u - y[:6]) ** 2).sum().reshape(1)

        x = torch.tensor([0.4, -0.2, 0.9], dtype=DT, requires_grad=True)
        assert torch.autograd.gradcheck(f, (x,), eps=1e-6, atol=1e-8, rtol=1e-6)


def test_gradcheck_on_lasso_weight_with_gmres():
    """gradcheck through a proximal (non-smooth, nonsymmetric Jacobian) operator, λ of shape (1,)."""
    g = torch.Generator().manual_seed(4)
    A = torch.randn(20, 10, generator=g, dtype=DT) / 20**0.5
    b = torch.randn(20, generator=g, dtype=DT)
    s = 1.0 / torch.linalg.matrix_norm(A, 2).item() ** 2
    T = hp.ProximalGradient(grad=lambda u, lam: A.T @ (A @ u - b), prox=hp.prox.l1_param(0), step=s)
    solver = hp.GKMSolver(T, max_steps=100000, tol=1e-15, check_every=1)

    def f(lam):
        u = solver(torch.zeros(10, dtype=DT), lam)
        return (u**2).sum().reshape(1)

    lam = torch.tensor([0.03], dtype=DT, requires_grad=True)
    assert torch.autograd.gradcheck(f, (lam,), eps=1e-7, atol=1e-7, rtol=1e-5)
