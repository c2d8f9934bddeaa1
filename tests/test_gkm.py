"""The GKM iteration (:mod:`hodl_plugin.gkm`, :ref:`math-gkm`): KM relaxation, HODL's aggregation inside
the operator and BDA/BOAT's outside it (:ref:`math-aggregation`), the selection of the upper-optimal
fixed point of a non-singleton set, per-sample iteration with ``batch_dims``.

Every reference is independent of the solver: closed forms (Fix T = {u : Au = b}, whose F-optimal point
for F = ½‖u − z‖² is the projection of z), hand-written loops of the two iterations
(:func:`_oracles.gkm_loop`), and central finite differences of a hand-written forward.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from _oracles import DT, gkm_loop, gradient_step_tanh, nonsingleton, rel_err

import hodl_plugin as hp
from hodl_plugin import _stopping


def _quiet(**kw) -> hp.GKMSolver:
    """A solver built with summable / out-of-theory schedules on purpose (warnings silenced)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", hp.ConvergenceWarning)
        return hp.GKMSolver(**kw)


# -- KM relaxation ----------------------------------------------------------------------------------
def _hypergrad(solver, q, x0):
    x = x0.clone().requires_grad_(True)
    u = solver(torch.zeros(q.n, dtype=DT), x)
    q.F(u, x).backward()
    return x.grad


@pytest.mark.parametrize("beta", [0.5, hp.Constant(0.8)])
def test_km_relaxation_same_fixed_point_and_hypergradient(quad, beta):
    x0 = torch.tensor([1.0, 0.0, -1.0], dtype=DT)
    for mode in ("implicit", "unrolled"):
        solver = hp.GKMSolver(quad.T, max_steps=40000, tol=1e-13, beta=beta, hypergrad=mode)
        assert rel_err(_hypergrad(solver, quad, x0), quad.hypergrad(x0)) < 1e-8


# -- plain KM depends on u0; both aggregation forms select the projection ---------------------------
@pytest.fixture
def ns():
    A, b, s, z, proj = nonsingleton()
    T = lambda u, *x: u - s * A.T @ (A @ u - b)  # noqa: E731  (rank-deficient least squares)
    return A, b, z, proj, T


def test_plain_km_converges_to_a_fixed_point_that_depends_on_u0(ns):
    A, b, z, proj, T = ns
    solver = hp.GKMSolver(T, max_steps=100000, tol=1e-13)
    outs = []
    for seed in (0, 1):
        u0 = torch.randn(12, generator=torch.Generator().manual_seed(seed), dtype=DT)
        with torch.no_grad():
            u = solver(u0)
        assert rel_err(u, proj(u0)) < 1e-10  # the projection of u0: depends on u0
        outs.append(u)
    assert rel_err(outs[0], outs[1]) > 0.1
    assert rel_err(outs[0], proj(z)) > 0.1  # and is not the upper-optimal fixed point


def test_hodl_aggregation_selects_the_upper_optimal_fixed_point(ns):
    A, b, z, proj, T = ns
    u_sel = proj(z)  # argmin ½||u - z||² over Fix(T), closed form
    F = lambda u: 0.5 * ((u - z) ** 2).sum()  # noqa: E731
    errs = {}
    for K in (1000, 4000):
        for seed in (0, 1):
            u0 = torch.randn(12, generator=torch.Generator().manual_seed(seed), dtype=DT)
            solver = hp.GKMSolver(T, max_steps=K, tol=0.0, upper=F, upper_step=1.0, alpha=hp.Harmonic(1.0))
            with torch.no_grad():
                u = solver(u0)
            errs[K, seed] = rel_err(u, u_sel)
    # converges to u_sel from any start, at the O(1/K) rate of the harmonic weights
    assert max(errs[4000, 0], errs[4000, 1]) < 2e-3
    assert errs[4000, 0] < 0.3 * errs[1000, 0]


@pytest.mark.parametrize("aggregation", ["inside", "outside"])
def test_both_forms_select_the_projection(aggregation):
    A, b, s, z, proj = nonsingleton()
    T = lambda u: u - s * A.T @ (A @ u - b)  # noqa: E731  Fix T = {u : Au = b}
    F = lambda u: 0.5 * ((u - z) ** 2).sum()  # noqa: E731
    u_sel = z - A.T @ torch.linalg.solve(A @ A.T, A @ z - b)  # the closed form
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


