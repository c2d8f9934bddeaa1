"""The stop test of the GKM loop (``hodl_plugin._stopping``): ``converged=True`` means
‖T(u) − u‖ ≤ max(tol·‖u‖, atol) at the returned u; far starts, aggregation, low precision, stalls.

References are computed here from the operators (closed forms, the residual recomputed at the
returned point), never read from the solver's own diagnostics.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import hodl_plugin as hp

D = torch.float64
MODES = ["implicit", "inexact", "unrolled", "truncated", "first_order"]


def _tols(mode: str, tol: float) -> dict:
    kw = dict(eps=tol, delta=tol) if mode == "inexact" else dict(tol=tol)
    if mode == "truncated":
        kw["steps"] = 3
    return kw


def _residual(T, u, *params) -> float:
    with torch.no_grad():
        return float((T(u, *params) - u).norm())


@pytest.mark.parametrize("mode", MODES)
def test_a_far_start_does_not_loosen_the_threshold(mode):
    """u0 = 1e6 for u* = 2e-6: the threshold used to scale with the first residual (45 % off, converged)."""
    T = lambda u, x: 0.5 * u + x  # noqa: E731
    solver = hp.GKMSolver(T, hypergrad=mode, **_tols(mode, 1e-10))
    x = torch.full((3,), 1e-6, dtype=D)
    u, info = solver.solve(torch.full((3,), 1e6, dtype=D), x)
    assert info.converged
    assert _residual(T, u, x) <= 1e-10 * float(u.norm())
    assert float((u - 2e-6).abs().max()) <= 2 * 1e-10 * 2e-6 * 2  # error ≤ r / (1 − ½)


def test_inexact_warm_start_after_the_solution_shrank():
    """The inexact mode's warm start is a far start whenever the solution shrinks between calls."""
    T = lambda u, x: 0.5 * u + x  # noqa: E731
    solver = hp.GKMSolver(T, hypergrad="inexact", eps=1e-8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for scale in (1.0, 1e-6):
            x = torch.full((2,), scale, dtype=D, requires_grad=True)
            u = solver(torch.zeros(2, dtype=D), x, key="batch")
            u.sum().backward()
            assert solver.info.converged and float((u.detach() - 2 * scale).abs().max()) <= 4e-8 * 2 * scale
            assert torch.allclose(x.grad, torch.full((2,), 2.0, dtype=D))


def test_inside_aggregation_reports_the_fixed_point_residual_of_the_returned_point():
    """info.residual was ‖T(w_k) − u_k‖ (aggregated), 750× below the true residual at the returned u."""
    g = torch.Generator().manual_seed(0)
    A, b = torch.randn(3, 6, dtype=D, generator=g), torch.randn(3, dtype=D, generator=g)
    s = 1 / float(torch.linalg.matrix_norm(A, 2)) ** 2
    z = torch.randn(6, dtype=D, generator=g)
    T = lambda u: u - s * A.T @ (A @ u - b)  # noqa: E731
    for max_steps, tol in ((3000, 1e-7), (20000, 1e-5)):
        solver = hp.GKMSolver(T, upper=lambda u: 0.5 * ((u - z) ** 2).sum(), alpha=hp.Harmonic(1.0),
                              max_steps=max_steps, tol=tol)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", hp.ConvergenceWarning)
            u, info = solver.solve(torch.zeros(6, dtype=D))
        true = _residual(lambda v: T(v), u)
        assert info.residual == pytest.approx(true, rel=1e-9)
        assert info.converged == (true <= tol * float(u.norm()))


def test_rtol_is_removed():
    with pytest.raises(TypeError, match="tol is the relative tolerance"):
        hp.GKMSolver(lambda u: 0.5 * u, rtol=1e-3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_never_claims_convergence_by_default(dtype):
    """bfloat16 stopped at 18.4 for u* = 100 (A = diag(0.01 … 1)), converged=True, silently."""
    A = torch.diag(torch.linspace(0.01, 1, 64, dtype=dtype))
    b = A @ torch.full((64,), 100.0, dtype=dtype)
    solver = hp.GKMSolver(hp.GradientStep(grad=lambda u, b: A @ u - b, step=1.0))
    with pytest.warns(hp.ConvergenceWarning, match="does not certify a fixed point|rounding floor"):
        u, info = solver.solve(torch.zeros(64, dtype=dtype), b)
    assert not info.converged
    # a tolerance given explicitly is a residual threshold the caller accepts: converged means it holds
    solver = hp.GKMSolver(hp.GradientStep(grad=lambda u, b: A @ u - b, step=1.0), tol=0.05)
    u, info = solver.solve(torch.zeros(64, dtype=dtype), b)
    if info.converged:
        assert _residual(lambda v, b: v - (A @ v - b), u.float().to(dtype), b) <= 0.05 * float(u.float().norm())


def test_float32_converges_where_half_precision_cannot():
    A = torch.diag(torch.linspace(0.01, 1, 64))
    b = A @ torch.full((64,), 100.0)
    u, info = hp.GKMSolver(hp.GradientStep(grad=lambda u, b: A @ u - b, step=1.0)).solve(torch.zeros(64), b)
    # error ≤ residual / σ_min(I − ∂T) = 1e-5·‖u‖ / 0.01 = 0.8
    assert info.converged and float((u - 100).abs().max()) < 0.8


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-12), (torch.float64, 1e-20)])
def test_rounding_floor_stops_early_with_a_warning(dtype, tol):
    """A tolerance below what the dtype resolves (a tanh equilibrium: its residual stalls at rounding
    level, 1e-7 in float32): the run stops at the floor, not after max_steps, and says so."""
    g = torch.Generator().manual_seed(1)
    W = torch.randn(32, 32, generator=g)
    W = (0.9 * W / torch.linalg.matrix_norm(W, 2)).to(dtype)
    x = torch.randn(32, generator=g).to(dtype)
    solver = hp.GKMSolver(lambda z, x: torch.tanh(W @ z + x), tol=tol, max_steps=100000)
    with pytest.warns(hp.ConvergenceWarning, match=f"rounding floor of {str(dtype)[6:]}"):
        u, info = solver.solve(torch.zeros(32, dtype=dtype), x)
    assert not info.converged and not info.diverged and info.steps < 200
    assert _residual(lambda z: torch.tanh(W @ z + x), u) <= 100 * torch.finfo(dtype).eps * float(u.norm())


