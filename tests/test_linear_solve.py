"""The linear solvers (:mod:`hodl_plugin.linear_solve`) against torch.linalg.solve (float64): SPD and
nonsymmetric systems, matrix-shaped unknowns, warm starts, non-convergence reported; the per-sample mode
(``batch_dims``) against each system solved alone."""

from __future__ import annotations

import math

import pytest
import torch
from _oracles import DT, rel_err

import hodl_plugin as hp
from hodl_plugin import linear_solve as ls


def spd(n, cond, seed):
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=DT))
    return U @ torch.diag(torch.logspace(0, torch.log10(torch.tensor(cond)).item(), n, dtype=DT)) @ U.T


def nonsym(n, seed, rho=0.9):
    g = torch.Generator().manual_seed(seed)
    J = torch.randn(n, n, generator=g, dtype=DT)
    J = rho * J / torch.linalg.matrix_norm(J, 2)
    return torch.eye(n, dtype=DT) - J.T  # the adjoint matrix (I - J)^T of a contraction


@pytest.mark.parametrize("name", ["cg", "torchopt_cg", "gmres", "bicgstab"])
def test_spd(name):
    M = spd(80, 100.0, 0)
    b = torch.randn(80, dtype=DT, generator=torch.Generator().manual_seed(1))
    x, info = ls.get(name, rtol=1e-12, maxiter=2000)(lambda v: M @ v, b)
    assert info.converged and info.residual <= info.threshold * (1 + 1e-6)
    assert rel_err(x, torch.linalg.solve(M, b)) < 1e-9


@pytest.mark.parametrize("name", ["gmres", "bicgstab", "fixed_point"])
def test_nonsymmetric(name):
    M = nonsym(60, 2)
    b = torch.randn(60, dtype=DT, generator=torch.Generator().manual_seed(3))
    x, info = ls.get(name, rtol=1e-12, maxiter=5000)(lambda v: M @ v, b)
    assert info.converged
    assert rel_err(x, torch.linalg.solve(M, b)) < 1e-9


def test_matrix_shaped_unknowns_and_warm_start():
    M = nonsym(12, 4)
    B = torch.randn(3, 4, dtype=DT)
    mv = lambda V: (M @ V.reshape(-1)).reshape(3, 4)  # noqa: E731
    x, info = ls.gmres(rtol=1e-12, restart=5)(mv, B)
    assert x.shape == (3, 4) and info.converged
    x2, info2 = ls.gmres(rtol=1e-12, restart=5)(mv, B, x0=x)
    assert info2.iterations <= 2  # started at the solution: one residual product
    assert rel_err(x2, x) < 1e-10


def test_reports_non_convergence():
    M = spd(50, 1e4, 5)
    b = torch.ones(50, dtype=DT)
    for name in ("cg", "gmres", "bicgstab", "fixed_point"):
        _, info = ls.get(name, rtol=1e-14, maxiter=3)(lambda v: M @ v, b)
        assert not info.converged and info.residual > info.threshold


def test_bad_arguments():
    with pytest.raises(ValueError):
        ls.cg(rtol=0.0, atol=0.0)
    with pytest.raises(ValueError):
        ls.gmres(maxiter=0)
    with pytest.raises(ValueError, match="unknown linear solver"):
        ls.get("lu")


# -- the per-sample mode (batch_dims) against independent solves ---------------------------------------
def close(a, b, rtol):
    err = float((a - b).abs().max() / b.abs().max().clamp(min=1e-300))
    assert err <= rtol, f"relative error {err:.3e} > {rtol:.1e}"


