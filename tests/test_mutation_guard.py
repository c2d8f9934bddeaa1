r"""Regression guards for the "silent wrong" items of issue 11 that concern the core (items 1–9, 13–15,
17, 18, 21, 23, 24), one test (or parametrised family) each, named ``test_itemNN_*``.

The rule is the matrix's (:func:`test_matrix.assert_right_or_named`): the right number against an
independent closed form, or a named error (a :class:`hodl_plugin.HODLError`, or a
``TypeError``/``ValueError`` naming the argument where the item is about bad input). Several items
also require a :class:`hodl_plugin.ConvergenceWarning` where the solve cannot be trusted.

Mutations tried by hand on a copy of the package (each caught by a test that passes on 7ea4691):
Truncated back-propagating steps − 1 (matrix truncated cells); adjoint matvec v + J_uᵀv instead of
v − J_uᵀv (matrix implicit cells); the residual under-reported 100x (item 21 and
test_guard_forward_tolerance_is_honest); Unrolled running K − 1 steps (matrix unrolled tol0 cells);
adjoint rtol 1e-10 → 1e-4 (test_guard_adjoint_accuracy_n60 — on n = 4 Krylov solves are exact and
nothing else noticed); the hook returning ∇_uF instead of v (matrix implicit cells); first_order
scaled by 1.0001 (matrix first_order cells); a loosened converged flag (matrix check_small cells);
KM relaxation ignored between checks (property test_unrolled_is_the_k_step_map with β < 1);
linearisation at u* + 1e-3 (matrix tanh implicit cells); truncated pre-phase 3 steps short (matrix
truncated tol0 cells).
"""

from __future__ import annotations

import math
import re
import warnings

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from _oracles import DT, make_linear, make_tanh, reference, rel_err
from test_matrix import assert_right_or_named

import hodl_plugin as hp

MODES = ["implicit", "inexact", "unrolled", "truncated", "first_order"]
ALL_MODES = pytest.mark.parametrize("mode", MODES)


def _zeros(n, dtype=DT):
    return torch.zeros(n, dtype=dtype)


def _run_recording(fn):
    """Run fn(); return (result or None, exception or None, list of warnings)."""
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        try:
            return fn(), None, list(rec)
        except Exception as e:  # noqa: BLE001 — classified by the caller
            return None, e, list(rec)


def _conv_warned(rec) -> bool:
    return any(issubclass(w.category, hp.ConvergenceWarning) for w in rec)


# ------------------------------------------------------------------------------------------------
# 1. Truncated(k) with k > check_every back-propagates all k steps
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("check_every", [None, 1, 3, 10, 49, 50, 100, 5000])
def test_item01_truncated_backprops_k_steps(check_every):
    kw = {} if check_every is None else {"check_every": check_every}
    solver = hp.GKMSolver(lambda u, x: 0.9 * u + x, hypergrad="truncated", steps=50, **kw)
    x = torch.ones(1, dtype=DT, requires_grad=True)
    solver(_zeros(1), x).backward()
    expected = sum(0.9**i for i in range(50))  # 9.948 (6.513 = Σ_{i<10} is the bug)
    assert abs(float(x.grad) - expected) < 1e-9, (float(x.grad), expected)


# ------------------------------------------------------------------------------------------------
# 2. Non-singleton Fix T, x only in the upper objective: du_sel/dx = projector, or a named error
# ------------------------------------------------------------------------------------------------
def _nonsingleton(seed=2, p=2, n=5):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(p, n, generator=g, dtype=DT)
    b = A @ torch.randn(n, generator=g, dtype=DT)
    s = 1.0 / torch.linalg.matrix_norm(A, 2).item() ** 2
    P = torch.eye(n, dtype=DT) - A.T @ torch.linalg.solve(A @ A.T, A)  # projector onto null(A)

    def proj(v):
        return v - A.T @ torch.linalg.solve(A @ A.T, A @ v - b)

    return A, b, s, P, proj, g


