"""``torch.func.vmap`` over a GKM solve is ONE batched solve (issue 12, last item).

Problem (per sample i): :math:`T(u; d, c) = u - s(Q(d)u - c)`, :math:`Q(d) = R\\,\\mathrm{diag}(d)R^\\top`
with a fixed rotation R and per-sample spectra d of very different conditioning, so the samples need
very different numbers of steps. Closed forms (independent of the code), with z = Rᵀc, e = u* − y,
f = ½‖u* − y‖² and P the derivative operator of the mode:

    u* = R(z/d),   ∂f/∂c = Pᵀe,   ∂f/∂d = −(Rᵀu*) ⊙ (R ᵀ Pᵀ e),
    P = Q⁻¹ (implicit, inexact, unrolled at convergence),  (I − (I − sQ)^t)Q⁻¹ (truncated, t steps
    at the fixed point),  sI (first_order).

"Batched" is checked by counting: one Python call of T per GKM step for the whole batch (the
per-sample loop calls it once per sample step), per-sample steps in ``info.steps_per_sample`` equal
to the unbatched solves' steps, a converged sample frozen (its iterate equals its own unbatched
solve's), and the adjoint info carrying ``iterations_per_sample``.
"""

from __future__ import annotations

import math

import pytest
import torch

import hodl_plugin as hp
from hodl_plugin import linear_solve as ls
from hodl_plugin.schedules import Polynomial

D = torch.float64
N, B = 6, 3
S = 1.0 / 10.0  # step: every spectrum below lies in (0, 10]


