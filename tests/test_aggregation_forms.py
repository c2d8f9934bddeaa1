"""Aggregation "inside" (SPEC §0) vs "outside" (BDA/BOAT), Geometric schedules, paper_config.

Every reference is independent of the solver: closed forms (SPEC T5), hand-written loops of the
two iterations, and central finite differences of a hand-written forward.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import hodl_plugin as hp
from conftest import DT, nonsingleton, rel_err


def _quiet(**kw) -> hp.GKMSolver:
    """A solver built with summable / out-of-theory schedules on purpose (warnings silenced)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", hp.ConvergenceWarning)
        return hp.GKMSolver(**kw)


# -- (a) both forms select the closed-form point of SPEC T5 ---------------------------------------
@pytest.mark.parametrize("aggregation", ["inside", "outside"])
def test_both_forms_select_the_T5_projection(aggregation):
    A, b, s, z, proj = nonsingleton()
    T = lambda u: u - s * A.T @ (A @ u - b)  # noqa: E731  Fix T = {u : Au = b}
    F = lambda u: 0.5 * ((u - z) ** 2).sum()  # noqa: E731
    u_sel = z - A.T @ torch.linalg.solve(A @ A.T, A @ z - b)  # SPEC T5 closed form
    u0 = torch.randn(12, generator=torch.Generator().manual_seed(3), dtype=DT)
    errs = {}
    for K in (1000, 4000):
        solver = hp.GKMSolver(T, max_steps=K, tol=0.0, upper=F, alpha=hp.Harmonic(1.0), aggregation=aggregation)
        with torch.no_grad():
            errs[K] = rel_err(solver(u0), u_sel)
    plain = hp.GKMSolver(T, max_steps=4000, tol=0.0)
    with torch.no_grad():
        assert rel_err(plain(u0), u_sel) > 0.1  # plain KM lands elsewhere: the test discriminates
    assert errs[4000] < 2e-3, errs
    assert errs[4000] < 0.35 * errs[1000], errs  # the O(1/K) rate of harmonic weights


# -- (b) outside form == gradient descent, written by hand ----------------------------------------
def _gd_problem():
    g = torch.Generator().manual_seed(5)
    n = 6
    M = torch.randn(n, n, generator=g, dtype=DT)
    Q = M @ M.T / n + 0.5 * torch.eye(n, dtype=DT)  # f(u) = ½uᵀQu - cᵀu
    c = torch.randn(n, generator=g, dtype=DT)
    z = torch.randn(n, generator=g, dtype=DT)  # F(u) = ½||u - z||²
    t = 0.9 / float(torch.linalg.eigvalsh(Q).max())
    u0 = torch.randn(n, generator=g, dtype=DT)
    return Q, c, z, t, u0


@pytest.mark.parametrize(
    "alpha,beta",
    [(0.0, 1.0), (hp.Geometric(0.0, 0.5), 1.0), (1.0, 1.0), (hp.Geometric(0.6, 0.9), 1.0),
     (hp.Harmonic(1.0), 0.7)],
)
def test_outside_is_gradient_descent_on_the_mixed_objective(alpha, beta):
    """T(u) = u - t∇f(u), s = t: u+ = (1-β)u + β(u - t[(1-α_k)∇f(u) + α_k∇F(u)]) — by hand.

    α ≡ 0: gradient descent on f; α ≡ 1: gradient descent on F; otherwise BOAT's GDA step on
    (1-α_k) f + α_k F.
    """
    Q, c, z, t, u0 = _gd_problem()
    K = 25
    solver = _quiet(T=lambda u: u - t * (Q @ u - c), upper=lambda u: 0.5 * ((u - z) ** 2).sum(), upper_step=t,
                    alpha=alpha, beta=beta, aggregation="outside", max_steps=K, tol=0.0, strict=False)
    a_sched = hp.schedules.as_schedule(alpha)
    u = u0.clone()
    for k in range(K):  # the hand-written reference: analytic gradients, one combined step
        a = a_sched(k)
        grad_f, grad_F = Q @ u - c, u - z
        u = (1 - beta) * u + beta * (u - t * ((1 - a) * grad_f + a * grad_F))
    with torch.no_grad():
        out = solver(u0)
    assert rel_err(out, u) < 1e-13
    assert solver.info.steps == K