def test_hyper_training_through_the_selection(ns):
    """z = ω, task loss ½||u_sel(ω) - u_gt||², u_gt ∈ Fix T: d/dω of the limit = P_null(A)(u_sel - u_gt).

    Unrolled through the aggregated iteration (HODL's hypergradient) approaches it as K grows.
    """
    A, b, z, proj, T = ns
    u_gt = proj(torch.zeros(12, dtype=DT) + 0.3)
    F = lambda u, w: 0.5 * ((u - w) ** 2).sum()  # noqa: E731
    P_null = torch.eye(12, dtype=DT) - A.T @ torch.linalg.solve(A @ A.T, A)
    expected = P_null @ (proj(z) - u_gt)
    errs = []
    for K in (300, 1200):
        w = z.clone().requires_grad_(True)
        solver = hp.GKMSolver(T, max_steps=K, tol=0.0, upper=F, alpha=hp.Harmonic(1.0), hypergrad="unrolled")
        u = solver(torch.zeros(12, dtype=DT), w)
        (0.5 * ((u - u_gt) ** 2).sum()).backward()
        errs.append(rel_err(w.grad, expected))
    assert errs[1] < 0.05 and errs[1] < errs[0]


# -- the outside form is gradient descent on the mixed objective, written by hand -------------------
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


# -- unrolled gradients of both forms against central finite differences -----------------------------
@pytest.mark.parametrize("aggregation", ["inside", "outside"])
@pytest.mark.parametrize("alpha", [hp.Harmonic(1.0), hp.Geometric(0.6, 0.9)])
def test_unrolled_gradient_matches_finite_differences(aggregation, alpha):
    T, F, grad_F, t, n, m = gradient_step_tanh()
    K, s, beta = 15, 0.7, 0.9
    g = torch.Generator().manual_seed(2)
    x0 = torch.randn(m, generator=g, dtype=DT)
    u0 = torch.randn(n, generator=g, dtype=DT)
    y = torch.randn(n, generator=g, dtype=DT)

    def loss_by_hand(x):
        return 0.5 * ((gkm_loop(T, grad_F, x, u0, K, s, alpha, beta, aggregation) - y) ** 2).sum()

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
        assert rel_err(u, gkm_loop(T, grad_F, x0, u0, K, s, alpha, beta, other)) > 1e-4


def _tanh_aggregation(n, K):
    """T(u; x) = u − (Q tanh(u) − x)/L, F(u; x) = ½‖u − z‖² + 0.3·xᵀu; the aggregated loop of :ref:`math-gkm`
    with β = 1, s = 1, α_k = 1/(k+1) written out (∇_u F = u − z + 0.3x); a loss through it and its central
    differences."""
    g = torch.Generator().manual_seed(3)
    A = torch.randn(n, n, generator=g, dtype=DT)
    Q = A @ A.T + n * torch.eye(n, dtype=DT)
    L = float(torch.linalg.matrix_norm(Q, 2))
    z = torch.randn(n, generator=g, dtype=DT)

    def T(u, x):
        return u - (Q @ torch.tanh(u) - x) / L

    def F(u, x):
        return 0.5 * ((u - z) ** 2).sum() + 0.3 * (x * u).sum()

    def hand_loop(x, steps=K):
        u = torch.zeros(n, dtype=DT)
        for k in range(steps):
            u = T(u - (u - z + 0.3 * x) / (k + 1), x)
        return u

    def loss(u, x):
        return (u ** 3).sum() + F(u, x)

    def fd_grad(x, h=1e-6):
        e = torch.eye(n, dtype=DT)
        return torch.stack([(loss(hand_loop(x + h * e[i]), x + h * e[i]) - loss(hand_loop(x - h * e[i]), x - h * e[i]))
                            / (2 * h) for i in range(n)])

    return T, F, hand_loop, loss, fd_grad