@pytest.mark.parametrize("mode", ["implicit", "inexact"])
def test_item02_nonsingleton_x_in_upper_only(mode):
    A, b, s, P, proj, g = _nonsingleton()
    n = A.shape[1]
    x = torch.randn(n, generator=g, dtype=DT, requires_grad=True)
    c = torch.randn(n, generator=g, dtype=DT)
    solver = hp.GKMSolver(lambda u, x: u - s * A.T @ (A @ u - b), upper=lambda u, x: 0.5 * ((u - x) ** 2).sum(),
                          hypergrad=mode, max_steps=3000)

    def hypergrad():
        u = solver(_zeros(n), x)
        return torch.autograd.grad((c * u).sum(), x)[0]

    # u_sel(x) = proj(x): d(c·u_sel)/dx = P c
    assert_right_or_named(hypergrad, P @ c, 1e-2, what=f"item 2 {mode}")


# ------------------------------------------------------------------------------------------------
# 3. Double backward through implicit / inexact with every adjoint solver
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode,solver", [("implicit", "cg"), ("implicit", "gmres"), ("implicit", "bicgstab"),
                                         ("implicit", "fixed_point"), ("inexact", "cg"), ("inexact", "gmres")])
def test_item03_double_backward_hessian(mode, solver):
    p = make_linear("spd", seed=4)
    T = hp.GradientStep(grad=lambda u, x: p.Q @ u - p.B @ x, step=p.s)
    opts = dict(eps=1e-12, delta=1e-12) if mode == "inexact" else dict(tol=1e-12)
    sol = hp.GKMSolver(T, hypergrad=mode, solver=solver, max_steps=3000, **opts)

    def hess():
        x = p.x0.clone().requires_grad_(True)
        (gr,) = torch.autograd.grad(p.F(sol(_zeros(p.n), x)), x, create_graph=True)
        return torch.stack([torch.autograd.grad(gr[i], x, retain_graph=True)[0] for i in range(x.numel())])

    assert_right_or_named(hess, reference(p, ("fixed",), p.x0).hess, 1e-7, what=f"item 3 {mode}/{solver}")


# ------------------------------------------------------------------------------------------------
# 4. Forward mode gives du*/dx (2I for T = 0.5u + x), not ∂_x T (I)
# ------------------------------------------------------------------------------------------------
@ALL_MODES
@pytest.mark.parametrize("entry", ["jacfwd", "forward_ad"])
def test_item04_forward_mode(mode, entry):
    kw = {"steps": 5} if mode == "truncated" else {}
    solver = hp.GKMSolver(lambda u, x: 0.5 * u + x, hypergrad=mode, tol=1e-13, max_steps=200, **kw)
    x0 = torch.tensor([1.0, -2.0, 0.5], dtype=DT)
    t = torch.tensor([0.3, 1.0, -1.0], dtype=DT)
    factor = {"first_order": 1.0, "truncated": sum(0.5**i for i in range(5))}.get(mode, 2.0)

    def run():
        if entry == "jacfwd":
            return torch.func.jacfwd(lambda x: solver(_zeros(3), x))(x0)
        with fwAD.dual_level():
            tan = fwAD.unpack_dual(solver(_zeros(3), fwAD.make_dual(x0, t))).tangent
        assert tan is not None, "forward mode: no tangent on the output"
        return tan.clone()

    ref = factor * (torch.eye(3, dtype=DT) if entry == "jacfwd" else t)
    assert_right_or_named(run, ref, 1e-10, what=f"item 4 {mode}/{entry}")


# ------------------------------------------------------------------------------------------------
# 5. Non-converged or slowly diverging forwards are never silent
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["implicit", "inexact", "first_order"])
def test_item05_unconverged_forward_warns(mode):
    solver = hp.GKMSolver(lambda u, x: 0.99 * u + x, hypergrad=mode, max_steps=20)  # needs ~2000 steps
    x = torch.ones(3, dtype=DT, requires_grad=True)

    def run():
        u = solver(_zeros(3), x)
        u.sum().backward()
        return solver.info

    info, err, rec = _run_recording(run)
    if err is not None:
        assert isinstance(err, hp.HODLError), f"generic error {type(err).__name__}: {err}"
        return
    assert not info.converged
    assert _conv_warned(rec), f"{mode}: a forward stopped 100x short of its tolerance passed silently"


