"""The Krylov forward (``forward="krylov"``) against closed forms: the fixed point of an affine T,
its stopping rule and diagnostics, batches, every hypergradient mode, and what it refuses."""

from __future__ import annotations

import math

import pytest
import torch

import hodl_plugin as hp

D = torch.float64


def spd(n: int, cond: float, seed: int, dtype: torch.dtype = D) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    Q = (U * torch.logspace(0, math.log10(cond), n, dtype=torch.float64)) @ U.T
    return (0.5 * (Q + Q.T)).to(dtype)


def skew(n: int, seed: int, scale: float) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    K = torch.randn(n, n, generator=g, dtype=D)
    return scale * (K - K.T) / torch.linalg.matrix_norm(K - K.T, 2)


def residual(T, u, *params) -> float:
    with torch.no_grad():
        return float((T(u, *params) - u).norm())


# ------------------------------------------------------------------------------------------------
# the value, float64 and float32, CG and GMRES
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cond", [10.0, 1e4])
def test_cg_forward_is_the_closed_form_in_sqrt_cond_products(cond):
    n = 60
    Q = spd(n, cond, seed=1)
    x = torch.randn(n, generator=torch.Generator().manual_seed(2), dtype=D)
    T = hp.GradientStep(grad=lambda u, x: Q @ u - x, step=1.0 / cond)
    u, info = hp.GKMSolver(T, forward="krylov", tol=1e-11, max_steps=10_000).solve(torch.zeros(n, dtype=D), x)
    exact = torch.linalg.solve(Q, x)
    assert info.forward == "cg" and info.converged and not info.diverged
    r = residual(T, u, x)
    assert r <= 1e-11 * float(u.norm())                    # the stopping rule, measured independently
    assert abs(info.residual - r) <= 1e-3 * r + 1e-30      # info says the returned point's residual
    # error ≤ ‖(I - M)⁻¹‖ · residual = cond · residual (I - M = sQ, smallest eigenvalue 1/cond)
    assert float((u - exact).norm()) <= 1.01 * cond * r
    # CG: about √cond · log(2/tol) / 2 products; the GKM iteration would need cond · log(1/tol)
    assert info.steps <= 2 * math.sqrt(cond) * math.log(2 / 1e-11) / 2 + 10
    assert info.steps < cond * math.log(1e11) / 5


def test_gmres_forward_for_a_nonsymmetric_jacobian():
    n = 40
    A = spd(n, 200.0, seed=3) + 30 * skew(n, 4, 1.0)
    s = 1.0 / float(torch.linalg.matrix_norm(A, 2))
    x = torch.randn(n, generator=torch.Generator().manual_seed(5), dtype=D)
    T = lambda u, x: u - s * (A @ u - x)  # noqa: E731
    u, info = hp.GKMSolver(T, forward="krylov", tol=1e-12).solve(torch.zeros(n, dtype=D), x)
    assert info.forward == "gmres" and info.converged
    assert residual(T, u, x) <= 1e-12 * float(u.norm())
    torch.testing.assert_close(u, torch.linalg.solve(A, x), rtol=1e-8, atol=0)


def test_float32_meets_its_default_tolerance():
    n = 50
    Q64 = spd(n, 100.0, seed=6)
    x64 = torch.randn(n, generator=torch.Generator().manual_seed(7), dtype=D)
    Q, x = Q64.float(), x64.float()
    T = hp.GradientStep(grad=lambda u, x: Q @ u - x, step=0.01)
    u, info = hp.GKMSolver(T, forward="krylov").solve(torch.zeros(n), x)
    assert u.dtype == torch.float32 and info.converged and info.forward == "cg"
    r = residual(T, u, x)
    assert r <= hp.gkm.default_tol(torch.float32) * float(u.norm())
    exact = torch.linalg.solve(Q64, x64)
    assert float((u.double() - exact).norm()) <= 100 * 1.5 * r + 1e-5 * float(exact.norm())


