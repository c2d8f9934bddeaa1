"""LASSO by proximal gradient (SPEC T4): fixed point vs scikit-learn, hypergradient w.r.t. λ."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import hodl_plugin as hp
from conftest import DT, rel_err

sklearn = pytest.importorskip("sklearn.linear_model")


def problem(seed=0, p=60, n=30):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(p, n, generator=g, dtype=DT) / p**0.5
    u_true = torch.zeros(n, dtype=DT)
    u_true[:5] = torch.randn(5, generator=g, dtype=DT) * 2
    b = A @ u_true + 0.05 * torch.randn(p, generator=g, dtype=DT)
    L = torch.linalg.matrix_norm(A, 2).item() ** 2
    return A, b, u_true, 1.0 / L


def lasso_operator(A, b, s):
    return hp.ProximalGradient(grad=lambda u, lam: A.T @ (A @ u - b), prox=hp.prox.l1_param(0), step=s)


def test_fixed_point_matches_sklearn_lasso():
    A, b, _, s = problem()
    lam = 0.05
    T = lasso_operator(A, b, s)
    solver = hp.GKMSolver(T, max_steps=100000, tol=1e-13, hypergrad="implicit")
    with torch.no_grad():
        u = solver(torch.zeros(A.shape[1], dtype=DT), torch.tensor(lam, dtype=DT))
    p = A.shape[0]
    # sklearn minimises (1/2p)||b - Au||² + α||u||₁  ⇒  α = λ / p
    ref = sklearn.Lasso(alpha=lam / p, fit_intercept=False, tol=1e-14, max_iter=1_000_000)
    ref.fit(A.numpy(), b.numpy())
    assert np.abs(u.numpy() - ref.coef_).max() < 1e-6
    # KKT of SPEC T4
    corr = A.T @ (b - A @ u)
    supp = u.abs() > 0
    assert float(corr.abs().max()) <= lam + 1e-9
    assert torch.allclose(corr[supp], lam * torch.sign(u[supp]), atol=1e-9)


@pytest.mark.parametrize("shape", [(), (1,)], ids=["scalar", "shape1"])
@pytest.mark.parametrize("mode,opts", [
    ("implicit", {"solver": "gmres"}),
    ("implicit", {"solver": "bicgstab"}),
    ("implicit", {"solver": "fixed_point", "adjoint_maxiter": 100000}),
    ("unrolled", {}),
])
def test_hypergradient_wrt_lambda_matches_support_closed_form(shape, mode, opts):
    A, b, u_true, s = problem(seed=1)
    lam0 = 0.05
    T = lasso_operator(A, b, s)
    solver = hp.GKMSolver(T, max_steps=100000, tol=1e-13, hypergrad=mode, **opts)
    lam = torch.full(shape, lam0, dtype=DT, requires_grad=True)
    u = solver(torch.zeros(A.shape[1], dtype=DT), lam)
    F = 0.5 * ((u - u_true) ** 2).sum()
    F.backward()
    # on the support S: u_S = (A_Sᵀ A_S)^{-1}(A_Sᵀ b - λ sign(u_S))  ⇒  du_S/dλ = -(A_SᵀA_S)^{-1} sign(u_S)
    ud = u.detach()
    S = ud.abs() > 1e-10
    AS = A[:, S]
    du = -torch.linalg.solve(AS.T @ AS, torch.sign(ud[S]))
    expected = ((ud - u_true)[S] * du).sum()
    assert lam.grad.shape == lam.shape
    assert abs(float(lam.grad.sum()) - float(expected)) < 1e-8 * abs(float(expected))


def test_lasso_orthonormal_closed_form_fixed_point():
    """A = I: u* = S_λ(b) exactly (SPEC T4)."""
    b = torch.tensor([3.0, -0.2, 0.7, -2.0], dtype=DT)
    T = hp.ProximalGradient(grad=lambda u: u - b, prox=hp.prox.l1(0.5), step=1.0)
    solver = hp.GKMSolver(T, max_steps=10, tol=1e-14)
    with torch.no_grad():
        u = solver(torch.zeros(4, dtype=DT))
    assert torch.allclose(u, hp.prox.soft_threshold(b, 0.5))
    assert rel_err(u, torch.tensor([2.5, 0.0, 0.2, -1.5], dtype=DT)) < 1e-15


def test_km_residual_is_monotone_on_lasso():
    """KM with a nonexpansive T: ||u_k - T(u_k)|| is non-increasing (SPEC T4 invariant)."""
    A, b, _, s = problem(seed=2)
    T = lasso_operator(A, b, 1.8 * s)
    solver = hp.GKMSolver(T, max_steps=3000, tol=0.0, beta=0.7, check_every=1)
    with torch.no_grad():
        solver(torch.zeros(A.shape[1], dtype=DT), torch.tensor(0.02, dtype=DT))
    r = solver.info.residuals
    assert bool((r[1:] <= r[:-1] * (1 + 1e-12) + 1e-15).all())
