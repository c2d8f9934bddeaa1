"""``torch.func.vmap`` over a GKM solve (:mod:`hodl_plugin._vmap`): ONE batched solve with per-sample stopping,
derivatives through it, the per-sample fallbacks; the inexact mode's warm starts, accuracies and error bound
per sample; the unrolled and truncated modes under vmap.

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

The inexact mode under vmap (same problem, samples of condition 2 / 10 / 100): a warm start from a batch's
own fixed points must cost (almost) no steps *per sample* (a start taken from another sample would cost as
much as a cold one), the hypergradient of a warm-started call must still match the closed form, and the
certified bound of each sample must lie above that sample's true error.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from _oracles import DT, affine_k_steps

import hodl_plugin as hp
from hodl_plugin.schedules import Polynomial

N, B = 6, 3
S = 1.0 / 10.0  # step: every spectrum below lies in (0, 10]


def _setup():
    g = torch.Generator().manual_seed(7)
    R, _ = torch.linalg.qr(torch.randn(N, N, generator=g, dtype=DT))
    # per-sample spectra: condition numbers 2 (two distinct eigenvalues), 10, 100 -> fast, medium
    # and slow samples, for the GKM iteration and for CG alike
    d = torch.stack([torch.tensor([5.0, 10.0], dtype=DT).repeat_interleave(N // 2)]
                    + [torch.logspace(math.log10(lo), 1, N, dtype=DT) for lo in (1.0, 0.1)])
    c = torch.randn(B, N, generator=g, dtype=DT)
    y = torch.randn(N, generator=g, dtype=DT)
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
        return S * torch.eye(N, dtype=DT)
    if mode == "truncated":
        return (torch.eye(N, dtype=DT) - torch.linalg.matrix_power(torch.eye(N, dtype=DT) - S * Q(d), t)) @ Qi
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
        return solver(torch.zeros(N, dtype=DT), x)

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
        return solver(torch.zeros(N, dtype=DT), x)

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
    U2 = torch.func.vmap(lambda xs: bsolver(torch.zeros(B, N, dtype=DT), xs))(XX)
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
            return 0.5 * ((solver(torch.zeros(N, dtype=DT), torch.cat([d, c_])) - Y) ** 2).sum()

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
    loss = torch.func.vmap(lambda d: 0.5 * ((solver(torch.zeros(N, dtype=DT), d) - Y) ** 2).sum())(DS).sum()
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


# -- unrolled and truncated under vmap: each sample its own K-step map -------------------------------------
def _opts(mode):
    return {"steps": 5} if mode == "truncated" else {}


@pytest.mark.parametrize("mode", ["unrolled", "truncated"])
def test_vmap_over_x_matches_per_sample_and_closed_form(mode):
    a = torch.tensor([0.5, 0.9, 0.99], dtype=DT)  # per-coordinate contraction, so samples differ

    def T(u, x):
        return a * u + x

    xs = torch.tensor([[1.0, 2.0, 3.0], [1e-3, -1.0, 0.5], [0.0, 0.0, 0.0], [4.0, 1.0, -2.0]], dtype=DT)
    solver = hp.GKMSolver(T, max_steps=3000, tol=1e-9, hypergrad=mode, check_every=7, **_opts(mode))
    batched = torch.func.vmap(lambda x: solver(torch.zeros(3, dtype=DT), x))(xs)
    looped = torch.stack([solver(torch.zeros(3, dtype=DT), x) for x in xs])
    assert torch.allclose(batched, looped, rtol=0, atol=1e-14)
    assert torch.allclose(batched, xs / (1 - a), rtol=1e-5, atol=1e-12)  # error <= tol |u| / (1 - 0.99)


def test_vmap_of_exact_K_steps_and_grad_transforms():
    K = 25

    def T(u, x):
        return 0.5 * u + x

    solver = hp.GKMSolver(T, max_steps=K, tol=0.0, hypergrad="unrolled")
    xs = torch.randn(6, 4, dtype=DT, generator=torch.Generator().manual_seed(0))
    out = torch.func.vmap(lambda x: solver(torch.zeros(4, dtype=DT), x))(xs)
    assert torch.allclose(out, affine_k_steps(0.5, xs, K), rtol=1e-14)
    c = (1 - 0.5**K) / 0.5
    f = lambda x: (solver(torch.zeros(4, dtype=DT), x) ** 2).sum()  # noqa: E731
    g = torch.func.grad(f)(xs[0])
    assert torch.allclose(g, 2 * c * c * xs[0], rtol=1e-12)
    J = torch.func.jacrev(lambda x: solver(torch.zeros(4, dtype=DT), x))(xs[0])
    Jf = torch.func.jacfwd(lambda x: solver(torch.zeros(4, dtype=DT), x))(xs[0])
    eye = torch.eye(4, dtype=DT)
    assert torch.allclose(J, c * eye, rtol=1e-12) and torch.allclose(Jf, c * eye, rtol=1e-12)
    per_sample = torch.func.vmap(torch.func.grad(f))(xs)
    assert torch.allclose(per_sample, 2 * c * c * xs, rtol=1e-12)


def test_vmap_early_stop_gradients_match_per_sample():
    # tol > 0: samples stop at different checks; the gradient is that of each sample's own K_i-step map
    def T(u, x):
        return 0.8 * u + x

    solver = hp.GKMSolver(T, max_steps=500, tol=1e-6, hypergrad="unrolled", check_every=3)
    xs = torch.tensor([[1.0], [1e-9], [100.0]], dtype=DT)
    f = lambda x: solver(torch.zeros(1, dtype=DT), x).sum()  # noqa: E731
    gb = torch.func.vmap(torch.func.grad(f))(xs)
    gl = []
    for x in xs:
        x = x.clone().requires_grad_(True)
        f(x).backward()
        gl.append(x.grad)
    assert torch.allclose(gb, torch.stack(gl), rtol=1e-14)
    assert torch.allclose(gb, torch.full_like(gb, 5.0), rtol=1e-5)


def test_vmap_divergent_sample_is_nan_not_silent():
    def T(u, x):
        return x * u + 1.0

    xs = torch.tensor([[0.5], [2.0]], dtype=DT)
    out = torch.func.vmap(lambda x: hp.GKMSolver(T, hypergrad="unrolled")(torch.zeros(1, dtype=DT), x))(xs)
    assert torch.allclose(out[0], torch.tensor([2.0], dtype=DT)) and torch.isnan(out[1]).all()


# -- the inexact mode under vmap: warm starts, accuracies and the bound per sample --------------------------
def upper(u, x):
    return 0.5 * ((u - Y) ** 2).sum()


def make_inexact(eps=1e-10, **kw):
    T = Counted()
    kw.setdefault("warm_start", True)
    method = hp.Inexact(eps=eps, **kw)
    return T, hp.GKMSolver(T, hypergrad=method, upper=upper, alpha=0, max_steps=100000)


def inexact_fns(solver, key="batch"):
    def solve(x):
        return solver(torch.zeros(N, dtype=DT), x, key=key)

    def f(x):
        return upper(solve(x), x)

    return solve, f


def rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture(autouse=True)
def _quiet_warm_start_notes():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Inexact warm start")
        yield


def test_a_vmapped_call_warm_starts_each_sample_from_its_own_iterate():
    _, solver = make_inexact(eps=1e-10, estimate_every=1000)
    solve, _ = inexact_fns(solver)
    with torch.no_grad():
        cold = torch.func.vmap(solve)(X)
    cold_steps = solver.info.steps_per_sample.clone()
    assert not solver.info.warm_started and bool((cold_steps > 20).all())
    assert tuple(solver.method.u_cache["batch"].shape) == (B, N)  # the batch is cached, not one sample
    with torch.no_grad():
        warm = torch.func.vmap(solve)(X)
    # started at its own fixed point (to eps), every sample stops at its first check: u_0 is returned
    assert solver.info.warm_started
    assert solver.info.steps_per_sample.tolist() == [0] * B, solver.info.steps_per_sample
    ref = torch.stack([u_star(x) for x in X])
    # error ≤ ‖(I − ∂T)⁻¹‖·residual ≤ cond · eps · scale = 100 · 1e-10 · scale
    assert rel(cold, ref) < 1e-7 and rel(warm, ref) < 1e-7
    # a new batch size does not fit the cached batch: a cold start from u0, no error
    with torch.no_grad():
        torch.func.vmap(solve)(X[:2])
    assert not solver.info.warm_started
    assert solver.info.steps_per_sample.tolist() == cold_steps[:2].tolist()


def test_an_unbatched_iterate_warm_starts_every_sample_of_a_vmapped_call():
    _, solver = make_inexact(eps=1e-10)
    solve, _ = inexact_fns(solver)
    with torch.no_grad():
        solve(X[1])  # caches sample 1's fixed point (shape (N,))
        out = torch.func.vmap(solve)(X)
    assert solver.info.warm_started
    steps = solver.info.steps_per_sample.tolist()
    assert steps[1] == 0 and steps[0] > 1 and steps[2] > 1  # only sample 1 started at its own point
    assert rel(out, torch.stack([u_star(x) for x in X])) < 1e-7


@pytest.mark.parametrize("solver_name", ["cg", "gmres", "bicgstab"])  # per-sample mode / one by one
def test_vmap_grad_warm_starts_the_adjoint_and_stays_exact(solver_name):
    _, solver = make_inexact(eps=1e-11, solver=solver_name, estimate_every=1000)
    _, f = inexact_fns(solver)
    g1 = torch.func.vmap(torch.func.grad(f))(X)
    it1 = solver.info.adjoint.iterations
    assert tuple(solver.method.v_cache["batch"].shape) == (B, N)
    g2 = torch.func.vmap(torch.func.grad(f))(X)
    it2 = solver.info.adjoint.iterations
    ref = torch.stack([grad_ref(x, "implicit") for x in X])
    assert rel(g1, ref) < 1e-7 and rel(g2, ref) < 1e-7
    assert it2 < it1, (it1, it2)  # the cached adjoints (this batch's own) were used


def test_a_sample_with_zero_upstream_gradient_keeps_an_exactly_zero_hypergradient():
    """The warm start is dropped per sample where it is worse than 0, so A⁻ᵀ0 = 0 exactly even when
    the cached adjoint of that sample is not zero (the adjoint stays linear in the upstream gradient)."""
    _, solver = make_inexact(eps=1e-10, solver="cg", estimate_every=1000)
    solve, _ = inexact_fns(solver)

    def f(x, w):
        return w * upper(solve(x), x)

    W = torch.ones(B, dtype=DT)
    torch.func.vmap(torch.func.grad(f))(X, W)  # fills the adjoint cache with nonzero v's
    W0 = W.clone()
    W0[1] = 0.0
    g = torch.func.vmap(torch.func.grad(f))(X, W0)
    assert bool((g[1] == 0).all()), g[1]
    ref = torch.stack([grad_ref(x, "implicit") for x in X])
    assert rel(g[[0, 2]], ref[[0, 2]]) < 1e-7


class Affine:
    """T(u; d, c) = u − s(Q(d)u − c): affine in u with ∂_cT = sI independent of u, so the bound is
    certified for the hypergradient in c (d is data: per-sample spectra, no gradient)."""

    def __call__(self, u, d, c):
        return u - S * (R @ (d * (R.T @ u)) - c)


@pytest.mark.parametrize("adjoint", ["cg", "gmres", "bicgstab", "fixed_point"])  # batched / one by one
@pytest.mark.parametrize("entry", ["vmap_grad", "grad_vmap", "backward_vmap"])
def test_each_sample_gets_a_certified_bound_above_its_true_error(entry, adjoint):
    # loose accuracies, so the errors are visible; no warm starts, so each call is the same. Each
    # sample's bound uses its own adjoint residual (not the batch's worst or last)
    solver = hp.GKMSolver(Affine(), upper=lambda u, d, c: upper(u, None), alpha=0, max_steps=100000,
                          hypergrad=hp.Inexact(eps=1e-4, warm_start=False, estimate_every=1, solver=adjoint))

    # samples of very different scales (so their adjoint residuals differ by orders of magnitude)
    Cs = CS * torch.tensor([1.0, 1e3, 1e-2], dtype=DT)[:, None]

    def f(d, c):
        return upper(solver(torch.zeros(N, dtype=DT), d, c), None)

    # closed form: ∂f/∂c = Q(d)⁻¹(u* − y)
    ref = torch.stack([torch.linalg.solve(Q(d), u_star(torch.cat([d, c])) - Y) for d, c in zip(DS, Cs)])
    if entry == "vmap_grad":
        g = torch.func.vmap(torch.func.grad(f, argnums=1))(DS, Cs)
    elif entry == "grad_vmap":
        g = torch.func.grad(lambda cs: torch.func.vmap(f)(DS, cs).sum())(Cs)
    else:
        cs = Cs.clone().requires_grad_(True)
        torch.func.vmap(f)(DS, cs).sum().backward()
        g = cs.grad
    info = solver.info
    bounds = info.error_bound_per_sample
    assert bounds is not None and bounds.shape == (B,), info.message
    errs = (g - ref).norm(dim=1)
    assert bool((errs > 0).all())
    assert bool((bounds >= errs).all()), (bounds, errs)
    assert info.error_bound == pytest.approx(float(bounds.max()))
    # and a bound is not vacuous: within a few orders of magnitude of the error of its sample
    assert bool((bounds <= 1e4 * errs).all()), (bounds, errs)
    # each sample's bound is the one its own unbatched call certifies
    for i in range(B):
        solver.info.error_bound = None
        ci = Cs[i].clone().requires_grad_(True)
        f(DS[i], ci).backward()
        assert solver.info.error_bound == pytest.approx(float(bounds[i]), rel=1e-6)


def test_the_warm_started_adjoint_under_vmap_passes_gradcheck_and_gradgradcheck():
    _, solver = make_inexact(eps=1e-14, solver="gmres", estimate_every=1000)
    solve, f = inexact_fns(solver)
    # samples of condition 2 and 10: with warm starts the forward starts elsewhere at every
    # evaluation, so finite differences of the condition-100 sample carry cond² · eps / h noise
    # (unbatched too); the analytical side must be reentrant (gradcheck compares two passes)
    xs = X[:2].clone().requires_grad_(True)
    torch.func.vmap(f)(xs).sum().backward()  # primes both caches with this batch
    assert "batch" in solver.method.v_cache

    def batch_loss(xs):
        return torch.func.vmap(f)(xs)

    assert torch.autograd.gradcheck(batch_loss, (xs,))
    assert torch.autograd.gradgradcheck(batch_loss, (xs,))


@pytest.mark.filterwarnings("ignore::hodl_plugin.errors.SummableScheduleWarning")
def test_with_hodl_aggregation_the_samples_solved_one_by_one_keep_their_own_warm_starts():
    T = Counted()
    solver = hp.GKMSolver(T, hypergrad=hp.Inexact(eps=1e-10, check_unique=False), upper=upper,
                          alpha=hp.Geometric(1e-3, 0.5), max_steps=100000)
    solve, f = inexact_fns(solver)
    with torch.no_grad():
        torch.func.vmap(solve)(X)
    cold = solver.info.steps_per_sample.clone()
    assert tuple(solver.method.u_cache["batch"].shape) == (B, N)
    with torch.no_grad():
        out = torch.func.vmap(solve)(X)
    warm = solver.info.steps_per_sample
    assert solver.info.warm_started
    # the aggregated steps push every start off Fix T by O(α_0), so the gain is partial; sample 0 is
    # dominated by that push (its steps do not change)
    assert bool((warm[1:] < cold[1:]).all()) and int(warm.sum()) < 0.75 * int(cold.sum()), (cold, warm)
    with torch.no_grad():  # started from another sample's iterate, samples 1 and 2 need more steps
        torch.func.vmap(solve)(X[[0, 2, 1]])
    crossed = solver.info.steps_per_sample
    assert int(crossed[1]) > int(warm[2]) and int(crossed[2]) > int(warm[1]), (warm, crossed)
    assert rel(out, torch.stack([u_star(x) for x in X])) < 1e-6
    g = torch.func.vmap(torch.func.grad(f))(X)
    assert rel(g, torch.stack([grad_ref(x, "implicit") for x in X])) < 1e-6


def test_nested_vmap_keeps_warm_starts_of_the_whole_batch():
    _, solver = make_inexact(eps=1e-10, estimate_every=1000)
    solve, f = inexact_fns(solver)
    XX = torch.stack([X, X.flip(0)])  # (2, B, 2N)
    vv = torch.func.vmap(torch.func.vmap(torch.func.grad(f)))
    g1 = vv(XX)
    assert tuple(solver.method.u_cache["batch"].shape) == (2, B, N)
    g2 = vv(XX)
    assert solver.info.warm_started and int(solver.info.steps) == 0
    ref = torch.stack([torch.stack([grad_ref(x, "implicit") for x in row]) for row in XX])
    assert rel(g1, ref) < 1e-7 and rel(g2, ref) < 1e-7


def test_the_warm_start_notice_points_at_the_users_line_under_vmap():
    _, solver = make_inexact(eps=1e-8)
    _, f = inexact_fns(solver)
    torch.func.vmap(torch.func.grad(f))(X)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        torch.func.vmap(torch.func.grad(f))(X)
    notes = [w for w in seen if "Inexact warm start" in str(w.message)]
    assert len(notes) == 1 and notes[0].filename == __file__, [(w.filename, w.lineno) for w in notes]


def test_per_sample_diagnostics_are_plain_tensors_after_outer_transforms():
    """info's per-sample tensors are made outside the transforms (no GradTrackingTensor escapes)."""
    from torch._C._functorch import is_batchedtensor, is_gradtrackingtensor

    def plain(t):
        return isinstance(t, torch.Tensor) and not is_gradtrackingtensor(t) and not is_batchedtensor(t)

    solver = hp.GKMSolver(Affine(), upper=lambda u, d, c: upper(u, None), alpha=0, max_steps=100000,
                          hypergrad=hp.Inexact(eps=1e-6, estimate_every=1, solver="cg"))
    torch.func.grad(lambda cs: torch.func.vmap(lambda d, c: upper(solver(torch.zeros(N, dtype=DT), d, c),
                                                                  None))(DS, cs).sum())(CS)
    assert plain(solver.info.error_bound_per_sample) and plain(solver.info.steps_per_sample)
    T = Counted()
    agg = hp.GKMSolver(T, hypergrad=hp.Implicit(check_unique=False), upper=upper, alpha=hp.Harmonic(0.1),
                       tol=1e-8, max_steps=200)
    torch.func.jacrev(lambda xs: torch.func.vmap(lambda x: agg(torch.zeros(N, dtype=DT), x))(xs))(X)
    assert plain(agg.info.steps_per_sample) and agg.info.steps_per_sample.tolist() == [200] * B