@ALL_MODES
def test_item05_slow_divergence_not_silent(mode):
    kw = {"steps": 5} if mode == "truncated" else {}
    solver = hp.GKMSolver(lambda u, x: 1.001 * u + x, hypergrad=mode, **kw)  # grows 1.7e3x in 1000 steps
    x = torch.ones(2, dtype=DT, requires_grad=True)

    def run():
        u = solver(_zeros(2), x)
        u.sum().backward()
        return solver.info

    info, err, rec = _run_recording(run)
    if err is not None:
        assert isinstance(err, hp.HODLError), f"generic error {type(err).__name__}: {err}"
        return
    assert not info.converged
    assert _conv_warned(rec) or info.diverged, f"{mode}: u grew to {1717:.0f} with no warning and diverged=False"
    assert _conv_warned(rec), f"{mode}: diverged=True but no ConvergenceWarning"


# ------------------------------------------------------------------------------------------------
# 6. The inexact error bound is a bound (or is not called one) on cond 1e2 … 1e6
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cond", [1e2, 1e4, 1e6])
def test_item06_inexact_error_bound_holds(cond):
    p = make_linear("spd", n=6, m=2, seed=6, cond=cond)
    T = hp.GradientStep(grad=lambda u, x: p.Q @ u - p.B @ x, step=p.s)
    solver = hp.GKMSolver(T, hypergrad="inexact", upper=lambda u, x: p.F(u), alpha=0.0, eps=1e-6,
                          max_steps=3000)
    x = p.x0.clone().requires_grad_(True)

    def run():
        p.F(solver(_zeros(p.n), x)).backward()
        return solver.info

    info, err, _ = _run_recording(run)
    if err is not None:
        assert isinstance(err, hp.HODLError), f"generic error {type(err).__name__}: {err}"
        return
    true_err = float((x.grad - reference(p, ("fixed",), p.x0).grad).norm())
    bound = getattr(info, "error_bound", None)
    if bound is None or math.isinf(bound):
        return  # not reported as a bound (e.g. renamed error_estimate): allowed
    assert bound >= true_err, f"cond {cond:g}: error_bound {bound:.3e} < true error {true_err:.3e}"


# ------------------------------------------------------------------------------------------------
# 7. Tiny data: default tolerances are scale-aware (no 26 % error reported as converged)
# ------------------------------------------------------------------------------------------------
@ALL_MODES
@pytest.mark.parametrize("scale", [1e-8, 1e8])
def test_item07_scale_aware_defaults(mode, scale):
    p = make_linear("spd", seed=7, scale=scale)
    solver = hp.GKMSolver(p.T, hypergrad=mode)
    x = p.x0.clone().requires_grad_(True)

    def run():
        u = solver(_zeros(p.n), x)
        (g,) = torch.autograd.grad(p.F(u), x)
        return u.detach(), g

    out, err, rec = _run_recording(run)
    if err is not None:
        assert isinstance(err, hp.HODLError), f"generic error {type(err).__name__}: {err}"
        return
    u, g = out
    ref_kind = {"first_order": ("first_order",), "truncated": ("truncated", None, 10, False)}.get(mode, ("fixed",))
    r = reference(p, ref_kind, p.x0)
    tol = 2e-2 if mode == "inexact" else 1e-4
    if not solver.info.converged:
        assert _conv_warned(rec), f"{mode}: not converged and no ConvergenceWarning"
        return
    assert rel_err(u, r.value) <= tol, f"{mode} scale {scale:g}: converged=True with u error {rel_err(u, r.value):.2e}"
    assert rel_err(g, r.grad) <= tol, f"{mode} scale {scale:g}: hypergradient error {rel_err(g, r.grad):.2e}"


# ------------------------------------------------------------------------------------------------
# 8. An operator that works in place on its input raises; the caller's u0 is unchanged
# ------------------------------------------------------------------------------------------------
@ALL_MODES
@pytest.mark.parametrize("grad", [True, False])
def test_item08_inplace_operator_raises(mode, grad):
    kw = {"steps": 5} if mode == "truncated" else {}
    solver = hp.GKMSolver(lambda u, x: u.mul_(0.5).add_(x), hypergrad=mode, **kw)
    u0 = torch.ones(3, dtype=DT)
    x = torch.ones(3, dtype=DT, requires_grad=grad)
    with pytest.raises((hp.HODLError, ValueError, TypeError), match=r"(?i)in.?place"):
        u = solver(u0, x)
        if grad:
            u.sum().backward()
    assert torch.equal(u0, torch.ones(3, dtype=DT)), f"the caller's u0 was modified: {u0}"