def test_outside_alpha_one_is_gradient_descent_on_F_only():
    """α ≡ 1 ignores T entirely: K steps of GD on F = ½||u - z||² with step s contract to z."""
    Q, c, z, t, u0 = _gd_problem()
    s, K = 0.3, 12
    solver = _quiet(T=lambda u: u - t * (Q @ u - c), upper=lambda u: 0.5 * ((u - z) ** 2).sum(), upper_step=s,
                    alpha=1.0, aggregation="outside", max_steps=K, tol=0.0, strict=False)
    with torch.no_grad():
        out = solver(u0)
    expected = z + (1 - s) ** K * (u0 - z)  # closed form of GD on ½||u - z||²
    assert rel_err(out, expected) < 1e-13


def test_outside_records_the_fixed_point_residual():
    """r_k = ||T(u_k) - u_k|| at the recorded steps, from a hand-written outside loop."""
    Q, c, z, t, u0 = _gd_problem()
    T = lambda u: u - t * (Q @ u - c)  # noqa: E731
    K, every = 21, 5
    alpha = hp.Geometric(0.5, 0.9)
    solver = _quiet(T=T, upper=lambda u: 0.5 * ((u - z) ** 2).sum(), upper_step=t, alpha=alpha,
                    aggregation="outside", max_steps=K, tol=0.0, check_every=every)
    with torch.no_grad():
        solver(u0)
    u, res = u0.clone(), {}
    for k in range(K):
        res[k] = float((T(u) - u).norm())
        a = alpha(k)
        u = (1 - a) * T(u) + a * (u - t * (u - z))
    steps = solver.info.residual_steps
    assert steps[0] == 0 and steps[-1] == K - 1
    for k, r in zip(steps, solver.info.residuals.tolist()):
        assert r == pytest.approx(res[k], rel=1e-12)


def test_outside_stops_on_the_fixed_point_residual():
    """With a tolerance the outside loop stops once ||T(u) - u|| is small: a geometric α (summable)
    lets it reach the unique fixed point u* = Q⁻¹c of a strongly convex lower level."""
    Q, c, z, t, u0 = _gd_problem()
    solver = _quiet(T=lambda u: u - t * (Q @ u - c), upper=lambda u: 0.5 * ((u - z) ** 2).sum(),
                    upper_step=t, alpha=hp.Geometric(0.5, 0.9), aggregation="outside", max_steps=5000,
                    tol=1e-12, check_every=1)
    with torch.no_grad():
        u = solver(u0)
    u_star = torch.linalg.solve(Q, c)
    assert solver.info.converged and solver.info.steps < 5000
    assert rel_err(u, u_star) < 1e-10


# -- (c) unrolled gradients of both forms against central finite differences ----------------------
def _nonlinear():
    g = torch.Generator().manual_seed(11)
    n, m = 5, 3
    M = torch.randn(n, n, generator=g, dtype=DT)
    Q = M @ M.T / n + 0.5 * torch.eye(n, dtype=DT)
    B = torch.randn(n, m, generator=g, dtype=DT)
    C = torch.randn(n, m, generator=g, dtype=DT)
    t = 0.8 / (float(torch.linalg.eigvalsh(Q).max()) + 0.3)

    def T(u, x):  # gradient step of ½uᵀQu + 0.3·Σ log cosh(u) - (Bx)ᵀu
        return u - t * (Q @ u + 0.3 * torch.tanh(u) - B @ x)

    def F(u, x):  # the upper objective depends on x too, so ∇_u F(u; x) carries x
        return 0.5 * ((u - torch.sin(C @ x)) ** 2).sum()

    def grad_F(u, x):
        return u - torch.sin(C @ x)

    return T, F, grad_F, t, n, m


def _hand_loop(T, grad_F, x, u0, K, s, alpha, beta, aggregation):
    u = u0
    for k in range(K):
        a = alpha(k)
        if aggregation == "inside":  # SPEC §0
            w = (1 - a) * u + a * (u - s * grad_F(u, x))
            u = (1 - beta) * u + beta * T(w, x)
        else:  # BDA/BOAT
            u = (1 - beta) * u + beta * ((1 - a) * T(u, x) + a * (u - s * grad_F(u, x)))
    return u


