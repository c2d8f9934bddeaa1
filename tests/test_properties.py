r"""Hypothesis property tests over random linear fixed-point problems.

T(u; x) = u − s(Qu − Bx) with Q SPD or nonsymmetric with a positive-definite symmetric part, cond(Q)
up to 1e6, data at scales 1e-8, 1 and 1e8, in float32 and float64 (:func:`_oracles.make_linear`).
The references are closed forms computed in float64 on the float32-rounded data.

Properties (each a "no silent wrong answer" statement; an unattainable accuracy must come with a
named error or a :class:`hodl_plugin.ConvergenceWarning`):

- fixed point: a solve that reports ``converged`` is within its reported tolerance of u*:
  ‖u − u*‖ ≤ ‖Q⁻¹‖·tol/s (+ roundoff), and with the default tolerances that tolerance is relative to
  the problem's scale (at most 1e-3 of max(‖u‖, first residual)); otherwise it warns or raises;
- implicit hypergradient: ‖g − BᵀQ⁻ᵀ(u* − y)‖ ≤ ‖B‖‖Q⁻¹‖(‖u − u*‖ + adjoint_rtol·‖u − y‖) (+ roundoff),
  and, converged with the default tolerances and no warning, a relative error ≤ 1e-3 (+ roundoff);
  or a named error / ConvergenceWarning;
- unrolled: the K-step map's own closed form (u_K = Σ_{i<K} Mⁱ sBx, du_K/dx = Σ_{i<K} Mⁱ sB), with
  exactly K steps for tol = 0.

And over random contractive affine operators T(u; x) = Wu + Bx (‖W‖ = ρ < 1, every nonsymmetric adjoint
solver) and SPD gradient steps with any KM relaxation β: the implicit hypergradient is the closed form.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from _oracles import DT, LinearFP, make_linear, reference, rel_err
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import hodl_plugin as hp

problems = st.fixed_dictionaries(
    {
        "kind": st.sampled_from(["spd", "nonsym"]),
        "n": st.integers(2, 6),
        "m": st.integers(1, 3),
        "log_cond": st.floats(0.0, 6.0),
        "scale": st.sampled_from([1e-8, 1.0, 1e8]),
        "dtype": st.sampled_from([torch.float32, torch.float64]),
        "seed": st.integers(0, 10_000),
    }
)

SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _build(c: dict) -> tuple[LinearFP, LinearFP]:
    """The problem in the test's dtype, and the same (rounded) data in float64 for the references."""
    p = make_linear(c["kind"], n=c["n"], m=c["m"], seed=c["seed"], cond=10.0 ** c["log_cond"], scale=c["scale"],
                    dtype=c["dtype"])
    ref = LinearFP(p.Q.double(), p.B.double(), p.y.double(), p.s, p.x0.double(), p.t.double(), p.X.double(), p.kind)
    return p, ref


def _eps(dtype: torch.dtype) -> float:
    return float(torch.finfo(dtype).eps)


def _solve_recording(solver, p: LinearFP, backward: bool):
    """Run solver(0, x) (and backward of F) recording warnings; return (u, grad, exc, warnings)."""
    x = p.x0.clone().requires_grad_(True)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        try:
            u = solver(torch.zeros(p.n, dtype=p.Q.dtype), x)
            g = torch.autograd.grad(p.F(u), x)[0] if backward else None
            return u.detach(), g, None, rec
        except hp.HODLError as e:
            return None, None, e, rec


def _warned(rec) -> bool:
    return any(issubclass(w.category, hp.ConvergenceWarning) for w in rec)