def _dense_solve(mv, b, x0=None):
    """A user's own linear solver: the matrix column by column, then a dense solve."""
    E = torch.eye(b.numel(), dtype=b.dtype)
    A = torch.stack([mv(E[i].reshape(b.shape)).reshape(-1) for i in range(b.numel())], dim=1)
    return torch.linalg.solve(A, b.reshape(-1)).reshape(b.shape)


@pytest.mark.parametrize("solver", ["bicgstab", "anderson", "user"])
def test_nested_transforms_with_solvers_without_a_per_sample_mode(solver):
    """hessian (jacfwd over jacrev) and vmap(vmap(grad)) lift the problem twice; a solver without a per-sample
    mode then solves one sample at a time at each level (it raised "has no per-sample mode"). Against
    Newton's equilibrium differentiated by plain autograd."""
    torch.manual_seed(0)
    dt, n = torch.float64, 4
    W = torch.randn(n, n, dtype=dt)
    W = 0.7 * W / torch.linalg.matrix_norm(W, 2)

    def newton(x):
        z = torch.zeros(n, dtype=dt)
        for _ in range(40):
            t = torch.tanh(W @ z + x)
            z = z - torch.linalg.solve(torch.eye(n, dtype=dt) - (1 - t**2)[:, None] * W, z - t)
        return z

    method = hp.Implicit(hp.linear_solve.FunctionSolver(fn=_dense_solve) if solver == "user" else solver)
    s = hp.GKMSolver(lambda z, x: torch.tanh(W @ z + x), tol=1e-13, hypergrad=method)
    f = lambda x: (s(torch.zeros(n, dtype=dt), x) ** 2).sum()  # noqa: E731
    ref = lambda x: (newton(x) ** 2).sum()  # noqa: E731
    x0, xs = torch.randn(n, dtype=dt), torch.randn(2, 3, n, dtype=dt)
    H = torch.func.hessian(f)(x0)
    assert torch.allclose(H, torch.autograd.functional.hessian(ref, x0), rtol=0, atol=1e-9)
    G = torch.func.vmap(torch.func.vmap(torch.func.grad(f)))(xs)
    Gref = torch.stack([torch.stack([torch.autograd.functional.jacobian(ref, x) for x in row]) for row in xs])
    assert torch.allclose(G, Gref, rtol=0, atol=1e-9)