@pytest.mark.parametrize("aggregation", ["inside", "outside"])
@pytest.mark.parametrize("alpha", [hp.Harmonic(1.0), hp.Geometric(0.6, 0.9)])
def test_unrolled_gradient_matches_finite_differences(aggregation, alpha):
    T, F, grad_F, t, n, m = _nonlinear()
    K, s, beta = 15, 0.7, 0.9
    g = torch.Generator().manual_seed(2)
    x0 = torch.randn(m, generator=g, dtype=DT)
    u0 = torch.randn(n, generator=g, dtype=DT)
    y = torch.randn(n, generator=g, dtype=DT)

    def loss_by_hand(x):
        return 0.5 * ((_hand_loop(T, grad_F, x, u0, K, s, alpha, beta, aggregation) - y) ** 2).sum()

    solver = _quiet(T=T, upper=F, upper_step=s, alpha=alpha, beta=beta, aggregation=aggregation,
                    max_steps=K, tol=0.0, hypergrad="unrolled")
    x = x0.clone().requires_grad_(True)
    u = solver(u0, x)
    (0.5 * ((u - y) ** 2).sum()).backward()
    h = 1e-6
    fd = torch.stack([(loss_by_hand(x0 + h * e) - loss_by_hand(x0 - h * e)) / (2 * h)
                      for e in torch.eye(m, dtype=DT)])
    assert rel_err(x.grad, fd) < 1e-7, (x.grad, fd)
    # the two forms are different maps after K steps (the test can tell them apart)
    other = "outside" if aggregation == "inside" else "inside"
    with torch.no_grad():
        assert rel_err(u, _hand_loop(T, grad_F, x0, u0, K, s, alpha, beta, other)) > 1e-4


# -- implicit / inexact / batch_dims / Anderson with the outside form -----------------------------
def test_outside_implicit_gradient_at_the_unique_fixed_point(quad):
    """Strongly convex lower level: the outside form converges to u* = Q⁻¹Bx and the implicit
    hypergradient is the closed form Bᵀ Q⁻¹ (u* - y) + c x."""
    x = torch.randn(quad.B.shape[1], generator=torch.Generator().manual_seed(4), dtype=DT, requires_grad=True)
    for mode, opts in (("implicit", {"tol": 1e-12}), ("inexact", {"eps": 1e-11, "delta": 1e-11})):
        solver = _quiet(T=quad.T, upper=quad.F, alpha=hp.Geometric(0.5, 0.9), upper_step=0.5,
                        aggregation="outside", hypergrad=mode, max_steps=20000, **opts)
        x.grad = None
        u = solver(torch.zeros(quad.n, dtype=DT), x)
        quad.F(u, x).backward()
        assert rel_err(u.detach(), quad.u_star(x.detach())) < 1e-9
        assert rel_err(x.grad, quad.hypergrad(x.detach())) < 1e-6, mode


def test_outside_under_torch_func_matches_the_closed_form(quad):
    """torch.func.grad and vmap through the outside form (implicit mode, no host syncs)."""
    solver = _quiet(T=quad.T, upper=quad.F, alpha=hp.Geometric(0.5, 0.9), upper_step=0.5,
                    aggregation="outside", max_steps=700, tol=1e-12)

    def f(x):
        return quad.F(solver(torch.zeros(quad.n, dtype=DT), x), x)

    X = torch.randn(2, quad.B.shape[1], generator=torch.Generator().manual_seed(6), dtype=DT)
    G = torch.func.vmap(torch.func.grad(f))(X)
    for i in range(2):
        assert rel_err(G[i], quad.hypergrad(X[i])) < 1e-8


def test_outside_implicit_refuses_a_non_singleton_fixed_point_set():
    A, b, s, z, proj = nonsingleton()
    T = lambda u, x: u - s * A.T @ (A @ u - b) + 0 * x  # noqa: E731
    F = lambda u, x: 0.5 * ((u - z) ** 2).sum()  # noqa: E731
    solver = hp.GKMSolver(T, upper=F, alpha=hp.Harmonic(1.0), aggregation="outside", max_steps=200, tol=0.0,
                          hypergrad="implicit", solver="fixed_point", adjoint_maxiter=100)
    x = torch.zeros(12, dtype=DT, requires_grad=True)
    u = solver(torch.zeros(12, dtype=DT), x)
    with pytest.raises(hp.LinearSolveError):
        ((u - z) ** 2).sum().backward()