def test_warm_start_at_the_fixed_point_takes_no_product():
    n = 20
    Q = spd(n, 50.0, seed=8)
    x = torch.ones(n, dtype=D)
    T = hp.GradientStep(grad=lambda u, x: Q @ u - x, step=0.02)
    u, info = hp.GKMSolver(T, forward="krylov").solve(torch.linalg.solve(Q, x), x)
    assert info.steps == 0 and info.converged


def test_out_of_products_warns_and_says_so():
    n = 60
    Q = spd(n, 1e6, seed=9)
    x = torch.ones(n, dtype=D)
    T = hp.GradientStep(grad=lambda u, x: Q @ u - x, step=1e-6)
    with pytest.warns(hp.ConvergenceWarning, match="did not converge"):
        u, info = hp.GKMSolver(T, forward="krylov", max_steps=5, tol=1e-12).solve(torch.zeros(n, dtype=D), x)
    assert not info.converged and info.steps <= 5
    assert abs(info.residual - residual(T, u, x)) <= 1e-6 * info.residual


def test_nonfinite_operator_is_a_divergence():
    T = lambda u, x: 0.5 * u + x / (x - x)  # noqa: E731  (0/0 = NaN)
    with pytest.raises(hp.DivergenceError, match="non-finite"):
        hp.GKMSolver(T, forward="gmres")(torch.zeros(3, dtype=D), torch.ones(3, dtype=D))


# ------------------------------------------------------------------------------------------------
# batches: per-sample stopping
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("forward", ["cg", "gmres"])
def test_batch_dims_solves_each_sample(forward):
    n, B = 30, 4
    Qs = torch.stack([spd(n, c, seed=10 + i) for i, c in enumerate([2.0, 10.0, 100.0, 1000.0])])
    X = torch.randn(B, n, generator=torch.Generator().manual_seed(11), dtype=D)
    T = lambda u, x: u - 1e-3 * (torch.einsum("bij,bj->bi", Qs, u) - x)  # noqa: E731
    u, info = hp.GKMSolver(T, forward=forward, batch_dims=1, tol=1e-10).solve(torch.zeros(B, n, dtype=D), X)
    assert info.forward == forward and info.converged
    assert info.converged_per_sample.tolist() == [True] * B
    assert info.residuals.shape[1:] == (B,)
    exact = torch.linalg.solve(Qs, X)
    for i in range(B):
        r = float((T(u, X)[i] - u[i]).norm())
        assert r <= 1e-10 * float(u[i].norm())
        assert float((u[i] - exact[i]).norm()) <= 1.01 * 1e3 * r + 1e-12  # ‖(I − M_i)⁻¹‖ = 1e3


def test_batch_sample_already_converged_stays_put():
    n = 10
    Q = spd(n, 20.0, seed=12)
    X = torch.randn(2, n, generator=torch.Generator().manual_seed(13), dtype=D)
    T = lambda u, x: u - 0.05 * (u @ Q - x)  # noqa: E731  (Q symmetric: row-wise Qu)
    u0 = torch.zeros(2, n, dtype=D)
    u0[0] = torch.linalg.solve(Q, X[0])
    u, info = hp.GKMSolver(T, forward="krylov", batch_dims=1).solve(u0, X)
    assert info.converged and torch.equal(u[0], u0[0])


# ------------------------------------------------------------------------------------------------
# every hypergradient mode
# ------------------------------------------------------------------------------------------------
def quadratic(n=25, cond=300.0):
    Q = spd(n, cond, seed=14)
    g = torch.Generator().manual_seed(15)
    y, x0 = torch.randn(n, generator=g, dtype=D), torch.randn(n, generator=g, dtype=D)
    s = 1.0 / cond
    T = hp.GradientStep(grad=lambda u, x: Q @ u - x, step=s)
    hyper = torch.linalg.solve(Q, torch.linalg.solve(Q, x0) - y)  # ∇_x ½‖Q⁻¹x − y‖²
    return Q, y, x0, s, T, hyper