@pytest.mark.parametrize("mode", ["unrolled", "truncated"])
def test_func_grad_vmap_jacfwd_through_aggregation(mode):
    """torch.func.grad / jacfwd / vmap through the aggregated step (``upper=``, α_k ≠ 0), unrolled and
    truncated: ∇_u F inside the step goes through ``torch.func.grad`` (``requires_grad_`` is refused under
    torch.func). Reference: central differences of the hand-written loop (float64)."""
    n, K = 4, 12
    T, F, hand_loop, loss, fd_grad = _tanh_aggregation(n, K)
    hg = "unrolled" if mode == "unrolled" else hp.Truncated(K)  # truncated with k = K: every step
    s = hp.GKMSolver(T, upper=F, alpha=hp.schedules.Harmonic(1.0), hypergrad=hg, max_steps=K, tol=0, atol=0)

    def f(x):
        return loss(s(torch.zeros(n, dtype=DT), x), x)

    x = torch.randn(n, generator=torch.Generator().manual_seed(5), dtype=DT)
    ref = fd_grad(x)
    assert torch.allclose(hand_loop(x), s(torch.zeros(n, dtype=DT), x), atol=1e-13)  # the forward is that loop
    assert torch.allclose(torch.func.grad(f)(x), ref, atol=1e-7)
    assert torch.allclose(torch.func.jacfwd(f)(x), ref, atol=1e-7)
    xs = torch.stack([x, 0.5 * x])
    refs = torch.stack([ref, fd_grad(0.5 * x)])
    assert torch.allclose(torch.func.vmap(torch.func.grad(f))(xs), refs, atol=1e-7)


# -- implicit / inexact / batch_dims with the outside form -------------------------------------------
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


# -- the default is the inside form of the math page --------------------------------------------------
@pytest.mark.parametrize("explicit", [False, True])
def test_default_inside_matches_a_hand_written_loop(explicit):
    T, F, grad_F, t, n, m = gradient_step_tanh()
    g = torch.Generator().manual_seed(8)
    x = torch.randn(m, generator=g, dtype=DT)
    u0 = torch.randn(n, generator=g, dtype=DT)
    K, s, beta, alpha = 40, 0.6, 0.8, hp.Polynomial(0.9, 0.75)
    kw = {"aggregation": "inside"} if explicit else {}
    solver = hp.GKMSolver(T, upper=F, upper_step=s, alpha=alpha, beta=beta, max_steps=K, tol=0.0, **kw)
    with torch.no_grad():
        out = solver(u0, x)
    assert solver.iteration.aggregation == "inside"
    assert rel_err(out, gkm_loop(T, grad_F, x, u0, K, s, alpha, beta, "inside")) < 1e-14


# -- batch_dims: each sample its own iteration ----------------------------------------------------------
def spd(n, cond, seed=0, dtype=DT):
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=dtype))
    ev = torch.logspace(0, math.log10(cond), n, dtype=dtype)
    return (U * ev) @ U.T, ev.max()


def _batch_problem(conds, n=8, seed=0):
    Qs, Ls = zip(*(spd(n, c, seed=seed + i) for i, c in enumerate(conds)))
    Q, L = torch.stack(Qs), torch.stack(Ls)
    b = torch.randn(len(conds), n, dtype=DT, generator=torch.Generator().manual_seed(seed))
    return Q, L, b


@pytest.fixture(params=["numpy", "torch"])
def array_path(request, monkeypatch):
    """The per-sample check on numpy views (eager CPU batches) and on torch tensors (what an accelerator
    device runs): the same rule, two namespaces."""
    if request.param == "torch":
        monkeypatch.setattr(_stopping, "np", None)
    return request.param


@pytest.mark.parametrize("accel", [None, "anderson"])
def test_batch_dims_each_sample_equals_its_own_solve(accel, array_path):
    Q, L, b = _batch_problem([2.0, 10.0, 300.0, 5.0])

    def T(u, x):
        return u - torch.einsum("bij,bj->bi", Q, u) / L[:, None] + x / L[:, None]

    def make(**kw):
        acc = hp.Anderson(3) if accel else None
        return hp.GKMSolver(T, max_steps=20000, tol=1e-9, check_every=5, acceleration=acc, **kw)

    u, info = make(batch_dims=1).solve(torch.zeros_like(b), b)
    assert info.converged and info.steps_per_sample.shape == (4,)
    exact = torch.linalg.solve(Q, b.unsqueeze(-1)).squeeze(-1)
    assert float(((u - exact).norm(dim=1) / exact.norm(dim=1)).max()) < 1e-6  # tol 1e-9 x cond 300
    for i in range(4):  # the same iteration, one sample at a time
        Ti = lambda v, x, i=i: v - Q[i] @ v / L[i] + x / L[i]  # noqa: E731
        acc = hp.Anderson(3) if accel else None
        ui, inf_i = hp.GKMSolver(Ti, max_steps=20000, tol=1e-9, check_every=5, acceleration=acc).solve(
            torch.zeros(8, dtype=DT), b[i])
        if accel is None:  # bitwise the same iteration
            assert int(info.steps_per_sample[i]) == inf_i.steps
            assert torch.allclose(u[i], ui, rtol=1e-12, atol=1e-14)
        else:  # batched vs single small least squares round differently: equal to the tolerance
            assert abs(int(info.steps_per_sample[i]) - inf_i.steps) <= 10
            assert float((u[i] - ui).norm() / ui.norm()) < 1e-7
    # the slow sample (cond 300) does not hold the others back
    assert int(info.steps_per_sample[2]) > 5 * int(info.steps_per_sample[0])


