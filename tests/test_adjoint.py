"""The linear solves of the implicit primitives (:mod:`hodl_plugin._adjoint`): CG only on a symmetric
matrix; a singular system — a fixed-point set that is not a singleton (:ref:`math-unrolled`) — solved where
it is consistent and named where it is not; tolerances that follow the dtype. The rule: the right number,
or a :class:`~hodl_plugin.LinearSolveError` that says what to use instead.
"""

from __future__ import annotations

import pytest
import torch
from _assertions import assert_right_or_named, zeros
from _oracles import DT, make_linear, nonsingleton, nonsingleton_projector, reference, rel_err, small_linear

import hodl_plugin as hp


# -- a fixed-point set that is not a singleton: I − ∂T is singular ----------------------------------------
@pytest.mark.parametrize("mode", ["implicit", "inexact"])
def test_selection_with_x_only_in_the_upper_objective_raises(mode):
    """Fix T = {Au = b}, F = ½||u - x||²: du_sel/dx is the projector, which implicit
    differentiation of u = T(u) cannot see. It must raise, not return du/dx = 0."""
    A, b, s, z, proj = nonsingleton()
    solver = hp.GKMSolver(lambda u, x: u - s * A.T @ (A @ u - b), max_steps=2000, tol=0.0,
                          upper=lambda u, x: 0.5 * ((u - x) ** 2).sum(), hypergrad=mode)
    x = z.clone().requires_grad_(True)
    u = solver(torch.zeros(12, dtype=DT), x)
    assert u.requires_grad
    with pytest.raises(hp.LinearSolveError, match="not a singleton"):
        (0.5 * (u**2).sum()).backward()


@pytest.mark.parametrize("mode", ["implicit", "inexact"])
def test_selection_with_x_only_in_the_upper_objective_is_named(mode):
    A, b, s, P, proj, g = nonsingleton_projector()
    n = A.shape[1]
    x = torch.randn(n, generator=g, dtype=DT, requires_grad=True)
    c = torch.randn(n, generator=g, dtype=DT)
    solver = hp.GKMSolver(lambda u, x: u - s * A.T @ (A @ u - b), upper=lambda u, x: 0.5 * ((u - x) ** 2).sum(),
                          hypergrad=mode, max_steps=3000)

    def hypergrad():
        u = solver(zeros(n), x)
        return torch.autograd.grad((c * u).sum(), x)[0]

    # u_sel(x) = proj(x): d(c·u_sel)/dx = P c
    assert_right_or_named(hypergrad, P @ c, 1e-2, what=f"selection {mode}")


def test_consistent_singular_adjoint_returns_the_derivative_of_the_plain_iterations_limit():
    """Without aggregation, a consistent singular adjoint system (CG) gives the minimum-norm solution,
    which for an affine T is the derivative of x -> lim_k u_k(x; u0): compare with unrolled."""
    A, b, s, z, proj = nonsingleton()
    Bx = torch.randn(A.shape[0], 2, dtype=DT, generator=torch.Generator().manual_seed(0))
    T = lambda u, x: u - s * A.T @ (A @ u - b - Bx @ x)  # noqa: E731
    x0 = torch.tensor([0.2, -0.4], dtype=DT)
    u0 = torch.randn(12, dtype=DT, generator=torch.Generator().manual_seed(1))
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


@pytest.mark.parametrize("consistent", [True, False])
@pytest.mark.parametrize("solver_name", ["cg", "gmres"])
def test_a_singular_adjoint_is_solved_where_consistent_or_named(consistent, solver_name):
    """Fix T(·; x) = {Au = x}; plain KM from u0 = z lands on u(x) = z − Aᵀ(AAᵀ)⁻¹(Az − x), the
    projection of z (HODL's selection by ½‖u − z‖², reached here without aggregation so the forward
    converges geometrically). For L = cᵀu: dL/dx = (AAᵀ)⁻¹Ac. The adjoint right-hand side c is
    consistent iff c ∈ range(Aᵀ); then any adjoint solution gives the right number."""
    A, _, s, P, _, g = nonsingleton_projector(seed=18)
    p_, n = A.shape
    z = torch.randn(n, generator=g, dtype=DT)
    c = A.T @ torch.randn(p_, generator=g, dtype=DT) if consistent else torch.randn(n, generator=g, dtype=DT)
    x = torch.randn(p_, generator=g, dtype=DT, requires_grad=True)
    solver = hp.GKMSolver(lambda u, x: u - s * A.T @ (A @ u - x), hypergrad="implicit", solver=solver_name,
                          max_steps=5000, tol=1e-12, adjoint_maxiter=200)

    def run():
        u = solver(z, x)
        assert rel_err(u.detach(), z - A.T @ torch.linalg.solve(A @ A.T, A @ z - x.detach())) < 1e-9
        return torch.autograd.grad((c * u).sum(), x)[0]

    assert_right_or_named(run, torch.linalg.solve(A @ A.T, A @ c), 1e-7, what=f"non-singleton {solver_name}")