# ------------------------------------------------------------------------------------------------
# 9. A NaN upstream gradient gives NaN (or an error), never a zero/finite hypergradient
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode,kw", [(m, {}) for m in MODES] + [("implicit", {"on_fail": "warn"}),
                                                                  ("inexact", {"on_fail": "raise"})],
                         ids=MODES + ["implicit-warn", "inexact-raise"])
def test_item09_nan_upstream_gradient(mode, kw):
    p = make_linear("nonsym", seed=9)
    kw = dict(kw, steps=5) if mode == "truncated" else kw
    solver = hp.GKMSolver(p.T, hypergrad=mode, **kw)
    x = p.x0.clone().requires_grad_(True)

    def run():
        u = solver(_zeros(p.n), x)
        u.backward(torch.full_like(u, float("nan")))
        return x.grad

    g, err, rec = _run_recording(run)
    texts = [str(w.message) for w in rec] + ([str(err)] if err is not None else [])
    for t in texts:  # item 24: "residual nan > nan" says nothing; the message must name the NaN
        assert "nan > nan" not in t.lower(), t
    if err is not None:
        assert isinstance(err, hp.HODLError), f"generic error {type(err).__name__}: {err}"
        assert re.search(r"(?i)non-finite|nan", str(err)), str(err)
        return
    assert g is not None and bool(torch.isnan(g).any()), f"{mode}: NaN upstream gradient became {g}"


# ------------------------------------------------------------------------------------------------
# 13. prox.l1_param refuses a negative learned weight
# ------------------------------------------------------------------------------------------------
def test_item13_l1_param_negative_weight():
    A = torch.eye(3, dtype=DT)
    b = torch.tensor([2.0, 0.1, -1.0], dtype=DT)
    T = hp.ProximalGradient(grad=lambda u, lam: A.T @ (A @ u - b), prox=hp.prox.l1_param(0), step=1.0)
    solver = hp.GKMSolver(T, hypergrad="implicit")
    with pytest.raises((hp.HODLError, ValueError), match=r"(?i)negativ|>= ?0|≥ ?0|non-?negative|lambda|λ"):
        solver(_zeros(3), torch.tensor(-0.5, dtype=DT))


# ------------------------------------------------------------------------------------------------
# 14. An upper_grad of the wrong shape is refused, not broadcast
# ------------------------------------------------------------------------------------------------
def test_item14_upper_grad_wrong_shape():
    solver = hp.GKMSolver(lambda u, x: 0.5 * u + x, upper_grad=lambda u, x: torch.ones(1, dtype=DT),
                          alpha=hp.Harmonic(1.0))
    with pytest.raises((hp.HODLError, ValueError, TypeError), match=r"upper_grad"):
        solver(_zeros(3), torch.ones(3, dtype=DT))


# ------------------------------------------------------------------------------------------------
# 15. key=torch.tensor(7) hits the warm-start cache (or is refused); the cache does not grow
# ------------------------------------------------------------------------------------------------
def test_item15_tensor_key():
    p = make_linear("spd", seed=15, cond=30.0)
    solver = hp.GKMSolver(p.T, hypergrad="inexact", eps=1e-10, delta=1e-10, warm_start=True, max_steps=5000)
    steps = []
    try:
        for _ in range(4):
            x = p.x0.clone().requires_grad_(True)
            p.F(solver(_zeros(p.n), x, key=torch.tensor(7))).backward()
            steps.append(solver.info.steps)
    except (TypeError, ValueError, hp.HODLError) as e:
        assert "key" in str(e), f"refused without naming key: {e}"
        return
    assert steps[1] <= steps[0] // 2, f"the second call with the same key was not warm-started: steps {steps}"
    cache = solver.method.state_dict().get("u_cache", {})
    assert len(cache) <= 1, f"the warm-start cache grows with equal tensor keys: {len(cache)} entries"