def test_batch_slow_sample_does_not_change_the_others(array_path):
    Q, L, b = _batch_problem([2.0, 10.0, 1000.0])

    def solve(idx):
        Qi, Li, bi = Q[idx], L[idx], b[idx]

        def T(u, x):
            return u - torch.einsum("bij,bj->bi", Qi, u) / Li[:, None] + x / Li[:, None]

        return hp.GKMSolver(T, max_steps=50000, tol=1e-9, batch_dims=1).solve(torch.zeros_like(bi), bi)

    u_all, info_all = solve([0, 1, 2])
    u_fast, info_fast = solve([0, 1])
    assert torch.equal(u_all[:2], u_fast)
    assert torch.equal(info_all.steps_per_sample[:2], info_fast.steps_per_sample)


def test_batch_unconverged_sample_is_named(array_path):
    Q, L, b = _batch_problem([2.0, 1000.0])

    def T(u, x):
        return u - torch.einsum("bij,bj->bi", Q, u) / L[:, None] + x / L[:, None]

    with pytest.warns(hp.ConvergenceWarning, match=r"1 of 2 samples, e.g. \[1\]"):
        _, info = hp.GKMSolver(T, max_steps=200, batch_dims=1).solve(torch.zeros_like(b), b)
    assert info.converged_per_sample.tolist() == [True, False]


def test_batch_stopped_samples_return_their_own_points_in_every_record(array_path):
    """Samples stop at different checks (conditions 2 to 400); each returns the point it stopped at, and
    every later row of the history keeps the residual it stopped with (a host batch lets a stopped sample
    iterate on and puts its point back at the end)."""
    Q, L, b = _batch_problem([2.0, 30.0, 400.0])

    def T(u, x):
        return u - torch.einsum("bij,bj->bi", Q, u) / L[:, None] + x / L[:, None]

    u, info = hp.GKMSolver(T, max_steps=20000, tol=1e-9, batch_dims=1).solve(torch.zeros_like(b), b)
    steps = info.steps_per_sample.tolist()
    assert steps[0] < steps[1] < steps[2]
    for i in range(3):  # each sample's point is the i-th single solve's (same rule, same steps)
        ui, ii = hp.GKMSolver(lambda v, x: T(v.expand(3, -1), x)[i], max_steps=20000, tol=1e-9).solve(
            torch.zeros_like(b[i]), b)
        assert ii.steps == steps[i] and torch.equal(u[i], ui)
    hist, at = info.residuals, torch.tensor(info.residual_steps)
    for i in range(2):
        after = hist[at >= steps[i], i]
        assert len(after) > 1 and bool((after == after[0]).all())
        assert float(after[0]) <= 1e-9 * float(u[i].norm())


def test_unrolled_batch_gradient_through_samples_that_stop_early(array_path):
    """Unrolled differentiation of a batch whose samples stop at different steps: each sample's gradient
    is that of its own K-step map (against the same solve one sample at a time)."""
    Q, L, b = _batch_problem([2.0, 50.0])
    x = b.clone().requires_grad_(True)

    def T(u, x):
        return u - torch.einsum("bij,bj->bi", Q, u) / L[:, None] + x / L[:, None]

    u = hp.GKMSolver(T, max_steps=3000, tol=1e-8, batch_dims=1, hypergrad="unrolled")(torch.zeros_like(b), x)
    (g,) = torch.autograd.grad((u ** 2).sum(), x)
    for i in range(2):
        xi = b.clone().requires_grad_(True)
        ui = hp.GKMSolver(lambda v, x: T(v.expand(2, -1), x)[i], max_steps=3000, tol=1e-8,
                          hypergrad="unrolled")(torch.zeros_like(b[i]), xi)
        (gi,) = torch.autograd.grad((ui ** 2).sum(), xi)
        assert torch.allclose(u[i], ui, rtol=1e-14, atol=0)
        assert torch.allclose(g[i], gi[i], rtol=1e-12, atol=1e-15)