def test_implicit_mode_reports_singular_adjoint():
    """Fix(T) is not a singleton, so I - ∂T is singular: the implicit method must not return garbage."""
    A, b, s, z, proj = nonsingleton()
    T2 = lambda u, x: u - s * A.T @ (A @ u - b) + 0 * x  # noqa: E731
    solver = hp.GKMSolver(T2, max_steps=5000, tol=1e-12, hypergrad="implicit", solver="fixed_point",
                          adjoint_maxiter=200)
    x = torch.zeros(12, dtype=DT, requires_grad=True)
    u = solver(torch.zeros(12, dtype=DT), x)
    with pytest.raises(hp.LinearSolveError, match="singular"):
        ((u - z) ** 2).sum().backward()


# -- CG needs a symmetric matrix --------------------------------------------------------------------------
def test_cg_on_a_nonsymmetric_jacobian_is_detected():
    W = torch.tensor([[0.0, 0.5], [-0.5, 0.0]], dtype=DT)
    x = torch.ones(2, dtype=DT, requires_grad=True)
    u = hp.GKMSolver(lambda u, x: W @ u + x, solver="cg", tol=1e-12)(torch.zeros(2, dtype=DT), x)
    with pytest.raises(hp.LinearSolveError, match="symmetric"):
        u.sum().backward()


@pytest.mark.parametrize("mode", ["implicit", "inexact"])
def test_cg_on_a_nonsymmetric_jacobian_is_right_or_named(mode):
    p = make_linear("nonsym", seed=18)
    opts = dict(eps=1e-12, delta=1e-12) if mode == "inexact" else dict(tol=1e-12)
    solver = hp.GKMSolver(p.T, hypergrad=mode, solver="cg", max_steps=3000, adjoint_maxiter=200, **opts)

    def run():
        x = p.x0.clone().requires_grad_(True)
        return torch.autograd.grad(p.F(solver(zeros(p.n), x)), x)[0]

    assert_right_or_named(run, reference(p, ("fixed",), p.x0).grad, 1e-7, what=f"cg {mode}")


# -- tolerances follow the dtype ---------------------------------------------------------------------------
def test_float32_defaults_reach_their_adjoint_tolerance():
    Q, B, y, s = small_linear(n=6, seed=2)
    Q = Q + 0 * torch.eye(6, dtype=DT)
    ev = torch.linalg.eigvalsh(Q)
    Q = (Q - ev[0] * torch.eye(6, dtype=DT)) + (ev[-1] - ev[0]) / 19 * torch.eye(6, dtype=DT)  # cond 20
    Qf, Bf, yf = Q.float(), B.float(), y.float()
    s = 1.0 / float(torch.linalg.eigvalsh(Q)[-1])
    x = torch.tensor([0.5, -1.0, 0.25], requires_grad=True)
    u = hp.GKMSolver(lambda u, x: u - s * (Qf @ u - Bf @ x), max_steps=20000, tol=1e-6)(torch.zeros(6), x)
    (0.5 * ((u - yf) ** 2).sum()).backward()
    Qi_B = torch.linalg.solve(Q, B)
    ref = Qi_B.T @ (Qi_B @ x.detach().double() - y)
    torch.testing.assert_close(x.grad.double(), ref, rtol=1e-4, atol=1e-4)


def test_batch_adjoint_failure_names_the_real_cause():
    """Samples whose cotangents differ by 1e9, an adjoint cut off by adjoint_maxiter: each sample's threshold is
    judged against its own ||b_i|| (against the whole batch's norm it read as 'below what float64 resolves:
    loosen adjoint_rtol'), so the message names adjoint_maxiter."""
    torch.manual_seed(5)
    n, dt = 8, torch.float64
    M = torch.randn(2, n, n, dtype=dt)
    A = M / torch.linalg.matrix_norm(M, ord=2)[:, None, None] * 0.9
    x = torch.randn(2, n, dtype=dt, requires_grad=True)
    w = torch.randn(2, n, dtype=dt)
    w[1] *= 1e9
    solver = hp.GKMSolver(lambda u, x: torch.einsum("bij,bj->bi", A, u) + x, batch_dims=1, tol=1e-13,
                          hypergrad=hp.Implicit("gmres", adjoint_rtol=1e-12, adjoint_maxiter=5))
    u = solver(torch.zeros(2, n, dtype=dt), x)
    with pytest.raises(hp.LinearSolveError, match="adjoint_maxiter") as err:
        (w * u).sum().backward()
    assert "below what" not in str(err.value)