# ------------------------------------------------------------------------------------------------
# 17. One Inexact object in two solvers: no shared counter / warm starts; u0 is not ignored silently
# ------------------------------------------------------------------------------------------------
def test_item17_shared_inexact_object():
    p = make_linear("spd", seed=17)
    method = hp.Inexact(eps=hp.Polynomial(1e-2, 1.0))
    s1 = hp.GKMSolver(p.T, hypergrad=method)
    try:
        s2 = hp.GKMSolver(p.T, hypergrad=method)
    except (ValueError, TypeError, hp.HODLError) as e:
        assert re.search(r"(?i)shar|already|hypergrad|Inexact", str(e)), str(e)
        return
    for _ in range(3):
        x = p.x0.clone().requires_grad_(True)
        p.F(s1(_zeros(p.n), x)).backward()
    x = p.x0.clone().requires_grad_(True)
    p.F(s2(_zeros(p.n), x)).backward()
    assert s2.info.eps == pytest.approx(1e-2), f"s2's first call used eps_3 of s1's schedule: {s2.info.eps}"
    x = p.x0.clone().requires_grad_(True)
    p.F(s1(_zeros(p.n), x)).backward()
    assert s1.info.eps == pytest.approx(1e-2 / 4), f"s1's 4th call: eps {s1.info.eps}"


def test_item17_u0_not_ignored_silently_after_key():
    """Plain KM on Fix T = {Au = b} lands on the projection of its start: the u0 of the second call
    must be used (result proj(z2)), or a warning must say that u0 is ignored."""
    A, b, s, P, proj, g = _nonsingleton(seed=17)
    n = A.shape[1]
    z1, z2 = torch.randn(n, generator=g, dtype=DT), torch.randn(n, generator=g, dtype=DT)
    solver = hp.GKMSolver(lambda u: u - s * A.T @ (A @ u - b), hypergrad="inexact", eps=1e-10, max_steps=20000)
    with torch.no_grad():
        solver(z1, key="k")
        out, err, rec = _run_recording(lambda: solver(z2, key="k"))
    if err is not None:
        assert isinstance(err, hp.HODLError) and "u0" in str(err), f"{type(err).__name__}: {err}"
        return
    if rel_err(out, proj(z2)) < 1e-6:
        return
    assert any("u0" in str(w.message) for w in rec), (
        f"u0 silently ignored: result is {rel_err(out, proj(z1)):.1e} from proj(z1), {rel_err(out, proj(z2)):.1e} "
        "from proj(z2)")


# ------------------------------------------------------------------------------------------------
# 18. CG with a non-unique fixed point or a nonsymmetric Jacobian: right number or named error
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("consistent", [True, False])
@pytest.mark.parametrize("solver_name", ["cg", "gmres"])
def test_item18_nonsingleton_linear_solve(consistent, solver_name):
    """Fix T(·; x) = {Au = x}; plain KM from u0 = z lands on u(x) = z − Aᵀ(AAᵀ)⁻¹(Az − x), the
    projection of z (HODL's selection by ½‖u − z‖², reached here without aggregation so the forward
    converges geometrically). For L = cᵀu: dL/dx = (AAᵀ)⁻¹Ac. The adjoint right-hand side c is
    consistent iff c ∈ range(Aᵀ); then any adjoint solution gives the right number."""
    A, _, s, P, _, g = _nonsingleton(seed=18)
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

    assert_right_or_named(run, torch.linalg.solve(A @ A.T, A @ c), 1e-7, what=f"item 18 {solver_name}")


@pytest.mark.parametrize("mode", ["implicit", "inexact"])
def test_item18_cg_on_nonsymmetric_jacobian(mode):
    p = make_linear("nonsym", seed=18)
    opts = dict(eps=1e-12, delta=1e-12) if mode == "inexact" else dict(tol=1e-12)
    solver = hp.GKMSolver(p.T, hypergrad=mode, solver="cg", max_steps=3000, adjoint_maxiter=200, **opts)

    def run():
        x = p.x0.clone().requires_grad_(True)
        return torch.autograd.grad(p.F(solver(_zeros(p.n), x)), x)[0]

    assert_right_or_named(run, reference(p, ("fixed",), p.x0).grad, 1e-7, what=f"item 18 cg {mode}")