@settings(max_examples=25, **SETTINGS)
@given(problems)
def test_fixed_point_within_reported_tolerance(c):
    p, r = _build(c)
    solver = hp.GKMSolver(p.T, hypergrad="implicit", max_steps=3000)
    u, _, err, rec = _solve_recording(solver, p, backward=False)
    if err is not None:
        return  # a named error
    info = solver.info
    if not info.converged:
        assert _warned(rec) or info.diverged, "stopped short of its tolerance without a ConvergenceWarning"
        return
    u = u.double()
    u_star = r.u_star(r.x0)
    Qinv = float(torch.linalg.matrix_norm(torch.linalg.inv(r.Q), 2))
    cond = float(torch.linalg.cond(r.Q))
    roundoff = 50 * p.n * _eps(c["dtype"]) * cond * float(u_star.norm())
    err_u = float((u - u_star).norm())
    assert err_u <= 1.01 * Qinv * info.tol / p.s + roundoff, (
        f"converged=True with ‖u − u*‖ = {err_u:.3e} > ‖Q⁻¹‖·tol/s = {Qinv * info.tol / p.s:.3e} (cond {cond:.1e})")
    # the default tolerance is scale-aware: relative to the size of the problem
    r0 = float((r.T(torch.zeros(r.n, dtype=DT), r.x0)).norm())
    size = max(float(u.norm()), r0)
    assert info.tol <= 1e-3 * size, f"default tol {info.tol:.1e} is not small relative to the problem ({size:.1e})"


@settings(max_examples=25, **SETTINGS)
@given(problems)
def test_implicit_hypergradient_closed_form(c):
    p, r = _build(c)
    adjoint_rtol = 1e-10 if c["dtype"] == torch.float64 else 1e-4
    solver = hp.GKMSolver(p.T, hypergrad="implicit", max_steps=3000, adjoint_rtol=adjoint_rtol)
    u, g, err, rec = _solve_recording(solver, p, backward=True)
    if err is not None:
        return  # a named error (e.g. LinearSolveError: the adjoint tolerance is out of reach)
    if not solver.info.converged:
        assert _warned(rec), "a hypergradient at a non-fixed point without a ConvergenceWarning"
        return
    u, g = u.double(), g.double()
    ref = reference(r, ("fixed",), r.x0)
    Qinv = float(torch.linalg.matrix_norm(torch.linalg.inv(r.Q), 2))
    Bn = float(torch.linalg.matrix_norm(r.B, 2))
    cond = float(torch.linalg.cond(r.Q))
    bound = 2 * Bn * Qinv * (float((u - ref.value).norm()) + adjoint_rtol * float((u - r.y).norm()))
    roundoff = 100 * p.n * _eps(c["dtype"]) * cond * (float(ref.grad.norm()) + Bn * Qinv * float((u - r.y).norm()))
    e = float((g - ref.grad).norm())
    assert e <= bound + roundoff, f"hypergradient error {e:.3e} > {bound:.3e} + {roundoff:.1e} (cond {cond:.1e})"
    # converged with the default (scale-aware) tolerance and no warning: a usable hypergradient
    assert e <= 1e-3 * float(ref.grad.norm()) + roundoff, (
        f"converged=True, no warning, but hypergradient relative error {e / float(ref.grad.norm()):.2e} "
        f"(cond {cond:.1e}, scale {c['scale']:g})")


@settings(max_examples=25, **SETTINGS)
@given(problems, st.integers(1, 40), st.sampled_from([1.0, 0.8, 0.5]))
def test_unrolled_is_the_k_step_map(c, K, beta):
    """KM relaxation β: u_{k+1} = (1−β)u_k + βT(u_k) = u_k − βs(Qu_k − Bx), the same closed form with βs."""
    p, r = _build(c)
    solver = hp.GKMSolver(p.T, hypergrad="unrolled", tol=0.0, max_steps=K, beta=beta)
    u, g, err, rec = _solve_recording(solver, p, backward=True)
    assert err is None, f"unrolled K={K}, tol=0 raised {err!r}"
    assert solver.info.steps == K
    r = LinearFP(r.Q, r.B, r.y, beta * r.s, r.x0, r.t, r.X, r.kind)
    ref = reference(r, ("unrolled", K), r.x0)
    tol = 1e-9 if c["dtype"] == torch.float64 else 2e-3
    assert rel_err(u.double(), ref.value) <= tol
    assert rel_err(g.double(), ref.grad) <= tol


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@settings(max_examples=15, **SETTINGS)
@given(problems)
def test_anderson_fixed_point_and_hypergradient(dtype, c):
    """With Anderson acceleration (history ≥ n: a Krylov method on a linear problem) ill-conditioned
    problems up to cond 1e4 converge in a few hundred steps; same honesty rules."""
    c = dict(c, dtype=dtype, log_cond=min(c["log_cond"], 4.0))
    p, r = _build(c)
    solver = hp.GKMSolver(p.T, hypergrad="implicit", max_steps=300, acceleration=hp.Anderson(history_size=6))
    u, g, err, rec = _solve_recording(solver, p, backward=True)
    if err is not None:
        return
    if not solver.info.converged:
        assert _warned(rec), "Anderson: stopped short without a ConvergenceWarning"
        return
    ref = reference(r, ("fixed",), r.x0)
    cond = float(torch.linalg.cond(r.Q))
    Qinv = float(torch.linalg.matrix_norm(torch.linalg.inv(r.Q), 2))
    roundoff = 50 * p.n * _eps(dtype) * cond * float(ref.value.norm())
    assert float((u.double() - ref.value).norm()) <= 1.01 * Qinv * solver.info.tol / p.s + roundoff