def test_batch_checks_without_numpy_vecdot(monkeypatch):
    """numpy < 2 has no ``vecdot``: the host checks and per-sample Anderson sum the squares by einsum."""
    from hodl_plugin.acceleration import base

    monkeypatch.delattr(base.np, "vecdot", raising=False)
    Q, L, b = _batch_problem([2.0, 30.0])

    def T(u, x):
        return u - torch.einsum("bij,bj->bi", Q, u) / L[:, None] + x / L[:, None]

    exact = torch.linalg.solve(Q, b)
    for acc in (None, hp.Anderson(4)):
        with torch.no_grad():
            u, info = hp.GKMSolver(T, max_steps=20000, tol=1e-11, batch_dims=1, acceleration=acc).solve(
                torch.zeros_like(b), b)
        assert info.converged and rel_err(u, exact) < 1e-8


def test_batch_history_ends_with_the_residual_of_each_returned_point(array_path):
    Q, L, b = _batch_problem([2.0, 1000.0])

    def T(u, x):
        return u - torch.einsum("bij,bj->bi", Q, u) / L[:, None] + x / L[:, None]

    with pytest.warns(hp.ConvergenceWarning, match=r"1 of 2 samples"):  # sample 1 runs out of steps
        u, info = hp.GKMSolver(T, max_steps=300, tol=1e-9, batch_dims=1).solve(torch.zeros_like(b), b)
    assert info.converged_per_sample.tolist() == [True, False]
    assert int(info.steps_per_sample[0]) < 300 == int(info.steps_per_sample[1])
    measured = (T(u, b) - u).norm(dim=1)  # of the points returned: sample 0 stopped early, 1 ran out
    assert torch.allclose(info.residuals[-1], measured, rtol=1e-8, atol=0)
    assert float(measured[0]) <= 1e-9 * float(u[0].norm()) < float(measured[1])


@pytest.mark.parametrize("c1", [1.5, -1.0])  # sample 1 diverges (grows), or stalls (a reflection)
def test_batch_history_of_a_diverged_sample_beside_one_that_runs_out_of_steps(array_path, c1):
    """The last row of ``info.residuals`` is the residual of each returned point, also for a sample that
    diverged (it returns its last finite iterate) while another ran out of steps (NaN before)."""
    T = lambda u, x, c: c.unsqueeze(-1) * (0.6 * u + 0.4 * u.flip(-1)) + x  # noqa: E731
    x = torch.tensor([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]], dtype=DT)
    c = torch.tensor([0.999, c1], dtype=DT)  # sample 0 converges slowly: it runs out of steps
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        u, info = hp.GKMSolver(T, batch_dims=1, on_divergence="warn", max_steps=300).solve(
            torch.zeros(2, 3, dtype=DT), x, c)
    measured = (T(u, x, c) - u).norm(dim=1)
    assert info.diverged and torch.isfinite(u).all() and int(info.steps_per_sample[0]) == 300
    assert torch.allclose(info.residuals[-1], measured, rtol=1e-12, atol=0)
    assert math.isfinite(info.residual)