@pytest.mark.parametrize("name", ["cg", "gmres", "fixed_point"])
@pytest.mark.parametrize("bd", [1, 2])
def test_batched_linear_solvers_match_per_sample(name, bd):
    """Per-sample mode vs each system solved alone: same products per sample, same iterate (a
    sample that met its threshold is frozen: with rtol = 1e-6 any further step would move it by
    ~1e-6), and the solution of the system itself."""
    n = 40
    g = torch.Generator().manual_seed(3)
    U, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=DT))
    A = torch.stack([(U * torch.logspace(-math.log10(c), 0, n, dtype=DT)) @ U.T for c in (2.0, 10.0, 50.0)])
    if name == "gmres":  # nonsymmetric
        A = A + 0.1 * torch.triu(torch.randn(n, n, generator=g, dtype=DT), 1) / n ** 0.5
    B = 3
    b = torch.randn(B, n, generator=g, dtype=DT)
    b[1] *= 1e4  # per-sample thresholds: rtol·‖b_i‖
    kw = {"restart": 10} if name == "gmres" else {}
    solver = ls.get(name, rtol=1e-6, maxiter=20000, **kw)
    if bd == 2:
        A2, b2 = torch.stack([A, A.flip(0)]), torch.stack([b, b.flip(0)])
        x, info = solver(lambda v: torch.einsum("pbij,pbj->pbi", A2, v), b2, batch_dims=2)
        x, its = x[0], info.iterations_per_sample[0]
        assert torch.equal(info.iterations_per_sample[1], its.flip(0))
    else:
        x, info = solver(lambda v: torch.einsum("bij,bj->bi", A, v), b, batch_dims=1)
        its = info.iterations_per_sample
    for i in range(B):
        xi, ii = solver(lambda v, i=i: A[i] @ v, b[i])
        assert int(its[i]) == ii.iterations, (i, its, ii.iterations)
        close(x[i], xi, 1e-7)  # the same iterate up to rounding (batched products round differently)
        if i < B - 1:  # stopped while others went on: frozen there (the same residual, not smaller)
            res, res_i = (float(torch.linalg.vector_norm(b[i] - A[i] @ z)) for z in (x[i], xi))
            assert 0.5 < res / res_i < 2, (i, res, res_i)
        close(x[i], torch.linalg.solve(A[i], b[i]), 2e-6 * float(torch.linalg.cond(A[i])))
    assert info.converged and its[0] < its[1] < its[2]
    assert info.iterations == int(its.max())


def test_batched_linear_solver_reports_worst_sample():
    N = 6
    A = torch.stack([torch.eye(N, dtype=DT), 0.01 * torch.eye(N, dtype=DT)])  # sample 1: Richardson diverges
    b = torch.ones(2, N, dtype=DT)
    x, info = ls.fixed_point(rtol=1e-10, maxiter=50)(lambda v: torch.einsum("bij,bj->bi", A, v), b, batch_dims=1)
    assert info.converged_per_sample.tolist() == [True, False] and not info.converged
    assert info.residual > info.threshold and info.iterations == 50
    with pytest.raises(ValueError, match="batch_dims"):
        ls.cg()(lambda v: v, b, batch_dims=2)


@pytest.mark.parametrize("name", ["cg", "gmres", "bicgstab", "fixed_point", "anderson"])
@pytest.mark.parametrize("dtype,scale", [(torch.float64, 1e-200), (torch.float64, 1e200), (torch.float32, 1e-25),
                                         (torch.float32, 1e25), (torch.float32, 1.5e38)])