@pytest.mark.parametrize("mode", ["implicit", "inexact", "first_order"])
def test_every_mode_that_runs_without_autograd(mode):
    Q, y, x0, s, T, hyper = quadratic()
    kw = {"eps": 1e-11, "constants": None} if mode == "inexact" else {"tol": 1e-11}
    solver = hp.GKMSolver(T, forward="krylov", hypergrad=mode, max_steps=5000, **kw)
    x = x0.clone().requires_grad_(True)
    u = solver(torch.zeros_like(x0), x)
    (g,) = torch.autograd.grad(0.5 * ((u - y) ** 2).sum(), x)
    assert solver.info.forward == "cg" and solver.info.converged
    if mode == "first_order":  # J_xᵀ ∇_u F = s(u* − y), the Jacobian-free estimate
        expected = s * (torch.linalg.solve(Q, x0) - y)
        torch.testing.assert_close(g, expected, rtol=1e-6, atol=1e-12)
    else:
        torch.testing.assert_close(g, hyper, rtol=1e-6, atol=1e-10)


def test_implicit_second_order_and_torch_func():
    Q, y, x0, s, T, hyper = quadratic(n=8, cond=50.0)
    solver = hp.GKMSolver(T, forward="krylov", tol=1e-12)
    f = lambda x: 0.5 * ((solver(torch.zeros(8, dtype=D), x) - y) ** 2).sum()  # noqa: E731
    Qi = torch.linalg.inv(Q)
    torch.testing.assert_close(torch.func.grad(f)(x0), hyper, rtol=1e-6, atol=1e-10)
    torch.testing.assert_close(torch.func.hessian(f)(x0), Qi @ Qi, rtol=1e-5, atol=1e-8)
    X = torch.randn(3, 8, generator=torch.Generator().manual_seed(16), dtype=D)
    got = torch.func.vmap(torch.func.grad(f))(X)
    torch.testing.assert_close(got, (Qi @ (X @ Qi - y).T).T, rtol=1e-6, atol=1e-10)


@pytest.mark.parametrize("mode", ["unrolled", "truncated", "ptt", "iga"])
def test_modes_that_need_the_gkm_iterates_are_refused(mode):
    """The trajectory (unrolled, truncated, PTT) or the K-th iterate (IGA's multiplier, 0/0 at the fixed point
    that the Krylov forward returns) is not computed by it: refused by name, not run as forward='gkm'."""
    T = hp.GradientStep(objective=lambda u, x: 0.5 * ((u - x) ** 2).sum(), step=0.5)
    kw = dict(upper=lambda u, x: -(u ** 2).sum(), alpha=0) if mode == "ptt" else {}
    with pytest.raises(hp.ConfigurationError, match="forward='krylov' cannot be used with hypergrad"):
        hp.GKMSolver(T, forward="krylov", hypergrad=mode, **kw)
    assert hp.get_method(mode).needs_gkm_iterates


def test_fd_runs_its_last_step_from_the_krylov_fixed_point():
    """DARTS's one-step derivative at the lower solution: u* = x for f = ½‖u − x‖², and one step of size s from
    u* gives du/dx = s·I through that step (an independent closed form)."""
    T = hp.GradientStep(objective=lambda u, x: 0.5 * ((u - x) ** 2).sum(), step=0.5)
    x = torch.tensor([1.0, -2.0], dtype=D, requires_grad=True)
    u, info = hp.GKMSolver(T, forward="krylov", hypergrad="fd", tol=1e-12).solve(torch.zeros(2, dtype=D), x)
    u.sum().backward()
    assert info.forward == "cg"
    torch.testing.assert_close(u.detach(), x.detach(), rtol=0, atol=1e-12)
    torch.testing.assert_close(x.grad, torch.full((2,), 0.5, dtype=D), rtol=1e-6, atol=1e-8)


def test_grad_recording_run_of_a_custom_method_is_refused():
    class Recording(hp.HypergradMethod):
        name = "recording"

        def run(self, it, u0, params, info, key=None):
            return it.run(u0, params, info)

    x = torch.ones(2, dtype=D, requires_grad=True)
    with pytest.raises(hp.ConfigurationError, match="runs without autograd"):
        hp.GKMSolver(lambda u, x: 0.5 * u + x, forward="krylov", hypergrad=Recording())(torch.zeros(2, dtype=D), x)