def test_outside_with_batch_dims_is_per_sample():
    Q, c, z, t, u0 = _gd_problem()
    Z = torch.stack([z, -z, 2 * z])
    U0 = torch.stack([u0, 0 * u0, -u0])
    T = lambda u: u - t * (u @ Q - c)  # noqa: E731  (Q symmetric: row-wise Qu)
    F = lambda u: 0.5 * ((u - Z) ** 2).sum()  # noqa: E731  separable over the batch
    K = 30
    alpha = hp.Harmonic(1.0)
    solver = hp.GKMSolver(T, upper=F, upper_step=t, alpha=alpha, aggregation="outside", max_steps=K,
                          tol=0.0, batch_dims=1)
    with torch.no_grad():
        out = solver(U0)
    for i in range(3):
        u = U0[i].clone()
        for k in range(K):
            a = alpha(k)
            u = (1 - a) * (u - t * (Q @ u - c)) + a * (u - t * (u - Z[i]))
        assert rel_err(out[i], u) < 1e-13


def test_anderson_is_refused_with_either_form():
    T = lambda u: 0.5 * u  # noqa: E731
    F = lambda u: (u**2).sum()  # noqa: E731
    for agg in ("inside", "outside"):
        with pytest.raises(hp.ConfigurationError, match="aggregation"):
            hp.GKMSolver(T, upper=F, alpha=hp.Harmonic(1.0), aggregation=agg, acceleration=hp.Anderson())


# -- (d) Geometric: values, the named warning, invalid arguments ----------------------------------
def test_geometric_values_and_facts():
    a = hp.Geometric(0.6, 0.9)
    assert a.values(4) == pytest.approx([0.6, 0.54, 0.486, 0.4374], rel=1e-15)
    assert a(30) == pytest.approx(0.6 * 0.9**30, rel=1e-15)
    assert a.summable and a.limit == 0.0 and a.nonincreasing
    assert sum(a.values(2000)) == pytest.approx(0.6 / (1 - 0.9), rel=1e-12)


def test_summable_schedules_warn_with_the_named_warning():
    T = lambda u: 0.5 * u  # noqa: E731
    F = lambda u: (u**2).sum()  # noqa: E731
    for alpha in (hp.Geometric(0.5, 0.9), hp.Polynomial(1.0, 2.0)):
        with pytest.warns(hp.SummableScheduleWarning, match="outside the selection theory"):
            hp.GKMSolver(T, upper=F, alpha=alpha)
    assert issubclass(hp.SummableScheduleWarning, hp.ConvergenceWarning)
    with warnings.catch_warnings():  # a non-summable schedule does not warn
        warnings.simplefilter("error")
        hp.GKMSolver(T, upper=F, alpha=hp.Harmonic(1.0), aggregation="outside")
        hp.GKMSolver(T, upper=F, alpha=0.0, aggregation="outside")


@pytest.mark.parametrize(
    "args,match",
    [((-0.1, 0.9), "alpha0"), ((math.nan, 0.9), "alpha0"), ((math.inf, 0.9), "alpha0"),
     ((0.5, 1.0), "gamma"), ((0.5, 0.0), "gamma"), ((0.5, -0.5), "gamma"), ((0.5, math.nan), "gamma")],
)
def test_geometric_rejects_invalid_arguments(args, match):
    with pytest.raises(hp.ScheduleError, match=match):
        hp.Geometric(*args)


def test_solver_rejects_bad_aggregation_arguments():
    T = lambda u: 0.5 * u  # noqa: E731
    F = lambda u: (u**2).sum()  # noqa: E731
    for bad in ("Outside", "both", None, 1):
        with pytest.raises(ValueError, match="aggregation must be one of"):
            hp.GKMSolver(T, upper=F, aggregation=bad)
    with pytest.raises(ValueError, match="needs the upper objective"):
        hp.GKMSolver(T, aggregation="outside")
    with pytest.raises(hp.ScheduleError, match=r"\[0, 1\]"):  # alpha_0 > 1 stays an error
        hp.GKMSolver(T, upper=F, alpha=hp.Geometric(1.5, 0.9), aggregation="outside")
    with pytest.raises(hp.ScheduleError, match="decrease to 0"):  # so does a non-vanishing weight
        hp.GKMSolver(T, upper=F, alpha=0.5, aggregation="outside")
    with pytest.raises(ValueError, match="steps"):
        hp.paper_config(steps=0)
    with pytest.raises(ValueError, match="aggregation"):
        hp.paper_config(steps=5, aggregation="middle")