@pytest.mark.parametrize("warm", [False, True])
def test_a_right_hand_side_whose_squares_leave_the_dtype_is_solved(name, dtype, scale, warm):
    """x = A⁻¹b for b at scales whose squared norm under- or overflows: the solve of b/s (s a power of 2)
    times s. Unscaled, ‖b‖ read 0 (x = 0 'converged' after 0 products) or Inf. A warm start of ones is far
    from the solution at 1e-200 / 1e-25 (once scaled, out of the dtype's range: the solve starts from 0);
    at 1.5e38 the largest entry, 3e38, rounded up to the scale 2^128 = Inf in float32."""
    A = torch.tensor([[1.0, 0.25, 0.0], [0.25, 1.2, 0.1], [0.0, 0.1, 0.8]], dtype=DT)  # I - J, ‖J‖ < 1
    b = torch.tensor([1.0, -2.0, 0.5], dtype=DT)
    exact = torch.linalg.solve(A, b)  # of b at scale 1
    rtol = 1e-5 if dtype == torch.float32 else 1e-12
    x0 = torch.ones(3, dtype=dtype) if warm else None
    x, info = ls.get(name, rtol=rtol, maxiter=500)(lambda v: A.to(dtype) @ v, (b * scale).to(dtype), x0)
    assert info.converged and info.iterations > 0
    assert float((x.double() / scale - exact).norm() / exact.norm()) < (1e-4 if dtype == torch.float32 else 1e-9)
    assert info.threshold / scale == pytest.approx(rtol * float(b.norm()), rel=1e-3)  # in the units of b


@pytest.mark.parametrize("name", ["cg", "gmres", "fixed_point"])
@pytest.mark.parametrize("atol", [0.0, 1e-300, 1e-155])  # 1e-155: binding for the 1e-150 sample only
@pytest.mark.parametrize("warm", [False, True])
def test_per_sample_right_hand_sides_at_scales_apart_are_each_solved(name, atol, warm):
    """A batch whose samples' norms lie 1e300 apart: each sample is scaled by its own power of 2 (atol in the
    units of each), so each meets its own relative tolerance. With atol > 0 one scale for the batch returned
    x = 0 'converged' for the small samples; a warm start of ones (far above the 1e-150 sample's solution)
    overflowed once scaled."""
    A = torch.tensor([[1.0, 0.25], [0.25, 1.3]], dtype=DT)  # I - J, ‖J‖ < 1
    unit = torch.tensor([[1.0, -2.0], [3.0, 1.0], [0.5, 0.5]], dtype=DT)
    scales = torch.tensor([1e-150, 1.0, 1e150], dtype=DT)
    x0 = torch.ones(3, 2, dtype=DT) if warm else None
    x, info = ls.get(name, rtol=1e-12, atol=atol, maxiter=500)(lambda v: v @ A.T, unit * scales[:, None], x0,
                                                               batch_dims=1)
    exact = torch.linalg.solve(A, unit.T).T  # per sample, at scale 1
    assert info.converged and bool(info.converged_per_sample.all())
    relative = 1e-12 * unit.norm(dim=1) >= atol / scales  # the samples whose threshold is rtol·‖b_i‖
    err = (x / scales[:, None] - exact).norm(dim=1) / exact.norm(dim=1)
    assert float(err[relative].max()) < 1e-10 and float(err.max()) < 1e-3
    assert torch.allclose(info.threshold_per_sample / scales, (1e-12 * unit.norm(dim=1)).clamp(min=atol / scales),
                          rtol=1e-6)


@pytest.mark.parametrize("name", ["cg", "gmres", "fixed_point"])
@pytest.mark.parametrize("bad", [math.inf, math.nan])
def test_a_non_finite_sample_is_not_converged_and_leaves_the_others_right(name, bad):
    """One sample of b is Inf / NaN beside samples at 1e-200 and 1e200: the others were returned as 0
    'converged' (no scaling when b held a non-finite entry), and gmres / fixed_point called the Inf sample
    converged (Inf <= Inf)."""
    A = torch.tensor([[1.0, 0.25], [0.25, 1.3]], dtype=DT)
    b = torch.tensor([[1.0, -2.0], [bad, 1.0], [3.0, 1.0], [0.5, 0.5]], dtype=DT)
    scales = torch.tensor([1e-200, 1.0, 1.0, 1e200], dtype=DT)
    x, info = ls.get(name, rtol=1e-12, maxiter=500)(lambda v: v @ A.T, b * scales[:, None], batch_dims=1)
    assert info.converged_per_sample.tolist() == [True, False, True, True] and not info.converged
    good = [0, 2, 3]
    exact = torch.linalg.solve(A, b[good].T).T
    assert float(((x[good] / scales[good, None] - exact).norm(dim=1) / exact.norm(dim=1)).max()) < 1e-10