# ------------------------------------------------------------------------------------------------
# 21. float32 with defaults on a cond-20 problem
# ------------------------------------------------------------------------------------------------
@ALL_MODES
def test_item21_float32_defaults(mode):
    p64 = make_linear("spd", n=10, m=3, seed=21, cond=20.0)
    p32 = make_linear("spd", n=10, m=3, seed=21, cond=20.0, dtype=torch.float32)
    solver = hp.GKMSolver(p32.T, hypergrad=mode)
    x = p32.x0.clone().requires_grad_(True)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        u = solver(_zeros(10, torch.float32), x)
        (g,) = torch.autograd.grad(p32.F(u), x)
    ref_kind = {"first_order": ("first_order",), "truncated": ("truncated", None, 10, False)}.get(mode, ("fixed",))
    r = reference(p64, ref_kind, p64.x0)
    tol = 2e-2 if mode == "inexact" else 1e-3
    assert rel_err(u.detach(), r.value) <= tol
    assert rel_err(g, r.grad) <= tol, f"{mode}: float32 hypergradient error {rel_err(g, r.grad):.2e}"
    if mode in ("implicit", "inexact", "first_order"):
        assert solver.info.converged and not _conv_warned(rec), "float32 defaults: the default tolerance is unreachable"


# ------------------------------------------------------------------------------------------------
# 23. Bad arguments are refused at construction, naming the argument
# ------------------------------------------------------------------------------------------------
_T = lambda u, x: 0.5 * u + x  # noqa: E731

BAD_CONSTRUCTIONS = {
    "max_steps=2.5": (lambda: hp.GKMSolver(_T, max_steps=2.5), "max_steps"),
    "max_steps=inf": (lambda: hp.GKMSolver(_T, max_steps=float("inf")), "max_steps"),
    "max_steps=nan": (lambda: hp.GKMSolver(_T, max_steps=float("nan")), "max_steps"),
    "max_steps=None": (lambda: hp.GKMSolver(_T, max_steps=None), "max_steps"),
    "tol=nan": (lambda: hp.GKMSolver(_T, tol=float("nan")), "tol"),
    "divergence_factor=0": (lambda: hp.GKMSolver(_T, divergence_factor=0.0), "divergence_factor"),
    "divergence_factor=-1": (lambda: hp.GKMSolver(_T, divergence_factor=-1.0), "divergence_factor"),
    "Inexact(solver='qr')": (lambda: hp.Inexact(solver="qr"), "solver"),
    "GKMSolver(inexact, solver='qr')": (lambda: hp.GKMSolver(_T, hypergrad="inexact", solver="qr"), "solver"),
    "Implicit(adjoint_rtol=-1)": (lambda: hp.Implicit(adjoint_rtol=-1), "adjoint_rtol"),
    "GKMSolver(adjoint_rtol=-1)": (lambda: hp.GKMSolver(_T, adjoint_rtol=-1.0), "adjoint_rtol"),
    "Inexact(on_fail='rasie')": (lambda: hp.Inexact(on_fail="rasie"), "on_fail"),
}


@pytest.mark.parametrize("case", list(BAD_CONSTRUCTIONS))
def test_item23_bad_construction(case):
    make, name = BAD_CONSTRUCTIONS[case]
    with pytest.raises((ValueError, TypeError, hp.HODLError), match=re.escape(name)):
        make()


@ALL_MODES
def test_item23_upper_independent_of_u(mode):
    """An upper objective that does not depend on u: refused at construction or at the first call."""
    kw = {"steps": 5} if mode == "truncated" else {}
    with pytest.raises((ValueError, TypeError, hp.HODLError), match="upper"):
        solver = hp.GKMSolver(_T, upper=lambda u, x: (x**2).sum(), hypergrad=mode, **kw)
        x = torch.ones(2, dtype=DT, requires_grad=True)
        solver(_zeros(2), x).sum().backward()