def _setup():
    g = torch.Generator().manual_seed(7)
    R, _ = torch.linalg.qr(torch.randn(N, N, generator=g, dtype=D))
    # per-sample spectra: condition numbers 2 (two distinct eigenvalues), 10, 100 -> fast, medium
    # and slow samples, for the GKM iteration and for CG alike
    d = torch.stack([torch.tensor([5.0, 10.0], dtype=D).repeat_interleave(N // 2)]
                    + [torch.logspace(math.log10(lo), 1, N, dtype=D) for lo in (1.0, 0.1)])
    c = torch.randn(B, N, generator=g, dtype=D)
    y = torch.randn(N, generator=g, dtype=D)
    return R, d, c, y


R, DS, CS, Y = _setup()
X = torch.cat([DS, CS], dim=1)  # one per-sample input x = (d, c)


class Counted:
    """T(u; x) with x = (d, c); counts its Python calls."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, u, x):
        self.calls += 1
        d, c = x[:N], x[N:]
        return u - S * (R @ (d * (R.T @ u)) - c)


def Q(d):
    return (R * d) @ R.T


def u_star(x):
    d, c = x[:N], x[N:]
    return R @ ((R.T @ c) / d)


def P(d, mode, t=5):
    Qi = torch.linalg.inv(Q(d))
    if mode == "first_order":
        return S * torch.eye(N, dtype=D)
    if mode == "truncated":
        return (torch.eye(N, dtype=D) - torch.linalg.matrix_power(torch.eye(N, dtype=D) - S * Q(d), t)) @ Qi
    return Qi


def grad_ref(x, mode):
    d = x[:N]
    u = u_star(x)
    w = P(d, mode).T @ (u - Y)
    return torch.cat([-(R.T @ u) * (R.T @ w), w])


def jac_ref(x, mode="implicit"):
    """du*/dx = [−P R diag(Rᵀu*), P]."""
    d = x[:N]
    Pm = P(d, mode)
    return torch.cat([-(Pm @ R) * (R.T @ u_star(x)), Pm], dim=1)


def f_of(solver):
    def solve(x):
        return solver(torch.zeros(N, dtype=D), x)

    def f(x):
        return 0.5 * ((solve(x) - Y) ** 2).sum()

    return solve, f


def make(mode="implicit", tol=1e-11, **kw):
    T = Counted()
    opts = {"eps": tol, "delta": tol} if mode == "inexact" else {"tol": tol}
    if mode == "truncated":
        opts["steps"] = 5
    return T, hp.GKMSolver(T, hypergrad=mode, max_steps=100000, **opts, **kw)


def close(a, b, rtol):
    err = float((a - b).abs().max() / b.abs().max().clamp(min=1e-300))
    assert err <= rtol, f"relative error {err:.3e} > {rtol:.1e}"


# -- the forward: one batched solve with per-sample stopping --------------------------------------------
@pytest.mark.parametrize("mode", ["implicit", "inexact"])
def test_vmap_forward_is_one_batched_solve(mode):
    T, solver = make(mode, tol=1e-9, **({"warm_start": False} if mode == "inexact" else {}))
    solve, _ = f_of(solver)
    U = torch.func.vmap(solve)(X)
    info = solver.info
    steps = info.steps_per_sample.tolist()
    # the references: each sample alone, unbatched (independent stopping decisions on host floats)
    alone, alone_steps = [], []
    for x in X:
        T.calls = 0
        alone.append(solve(x))
        alone_steps.append(solver.info.steps)
    assert steps == alone_steps, (steps, alone_steps)
    assert steps[0] < steps[1] < steps[2] and steps[2] > 20 * steps[0]
    # T called once per step for the whole batch (the per-sample loop: sum(steps) calls)
    T.calls = 0
    U = torch.func.vmap(solve)(X)
    assert T.calls <= max(steps) + 2 < sum(steps)
    # each sample stopped where it would alone: a converged sample is frozen, not iterated on
    torch.testing.assert_close(U, torch.stack(alone), rtol=0, atol=1e-12)
    close(U, torch.stack([u_star(x) for x in X]), 1e-6)  # error <= tol·κ
    assert info.converged and info.converged_per_sample.all()
    assert info.residuals.shape[1:] == (B,)


def test_vmap_randomness_is_passed_to_the_batched_operator():
    """vmap(..., randomness="different") reaches the lifted T (noise of size 0 keeps the closed form;
    the default randomness="error" raises torch's own error, as for any vmapped function)."""
    T = Counted()
    solver = hp.GKMSolver(lambda u, x: T(u, x) + 0.0 * torch.rand_like(u), tol=1e-10, max_steps=100000)

    def solve(x):
        return solver(torch.zeros(N, dtype=D), x)

    with pytest.raises(RuntimeError, match="random"):
        torch.func.vmap(solve)(X)
    U = torch.func.vmap(solve, randomness="different")(X)
    assert T.calls <= int(solver.info.steps_per_sample.max()) + 3  # batched, not a loop
    close(U, torch.stack([u_star(x) for x in X]), 1e-7)


def test_vmap_forward_nested_and_batch_dims():
    """vmap(vmap(solve)) and vmap over a solver with its own batch_dims: per-sample steps over
    all batch dims, values against the closed form."""
    T, solver = make(tol=1e-10)
    solve, _ = f_of(solver)
    XX = torch.stack([X, X.flip(0)])
    T.calls = 0
    U = torch.func.vmap(torch.func.vmap(solve))(XX)
    sp = solver.info.steps_per_sample
    assert sp.shape == (2, B) and torch.equal(sp[0], sp[1].flip(0))
    assert T.calls <= int(sp.max()) + 2
    close(U, torch.stack([torch.stack([u_star(x) for x in xs]) for xs in XX]), 1e-6)

    T2 = Counted()
    bsolver = hp.GKMSolver(lambda u, x: torch.vmap(T2)(u, x), batch_dims=1, tol=1e-10, max_steps=100000)
    U2 = torch.func.vmap(lambda xs: bsolver(torch.zeros(B, N, dtype=D), xs))(XX)
    assert bsolver.info.steps_per_sample.shape == (2, B)
    close(U2, U, 1e-12)


# -- derivatives through the batched solve ----------------------------------------------------------------
ENTRIES = ["vmap_grad", "grad_vmap", "backward_vmap", "vmap_jacrev", "jacrev_vmap", "vmap_jacfwd",
           "vmap_vmap_grad"]


@pytest.mark.parametrize("mode,entry", [("implicit", e) for e in ENTRIES]
                         + [("inexact", e) for e in ("vmap_grad", "backward_vmap", "jacrev_vmap")])
def test_vmap_derivatives_closed_form(mode, entry):
    T, solver = make(mode)
    solve, f = f_of(solver)
    G = torch.stack([grad_ref(x, "implicit") for x in X])
    J = torch.stack([jac_ref(x) for x in X])
    vm = torch.func.vmap
    if entry == "vmap_grad":
        close(vm(torch.func.grad(f))(X), G, 1e-7)
    elif entry == "grad_vmap":
        close(torch.func.grad(lambda X_: vm(f)(X_).sum())(X), G, 1e-7)
    elif entry == "backward_vmap":
        Xr = X.clone().requires_grad_(True)
        vm(f)(Xr).sum().backward()
        close(Xr.grad, G, 1e-7)
    elif entry == "vmap_jacrev":
        close(vm(torch.func.jacrev(solve))(X), J, 1e-7)
    elif entry == "jacrev_vmap":
        Jb = torch.func.jacrev(vm(solve))(X)  # (B, N, B, 2N): block diagonal
        close(torch.einsum("bibj->bij", Jb), J, 1e-7)
        off = Jb.clone()
        for i in range(B):
            off[i, :, i] = 0
        assert float(off.abs().max()) == 0.0
    elif entry == "vmap_jacfwd":
        close(vm(torch.func.jacfwd(solve))(X), J, 1e-7)
    else:
        X2 = torch.cat([DS.flip(0), 2 * CS], dim=1)
        GG = vm(vm(torch.func.grad(f)))(torch.stack([X, X2]))
        close(GG[0], G, 1e-7)
        close(GG[1], torch.stack([grad_ref(x, "implicit") for x in X2]), 1e-7)
    adj = solver.info.adjoint
    if entry not in ("vmap_jacfwd",):  # reverse entries: the adjoint solve was one batched solve
        assert adj is not None and adj.iterations_per_sample is not None, adj


def test_vmap_hessian_closed_form():
    """∇²_c f = Q⁻ᵀQ⁻¹ per sample (second order through the batched primitive)."""
    _, solver = make()
    _, f = f_of(solver)
    H = torch.func.vmap(torch.func.hessian(f))(X)
    ref = torch.stack([torch.linalg.inv(Q(x[:N])) @ torch.linalg.inv(Q(x[:N])) for x in X])
    close(H[:, N:, N:], ref, 1e-7)


@pytest.mark.parametrize("mode", ["unrolled", "truncated", "first_order"])
def test_vmap_other_modes_closed_form(mode):
    """Unrolled (at convergence: the implicit value), truncated (t = 5 steps at the fixed point) and
    first_order under vmap and vmap∘grad."""
    T = Counted()
    # under vmap these modes run every step (their per-step checks are data-dependent control flow,
    # masked per sample instead): a small max_steps that the fast samples converge in
    solver = hp.GKMSolver(T, hypergrad=mode, max_steps=400, tol=1e-12, **({"steps": 5} if mode == "truncated" else {}))
    solve, f = f_of(solver)
    fast = X[:2]
    close(torch.func.vmap(solve)(fast), torch.stack([u_star(x) for x in fast]), 1e-9)
    ref = torch.stack([grad_ref(x, "implicit" if mode == "unrolled" else mode) for x in fast])
    close(torch.func.vmap(torch.func.grad(f))(fast), ref, 1e-8)


# -- unbatched tensors, module parameters, fallbacks ---------------------------------------------------------
def test_vmap_with_unbatched_param_sums_its_gradient():
    """d per sample (batched), c shared (unbatched, in_dims=None): grad w.r.t. c of Σ_i f_i is the
    sum of the per-sample closed forms; w.r.t. d the per-sample ones."""
    _, solver = make()
    c = CS[0]

    def total(ds, c_):
        def one(d):
            return 0.5 * ((solver(torch.zeros(N, dtype=D), torch.cat([d, c_])) - Y) ** 2).sum()

        return torch.func.vmap(one)(ds).sum()

    gd, gc = torch.func.grad(total, argnums=(0, 1))(DS, c)
    refs = torch.stack([grad_ref(torch.cat([d, c]), "implicit") for d in DS])
    close(gc, refs[:, N:].sum(0), 1e-7)
    close(gd, refs[:, :N], 1e-7)


def test_vmap_module_operator_parameter_gradient():
    """An nn.Module T with a learnable shift c (unbatched) and per-sample spectra: backward through
    vmap accumulates Σ_i ∂f_i/∂c."""

    class Op(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c = torch.nn.Parameter(CS[1].clone())

        def forward(self, u, d):
            return u - S * (R @ (d * (R.T @ u)) - self.c)

    op = Op()
    solver = hp.GKMSolver(op, tol=1e-11, max_steps=100000)
    loss = torch.func.vmap(lambda d: 0.5 * ((solver(torch.zeros(N, dtype=D), d) - Y) ** 2).sum())(DS).sum()
    loss.backward()
    refs = torch.stack([grad_ref(torch.cat([d, CS[1]]), "implicit") for d in DS])
    close(op.c.grad, refs[:, N:].sum(0), 1e-7)


@pytest.mark.parametrize("solver_name", ["cg", "gmres", "fixed_point", "bicgstab"])
def test_vmap_grad_every_adjoint_solver(solver_name):
    """cg / gmres / fixed_point run their per-sample mode; bicgstab (none) one solve per sample;
    both report per-sample diagnostics (each sample's own products, residual and threshold)."""
    T, solver = make(solver=solver_name, adjoint_maxiter=20000)
    solve, f = f_of(solver)
    with torch.no_grad():
        torch.func.vmap(solve)(X)
    T.calls, forward_calls = 0, T.calls
    G = torch.func.vmap(torch.func.grad(f))(X)
    close(G, torch.stack([grad_ref(x, "implicit") for x in X]), 1e-7)
    # the backward calls T to build graphs only: one for the adjoint products of the whole batch (a
    # per-sample solver) or one per sample (bicgstab), plus one for the final vjp
    assert T.calls - forward_calls == (1 + B if solver_name == "bicgstab" else 2)
    adj = solver.info.adjoint
    its = adj.iterations_per_sample
    assert its is not None and its.shape == (B,) and int(its.max()) == adj.iterations
    assert its[0] < its[2], its  # the well-conditioned sample stopped first
    assert bool((adj.residual_per_sample <= adj.threshold_per_sample).all()) and adj.converged


def test_vmap_with_aggregation_falls_back_per_sample():
    """HODL aggregation (∇_u F in the iteration) keeps the per-sample loop: each sample's value and
    steps are those of its own unbatched solve."""
    T = Counted()
    solver = hp.GKMSolver(T, tol=1e-5, max_steps=3000, upper=lambda u, x: 0.5 * ((u - Y) ** 2).sum(),
                          alpha=Polynomial(0.2, 1.0), upper_step=0.5)
    solve, _ = f_of(solver)
    fast = X[:2]
    U = torch.func.vmap(solve)(fast)
    steps = solver.info.steps_per_sample.tolist()
    assert T.calls >= sum(steps) and steps[0] != steps[1]  # the loop: one solve after another
    assert solver.info.converged
    alone = []
    for i, x in enumerate(fast):
        alone.append(solve(x))
        assert solver.info.steps == steps[i]
    torch.testing.assert_close(U, torch.stack(alone), rtol=0, atol=1e-12)


# -- the per-sample linear solvers against independent solves -------------------------------------------------
@pytest.mark.parametrize("name", ["cg", "gmres", "fixed_point"])
@pytest.mark.parametrize("bd", [1, 2])
def test_batched_linear_solvers_match_per_sample(name, bd):
    """Per-sample mode vs each system solved alone: same products per sample, same iterate (a
    sample that met its threshold is frozen: with rtol = 1e-6 any further step would move it by
    ~1e-6), and the solution of the system itself."""
    n = 40
    g = torch.Generator().manual_seed(3)
    U, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=D))
    A = torch.stack([(U * torch.logspace(-math.log10(c), 0, n, dtype=D)) @ U.T for c in (2.0, 10.0, 50.0)])
    if name == "gmres":  # nonsymmetric
        A = A + 0.1 * torch.triu(torch.randn(n, n, generator=g, dtype=D), 1) / n ** 0.5
    b = torch.randn(B, n, generator=g, dtype=D)
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
    A = torch.stack([torch.eye(N, dtype=D), 0.01 * torch.eye(N, dtype=D)])  # sample 1: Richardson diverges
    b = torch.ones(2, N, dtype=D)
    x, info = ls.fixed_point(rtol=1e-10, maxiter=50)(lambda v: torch.einsum("bij,bj->bi", A, v), b, batch_dims=1)
    assert info.converged_per_sample.tolist() == [True, False] and not info.converged
    assert info.residual > info.threshold and info.iterations == 50
    with pytest.raises(ValueError, match="batch_dims"):
        ls.cg()(lambda v: v, b, batch_dims=2)