def test_batch_divergence_names_the_sample_and_keeps_the_others(array_path):
    grow = torch.tensor([0.5, 2.0, 0.5], dtype=DT)[:, None]  # sample 1 doubles at every step
    x = torch.ones(3, 4, dtype=DT)
    with pytest.warns(hp.ConvergenceWarning, match=r"diverged at step \d+ \(batch samples \[1\]\)"):
        u, info = hp.GKMSolver(lambda u, x: grow * u + x, tol=1e-10, batch_dims=1,
                               on_divergence="warn").solve(torch.zeros_like(x), x)
    assert info.converged_per_sample.tolist() == [True, False, True]
    assert torch.allclose(u[[0, 2]], torch.full((2, 4), 2.0, dtype=DT), rtol=1e-9)  # x / (1 - 0.5)
    # the diverged sample keeps its last finite iterate and its step count, as when solved alone (it went on
    # iterating, and every count was shifted by the divergence step)
    with pytest.warns(hp.ConvergenceWarning, match="diverged"):
        u1, info1 = hp.GKMSolver(lambda u, x: 2.0 * u + x, tol=1e-10, on_divergence="warn").solve(
            torch.zeros(4, dtype=DT), x[1])
    assert torch.equal(u[1], u1) and int(info.steps_per_sample[1]) == info1.steps
    alone = hp.GKMSolver(lambda u, x: 0.5 * u + x, tol=1e-10).solve(torch.zeros(4, dtype=DT), x[0])[1]
    assert int(info.steps_per_sample[0]) == alone.steps == info.steps
    assert u1.abs().max() == 2.0 ** info1.steps - 1  # u_k = (2^k - 1)·x: the iterate of the reported step


@pytest.mark.parametrize("batch_dims", [0, 1])
def test_outside_does_not_stop_at_a_start_in_fix_t_that_is_not_the_selected_point(batch_dims):
    """T projects onto span(e1), F = ½‖u - y‖²: the selected point is (y1, 0). From u0 = 0 ∈ Fix T the outside
    form stopped at step 0 with converged=True (‖T(u0) - u0‖ = 0); its selection test ‖T(u - αs∇F) - u‖ keeps it
    going. From the selected point itself it stops at once."""
    def T(u, y):
        return torch.stack([u[..., 0], torch.zeros_like(u[..., 1])], -1)

    def F(u, y):
        return 0.5 * ((u - y) ** 2).sum()

    y = torch.tensor([[1.0, 2.0], [-3.0, 0.5]], dtype=DT)
    y = y if batch_dims else y[0]
    selected = torch.stack([y[..., 0], torch.zeros_like(y[..., 0])], -1)
    solver = hp.GKMSolver(T, upper=F, aggregation="outside", tol=1e-6, max_steps=2000, batch_dims=batch_dims)
    with pytest.warns(hp.ConvergenceWarning, match="did not converge"):  # the outside form approaches it slowly
        u, info = solver.solve(torch.zeros_like(y), y)
    assert not info.converged and info.steps == 2000
    assert float((u - selected).abs().max()) < 1e-2  # on its way to the selected point, not at u0 = 0
    u, info = solver.solve(selected.clone(), y)
    assert info.converged and info.steps == 0 and torch.equal(u, selected)


def test_a_check_that_cannot_stop_the_run_sets_no_stall_reference():
    """Unrolled (at least one step) from the selected point of the outside form: the step-0 residual is 0, the
    aggregated step then leaves Fix T, and every later residual was a 'stall at the rounding floor' of float64
    (smallest 0). The run goes on, and ends as what it is: not converged in max_steps."""
    def T(u, y):
        return torch.stack([u[..., 0], torch.zeros_like(u[..., 1])], -1)

    y = torch.tensor([3.0, 1.0], dtype=DT)
    solver = hp.GKMSolver(T, upper=lambda u, y: 0.5 * ((u - y) ** 2).sum(), aggregation="outside",
                          hypergrad="unrolled", tol=1e-8, max_steps=300)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        solver.solve(torch.tensor([3.0, 0.0], dtype=DT), y)
    messages = " ".join(str(w.message) for w in caught)
    assert "rounding floor" not in messages and "did not converge" in messages
    assert solver.info.steps == 300


@pytest.mark.parametrize("batch_dims", [0, 1])
def test_an_operator_reusing_an_output_buffer_is_refused(batch_dims):
    """T writes into one out= buffer: from the second step on u is that buffer, T(u) overwrote u and the
    residual read 0 (converged=True at 1.998 for u* = 2)."""
    buf = torch.empty(2, 3, dtype=torch.float64) if batch_dims else torch.empty(3, dtype=torch.float64)
    x = torch.ones_like(buf)
    solver = hp.GKMSolver(lambda u, x: torch.add(0.5 * u, x, out=buf), tol=1e-10, batch_dims=batch_dims)
    with pytest.raises(ValueError, match="out= buffer"):
        solver.solve(torch.zeros_like(x), x)