# ------------------------------------------------------------------------------------------------
# what is refused: non-affine T, false symmetry, options it cannot honour
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("forward", ["cg", "gmres"])
def test_non_affine_operator_is_named(forward):
    T = lambda u, x: u - 0.1 * (u ** 3 + u - x)  # noqa: E731  (gradient step of a quartic: symmetric, not affine)
    with pytest.raises(hp.NotAffineError, match="not affine|is not:"):
        hp.GKMSolver(T, forward=forward, tol=1e-12)(torch.zeros(4, dtype=D), 3 * torch.ones(4, dtype=D))


def test_a_non_affine_operator_is_never_a_wrong_answer():
    """GMRES restarted from the measured residual may still converge on a mildly nonlinear T: the
    returned point then is a fixed point (the measured residual says so), or the run raises."""
    T = lambda u, x: 0.5 * torch.tanh(u) + x  # noqa: E731
    x = torch.ones(3, dtype=D)
    try:
        u, info = hp.GKMSolver(T, forward="gmres", tol=1e-12).solve(torch.zeros(3, dtype=D), x)
    except hp.NotAffineError:
        return
    if info.converged:
        assert residual(T, u, x) <= 1e-12 * float(u.norm()) * (1 + 1e-6)


def test_a_false_symmetry_claim_is_caught_by_cg():
    n = 20
    A = spd(n, 10.0, seed=17) + 3 * skew(n, 18, 1.0)
    T = lambda u, x: u - 0.05 * (A @ u - x)  # noqa: E731
    T.symmetric_jacobian = True  # false
    with pytest.raises(hp.LinearSolveError, match="not symmetric"):
        hp.GKMSolver(T, forward="krylov")(torch.zeros(n, dtype=D), torch.ones(n, dtype=D))


def test_options_a_krylov_forward_cannot_honour():
    T = hp.GradientStep(grad=lambda u, x: u - x, step=0.5)
    with pytest.raises(hp.ConfigurationError, match="acceleration"):
        hp.GKMSolver(T, forward="krylov", acceleration=hp.Anderson())
    with pytest.raises(hp.ConfigurationError, match="aggregation"):
        hp.GKMSolver(T, forward="krylov", upper=lambda u, x: (u ** 2).sum(), alpha=hp.Harmonic(0.5))
    with pytest.raises(hp.ConfigurationError, match="tolerance"):
        hp.GKMSolver(T, forward="krylov", tol=0.0)
    with pytest.raises(ValueError, match="forward must be one of"):
        hp.GKMSolver(T, forward="newton")
    # alpha = 0 keeps upper (for the inexact bound) without aggregating: allowed
    hp.GKMSolver(T, forward="krylov", upper=lambda u, x: (u ** 2).sum(), alpha=0.0)


def test_krylov_resolution_follows_the_declared_symmetry():
    assert hp.GKMSolver(hp.GradientStep(grad=lambda u: u, step=0.5), forward="krylov").iteration.forward == "cg"
    assert hp.GKMSolver(lambda u: 0.5 * u, forward="krylov").iteration.forward == "gmres"
    assert hp.GKMSolver(lambda u: 0.5 * u).iteration.forward == "gkm"


# -- no fixed point, extreme scales, a non-affine T under CG, the product budget ------------------------
@pytest.mark.parametrize("forward", ["krylov", "gmres"])
@pytest.mark.parametrize("batch_dims", [0, 1])
def test_an_affine_operator_without_a_fixed_point_is_a_divergence(forward, batch_dims):
    """T(u) = u - (Qu - x) with Q singular and x outside its range has no fixed point: the Krylov iterate runs to
    infinity while the relative test tol·‖u‖ would pass (it returned 1e16-sized points, converged=True)."""
    Q = torch.diag(torch.tensor([1.0, 0.5, 0.0], dtype=D))
    T = hp.GradientStep(grad=lambda u, x: u @ Q.T - x, step=1.0)
    x = torch.ones((2, 3) if batch_dims else (3,), dtype=D)
    with pytest.raises(hp.DivergenceError, match="no fixed point"):
        hp.GKMSolver(T, forward=forward, tol=1e-10, batch_dims=batch_dims)(torch.zeros_like(x), x)


