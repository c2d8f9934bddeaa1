"""Proximal maps (:mod:`hodl_plugin.prox`) and the proximal-gradient LASSO: closed forms, scikit-learn's
Lasso, the hypergradient w.r.t. λ on the support, gradcheck through the non-smooth operator, and learned
weights that leave the valid range (a named error, or NaN under torch.func — never a number)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from _assertions import zeros
from _oracles import DT, rel_err

import hodl_plugin as hp
from hodl_plugin import prox


def test_l1_param_is_the_soft_threshold_closed_form():
    v = torch.tensor([-2.0, -0.3, 0.0, 0.4, 3.0], dtype=DT)
    lam = torch.tensor([0.5, 0.5, 0.5, 0.1, 0.0], dtype=DT)  # per-coordinate weights
    out = prox.l1_param(1)(v, 2.0, torch.ones(1, dtype=DT), lam)
    # argmin_u 1/2 (u - v)^2 + 2 lam |u|, coordinate-wise
    ref = torch.tensor([-1.0, 0.0, 0.0, 0.2, 3.0], dtype=DT)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("bad, word", [(-0.5, "negative"), (math.nan, "non-finite"), (math.inf, "non-finite")])
def test_l1_param_rejects_invalid_weight(bad, word):
    with pytest.raises(ValueError, match=rf"l1_param weight params\[0\] is {word}"):
        prox.l1_param(0)(torch.ones(3, dtype=DT), 1.0, torch.tensor(bad, dtype=DT))


def test_l1_param_rejects_one_negative_coordinate():
    lam = torch.tensor([0.1, -1e-9, 0.2], dtype=DT)
    with pytest.raises(ValueError, match="negative"):
        prox.l1_param(0)(torch.ones(3, dtype=DT), 1.0, lam)


def test_l1_param_bad_index():
    with pytest.raises(ValueError, match="index"):
        prox.l1_param(-1)
    with pytest.raises(ValueError, match="params\\[2\\]"):
        prox.l1_param(2)(torch.ones(2), 1.0, torch.tensor(0.1))


@pytest.mark.parametrize("bad", [-0.5, math.nan, math.inf])
def test_fixed_l1_weight_rejected_at_construction(bad):
    with pytest.raises(ValueError, match="l1 weight"):
        prox.l1(bad)


def test_box_rejects_nan():
    with pytest.raises(ValueError, match="box"):
        prox.box(math.nan, 1.0)


# -- a learned weight that turns invalid ------------------------------------------------------------------
def _lasso_operator():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(8, 5, generator=g, dtype=DT)
    b = torch.randn(8, generator=g, dtype=DT)
    s = 1.0 / float(torch.linalg.matrix_norm(A, 2)) ** 2
    T = hp.ProximalGradient(grad=lambda u, lam: A.T @ (A @ u - b), prox=prox.l1_param(0), step=s)
    return T


@pytest.mark.parametrize("mode", ["implicit", "unrolled", "inexact", "first_order"])
def test_weight_that_turns_negative_during_training_raises(mode):
    """Train λ with SGD until a step makes it negative: the next solve raises, it does not
    'converge'. The in-place optimizer step bumps the tensor version, so the check runs again."""
    T = _lasso_operator()
    lam = torch.tensor(0.05, dtype=DT, requires_grad=True)
    solver = hp.GKMSolver(T, max_steps=5000, tol=1e-9, hypergrad=mode)
    opt = torch.optim.SGD([lam], lr=1.0)
    u = solver(torch.zeros(5, dtype=DT), lam)
    (u.sum() ** 2).backward()
    with torch.no_grad():
        lam.grad.fill_(0.3)  # a step that overshoots below 0
    opt.step()
    assert float(lam.detach()) < 0
    with pytest.raises(ValueError, match="negative"):
        solver(torch.zeros(5, dtype=DT), lam)


def test_a_negative_weight_is_refused_by_the_solve():
    A = torch.eye(3, dtype=DT)
    b = torch.tensor([2.0, 0.1, -1.0], dtype=DT)
    T = hp.ProximalGradient(grad=lambda u, lam: A.T @ (A @ u - b), prox=hp.prox.l1_param(0), step=1.0)
    solver = hp.GKMSolver(T, hypergrad="implicit")
    with pytest.raises((hp.HODLError, ValueError), match=r"(?i)negativ|>= ?0|≥ ?0|non-?negative|lambda|λ"):
        solver(zeros(3), torch.tensor(-0.5, dtype=DT))


def test_check_runs_once_per_tensor_version(monkeypatch):
    """No per-step validation: the same unchanged tensor is checked once (one host sync per solve)."""
    calls = {"n": 0}
    real = torch.isfinite

    def counting(t):
        calls["n"] += 1
        return real(t)

    p = prox.l1_param(0)
    lam = torch.tensor(0.1, dtype=DT)
    monkeypatch.setattr(torch, "isfinite", counting)
    for _ in range(50):
        p(torch.ones(3, dtype=DT), 1.0, lam)
    assert calls["n"] == 1
    lam.sub_(0.05)  # an in-place change: checked again
    p(torch.ones(3, dtype=DT), 1.0, lam)
    assert calls["n"] == 2
    lam.sub_(0.1)
    with pytest.raises(ValueError):
        p(torch.ones(3, dtype=DT), 1.0, lam)


def test_under_torch_func_invalid_weights_poison_with_nan():
    """vmap cannot read values (no ValueError possible): invalid entries give NaN, never a number."""
    p = prox.l1_param(0)
    v = torch.tensor([1.0, -0.2, 3.0], dtype=DT)
    out = torch.func.vmap(lambda w: p(v, 1.0, w))(torch.tensor([0.5, -0.1, math.nan], dtype=DT))
    assert torch.equal(out[0], torch.tensor([0.5, 0.0, 2.5], dtype=DT))
    assert torch.isnan(out[1:]).all()
    jac = torch.func.jacrev(lambda w: p(v, 1.0, w))(torch.tensor(0.5, dtype=DT))
    assert torch.equal(jac, torch.tensor([-1.0, 0.0, -1.0], dtype=DT))  # d/dλ S_λ(v) = -sign(v) off the kink


# -- LASSO by proximal gradient: u* = argmin ½‖Au − b‖² + λ‖u‖₁ --------------------------------------------
def lasso_problem(seed=0, p=60, n=30):
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
    sklearn = pytest.importorskip("sklearn.linear_model")
    A, b, _, s = lasso_problem()
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
    # the optimality (KKT) conditions of the LASSO
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
    A, b, u_true, s = lasso_problem(seed=1)
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
    """A = I: u* = S_λ(b), the soft threshold, exactly."""
    b = torch.tensor([3.0, -0.2, 0.7, -2.0], dtype=DT)
    T = hp.ProximalGradient(grad=lambda u: u - b, prox=hp.prox.l1(0.5), step=1.0)
    solver = hp.GKMSolver(T, max_steps=10, tol=1e-14)
    with torch.no_grad():
        u = solver(torch.zeros(4, dtype=DT))
    assert torch.allclose(u, hp.prox.soft_threshold(b, 0.5))
    assert rel_err(u, torch.tensor([2.5, 0.0, 0.2, -1.5], dtype=DT)) < 1e-15


def test_km_residual_is_monotone_on_lasso():
    """KM with a nonexpansive T (the proximal-gradient step with s < 2/L): ||u_k - T(u_k)|| is non-increasing."""
    A, b, _, s = lasso_problem(seed=2)
    T = lasso_operator(A, b, 1.8 * s)
    solver = hp.GKMSolver(T, max_steps=3000, tol=0.0, beta=0.7, check_every=1)
    with torch.no_grad():
        solver(torch.zeros(A.shape[1], dtype=DT), torch.tensor(0.02, dtype=DT))
    r = solver.info.residuals
    assert bool((r[1:] <= r[:-1] * (1 + 1e-12) + 1e-15).all())


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
