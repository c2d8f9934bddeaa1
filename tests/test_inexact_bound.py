"""The inexact mode's a-posteriori error bound is a bound (issue 11, item 6).

References are independent of the code under test: closed-form hypergradients (Q⁻¹ solves), dense
eigen-decompositions (torch.linalg.eigvalsh / svdvals).
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import hodl_plugin as hp
from conftest import DT, make_quadratic
from hodl_plugin.bound import BoundConstants, a_posteriori, lanczos_interval, residuals_at

X0 = torch.tensor([0.3, -0.6, 1.1], dtype=DT)


def solve_inexact(T, F, x0, eps, n, u0=None, max_steps=20000, solver="cg", symmetric=None, delta=None):
    """Hypergradient by GKMSolver(hypergrad="inexact"), and the report at the point it used."""
    delta = eps if delta is None else delta
    s = hp.GKMSolver(T, max_steps=max_steps, hypergrad="inexact", upper=F, alpha=0, eps=eps, delta=delta,
                     relative=False,
                     solver=solver, constants=None, adjoint_maxiter=20000)
    x = x0.clone().requires_grad_(True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        u = s(torch.zeros(n, dtype=DT) if u0 is None else u0, x, key="k")
        F(u, x).backward()
    rep = a_posteriori(T, F, s.method.u_cache["k"], [x], [x], s.method.v_cache["k"],
                       adjoint_residual=s.info.adjoint.residual, symmetric=symmetric)
    return x.grad, rep


# -- the spectral intervals ---------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(4))
def test_lanczos_interval_contains_the_spectrum(seed):
    """KW-certified interval (not exhausted) contains [λ_min, λ_max] of symmetric, indefinite too."""
    g = torch.Generator().manual_seed(seed)
    n = 300
    U, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=DT))
    ev = torch.cat([torch.logspace(-1, 0, n - 3, dtype=DT), torch.tensor([-0.5, 2.0, 1e-3], dtype=DT)])
    A = U @ torch.diag(ev) @ U.T
    A = 0.5 * (A + A.T)
    iv = lanczos_interval(lambda w: A @ w, n, maxiter=60, need_min=False, seed=seed)
    assert not iv.exact and iv.steps <= 60
    assert iv.lo <= -0.5 and iv.hi >= 2.0  # the certified ends enclose the true ones
    assert iv.ritz_min >= -0.5 - 1e-12 and iv.ritz_max <= 2.0 + 1e-12  # Ritz values lie inside
    assert iv.hi <= 2.0 * 1.5  # and the enclosure is not vacuous


def test_lanczos_interval_exhausted_is_exact():
    g = torch.Generator().manual_seed(3)
    n = 40
    U, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=DT))
    ev = torch.logspace(-6, 0, n, dtype=DT)
    A = U @ torch.diag(ev) @ U.T
    iv = lanczos_interval(lambda w: A @ w, n, maxiter=200)
    assert iv.exact and iv.fail_prob == 0.0
    assert iv.lo <= 1e-6 <= iv.lo + 1e-12 and abs(iv.hi - 1.0) < 1e-12


# -- the bound on SPD quadratics, cond 1e2 ... 1e6 ----------------------------------------------


@pytest.mark.parametrize("cond", [1e2, 1e3, 1e4, 1e5, 1e6])
@pytest.mark.parametrize("eps", [1e-2, 1e-5, 1e-8])
def test_bound_holds_on_ill_conditioned_quadratics(cond, eps):
    """error <= bound always; bound/error small when the forward ran (error in the slow modes).

    Before: cond 1e4 error 0.17 vs "bound" 8.4e-4; cond 1e6 87,000x over.
    """
    q = make_quadratic(n=40, cond=cond, seed=5)
    g, rep = solve_inexact(q.T, q.F, X0, eps, q.n, max_steps=5000)
    err = float((g - q.hypergrad(X0)).norm())
    assert rep.bound is not None, rep.message
    assert rep.exact  # n = 40: the Krylov spaces are exhausted, deterministic bound
    ev = torch.linalg.eigvalsh(q.s * q.Q)
    assert rep.constants.sigma_min <= float(ev[0]) * (1 + 1e-9)  # a lower bound on sigma_min
    assert rep.constants.sigma_min >= 0.5 * float(ev[0])  # ... and a sharp one
    assert err <= rep.bound
    assert rep.bound <= 25 * err  # measured 3.8 ... 18 (cold start)


@pytest.mark.parametrize("cond", [1e2, 1e4, 1e6])
def test_bound_holds_when_the_error_is_in_the_fast_modes(cond):
    """Start near u*: the forward stops at once and the error is not in the slowest mode. The bound
    is the worst case over directions (ε/σ_min), so it holds, loosely (ratio up to ~cond/10)."""
    q = make_quadratic(n=40, cond=cond, seed=5)
    gen = torch.Generator().manual_seed(1)
    u0 = q.u_star(X0) + 1e-1 * torch.randn(q.n, generator=gen, dtype=DT)
    for eps in (1e-2, 1e-4):
        g, rep = solve_inexact(q.T, q.F, X0, eps, q.n, u0=u0, max_steps=2000)
        err = float((g - q.hypergrad(X0)).norm())
        assert rep.bound is not None and err <= rep.bound


def test_large_space_certified_by_probability_or_refused():
    """n = 400 > maxiter: the bound comes from the Kuczyński–Woźniakowski intervals (fail_prob > 0)
    when they certify sigma_min, else it is None with a message, and the estimate is still given."""
    x = X0
    for cond, certified in ((1e2, True), (1e5, False)):
        q = make_quadratic(n=400, cond=cond, seed=5)
        g, rep = solve_inexact(q.T, q.F, x, 1e-6, q.n, max_steps=3000, symmetric=True)
        err = float((g - q.hypergrad(x)).norm())
        assert not rep.exact
        assert math.isfinite(rep.estimate) and rep.estimate > 0
        if certified:
            assert rep.bound is not None and rep.fail_prob == pytest.approx(1e-4)
            assert err <= rep.bound
        else:
            assert rep.bound is None and "could not be certified" in rep.message


def test_old_power_iteration_constants_were_not_a_bound():
    """The pre-fix recipe (rho from 20 power iterations, 1/(1-rho)^2) falls below the true error."""
    q = make_quadratic(n=40, cond=1e4, seed=5)
    g, rep = solve_inexact(q.T, q.F, X0, 1e-6, q.n, max_steps=5000)
    err = float((g - q.hypergrad(X0)).norm())
    A = torch.eye(q.n, dtype=DT) - q.s * q.Q
    w = torch.randn(q.n, generator=torch.Generator().manual_seed(0), dtype=DT)
    for _ in range(20):
        w = A @ w
        rho = float(w.norm())
        w = w / rho
    old = BoundConstants(rho=rho, jx_norm=rep.constants.jx_norm, lip_upper=rep.constants.lip_upper)
    assert old.bound(rep.forward_residual, rep.adjoint_residual) < err <= rep.bound


# -- nonsymmetric contraction -----------------------------------------------------------------


def nonsymmetric(n=40, cond=1e3, seed=2):
    r"""T(u;x) = u - s((Q + S)u - Bx), S skew: I - J_u = s(Q + S) nonsymmetric, Re spec > 0."""
    q = make_quadratic(n=n, cond=cond, seed=seed)
    g = torch.Generator().manual_seed(seed + 100)
    G = torch.randn(n, n, generator=g, dtype=DT)
    S = 0.5 * (G - G.T) / n**0.5  # ||S|| about 1 = lambda_min(Q)
    M = q.Q + S

    def T(u, x):
        return u - q.s * (M @ u - q.B @ x)

    def hypergrad(x):
        u = torch.linalg.solve(M, q.B @ x)
        return q.B.T @ torch.linalg.solve(M.T, u - q.y) + q.c * x

    return q, T, M, hypergrad


@pytest.mark.parametrize("cond", [1e2, 1e3, 1e4])
@pytest.mark.parametrize("eps", [1e-3, 1e-7])
def test_bound_holds_for_a_nonsymmetric_contraction(cond, eps):
    q, T, M, hypergrad = nonsymmetric(cond=cond)
    g, rep = solve_inexact(T, q.F, X0, eps, q.n, max_steps=5000, solver="gmres")
    err = float((g - hypergrad(X0)).norm())
    smin = float(torch.linalg.svdvals(q.s * M)[-1])
    assert rep.bound is not None, rep.message
    assert rep.constants.sigma_min <= smin * (1 + 1e-6)
    assert err <= rep.bound <= 50 * err


def test_declared_symmetry_is_checked():
    q, T, M, hypergrad = nonsymmetric(cond=1e2)
    T.symmetric_jacobian = True  # a false claim
    g, rep = solve_inexact(T, q.F, X0, 1e-6, q.n, max_steps=5000, solver="gmres")
    assert "not symmetric" in rep.message and rep.bound is None
    assert float((g - hypergrad(X0)).norm()) <= rep.estimate * 100


# -- when the bound cannot be certified --------------------------------------------------------


def test_nonlinear_operator_gives_no_bound_but_an_estimate():
    q = make_quadratic(n=20, cond=10.0, seed=1)

    def T(u, x):  # a proximal-gradient step: piecewise affine, not affine
        return hp.prox.soft_threshold(u - q.s * (q.Q @ u - q.B @ x), 0.01 * q.s)

    g, rep = solve_inexact(T, q.F, X0, 1e-6, q.n, solver="gmres")
    assert rep.bound is None and "affine" in rep.message
    assert math.isfinite(rep.estimate)


def test_non_quadratic_upper_gives_no_bound():
    q = make_quadratic(n=20, cond=10.0, seed=1)

    def F(u, x):
        return (u - q.y).pow(4).sum() + 0.05 * (x**2).sum()

    _, rep = solve_inexact(q.T, F, X0, 1e-6, q.n)
    assert rep.bound is None and "quadratic" in rep.message


def test_loss_other_than_upper_is_detected():
    q = make_quadratic(n=20, cond=10.0, seed=1)
    s = hp.GKMSolver(q.T, max_steps=5000, hypergrad="inexact", upper=q.F, alpha=0, eps=1e-8, solver="cg",
                     constants=None)
    x = X0.clone().requires_grad_(True)
    u = s(torch.zeros(q.n, dtype=DT), x, key="k")
    (3.0 * q.F(u, x)).backward()  # not the `upper` the bound is about
    rep = a_posteriori(q.T, q.F, s.method.u_cache["k"], [x], [x], s.method.v_cache["k"],
                       adjoint_residual=s.info.adjoint.residual)
    assert rep.bound is None and "not `upper`" in rep.message


def test_known_sigma_min_constants():
    q = make_quadratic(n=30, cond=1e3, seed=6)
    smin = float(torch.linalg.eigvalsh(q.s * q.Q)[0])
    c = BoundConstants(rho=math.nan, jx_norm=q.s * float(torch.linalg.matrix_norm(q.B, 2)), lip_upper=1.0,
                       sigma_min=smin)
    s = hp.GKMSolver(q.T, max_steps=20000, hypergrad="inexact", upper=q.F, alpha=0, eps=1e-6, solver="cg",
                     constants=None)
    x = X0.clone().requires_grad_(True)
    q.F(s(torch.zeros(q.n, dtype=DT), x, key="k"), x).backward()
    ut, vt = s.method.u_cache["k"], s.method.v_cache["k"]
    rep = a_posteriori(q.T, q.F, ut, [x], [x], vt)
    eps, delta = residuals_at(q.T, q.F, ut, [x], vt)
    z = ut  # the point returned; independent residuals: closed-form T, dT/du = I - sQ, grad_u F = u - y
    assert eps == pytest.approx(float((z - q.T(z, X0)).norm()), rel=1e-9)
    assert delta == pytest.approx(float((vt - (vt - q.s * q.Q @ vt) - (z - q.y)).norm()), rel=1e-6, abs=1e-15)
    assert (eps, delta) == (rep.forward_residual, rep.adjoint_residual)
    assert c.bound(eps, delta) == pytest.approx(rep.bound, rel=1e-6)
    assert BoundConstants(rho=1.0, jx_norm=1.0, lip_upper=1.0).bound(1e-3, 1e-3) == math.inf


def test_cross_term_of_the_upper_objective_counts():
    """F(u, x) = 1/2||u - y - Cx||^2 + c/2||x||^2: the L_xF ε/σ term dominates when ||J_x|| is small."""
    q = make_quadratic(n=30, cond=1e3, seed=4)
    gen = torch.Generator().manual_seed(9)
    B = 1e-3 * q.B
    C = 10.0 * torch.randn(q.n, 3, generator=gen, dtype=DT)

    def T(u, x):
        return u - q.s * (q.Q @ u - B @ x)

    def F(u, x):
        return 0.5 * ((u - q.y - C @ x) ** 2).sum() + 0.5 * q.c * (x**2).sum()

    def hypergrad(x):
        r = torch.linalg.solve(q.Q, B @ x) - q.y - C @ x
        return B.T @ torch.linalg.solve(q.Q, r) - C.T @ r + q.c * x

    for eps in (1e-3, 1e-6):
        g, rep = solve_inexact(T, F, X0, eps, q.n, max_steps=20000)
        err = float((g - hypergrad(X0)).norm())
        assert rep.constants.lip_cross == pytest.approx(float(torch.linalg.matrix_norm(C, 2)), rel=1e-9)
        assert rep.bound is not None and err <= rep.bound <= 50 * err


def test_nonsymmetric_large_space_sigma_is_a_lower_bound():
    """Not exhausted (n = 300 > maxiter): the Gram path's certified sigma_min lies below the true one
    (the Ritz value lies above it)."""
    q, T, M, hypergrad = nonsymmetric(n=300, cond=4.0, seed=3)
    g, rep = solve_inexact(T, q.F, X0, 1e-8, q.n, max_steps=5000, solver="gmres")
    smin = float(torch.linalg.svdvals(q.s * M)[-1])
    assert not rep.exact and rep.bound is not None, rep.message
    assert smin / 3 <= rep.constants.sigma_min < smin
    assert float((g - hypergrad(X0)).norm()) <= rep.bound


@pytest.mark.parametrize("delta", [1e-2, 1e-5])
def test_adjoint_error_term(delta):
    """Tight forward, loose adjoint: the c_2 δ term carries the bound."""
    q = make_quadratic(n=40, cond=1e2, seed=5)
    g, rep = solve_inexact(q.T, q.F, X0, 1e-12, q.n, delta=delta, max_steps=50000)
    err = float((g - q.hypergrad(X0)).norm())
    assert rep.forward_residual <= 1e-12 and rep.adjoint_residual <= delta
    assert rep.bound is not None and err <= rep.bound <= 100 * err


@pytest.mark.parametrize("cond, certified", [(1e2, True), (1e4, False)])
def test_float32_bound_or_named_refusal(cond, certified):
    """float32: the bound holds where rounding allows certifying sigma_min, else None with the reason."""
    q = make_quadratic(n=40, cond=cond, seed=5)
    Q, B, y = q.Q.float(), q.B.float(), q.y.float()

    def T(u, x):
        return u - q.s * (Q @ u - B @ x)

    def F(u, x):
        return 0.5 * ((u - y) ** 2).sum() + 0.5 * q.c * (x**2).sum()

    s = hp.GKMSolver(T, max_steps=20000, hypergrad="inexact", upper=F, alpha=0, eps=1e-4, solver="gmres",
                     constants=None)
    x = X0.float().requires_grad_(True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        F(s(torch.zeros(q.n), x, key=0), x).backward()
    rep = a_posteriori(T, F, s.method.u_cache[0], [x], [x], s.method.v_cache[0])
    err = float((x.grad.double() - q.hypergrad(X0)).norm())
    if certified:
        assert rep.bound is not None and err <= rep.bound
    else:
        assert rep.bound is None and "rounding level of torch.float32" in rep.message
