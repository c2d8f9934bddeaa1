"""The stop test of the GKM loop (``hodl_plugin._stopping``): ``converged=True`` means
‖T(u) − u‖ ≤ max(tol·‖u‖, atol) at the returned u; far starts, aggregation, low precision, stalls.

References are computed here from the operators (closed forms, the residual recomputed at the
returned point), never read from the solver's own diagnostics. The rule: :ref:`math-stopping`.
"""

from __future__ import annotations

import math
import re
import warnings

import pytest
import torch
from _assertions import conv_warned, run_recording, zeros
from _oracles import DT, make_linear, reference, rel_err

import hodl_plugin as hp
from hodl_plugin.gkm import default_tol

MODES = ["implicit", "inexact", "unrolled", "truncated", "first_order"]


def _tols(mode: str, tol: float) -> dict:
    kw = dict(eps=tol, delta=tol) if mode == "inexact" else dict(tol=tol)
    if mode == "truncated":
        kw["steps"] = 3
    return kw


def _opts(mode):
    return {"steps": 5} if mode == "truncated" else {}


def _residual(T, u, *params) -> float:
    with torch.no_grad():
        return float((T(u, *params) - u).norm())


def spd(n, cond, seed=0, dtype=DT):
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=dtype))
    ev = torch.logspace(0, math.log10(cond), n, dtype=dtype)
    return (U * ev) @ U.T, ev.max()


@pytest.mark.parametrize("mode", MODES)
def test_a_far_start_does_not_loosen_the_threshold(mode):
    """u0 = 1e6 for u* = 2e-6: the threshold used to scale with the first residual (45 % off, converged)."""
    T = lambda u, x: 0.5 * u + x  # noqa: E731
    solver = hp.GKMSolver(T, hypergrad=mode, **_tols(mode, 1e-10))
    x = torch.full((3,), 1e-6, dtype=DT)
    u, info = solver.solve(torch.full((3,), 1e6, dtype=DT), x)
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
            x = torch.full((2,), scale, dtype=DT, requires_grad=True)
            u = solver(torch.zeros(2, dtype=DT), x, key="batch")
            u.sum().backward()
            assert solver.info.converged and float((u.detach() - 2 * scale).abs().max()) <= 4e-8 * 2 * scale
            assert torch.allclose(x.grad, torch.full((2,), 2.0, dtype=DT))