# -- contractive affine operators and SPD gradient steps -----------------------------------------------------
contractive = st.fixed_dictionaries(
    {
        "n": st.integers(2, 12),
        "m": st.integers(1, 4),
        "rho": st.floats(0.05, 0.9),
        "seed": st.integers(0, 10_000),
    }
)


@settings(max_examples=25, deadline=None)
@given(contractive, st.sampled_from(["gmres", "bicgstab", "fixed_point"]))
def test_contractive_affine_operator_implicit_is_closed_form(c, solver_name):
    """T(u; x) = W u + B x with ||W|| = ρ < 1: u* = (I-W)^{-1}Bx, ∇f = Bᵀ(I-W)^{-T}(u* - y)."""
    g = torch.Generator().manual_seed(c["seed"])
    n, m = c["n"], c["m"]
    W = torch.randn(n, n, generator=g, dtype=DT)
    W = c["rho"] * W / torch.linalg.matrix_norm(W, 2)
    B = torch.randn(n, m, generator=g, dtype=DT)
    y = torch.randn(n, generator=g, dtype=DT)
    x = torch.randn(m, generator=g, dtype=DT, requires_grad=True)
    I = torch.eye(n, dtype=DT)
    solver = hp.GKMSolver(lambda u, x: W @ u + B @ x, max_steps=5000, tol=1e-14,
                          solver=solver_name, adjoint_maxiter=5000)
    u = solver(torch.zeros(n, dtype=DT), x)
    (0.5 * ((u - y) ** 2).sum()).backward()
    u_star = torch.linalg.solve(I - W, B @ x.detach())
    expected = B.T @ torch.linalg.solve((I - W).T, u_star - y)
    assert rel_err(u.detach(), u_star) < 1e-10
    assert rel_err(x.grad, expected) < 1e-8 or float((x.grad - expected).norm()) < 1e-12


@settings(max_examples=20, deadline=None)
@given(contractive, st.sampled_from(["implicit", "unrolled"]), st.floats(0.3, 1.0))
def test_spd_quadratic_gradient_step(c, mode, beta):
    """T(u) = u - s(Qu - Bx) with Q SPD, any KM relaxation β: hypergradient = Bᵀ Q⁻¹ (u* - y)."""
    g = torch.Generator().manual_seed(c["seed"])
    n, m = c["n"], c["m"]
    R = torch.randn(n, n, generator=g, dtype=DT)
    Q = R @ R.T / n + (0.2 + c["rho"]) * torch.eye(n, dtype=DT)
    s = 1.0 / float(torch.linalg.eigvalsh(Q).max())
    B = torch.randn(n, m, generator=g, dtype=DT)
    y = torch.randn(n, generator=g, dtype=DT)
    x = torch.randn(m, generator=g, dtype=DT, requires_grad=True)
    T = hp.GradientStep(grad=lambda u, x: Q @ u - B @ x, step=s)
    solver = hp.GKMSolver(T, max_steps=200000, tol=1e-13, beta=beta, hypergrad=mode)
    u = solver(torch.zeros(n, dtype=DT), x)
    (0.5 * ((u - y) ** 2).sum()).backward()
    expected = B.T @ torch.linalg.solve(Q, torch.linalg.solve(Q, B @ x.detach()) - y)
    assert rel_err(x.grad, expected) < 1e-8 or float((x.grad - expected).norm()) < 1e-12