def test_a_nonsymmetric_operator_without_a_fixed_point_is_a_divergence():
    P = torch.eye(3, dtype=D)
    P[0, 0] = 0.0  # I - P = e0 e0ᵀ: singular, and c = (0, 1, 1) is not in its range
    c = torch.tensor([0.0, 1.0, 1.0], dtype=D)
    with pytest.raises(hp.DivergenceError, match="no fixed point"):
        hp.GKMSolver(lambda u: P @ u + c, forward="gmres")(torch.zeros(3, dtype=D))


@pytest.mark.parametrize("forward", ["cg", "gmres"])
@pytest.mark.parametrize("dtype,scale", [(torch.float32, 1e-25), (torch.float32, 1e20), (torch.float32, 1e30),
                                         (D, 1e-200), (D, 1e200)])
@pytest.mark.parametrize("batch_dims", [0, 1])
def test_any_scale_any_dtype(forward, dtype, scale, batch_dims):
    """u* = (I - M)^{-1} c at scales whose squares leave the dtype (they returned 0 or raised)."""
    M = torch.tensor([[0.5, 0.1, 0.0], [0.1, 0.3, 0.1], [0.0, 0.1, 0.2]], dtype=D)
    exact_unit = torch.linalg.solve(torch.eye(3, dtype=D) - M, torch.ones(3, dtype=D))
    c = torch.full((2, 3) if batch_dims else (3,), scale, dtype=dtype)
    Mt = M.to(dtype)
    solver = hp.GKMSolver(lambda u, c: u @ Mt.T + c, forward=forward, batch_dims=batch_dims)
    u = solver(torch.zeros_like(c), c)
    assert solver.info.converged
    err = float(((u.double() / scale) - exact_unit).abs().max() / exact_unit.abs().max())
    assert err < (1e-4 if dtype == torch.float32 else 1e-9), err


def test_cg_on_an_operator_that_is_not_affine_names_it():
    """The gradient step of a non-quadratic objective has a symmetric Jacobian: CG's symmetry test fails only
    because the products at two scales differ; the error says T is not affine (it blamed the symmetry)."""
    f = lambda u, x: 0.5 * (u**2).sum() - x @ u + 0.1 * torch.log(torch.cosh(u)).sum()  # noqa: E731
    T = hp.GradientStep(objective=f, step=0.5)
    with pytest.raises(hp.NotAffineError, match="affine in u.*but T is not"):
        hp.GKMSolver(T, forward="krylov")(torch.zeros(2, dtype=D), torch.tensor([1.0, 3.0], dtype=D))


def test_forward_cg_without_a_claim_says_cg_needs_symmetry():
    A = torch.tensor([[0.5, 0.3, 0.0], [0.0, 0.2, 0.4], [0.1, 0.0, 0.3]], dtype=D)
    with pytest.raises(hp.LinearSolveError, match="forward='cg' needs a symmetric"):
        hp.GKMSolver(lambda u: A @ u + 1.0, forward="cg")(torch.zeros(3, dtype=D))


def test_max_steps_caps_the_products():
    A = torch.tensor([[3.0, 1.0], [1.0, 2.0]], dtype=D)
    T = lambda u, x: u - 0.2 * (A @ u - x)  # noqa: E731
    with pytest.warns(hp.ConvergenceWarning, match="did not converge"):  # it ran 26 products, converged=True
        u, info = hp.GKMSolver(T, forward="gmres", max_steps=1).solve(torch.zeros(2, dtype=D), torch.ones(2, dtype=D))
    assert info.steps <= 2 and not info.converged
    u, info = hp.GKMSolver(T, forward="gmres", max_steps=3).solve(torch.zeros(2, dtype=D), torch.ones(2, dtype=D))
    assert info.steps <= 3 and info.converged