def test_a_failed_adjoint_after_a_diverged_forward_says_so():
    """A batch with one diverging sample, on_divergence='warn': the adjoint at its last finite iterate (not
    a fixed point) cannot be solved; the error said '(I - dT/du) may be singular ... use
    hypergrad='unrolled'' (which acceleration refuses). It now names the divergence."""
    import torch.nn.functional as Fn

    g = torch.Generator().manual_seed(0)
    C, H, W = 2, 6, 6
    N = C * H * W
    K = torch.randn(C, C, 3, 3, generator=g, dtype=torch.float64)
    dense = Fn.conv2d(torch.eye(N, dtype=torch.float64).reshape(N, C, H, W), K, padding=1).reshape(N, N)
    K = K / torch.linalg.matrix_norm(dense, 2)  # a convolution of norm 1

    def T(z, x, c):
        return c.view(-1, 1, 1, 1) * Fn.conv2d(z, K, padding=1) + x

    x = torch.randn(3, C, H, W, generator=g, dtype=torch.float64)
    c = torch.tensor([0.5, 4.5, 0.9], dtype=torch.float64, requires_grad=True)  # sample 1 diverges
    solver = hp.GKMSolver(T, batch_dims=1, acceleration=hp.Anderson(5), on_divergence="warn")
    with pytest.warns(hp.ConvergenceWarning):
        z = solver(torch.zeros_like(x), x, c)
    assert solver.info.diverged
    with pytest.raises(hp.LinearSolveError, match="forward solve diverged") as e:
        z.sum().backward()
    assert "unrolled" not in str(e.value)


def test_a_false_symmetry_claim_hidden_from_cgs_first_directions_is_still_named():
    """A skew part deep in a tridiagonal chain and ∇_u F = e_0: CG's first two search directions stay in
    span(e_0, e_1) and measured no asymmetry (defect 0); CG then failed after 1001 products and the error
    said '(I - dT/du) may be singular'. A CG solve that does not converge is now also tested on random
    vectors: the false claim is named. (GMRES gives A⁻ᵀe_0.)"""
    n = 30
    off = torch.diag(torch.ones(n - 1, dtype=DT), 1)
    A = 2.2 * torch.eye(n, dtype=DT) - off - off.T
    A[10, 11] += 1.5
    A[11, 10] -= 1.5
    s = 1 / torch.linalg.matrix_norm(A, 2).item()

    def T(u, x):
        return u - s * (A @ u - x)

    T.symmetric_jacobian = True  # false
    x = torch.randn(n, dtype=DT, generator=torch.Generator().manual_seed(0), requires_grad=True)
    u = hp.GKMSolver(T, max_steps=200000, tol=1e-13)(torch.zeros(n, dtype=DT), x)
    with pytest.raises(hp.LinearSolveError, match="needs a symmetric dT/du"):
        u[0].backward()
    u = hp.GKMSolver(T, max_steps=200000, tol=1e-13, hypergrad=hp.Implicit("gmres"))(torch.zeros(n, dtype=DT), x)
    (g,) = torch.autograd.grad(u[0], x)
    assert rel_err(g, torch.linalg.solve(A.T, torch.eye(n, dtype=DT)[0])) < 1e-9


@pytest.mark.parametrize("solver", ["gmres", "bicgstab"])
def test_the_uniqueness_probe_of_a_batch_names_the_singular_sample(solver):
    """Sample 1 of three has a non-unique fixed-point set (I - J = diag(.5, .5, 0, 0)): check_unique raises
    naming it — the message said 'residual nan' when BiCGSTAB broke down, and named no sample."""
    d = torch.tensor([[0.5, 0.5, 0.5, 0.5], [0.5, 0.5, 0.0, 0.0], [0.9, 0.1, 0.3, 0.7]], dtype=DT)
    x = torch.tensor([[1.0, 2, 3, 4]] * 3, dtype=DT, requires_grad=True)
    solver_ = hp.GKMSolver(lambda u, x: u - d * (u - x), max_steps=5000, tol=1e-13, batch_dims=1,
                           hypergrad=hp.Implicit(solver=solver, check_unique=True))
    u = solver_(torch.zeros(3, 4, dtype=DT), x)
    with pytest.raises(hp.LinearSolveError, match="singular") as e:
        u.sum().backward()
    msg = str(e.value)
    assert "nan" not in msg
    if solver == "gmres":  # per sample (BiCGSTAB solves the batch as one system: no sample to name)
        assert "at the fixed point (samples [1] of the batch)" in msg
    else:
        assert "broke down" in msg