@pytest.mark.parametrize("make", [ls.gmres, ls.fixed_point], ids=["gmres", "fixed_point"])
def test_batched_solve_with_a_subnormal_sample(make):
    """A sample whose right-hand side is subnormal (1e-310) beside a normal one: its own solution, converged,
    with a finite threshold (its scale's reciprocal overflowed: x = 0 with a NaN threshold before)."""
    torch.manual_seed(0)
    n = 4
    A = torch.eye(n, dtype=torch.float64) + 0.1 * torch.randn(2, n, n, dtype=torch.float64)
    b = torch.randn(2, n, dtype=torch.float64)
    b[1] *= 1e-310
    x, info = make(rtol=1e-12)(lambda v: torch.einsum("bij,bj->bi", A, v), b, batch_dims=1)
    exact = torch.linalg.solve(A, b)
    assert info.converged_per_sample.tolist() == [True, True]
    assert torch.isfinite(info.threshold_per_sample).all()
    assert float((x[1] - exact[1]).abs().max()) <= 1e-12 * float(exact[1].abs().max())


def test_implicit_gradient_with_a_subnormal_upstream_sample():
    """Through the implicit derivative: a sample whose upstream gradient is subnormal gets (I - A_bᵀ)⁻¹w_b
    (a LinearSolveError with threshold NaN before)."""
    torch.manual_seed(5)
    n = 4
    M = torch.randn(2, n, n, dtype=torch.float64)
    A = M / torch.linalg.matrix_norm(M, ord=2)[:, None, None] * 0.5
    x = torch.randn(2, n, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, n, dtype=torch.float64)
    w[1] *= 1e-310
    solver = hp.GKMSolver(lambda u, x: torch.einsum("bij,bj->bi", A, u) + x, batch_dims=1, tol=1e-13,
                          hypergrad=hp.Implicit("gmres"))
    (w * solver(torch.zeros(2, n, dtype=torch.float64), x)).sum().backward()
    ref = torch.linalg.solve(torch.eye(n, dtype=torch.float64) - A.mT, w)
    assert float((x.grad[1] - ref[1]).abs().max()) <= 1e-10 * float(ref[1].abs().max())
    assert float((x.grad[0] - ref[0]).abs().max()) <= 1e-10 * float(ref[0].abs().max())


@pytest.mark.parametrize("make", [ls.gmres, ls.cg, ls.bicgstab, ls.fixed_point])
def test_bad_systems_are_named(make):
    """Input a solver cannot serve raises a TypeError / ValueError naming the argument (raw torch errors
    before); an empty system returns at once."""
    solve = make()
    with pytest.raises(TypeError, match="complex systems are not supported"):
        solve(lambda v: 2 * v, torch.ones(3, dtype=torch.complex128))
    with pytest.raises(TypeError, match="real floating tensor"):
        solve(lambda v: 2 * v, torch.ones(3, dtype=torch.long))
    with pytest.raises(ValueError, match="warm start x0"):
        solve(lambda v: 2 * v, torch.ones(3, 5, dtype=torch.float64), x0=torch.zeros(3, 6, dtype=torch.float64))
    x, info = solve(lambda v: 2 * v, torch.ones(0, 4, dtype=torch.float64))
    assert x.shape == (0, 4) and info.converged and info.iterations == 0