# ------------------------------------------------------------------------------------------------
# 24. Inexact gradcheck with warm starts; NaN messages; info.converged with tol = 0
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("warm_start", [True, False])
def test_item24_inexact_gradcheck_warm_started(warm_start):
    p = make_tanh(seed=24)
    solver = hp.GKMSolver(p.T, hypergrad="inexact", eps=1e-12, delta=1e-12, warm_start=warm_start, max_steps=500)
    x = p.x0.clone().requires_grad_(True)
    assert_right_or_named(lambda: torch.autograd.gradcheck(lambda z: solver(_zeros(p.n), z), (x,), nondet_tol=1e-9),
                          True, 0.0, what="item 24 gradcheck")


@ALL_MODES
@pytest.mark.parametrize("on_divergence", ["raise", "warn"])
def test_item24_nan_lower_level_message(mode, on_divergence):
    kw = {"steps": 5} if mode == "truncated" else {}
    solver = hp.GKMSolver(lambda u, x: torch.sqrt(u - 1.0) + x, hypergrad=mode, on_divergence=on_divergence, **kw)
    x = torch.ones(2, dtype=DT, requires_grad=True)

    def run():
        solver(_zeros(2), x).sum().backward()

    _, err, rec = _run_recording(run)
    texts = [str(w.message) for w in rec] + ([str(err)] if err is not None else [])
    if err is not None:
        assert isinstance(err, hp.HODLError), f"generic error {type(err).__name__}: {err}"
    assert texts, "a NaN lower level passed silently"
    for t in texts:
        assert "nan > nan" not in t.lower(), t
    assert any(re.search(r"(?i)non-finite|nan", t) for t in texts), texts


@ALL_MODES
def test_item24_converged_with_tol0(mode):
    p = make_linear("nonsym", n=10, seed=3)  # the residual stagnates at ~1e-16 (not exactly 0)
    kw = {"steps": 5} if mode == "truncated" else {}
    try:
        solver = hp.GKMSolver(p.T, hypergrad=mode, tol=0.0, max_steps=500, **kw)
    except (ValueError, TypeError, hp.HODLError) as e:  # inexact: its forward tolerance is eps
        assert mode == "inexact" and re.search(r"tol|eps", str(e)), str(e)
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        u = solver(_zeros(p.n), p.x0.clone().requires_grad_(True))
    if mode != "inexact":  # inexact stops at its own eps
        assert solver.info.steps == 500
        assert rel_err(u.detach(), p.u_star(p.x0)) < 1e-12
    assert solver.info.converged, "tol=0 ran 500 steps to roundoff; info.converged must say so"


# ------------------------------------------------------------------------------------------------
# Guards found by breaking the code on purpose (see the module docstring of test_matrix): on the
# 4-dimensional matrix problems Krylov adjoint solves are exact after 4 products and a forward that
# stops 100x early still lands within 1e-9, so these two use n = 60 and the reported tolerance.
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["spd", "nonsym"])
def test_guard_forward_tolerance_is_honest(kind):
    """A forward reported converged at threshold info.tol is within ‖Q⁻¹‖·tol/s of u*, and an explicit
    tol = 1e-12 is not loosened."""
    p = make_linear(kind, n=60, m=4, seed=31, cond=10.0)
    solver = hp.GKMSolver(p.T, hypergrad="implicit", tol=1e-12, max_steps=20000)
    u = solver(_zeros(p.n), p.x0)
    info = solver.info
    assert info.converged
    Qinv = float(torch.linalg.matrix_norm(torch.linalg.inv(p.Q), 2))
    err = float((u - p.u_star(p.x0)).norm())
    assert err <= 1.01 * Qinv * info.tol / p.s + 1e-13, (err, Qinv * info.tol / p.s)
    assert info.tol <= 1e-12 * max(1.0, float(u.norm())), info.tol


@pytest.mark.parametrize("kind", ["spd", "nonsym"])
def test_guard_adjoint_accuracy_n60(kind):
    """Default implicit adjoint accuracy on a problem where GMRES/CG need many products (n = 60)."""
    p = make_linear(kind, n=60, m=4, seed=32, cond=10.0)
    solver = hp.GKMSolver(p.T, hypergrad="implicit", tol=1e-12, max_steps=20000)
    x = p.x0.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(p.F(solver(_zeros(p.n), x)), x)
    assert rel_err(g, reference(p, ("fixed",), p.x0).grad) < 1e-8