# -- (e) the default is the SPEC §0 "inside" form, unchanged --------------------------------------
@pytest.mark.parametrize("explicit", [False, True])
def test_default_inside_matches_a_hand_written_spec_loop(explicit):
    T, F, grad_F, t, n, m = _nonlinear()
    g = torch.Generator().manual_seed(8)
    x = torch.randn(m, generator=g, dtype=DT)
    u0 = torch.randn(n, generator=g, dtype=DT)
    K, s, beta, alpha = 40, 0.6, 0.8, hp.Polynomial(0.9, 0.75)
    kw = {"aggregation": "inside"} if explicit else {}
    solver = hp.GKMSolver(T, upper=F, upper_step=s, alpha=alpha, beta=beta, max_steps=K, tol=0.0, **kw)
    with torch.no_grad():
        out = solver(u0, x)
    assert solver.iteration.aggregation == "inside"
    assert rel_err(out, _hand_loop(T, grad_F, x, u0, K, s, alpha, beta, "inside")) < 1e-14


# -- paper_config: exactly K unrolled steps of the outside form ------------------------------------
def test_paper_config_runs_exactly_K_unrolled_outside_steps():
    T, F, grad_F, t, n, m = _nonlinear()
    g = torch.Generator().manual_seed(9)
    x0 = torch.randn(m, generator=g, dtype=DT)
    u0 = torch.randn(n, generator=g, dtype=DT)
    K = 7
    with pytest.warns(hp.SummableScheduleWarning):
        solver = hp.GKMSolver(T, upper=F, **hp.paper_config(steps=K))
    x = x0.clone().requires_grad_(True)
    u = solver(u0, x)
    assert solver.info.steps == K and solver.info.exact_steps
    alpha = hp.Geometric(0.5, 0.9)
    assert rel_err(u.detach(), _hand_loop(T, grad_F, x0, u0, K, 1.0, alpha, 1.0, "outside")) < 1e-14
    u.sum().backward()  # unrolled: the gradient of the K-step map, checked against FD
    h = 1e-6
    fd = torch.stack([
        (_hand_loop(T, grad_F, x0 + h * e, u0, K, 1.0, alpha, 1.0, "outside").sum()
         - _hand_loop(T, grad_F, x0 - h * e, u0, K, 1.0, alpha, 1.0, "outside").sum()) / (2 * h)
        for e in torch.eye(m, dtype=DT)
    ])
    assert rel_err(x.grad, fd) < 1e-7


# ------------------------------------------------------------------------------------ converged means converged
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


def test_a_forward_tolerance_given_to_the_inexact_mode_is_said_unused():
    """The inexact forward stops at its ε_k: tol= was silently unused (1e-4 accuracy for tol=1e-12)."""
    for bad in ({"tol": 1e-12}, {"atol": 1e-9}):
        with pytest.warns(hp.errors.UnusedOptionWarning, match="eps="):
            hp.GKMSolver(lambda u, x: 0.5 * u + x, hypergrad="inexact", **bad)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hp.GKMSolver(lambda u, x: 0.5 * u + x, hypergrad="inexact", eps=1e-12)  # the way to ask for it


def test_geometric_zero_is_no_aggregation_and_a_huge_anderson_history_is_capped():
    """Geometric(0, γ) ≡ 0: plain KM — accepted with Anderson, no summable warning; Geometric(True, ·) refused;
    history_size far above n keeps at most n differences (was an 8 TB allocation for m = 1e6, n = 8)."""
    Q = torch.diag(torch.linspace(1, 10, 8, dtype=DT))
    x = torch.ones(8, dtype=DT)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s = hp.GKMSolver(lambda u, x: u - (Q @ u - x) / 10, upper=lambda u, x: (u ** 2).sum(),
                         alpha=hp.Geometric(0.0, 0.5), acceleration=hp.Anderson(history_size=10 ** 6))
        u = s(torch.zeros(8, dtype=DT), x)
    assert rel_err(u, torch.linalg.solve(Q, x)) < 1e-9
    with pytest.raises(hp.ScheduleError):
        hp.Geometric(True, 0.9)