def test_inside_aggregation_reports_the_fixed_point_residual_of_the_returned_point():
    """info.residual was ‖T(w_k) − u_k‖ (aggregated), 750× below the true residual at the returned u."""
    g = torch.Generator().manual_seed(0)
    A, b = torch.randn(3, 6, dtype=DT, generator=g), torch.randn(3, dtype=DT, generator=g)
    s = 1 / float(torch.linalg.matrix_norm(A, 2)) ** 2
    z = torch.randn(6, dtype=DT, generator=g)
    T = lambda u: u - s * A.T @ (A @ u - b)  # noqa: E731
    for max_steps, tol in ((3000, 1e-7), (20000, 1e-5)):
        solver = hp.GKMSolver(T, upper=lambda u: 0.5 * ((u - z) ** 2).sum(), alpha=hp.Harmonic(1.0),
                              max_steps=max_steps, tol=tol)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", hp.ConvergenceWarning)
            u, info = solver.solve(torch.zeros(6, dtype=DT))
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
    level, 1e-7 in float32): the run stops at the floor, not after max_steps, and says so. (n = 128: in 32
    dimensions some CPUs' rounding lands on a float64 point with T(u) == u exactly, residual 0, which is
    converged; in 128 the chance that every entry does is negligible.)"""
    n = 128
    g = torch.Generator().manual_seed(1)
    W = torch.randn(n, n, generator=g)
    W = (0.9 * W / torch.linalg.matrix_norm(W, 2)).to(dtype)
    x = torch.randn(n, generator=g).to(dtype)
    solver = hp.GKMSolver(lambda z, x: torch.tanh(W @ z + x), tol=tol, max_steps=100000)
    with pytest.warns(hp.ConvergenceWarning, match=f"rounding floor of {str(dtype)[6:]}"):
        u, info = solver.solve(torch.zeros(n, dtype=dtype), x)
    assert not info.converged and not info.diverged and info.steps < 200
    assert _residual(lambda z: torch.tanh(W @ z + x), u) <= 100 * torch.finfo(dtype).eps * float(u.norm())


def test_a_learned_operator_outside_the_contraction_region_is_detected_early():
    """A DEQ z = tanh(Wz + x) with ‖W‖₂ = 1.5 and a period-2 orbit: the residual never decreases, so the
    run is stopped as not converging within a few hundred steps (it used to take thousands)."""
    n = 8
    W = -1.5 * torch.eye(n, dtype=DT)  # tanh(−1.5 z + x): the fixed point is unstable, iterates oscillate
    x = torch.full((n,), 0.1, dtype=DT)
    solver = hp.GKMSolver(lambda z, x: torch.tanh(W @ z + x), max_steps=100000)
    with pytest.raises(hp.DivergenceError, match="not converging|slow divergence"):
        solver(torch.full((n,), 0.5, dtype=DT), x)
    warn = hp.GKMSolver(lambda z, x: torch.tanh(W @ z + x), max_steps=100000, on_divergence="warn")
    with pytest.warns(hp.ConvergenceWarning, match="diverged"):
        _, info = warn.solve(torch.full((n,), 0.5, dtype=DT), x)
    assert info.diverged and info.steps <= 500


def test_a_slow_but_converging_iteration_is_not_a_stall():
    """Contraction 0.999 with check_every=1: the residual shrinks by 0.1 % per check, far below the
    1 % of a new minimum per check — the minimum still moves, so the run is not stopped."""
    solver = hp.GKMSolver(lambda u, x: 0.999 * u + x, max_steps=30000, tol=1e-10, check_every=1)
    u, info = solver.solve(torch.zeros(2, dtype=DT), torch.ones(2, dtype=DT))
    assert info.converged and not info.diverged and float((u - 1000).abs().max()) < 1e-4


def test_unrolled_steps_at_least_once_from_a_fixed_point():
    """u0 already a fixed point: the implicit mode returns u0 (0 steps), an unrolled run returns u_1 so
    that the result depends on x (u0 carries no derivative)."""
    T = lambda u, x: 0.5 * u + x  # noqa: E731
    x = torch.ones(2, dtype=DT, requires_grad=True)
    u, info = hp.GKMSolver(T, hypergrad="implicit").solve(2 * x.detach(), x)
    assert info.steps == 0 and torch.equal(u.detach(), 2 * x.detach())
    u, info = hp.GKMSolver(T, hypergrad="unrolled", check_every=1).solve(2 * x.detach(), x)
    assert info.steps == 1 and u.requires_grad
    u.sum().backward()
    assert torch.allclose(x.grad, torch.ones(2, dtype=DT))  # the one-step map: du_1/dx = I


# -- a run that stops short of its tolerance warns; divergence is caught -------------------------------
@pytest.mark.parametrize("mode", MODES)
def test_nonconverged_forward_warns_in_every_mode(mode):
    solver = hp.GKMSolver(lambda u, x: 0.99 * u + x, max_steps=30, hypergrad=mode, **_opts(mode))
    x = torch.ones(3, dtype=DT, requires_grad=True)
    with pytest.warns(hp.ConvergenceWarning, match="did not converge") as rec:
        u = solver(torch.zeros(3, dtype=DT), x)
    msg = str([w.message for w in rec if "did not converge" in str(w.message)][0])
    assert "30 steps" in msg and "threshold" in msg and "max_steps" in msg
    assert not solver.info.converged
    u.sum().backward()


@pytest.mark.parametrize("mode", ["implicit", "inexact", "first_order"])
def test_a_forward_stopped_100x_short_of_its_tolerance_warns(mode):
    solver = hp.GKMSolver(lambda u, x: 0.99 * u + x, hypergrad=mode, max_steps=20)  # needs ~2000 steps
    x = torch.ones(3, dtype=DT, requires_grad=True)

    def run():
        u = solver(zeros(3), x)
        u.sum().backward()
        return solver.info

    info, err, rec = run_recording(run)
    if err is not None:
        assert isinstance(err, hp.HODLError), f"generic error {type(err).__name__}: {err}"
        return
    assert not info.converged
    assert conv_warned(rec), f"{mode}: a forward stopped 100x short of its tolerance passed silently"


def test_exact_steps_do_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error", hp.ConvergenceWarning)
        hp.GKMSolver(lambda u, x: 0.99 * u + x, max_steps=30, tol=0.0, hypergrad="unrolled")(
            torch.zeros(3, dtype=DT), torch.ones(3, dtype=DT))


def test_slow_divergence_is_caught():
    # T = 1.001 u + x: u_k = x (1.001^k - 1) / 0.001 grows without bound, slowly
    solver = hp.GKMSolver(lambda u, x: 1.001 * u + x, max_steps=1000)
    with pytest.raises(hp.DivergenceError, match="diverged at step 209.*not converging"):
        solver(torch.zeros(1, dtype=DT), torch.ones(1, dtype=DT))  # no decrease for 200 steps: not a contraction
    warn = hp.GKMSolver(lambda u, x: 1.001 * u + x, max_steps=1000, on_divergence="warn")
    with pytest.warns(hp.ConvergenceWarning, match="diverged"):
        u, info = warn.solve(torch.zeros(1, dtype=DT), torch.ones(1, dtype=DT))
    assert info.diverged and not info.converged and float(u) < 1717


@pytest.mark.parametrize("mode", MODES)
def test_slow_divergence_is_never_silent_in_any_mode(mode):
    kw = {"steps": 5} if mode == "truncated" else {}
    solver = hp.GKMSolver(lambda u, x: 1.001 * u + x, hypergrad=mode, **kw)  # grows 1.7e3x in 1000 steps
    x = torch.ones(2, dtype=DT, requires_grad=True)

    def run():
        u = solver(zeros(2), x)
        u.sum().backward()
        return solver.info

    info, err, rec = run_recording(run)
    if err is not None:
        assert isinstance(err, hp.HODLError), f"generic error {type(err).__name__}: {err}"
        return
    assert not info.converged
    assert conv_warned(rec) or info.diverged, f"{mode}: u grew to {1717:.0f} with no warning and diverged=False"
    assert conv_warned(rec), f"{mode}: diverged=True but no ConvergenceWarning"


def test_slow_convergence_is_not_called_divergence():
    # contraction 0.999: monotone residual decrease, must only warn "did not converge"
    solver = hp.GKMSolver(lambda u, x: 0.999 * u + x, max_steps=1000, check_every=1, hypergrad="unrolled")
    with pytest.warns(hp.ConvergenceWarning, match="did not converge"):
        u, info = solver.solve(torch.zeros(2, dtype=DT), torch.ones(2, dtype=DT))
    assert not info.diverged
    assert torch.allclose(u, torch.full((2,), (1 - 0.999**1000) / 0.001, dtype=DT))


def test_noise_level_residual_jitter_with_tol0_is_not_divergence():
    # exactly K steps far past convergence: the residual jitters at rounding level
    Q, L = spd(30, 10.0)
    b = torch.randn(30, dtype=DT, generator=torch.Generator().manual_seed(3))
    solver = hp.GKMSolver(lambda u, x: u - (Q @ u - x) / L, max_steps=3000, tol=0.0, check_every=1)
    u, info = solver.solve(torch.zeros(30, dtype=DT), b)
    assert not info.diverged and info.converged
    assert torch.allclose(u, torch.linalg.solve(Q, b), rtol=1e-10)


# -- default tolerances are relative to the problem's scale ------------------------------------------
@pytest.mark.parametrize("scale", [1e-8, 1.0, 1e8])
@pytest.mark.parametrize("mode", ["implicit", "inexact", "first_order", "unrolled"])
def test_default_tolerance_is_relative(scale, mode):
    Q, L = spd(20, 50.0)
    b = scale * torch.randn(20, dtype=DT, generator=torch.Generator().manual_seed(1))
    solver = hp.GKMSolver(lambda u, x: u - (Q @ u - x) / L, max_steps=20000, hypergrad=mode)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", hp.ConvergenceWarning)  # the inexact mode's own eps
        u, info = solver.solve(torch.zeros(20, dtype=DT), b)
    exact = torch.linalg.solve(Q, b)
    err = float((u - exact).norm() / exact.norm())
    if mode != "inexact":  # the inexact mode stops at its own accuracy eps
        assert info.converged
        assert err < 1e-7, err


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("scale", [1e-8, 1e8])
def test_scale_aware_defaults_converged_means_accurate(mode, scale):
    p = make_linear("spd", seed=7, scale=scale)
    solver = hp.GKMSolver(p.T, hypergrad=mode)
    x = p.x0.clone().requires_grad_(True)

    def run():
        u = solver(zeros(p.n), x)
        (g,) = torch.autograd.grad(p.F(u), x)
        return u.detach(), g

    out, err, rec = run_recording(run)
    if err is not None:
        assert isinstance(err, hp.HODLError), f"generic error {type(err).__name__}: {err}"
        return
    u, g = out
    ref_kind = {"first_order": ("first_order",), "truncated": ("truncated", None, 10, False)}.get(mode, ("fixed",))
    r = reference(p, ref_kind, p.x0)
    tol = 2e-2 if mode == "inexact" else 1e-4
    if not solver.info.converged:
        assert conv_warned(rec), f"{mode}: not converged and no ConvergenceWarning"
        return
    assert rel_err(u, r.value) <= tol, f"{mode} scale {scale:g}: converged=True with u error {rel_err(u, r.value):.2e}"
    assert rel_err(g, r.grad) <= tol, f"{mode} scale {scale:g}: hypergradient error {rel_err(g, r.grad):.2e}"


def test_float32_default_is_reachable():
    Q, L = spd(20, 20.0, dtype=torch.float32)
    b = torch.randn(20, generator=torch.Generator().manual_seed(1))
    with warnings.catch_warnings():
        warnings.simplefilter("error", hp.ConvergenceWarning)
        u, info = hp.GKMSolver(lambda u, x: u - (Q @ u - x) / L, max_steps=5000).solve(torch.zeros(20), b)
    assert info.converged and info.tol <= default_tol(torch.float32) * 1.01 * float(u.norm())
    exact = torch.linalg.solve(Q.double(), b.double())
    assert float((u.double() - exact).norm() / exact.norm()) < 1e-3


@pytest.mark.parametrize("mode", MODES)
def test_float32_defaults_in_every_mode(mode):
    p64 = make_linear("spd", n=10, m=3, seed=21, cond=20.0)
    p32 = make_linear("spd", n=10, m=3, seed=21, cond=20.0, dtype=torch.float32)
    solver = hp.GKMSolver(p32.T, hypergrad=mode)
    x = p32.x0.clone().requires_grad_(True)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        u = solver(zeros(10, torch.float32), x)
        (g,) = torch.autograd.grad(p32.F(u), x)
    ref_kind = {"first_order": ("first_order",), "truncated": ("truncated", None, 10, False)}.get(mode, ("fixed",))
    r = reference(p64, ref_kind, p64.x0)
    tol = 2e-2 if mode == "inexact" else 1e-3
    assert rel_err(u.detach(), r.value) <= tol
    assert rel_err(g, r.grad) <= tol, f"{mode}: float32 hypergradient error {rel_err(g, r.grad):.2e}"
    if mode in ("implicit", "inexact", "first_order"):
        assert solver.info.converged and not conv_warned(rec), "float32 defaults: the default tolerance is unreachable"


def test_absolute_tolerance_on_request_and_relative_by_default():
    T = lambda u, x: 0.5 * u + x  # noqa: E731  u* = 2x, residual after k steps 2|x| 0.5^k... exactly |x| 0.5^k
    x = torch.full((1,), 1e-8, dtype=DT)
    _, info = hp.GKMSolver(T, tol=0.0, atol=1e-6).solve(torch.zeros(1, dtype=DT), x)
    assert info.converged and info.steps == 0  # absolute: u0's residual 1e-8 is already below 1e-6
    u, info = hp.GKMSolver(T).solve(torch.zeros(1, dtype=DT), x)
    assert abs(float(u) - 2e-8) < 1e-17  # relative by default
    u, info = hp.GKMSolver(T, tol=1e-12).solve(torch.zeros(1, dtype=DT), torch.ones(1, dtype=DT))
    assert info.converged and abs(float(u) - 2.0) < 1e-11 and 39 <= info.steps <= 50


def test_zero_fixed_point_needs_an_absolute_tolerance():
    # u* = 0: a relative threshold tol·||u|| vanishes with u, so it is not met (the residual is ||u||/2);
    # the warning says to pass atol, and with atol the solve converges at the returned point
    with pytest.warns(hp.ConvergenceWarning, match="atol"):
        u, info = hp.GKMSolver(lambda u: 0.5 * u, max_steps=100).solve(torch.ones(3, dtype=DT))
    assert not info.converged and info.steps == 100
    u, info = hp.GKMSolver(lambda u: 0.5 * u, atol=1e-12).solve(torch.ones(3, dtype=DT))
    assert info.converged and float((0.5 * u - u).norm()) <= 1e-12 and info.residual == float((0.5 * u - u).norm())


@pytest.mark.parametrize("kind", ["spd", "nonsym"])
def test_a_converged_forward_is_within_its_tolerance_n60(kind):
    """A forward reported converged at threshold info.tol is within ‖Q⁻¹‖·tol/s of u*, and an explicit
    tol = 1e-12 is not loosened."""
    p = make_linear(kind, n=60, m=4, seed=31, cond=10.0)
    solver = hp.GKMSolver(p.T, hypergrad="implicit", tol=1e-12, max_steps=20000)
    u = solver(zeros(p.n), p.x0)
    info = solver.info
    assert info.converged
    Qinv = float(torch.linalg.matrix_norm(torch.linalg.inv(p.Q), 2))
    err = float((u - p.u_star(p.x0)).norm())
    assert err <= 1.01 * Qinv * info.tol / p.s + 1e-13, (err, Qinv * info.tol / p.s)
    assert info.tol <= 1e-12 * max(1.0, float(u.norm())), info.tol


# -- NaN in the lower level; tol = 0 ----------------------------------------------------------------
def test_nan_lower_level_has_a_clear_message():
    with pytest.raises(hp.DivergenceError) as e:
        hp.GKMSolver(lambda u, x: torch.log(u) + x)(torch.zeros(2, dtype=DT), torch.ones(2, dtype=DT))
    assert "non-finite" in str(e.value) and "nan > nan" not in str(e.value)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("on_divergence", ["raise", "warn"])
def test_a_nan_lower_level_is_named_in_every_mode(mode, on_divergence):
    kw = {"steps": 5} if mode == "truncated" else {}
    solver = hp.GKMSolver(lambda u, x: torch.sqrt(u - 1.0) + x, hypergrad=mode, on_divergence=on_divergence, **kw)
    x = torch.ones(2, dtype=DT, requires_grad=True)

    def run():
        solver(zeros(2), x).sum().backward()

    _, err, rec = run_recording(run)
    texts = [str(w.message) for w in rec] + ([str(err)] if err is not None else [])
    if err is not None:
        assert isinstance(err, hp.HODLError), f"generic error {type(err).__name__}: {err}"
    assert texts, "a NaN lower level passed silently"
    for t in texts:
        assert "nan > nan" not in t.lower(), t
    assert any(re.search(r"(?i)non-finite|nan", t) for t in texts), texts


def test_converged_with_tol_zero_means_working_accuracy():
    T = lambda u, x: 0.5 * u + x  # noqa: E731
    one = torch.ones(2, dtype=DT)
    _, many = hp.GKMSolver(T, max_steps=80, tol=0.0).solve(torch.zeros(2, dtype=DT), one)
    _, few = hp.GKMSolver(T, max_steps=5, tol=0.0).solve(torch.zeros(2, dtype=DT), one)
    assert many.steps == 80 and many.converged  # 0.5^80 << 1e-10
    assert few.steps == 5 and not few.converged  # residual 0.5^4 = 6e-2


@pytest.mark.parametrize("mode", MODES)
def test_converged_with_tol0_in_every_mode(mode):
    p = make_linear("nonsym", n=10, seed=3)  # the residual stagnates at ~1e-16 (not exactly 0)
    kw = {"steps": 5} if mode == "truncated" else {}
    try:
        solver = hp.GKMSolver(p.T, hypergrad=mode, tol=0.0, max_steps=500, **kw)
    except (ValueError, TypeError, hp.HODLError) as e:  # inexact: its forward tolerance is eps
        assert mode == "inexact" and re.search(r"tol|eps", str(e)), str(e)
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        u = solver(zeros(p.n), p.x0.clone().requires_grad_(True))
    if mode != "inexact":  # inexact stops at its own eps
        assert solver.info.steps == 500
        assert rel_err(u.detach(), p.u_star(p.x0)) < 1e-12
    assert solver.info.converged, "tol=0 ran 500 steps to roundoff; info.converged must say so"


# -- with aggregation, converged means a point near Fix T -------------------------------------------
@pytest.mark.parametrize("aggregation", ["inside", "outside"])
@pytest.mark.parametrize("hypergrad", ["implicit", "inexact"])
@pytest.mark.parametrize("start", ["at_u_star", "at_zero"])
def test_a_converged_aggregated_solve_is_within_the_tolerance_of_the_fixed_point(aggregation, hypergrad, start):
    """Single fixed point u* = Q⁻¹x, F = ½‖u‖²: a solve that says converged returns u* (and the hypergradient
    Q⁻²x... at it) to the tolerance, whatever α does on the way. Caught before: the outside form stopped on
    ‖T(u_k) - u_k‖ at u* but returned the aggregated step, 25 % off; the inside form stopped on the small
    steps of a slowly decaying α, 1 % off (both with converged=True)."""
    Q = torch.tensor([[2.0, 0.5], [0.5, 1.0]], dtype=DT)
    x = torch.tensor([-3.0, 1.0], dtype=DT)
    u_star = torch.linalg.solve(Q, x)
    g_ref = torch.linalg.solve(Q, u_star)  # d/dx ½‖Q⁻¹x‖²

    def T(u, x):
        return u - 0.4 * (Q @ u - x)

    def F(u, x):
        return 0.5 * (u ** 2).sum()

    extra = {"eps": 1e-9, "delta": 1e-9} if hypergrad == "inexact" else {}
    for alpha in (hp.Geometric(0.5, 0.5), hp.Harmonic(1.0)):
        method = hp.Inexact(**extra) if hypergrad == "inexact" else hypergrad
        sol = hp.GKMSolver(T, upper=F, alpha=alpha, upper_step=0.5, aggregation=aggregation, hypergrad=method,
                           max_steps=20000)
        xr = x.clone().requires_grad_(True)
        u0 = u_star.clone() if start == "at_u_star" else torch.zeros(2, dtype=DT)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", hp.SummableScheduleWarning)
            warnings.simplefilter("error", hp.ConvergenceWarning)  # a stop short of tol would say so
            try:
                u = sol(u0, xr)
            except hp.ConvergenceWarning:
                assert not sol.info.converged
                continue
        F(u, xr).backward()
        assert sol.info.converged
        assert rel_err(u.detach(), u_star) < 1e-7
        assert rel_err(xr.grad, g_ref) < 1e-6


@pytest.mark.parametrize("hypergrad", ["implicit", "inexact"])
def test_a_loose_tolerance_with_a_slow_alpha_still_bounds_the_distance_to_the_fixed_point(hypergrad):
    """Inside form, α_k = 1/(k+1), relative tolerance 1e-4 (inexact's default ε): the aggregated steps get
    that small while u_k is still ~1e-2 from u* (α_k‖∇F‖ away); converged must mean ~tolerance × cond."""
    Q = torch.tensor([[2.0, 0.5], [0.5, 1.0]], dtype=DT)
    x = torch.tensor([1.0, 2.0], dtype=DT)
    u_star = torch.linalg.solve(Q, x)
    opts = {"tol": 1e-4} if hypergrad == "implicit" else {}
    sol = hp.GKMSolver(lambda u, x: u - 0.4 * (Q @ u - x), upper=lambda u, x: 0.5 * (u ** 2).sum(),
                       alpha=hp.Harmonic(1.0), hypergrad=hypergrad, max_steps=5000, **opts)
    u = sol(torch.zeros(2, dtype=DT), x)
    assert sol.info.converged
    assert rel_err(u, u_star) < 1e-3  # was 1.3e-2 with converged=True


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", ["implicit", "unrolled"])
def test_half_precision_exact_steps_do_not_claim_convergence(dtype, mode):
    """tol=0 (exactly K steps) in float16/bfloat16 stalled at a spurious fixed point of the rounded map
    (u = 256 for u* = 1000, residual exactly 0) and reported converged=True."""
    T = lambda u: u - 0.001 * (u - 1000.0)  # noqa: E731
    u, info = hp.GKMSolver(T, max_steps=20000, tol=0.0, atol=0.0, hypergrad=mode).solve(torch.zeros(2, dtype=dtype))
    assert not info.converged and float(u.float().min()) < 999


def test_outside_aggregation_from_a_warm_start_is_not_a_divergence():
    """u0 on Fix T: the aggregated step moves u off Fix T by α_k s∇F (the residual rises from ~0 to that
    scale, then falls) — it was called a divergence ('grew 1e4 times', 'not decreasing'), blaming T."""
    g = torch.Generator().manual_seed(2)
    M = torch.randn(5, 5, dtype=DT, generator=g)
    Q = M @ M.T / 5 + torch.eye(5, dtype=DT)
    c = torch.randn(5, dtype=DT, generator=g)
    s = 0.9 / float(torch.linalg.eigvalsh(Q).max())
    T = lambda u: u - s * (Q @ u - c)  # noqa: E731
    u_star = torch.linalg.solve(Q, c)
    z = torch.randn(5, dtype=DT, generator=g)
    for form in ("outside", "inside"):
        solver = hp.GKMSolver(T, upper=lambda u: 0.5 * ((u - z) ** 2).sum(), alpha=hp.Harmonic(1.0),
                              aggregation=form, max_steps=3000, tol=1e-8)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", hp.ConvergenceWarning)
            u, info = solver.solve(u_star + 1e-7)  # a warm start next to the (unique) fixed point
        assert not info.diverged, info.message
        assert rel_err(u, u_star) < 1e-2  # O(α_K) from Fix T after K aggregated steps


def test_a_rotation_is_told_to_relax_and_reports_its_step():
    """T(u) = Ru, a rotation: nonexpansive, not averaged, never converges with β = 1; the error says to
    use beta < 1 and info.steps is the step where it stopped."""
    th = 0.5
    R = torch.tensor([[math.cos(th), -math.sin(th)], [math.sin(th), math.cos(th)]], dtype=DT)
    solver = hp.GKMSolver(lambda u: R @ u + 1.0, max_steps=100000, on_divergence="warn")
    with pytest.warns(hp.ConvergenceWarning, match="beta < 1"):
        u, info = solver.solve(torch.zeros(2, dtype=DT))
    assert info.diverged and 100 < info.steps < 1000
    u, info = hp.GKMSolver(lambda u: R @ u + 1.0, beta=0.5, max_steps=100000).solve(torch.zeros(2, dtype=DT))
    assert info.converged and rel_err(u, torch.linalg.solve(torch.eye(2, dtype=DT) - R, torch.ones(2, dtype=DT))) < 1e-8


@pytest.mark.parametrize("batch_dims", [0, 1])
@pytest.mark.parametrize("scale", [1e20, 1e30])
def test_float32_at_a_scale_whose_squares_overflow(batch_dims, scale):
    """‖u‖² of float32 entries above ~1e19 overflows: the residual is a norm of finite numbers and must
    not read as Inf (the solve was called divergent, blaming T for NaN/Inf it never returned)."""
    x = torch.full((2, 3) if batch_dims else (3,), scale)
    solver = hp.GKMSolver(lambda u, x: 0.5 * u + x, batch_dims=batch_dims)
    u = solver(torch.zeros_like(x), x)
    assert solver.info.converged and not solver.info.diverged
    assert rel_err(u.double(), 2 * x.double()) < 1e-5  # u* = 2x
    assert math.isfinite(solver.info.residual)


def test_a_weight_that_does_not_vanish_is_named_when_the_solve_misses_its_tolerance():
    """With strict=False a constant alpha is accepted; the solve can then never meet its tolerance, and the
    warning says why instead of advising more steps."""
    F = lambda u, x: 0.5 * (u**2).sum()  # noqa: E731
    f = lambda u, x: 0.5 * ((u - x) ** 2).sum()  # noqa: E731
    with pytest.warns(hp.ConvergenceWarning, match="must decrease to 0"):
        solver = hp.GKMSolver(hp.GradientStep(objective=f, step=0.5), aggregation="outside", upper=F,
                              alpha=hp.Constant(0.5), strict=False, max_steps=200)
    with pytest.warns(hp.ConvergenceWarning, match="does not vanish .*limit is 0.5"):
        solver(torch.zeros(3, dtype=DT), torch.ones(3, dtype=DT))
    assert not solver.info.converged


@pytest.mark.parametrize("accel", [None, "anderson", "broyden"])
@pytest.mark.parametrize("batch_dims", [0, 1])
@pytest.mark.parametrize("dtype,scale", [(torch.float32, 1e-25), (torch.float32, 1e25), (DT, 1e-200), (DT, 1e200)])
def test_every_forward_at_scales_whose_squares_leave_the_dtype(accel, batch_dims, dtype, scale):
    """u* = 2c: Anderson / Broyden returned u = 0 after 0 steps with converged=True at c = 1e-25 in float32 (the
    squared norms underflowed to 0 <= 0)."""
    make = {"anderson": lambda: hp.Anderson(5), "broyden": lambda: hp.Broyden(5), None: lambda: None}[accel]
    c = torch.full((2, 3) if batch_dims else (3,), scale, dtype=dtype)
    solver = hp.GKMSolver(lambda u, c: 0.5 * u + c, acceleration=make(), batch_dims=batch_dims)
    u = solver(torch.zeros_like(c), c)
    assert solver.info.converged and solver.info.steps > 0
    assert float((u.double() / scale - 2.0).abs().max()) < (1e-4 if dtype == torch.float32 else 1e-8)


@pytest.mark.parametrize("accel", [None, "anderson"])
@pytest.mark.parametrize("scale", [1e-200, 1e200])
def test_float64_batches_beyond_the_squares_range_on_torch_tensors(accel, scale, monkeypatch):
    """The per-sample check on torch tensors (a GPU batch; here forced by hiding numpy) measures the scaled norms
    too: at 1e-200 the plain squares underflow to 0 <= 0 (converged at u0 = 0), at 1e200 they overflow."""
    from hodl_plugin import _stopping
    from hodl_plugin.acceleration import base

    monkeypatch.setattr(_stopping, "np", None)
    monkeypatch.setattr(base, "np", None)
    c = torch.full((2, 3), scale, dtype=DT)
    solver = hp.GKMSolver(lambda u, c: 0.5 * u + c, acceleration=hp.Anderson(5) if accel else None, batch_dims=1)
    u = solver(torch.zeros_like(c), c)
    assert solver.info.converged and solver.info.steps > 0
    assert float((u / scale - 2.0).abs().max()) < 1e-8


@pytest.mark.parametrize("batch_dims", [0, 1])
@pytest.mark.parametrize("scale", [1e-170, 1e-200, 1e160, 1e200])
@pytest.mark.parametrize("steps,conv", [(400, True), (30, False)])
def test_a_run_that_ends_by_its_step_count_is_judged_with_scaled_norms(batch_dims, scale, steps, conv):
    """u = 0.9u + x for K steps: after 400 the relative residual is 1e-18, after 30 it is 4e-2. The end-of-run
    measurement (samples out of steps; an exact-steps run's last residual against ‖u‖) used the plain norm, whose
    squares under- or overflow beyond 1e±154: a batch at 1e-170 that ran out of steps said converged=True."""
    x = torch.randn(2, 4, dtype=DT, generator=torch.Generator().manual_seed(0)) * scale
    x = x if batch_dims else x[0]
    for tol in (1e-6, 0.0):  # a tolerance (out of steps), and exactly K steps
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", hp.ConvergenceWarning)
            u, info = hp.GKMSolver(lambda u, x: 0.9 * u + x, tol=tol, atol=0.0, max_steps=steps,
                                   batch_dims=batch_dims).solve(torch.zeros_like(x), x)
        ud, xd = u / scale, x / scale
        rel = (0.9 * ud + xd - ud).norm(dim=-1) / ud.norm(dim=-1)  # the truth, on rescaled values
        assert bool((rel <= (tol or 1e-10)).all()) is conv and info.converged is conv, (tol, rel)
        if not conv:  # the residual reported is that of the returned point (exactly 0 once converged here)
            assert 0.5 < info.residual / (float((rel * ud.norm(dim=-1)).max()) * scale) < 2


@pytest.mark.parametrize("shape,batch_dims", [((0, 3), 1), ((3, 0, 2), 2), ((4, 0), 1)])
def test_an_empty_batch_is_solved_at_once(shape, batch_dims):
    x = torch.zeros(shape, dtype=DT)
    u, info = hp.GKMSolver(lambda u, x: 0.5 * u + x, batch_dims=batch_dims).solve(torch.zeros_like(x), x)
    assert u.shape == shape and info.converged and info.steps == 0
    assert info.steps_per_sample.shape == shape[:batch_dims] and info.converged_per_sample.all()


def test_a_sample_near_the_dtypes_max_raises_no_numpy_warning():
    x = torch.tensor([[1.0, -0.5, 0.25, 0.75], [6e307, -3e307, 1.5e307, 4.5e307]], dtype=DT)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        u, info = hp.GKMSolver(lambda u, x: 0.5 * u + x, batch_dims=1).solve(torch.zeros_like(x), x)
    assert info.converged and torch.allclose(u, 2 * x, rtol=1e-9)


def test_iterates_that_reach_the_subnormal_range_are_told_to_use_atol():
    """A rotation by 0.5 rad, relaxed (β = 0.5), has its fixed point at 0: plain KM steps reach subnormal numbers
    and stall there, where no relative tolerance can be met (about half a second). That stall was a
    DivergenceError saying 'check that T is nonexpansive'; it is a ConvergenceWarning that names atol, and atol
    converges. Anderson (its pairs normed scaled at any magnitude) reaches an exact fixed point of the rounded map
    there: residual 0 at a point within the smallest subnormals of 0, which meets the tolerance."""
    c, s_ = math.cos(0.5), math.sin(0.5)
    R = torch.tensor([[c, -s_], [s_, c]], dtype=DT)
    u0 = torch.tensor([1.0, 0.0], dtype=DT)
    with pytest.warns(hp.ConvergenceWarning, match="fixed point at 0 needs atol"):
        u, info = hp.GKMSolver(lambda u: u @ R.T, beta=0.5, max_steps=60000).solve(u0)
    assert not info.converged and not info.diverged and info.steps < 60000
    u, info = hp.GKMSolver(lambda u: u @ R.T, beta=0.5, acceleration=hp.Anderson(2), atol=1e-12).solve(u0)
    assert info.converged and float(u.abs().max()) < 1e-11
    u, info = hp.GKMSolver(lambda u: u @ R.T, beta=0.5, acceleration=hp.Anderson(2), max_steps=2000).solve(u0)
    assert info.converged and info.residual == 0.0 and float(u.abs().max()) < 1e-320


def test_a_batch_whose_iterates_reach_the_subnormal_range_is_told_to_use_atol():
    """The per-sample rule: plain KM steps on the rotation reach subnormal numbers after ~23000 steps and stall
    there (about a second)."""
    c, s_ = math.cos(0.5), math.sin(0.5)
    R = torch.tensor([[c, -s_], [s_, c]], dtype=DT)
    u0 = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=DT)
    with pytest.warns(hp.ConvergenceWarning, match="fixed point at 0 needs atol"):
        u, info = hp.GKMSolver(lambda u: u @ R.T, beta=0.5, max_steps=60000, batch_dims=1).solve(u0)
    assert not info.converged and not info.diverged and info.steps < 60000


@pytest.mark.parametrize("check_every", [1, 10])
@pytest.mark.parametrize("mode", ["unrolled", "implicit", "inexact"])
def test_forward_mode_tangents_of_samples_that_stop_at_different_steps(mode, check_every):
    """u*_i = b_i / (1 - a_i) per sample: the implicit tangent is 1/(1 - a_i), the unrolled one that of the
    k_i steps sample i took, (1 - a_i^k_i)/(1 - a_i) (from 0 or from u*_i alike). A sample that stops early
    must not freeze the tangents of the others (a host batch kept the returned points of stopped samples
    aside in numpy, which writes only the primal of a dual tensor: the slow sample's tangent was 8.65 for
    10)."""
    import torch.autograd.forward_ad as fwAD

    a = torch.tensor([[0.1], [0.9]], dtype=DT)
    b, tb = torch.ones(2, 3, dtype=DT), torch.ones(2, 3, dtype=DT)
    s = hp.GKMSolver(lambda u, a, b: a * u + b, batch_dims=1, tol=1e-12, max_steps=2000, hypergrad=mode,
                     check_every=check_every)
    for u0 in (torch.zeros(2, 3, dtype=DT), torch.stack([b[0] / 0.9, torch.zeros(3, dtype=DT)])):
        with fwAD.dual_level():
            tangent = fwAD.unpack_dual(s(u0, a, fwAD.make_dual(b, tb))).tangent
        k = s.info.steps_per_sample.to(DT)[:, None]
        exact = (1 - a**k) / (1 - a) if mode == "unrolled" else 1 / (1 - a)
        assert mode == "inexact" or int(k[0]) < int(k[1])  # (inexact warm-starts the second solve)
        assert torch.allclose(tangent, exact.expand(2, 3), rtol=1e-12, atol=0), tangent


@pytest.mark.parametrize("acceleration", [None, "anderson"])
def test_a_batch_reports_the_threshold_of_its_worst_sample(acceleration):
    """``batch_dims``: a slow sample at 1e-9 beside a fast one at 1e3. The warning said "residual 1.988e-09
    above the threshold 2.002e-07" (the fast sample's threshold: the message contradicted itself) and
    ``info.tol`` was the largest threshold, of the converged sample. Now each sample's threshold
    max(tol·‖u_i‖, atol) is in ``info.tol_per_sample``, ``info.tol`` is the worst sample's, and the warning
    names that sample with its own residual and threshold."""
    T = lambda z, x, c: c[:, None] * torch.tanh(0.7 * z + 0.3 * z.roll(1, -1)) + x  # noqa: E731
    x = torch.tensor([[1e-9, 2e-9, -1e-9, 5e-9], [1e3] * 4], dtype=DT)
    c = torch.tensor([0.9999, 0.9], dtype=DT)
    solver = hp.GKMSolver(T, batch_dims=1, max_steps=4 if acceleration else 60, check_every=1,
                          acceleration=hp.Anderson(1) if acceleration else None)
    with pytest.warns(hp.ConvergenceWarning) as record:
        u, info = solver.solve(torch.zeros_like(x), x, c)
    assert info.converged_per_sample.tolist() == [False, True]
    r = (T(u, x, c) - u).norm(dim=1)  # independent: the residuals and thresholds of the returned point
    thr = torch.clamp(hp.gkm.default_tol(DT) * u.norm(dim=1), min=0.0)
    assert torch.allclose(info.tol_per_sample, thr, rtol=1e-12, atol=0)
    assert info.tol == pytest.approx(float(thr[0]), rel=1e-12) and float(r[0]) > info.tol
    msg = str(record[0].message)
    nums = re.search(r"residual \|\|T\(u\) - u\|\| = ([0-9.e+-]+) \(sample 0\) above the threshold ([0-9.e+-]+)", msg)
    assert nums, msg
    assert float(nums.group(1)) > float(nums.group(2))
    assert float(nums.group(2)) == pytest.approx(float(thr[0]), rel=1e-3)