def test_zero_right_hand_side_with_a_warm_start_returns_zero_at_once():
    """b = 0 (a sample of it) with a nonzero warm start: x = 0 without iterating (GMRES ran 583 products until
    ‖Ax‖² underflowed, and reported an underflowed residual)."""
    torch.manual_seed(1)
    n = 20
    A = torch.eye(n, dtype=torch.float64) + 0.5 * torch.randn(n, n, dtype=torch.float64) / n**0.5
    x, info = ls.gmres(rtol=1e-10, restart=5)(lambda v: A @ v, torch.zeros(n, dtype=torch.float64),
                                              x0=torch.randn(n, dtype=torch.float64))
    assert info.converged and info.iterations <= 1 and float(x.abs().max()) == 0.0
    b = torch.stack([torch.randn(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)])
    x, info = ls.gmres(rtol=1e-10)(lambda v: v @ A.T, b, x0=torch.randn(2, n, dtype=torch.float64), batch_dims=1)
    assert info.converged and float(x[1].abs().max()) == 0.0 and int(info.iterations_per_sample[1]) <= 1


@pytest.mark.parametrize("make", [ls.cg, ls.gmres, ls.bicgstab, ls.fixed_point, ls.anderson_fixed_point,
                                  lambda: ls.FunctionSolver(fn=lambda mv, b, x0=None: 2 * b)],
                         ids=["cg", "gmres", "bicgstab", "fixed_point", "anderson", "function"])
def test_autograd_through_the_iterations_is_refused_by_name(make):
    """Autograd through a solver's iterations gives wrong derivatives (BiCGSTAB's gradient w.r.t. b was off
    by 1e13 on a converged solve; GMRES and Anderson raised torch's raw in-place errors): a right-hand side,
    warm start or matvec that carries a derivative (requires grad, or a forward-mode dual) is refused by name,
    and so is a call under torch.func transforms; the derivative of x = A⁻¹b comes from hp.custom_root
    (checked against A⁻ᵀw)."""
    A = 0.5 * torch.eye(4, dtype=DT) + 0.05 * torch.arange(16, dtype=DT).reshape(4, 4) / 16
    b = torch.arange(1.0, 5.0, dtype=DT, requires_grad=True)
    solver = make()
    with pytest.raises(hp.errors.ConfigurationError, match="custom_root"):
        solver(lambda z: A @ z, b)
    with pytest.raises(hp.errors.ConfigurationError, match="do not differentiate"):
        solver(lambda z: A @ z, b.detach(), x0=torch.zeros(4, dtype=DT, requires_grad=True))
    Ar = A.clone().requires_grad_(True)
    if not isinstance(solver, ls.FunctionSolver):  # (its fn here ignores the matrix)
        with pytest.raises(hp.errors.ConfigurationError, match="do not differentiate"):
            solver(lambda z: Ar @ z, b.detach())
    with torch.no_grad():
        x, _ = solver(lambda z: A @ z, b)
    assert not x.requires_grad
    # forward mode: dual numbers in b, or in the matrix (GMRES's tangent was 16% off, without an error)
    import torch.autograd.forward_ad as fwAD

    with fwAD.dual_level():
        with pytest.raises(hp.errors.ConfigurationError, match="do not differentiate"):
            solver(lambda z: A @ z, fwAD.make_dual(b.detach(), torch.ones(4, dtype=DT)))
        if not isinstance(solver, ls.FunctionSolver):
            Ad = fwAD.make_dual(A, torch.ones_like(A))
            with pytest.raises(hp.errors.ConfigurationError, match="do not differentiate"):
                solver(lambda z: Ad @ z, b.detach())
    # torch.func transforms (BiCGSTAB's torch.func.grad was off by 1e111; vmap raised torch's .item() error)
    for transform in (lambda f: torch.func.grad(lambda b: f(b).sum()), torch.func.vmap,
                      lambda f: (lambda b: torch.func.jvp(f, (b,), (b,))[1])):
        with pytest.raises(hp.errors.ConfigurationError, match="torch.func transforms"):
            transform(lambda b: solver(lambda z: A @ z, b)[0])(b.detach().expand(2, 4).clone()
                                                                if transform is torch.func.vmap else b.detach())
    solve = hp.custom_root(lambda x, b: A @ x - b)(lambda x0, b: torch.linalg.solve(A, b))
    w = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=DT)
    (g,) = torch.autograd.grad((w * solve(torch.zeros(4, dtype=DT), b)).sum(), b)
    assert torch.allclose(g, torch.linalg.solve(A.T, w), rtol=1e-10, atol=0)