def test_a_learned_operator_outside_the_contraction_region_is_detected_early():
    """A DEQ z = tanh(Wz + x) with ‖W‖₂ = 1.5 and a period-2 orbit: the residual never decreases, so the
    run is stopped as not converging within a few hundred steps (it used to take thousands)."""
    n = 8
    W = -1.5 * torch.eye(n, dtype=D)  # tanh(−1.5 z + x): the fixed point is unstable, iterates oscillate
    x = torch.full((n,), 0.1, dtype=D)
    solver = hp.GKMSolver(lambda z, x: torch.tanh(W @ z + x), max_steps=100000)
    with pytest.raises(hp.DivergenceError, match="not converging|slow divergence"):
        solver(torch.full((n,), 0.5, dtype=D), x)
    warn = hp.GKMSolver(lambda z, x: torch.tanh(W @ z + x), max_steps=100000, on_divergence="warn")
    with pytest.warns(hp.ConvergenceWarning, match="diverged"):
        _, info = warn.solve(torch.full((n,), 0.5, dtype=D), x)
    assert info.diverged and info.steps <= 500


def test_a_slow_but_converging_iteration_is_not_a_stall():
    """Contraction 0.999 with check_every=1: the residual shrinks by 0.1 % per check, far below the
    1 % of a new minimum per check — the minimum still moves, so the run is not stopped."""
    solver = hp.GKMSolver(lambda u, x: 0.999 * u + x, max_steps=30000, tol=1e-10, check_every=1)
    u, info = solver.solve(torch.zeros(2, dtype=D), torch.ones(2, dtype=D))
    assert info.converged and not info.diverged and float((u - 1000).abs().max()) < 1e-4


def test_unrolled_steps_at_least_once_from_a_fixed_point():
    """u0 already a fixed point: the implicit mode returns u0 (0 steps), an unrolled run returns u_1 so
    that the result depends on x (u0 carries no derivative)."""
    T = lambda u, x: 0.5 * u + x  # noqa: E731
    x = torch.ones(2, dtype=D, requires_grad=True)
    u, info = hp.GKMSolver(T, hypergrad="implicit").solve(2 * x.detach(), x)
    assert info.steps == 0 and torch.equal(u.detach(), 2 * x.detach())
    u, info = hp.GKMSolver(T, hypergrad="unrolled", check_every=1).solve(2 * x.detach(), x)
    assert info.steps == 1 and u.requires_grad
    u.sum().backward()
    assert torch.allclose(x.grad, torch.ones(2, dtype=D))  # the one-step map: du_1/dx = I