@pytest.mark.parametrize("bd", [0, 1])
@pytest.mark.parametrize("name", ["cg", "gmres", "bicgstab", "fixed_point", "anderson_fixed_point"])
def test_the_reported_residual_is_that_of_the_returned_point_when_maxiter_stops(name, bd):
    """``info.residual`` is ‖b - Ax‖ of the returned x, also when ``maxiter`` stops an unconverged solve
    (Neumann reported the residual of the iterate before the one it returned: 5.7e5 for 5.0e7)."""
    if bd and name in ("bicgstab", "anderson_fixed_point"):
        pytest.skip("no per-sample mode")
    torch.manual_seed(0)
    n = 20
    Q = torch.linalg.qr(torch.randn(n, n, dtype=DT))[0]
    M = Q @ torch.diag(torch.logspace(0, 2, n, dtype=DT)) @ Q.T  # eigenvalues 1..100: Richardson diverges
    b = torch.randn(3, n, dtype=DT) if bd else torch.randn(n, dtype=DT)
    for maxiter in (1, 2, 3, 5):
        solver = getattr(ls, name)(rtol=1e-12, maxiter=maxiter)
        x, info = solver(lambda v: v @ M.T, b, batch_dims=bd) if bd else solver(lambda v: M @ v, b)
        true = torch.linalg.vector_norm(b - x @ M.T, dim=-1)
        assert not info.converged
        if bd:  # (info.residual: the sample farthest from its threshold)
            assert torch.allclose(info.residual_per_sample, true, rtol=1e-6, atol=0), (maxiter, info, true)
            true = true[int(torch.argmax(info.residual_per_sample / info.threshold_per_sample))]
        assert math.isclose(info.residual, float(true), rel_tol=1e-6), (maxiter, info.residual, true)


@pytest.mark.parametrize("name", ["cg", "gmres", "bicgstab", "fixed_point", "anderson_fixed_point"])
def test_a_matvec_of_the_wrong_shape_or_dtype_is_named(name):
    """A product of another shape or dtype than its input raised torch's raw size / dtype errors."""
    b = torch.ones(12, dtype=DT)
    solver = getattr(ls, name)()
    for bad in (lambda v: v[:5], lambda v: (0.5 * v).float()):
        with pytest.raises(ValueError, match="matvec must return a tensor like its input"):
            solver(bad, b)


# ------------------------------------------------------------------------------------------------
# _solve_checked: the checks around a solve of an implicit derivative
# ------------------------------------------------------------------------------------------------
def test_solve_checked_refuses_cg_on_an_asymmetric_matrix_and_gmres_solves_it():
    A = nonsym(30, 3)
    b = torch.randn(30, dtype=DT, generator=torch.Generator().manual_seed(4))
    with pytest.raises(hp.LinearSolveError, match="symmetric"):
        ls.cg(rtol=1e-12)._solve_checked(lambda v: A @ v, b)
    x, info = ls.gmres(rtol=1e-12)._solve_checked(lambda v: A @ v, b)
    assert info.converged and rel_err(x, torch.linalg.solve(A, b)) < 1e-10
    M = spd(30, 50.0, 5)  # and CG on a symmetric one is not refused
    x, _ = ls.cg(rtol=1e-12)._solve_checked(lambda v: M @ v, b)
    assert rel_err(x, torch.linalg.solve(M, b)) < 1e-10


@pytest.mark.parametrize("name", ["gmres", "bicgstab"])
def test_solve_checked_probes_a_singular_matrix_only_when_asked(name):
    # A singular, b in its range (a consistent system): the solve alone succeeds, the probe names the singularity
    A = torch.diag(torch.tensor([1.0, 2.0, 0.0], dtype=DT))
    b = torch.tensor([1.0, 4.0, 0.0], dtype=DT)
    x, info = ls.get(name, rtol=1e-12, maxiter=50)._solve_checked(lambda v: A @ v, b)
    assert info.converged and torch.allclose(x, torch.tensor([1.0, 2.0, 0.0], dtype=DT), atol=1e-12)
    with pytest.raises(hp.LinearSolveError, match="singular"):
        ls.get(name, rtol=1e-12, maxiter=50)._solve_checked(lambda v: A @ v, b, probe_singular=True)


def test_solve_checked_uses_a_warm_start_only_where_it_beats_zero_per_sample():
    A = nonsym(6, 7)
    b = torch.randn(2, 6, dtype=DT, generator=torch.Generator().manual_seed(8))
    exact = torch.linalg.solve(A, b.T).T
    calls = []

    def mv(v):
        calls.append(v.clone())
        return v @ A.T
    x0 = torch.stack([exact[0], 1e6 * torch.ones(6, dtype=DT)])  # sample 0: the solution; sample 1: far worse than 0
    x, info = ls.gmres(rtol=1e-12)._solve_checked(mv, b, x0, samples=1)
    assert info.converged and rel_err(x, exact) < 1e-10
    start = calls[1]  # (calls[0] measured the warm start) the solve started from x0 on sample 0, from 0 on sample 1
    assert torch.equal(start[0], exact[0]) and torch.equal(start[1], torch.zeros(6, dtype=DT))


def test_solve_checked_gives_each_sample_its_tolerance_without_a_per_sample_mode():
    # BiCGSTAB solves the batch as one system: each sample's right-hand side is brought to unit size first,
    # so the small sample is as accurate as the large one (one threshold would leave it at rtol·‖b‖/‖b_small‖)
    # sample 0: a large right-hand side on an easy system (2I); sample 1: a small one on a hard system
    A = torch.stack([2 * torch.eye(40, dtype=DT), nonsym(40, 9, rho=0.99)])
    g = torch.Generator().manual_seed(10)
    b = torch.randn(2, 40, dtype=DT, generator=g) * torch.tensor([[1.0], [1e-8]], dtype=DT)
    x, info = ls.bicgstab(rtol=1e-8)._solve_checked(lambda v: (A @ v[..., None])[..., 0], b, samples=1)
    exact = torch.linalg.solve(A, b)
    assert info.converged
    for i in range(2):
        assert rel_err(x[i], exact[i]) < 1e-6


def test_a_solve_function_asking_for_a_wrongly_shaped_product_or_returning_another_dtype_is_named():
    """Your own solve(matvec, b, x0): with batch_dims, b holds the whole batch; a product asked for one
    sample's vector raised torch's raw 'Mismatch in shape' from deep in autograd; a float32 answer to a
    float64 system was blamed on matvec ('matvec must return a tensor like its input')."""
    M = spd(6, 10.0, 3)
    b = torch.randn(3, 6, dtype=DT, generator=torch.Generator().manual_seed(4))

    def per_column(matvec, b, x0=None):  # builds the matrix from products with single vectors
        E = torch.eye(b.shape[-1], dtype=b.dtype)
        return torch.linalg.solve(torch.stack([matvec(E[j]) for j in range(b.shape[-1])], -1), b)

    with pytest.raises(ValueError, match=r"asked for a product with \(6,\).*shaped like b \(3, 6\)"):
        ls.as_solver(per_column)(lambda v: v @ M.T, b)
    x, info = ls.as_solver(per_column)(lambda v: M @ v, b[0])  # one system: right
    assert info.converged and rel_err(x, torch.linalg.solve(M, b[0])) < 1e-12
    with pytest.raises(TypeError, match=r"must return x like b .*float64.*got .*float32"):
        ls.as_solver(lambda matvec, b, x0=None: b.float())(lambda v: M @ v, b[0])
