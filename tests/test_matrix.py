r"""One matrix: every hypergradient mode × the options that change control flow × every autograd
entry point, each against an independent reference (:mod:`_oracles`), or a named error.

Rule of every cell (:func:`assert_right_or_named`): the result equals the reference to the stated
relative tolerance, OR the call raises a subclass of :class:`hodl_plugin.HODLError` whose message
names a hypergradient mode to use instead. A generic error from torch internals, a missing
gradient, or a wrong number fails the cell.

Problems (float64, n = 4, m = 3): ``spd`` — T(u; x) = u − s(Qu − Bx), Q SPD; ``nonsym`` — Q with a
positive-definite symmetric part; ``tanh`` — u = tanh(Wu + Bx), W nonsymmetric, ‖W‖ = 0.5.
Loss f(x) = ½‖u(x) − y‖².

References per mode: implicit / inexact — the derivatives of u*(x) (closed forms, Q⁻¹B, BᵀQ⁻ᵀ(u*−y),
BᵀQ⁻ᵀQ⁻¹B; for tanh (I − DW)⁻¹DB and central differences of the closed-form gradient for the
Hessian); unrolled — the K-step map's own closed form when exactly K steps run (tol = 0), the
fixed-point forms when it ran to a tight tolerance; truncated(k) — the last k steps,
Σ_{i<k} Mⁱ sB (the known bug: k > check_every back-propagates only check_every steps);
first_order — J_xᵀ∇_uF at u*.

Options: ``default`` (no tolerance given), ``tight`` (tol 1e-12), ``tol0`` (exactly K steps),
``check_small`` (check_every = 3 < truncated steps 10), ``check_large`` (check_every > max_steps = 150),
``warm_key`` (inexact: warm start + key, primed by a first call at another x), ``anderson``
(``acceleration=hp.Anderson(history_size=5)``), ``cg`` (implicit / inexact with solver="cg": on a
nonsymmetric Jacobian the right outcome is a named error).

gradcheck / gradgradcheck compare the analytic derivative with finite differences of the forward
map, so they apply to the modes that claim the exact derivative of what ran (implicit, inexact,
unrolled) and to the precise options only (a forward stopped at tol 1e-8 has a finite-difference
derivative accurate to 1e-2; truncated and first_order are biased by design).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from _assertions import assert_right_or_named
from _oracles import DT, make_linear, make_tanh, reference, rel_err

import hodl_plugin as hp

pytestmark = pytest.mark.filterwarnings("ignore::hodl_plugin.ConvergenceWarning")

# ------------------------------------------------------------------------------------------------
# the grid
# ------------------------------------------------------------------------------------------------
OPTIONS = {
    "implicit": ["default", "tight", "tol0", "check_small", "check_large", "anderson", "cg"],
    "inexact": ["default", "tight", "tol0", "check_small", "check_large", "warm_key", "anderson", "cg"],
    "unrolled": ["default", "tight", "tol0", "check_small", "check_large", "anderson"],
    "truncated": ["default", "tight", "tol0", "check_small", "check_large"],
    "first_order": ["default", "tight", "tol0", "check_small", "check_large", "anderson"],
}
# the full option grid runs on "spd"; the others run the options where the operator's symmetry or
# nonlinearity matters (transposes in the adjoint, CG's applicability, second derivatives of T)
SUBSET = {"nonsym": {"default", "tight", "tol0", "cg"}, "tanh": {"tight", "tol0", "cg"}}
ENTRIES = ["backward", "autograd_grad", "create_graph", "gradcheck", "gradgradcheck", "forward_ad",
           "func_grad", "jacrev", "jacfwd", "hessian", "vmap", "vmap_grad"]
CG_ENTRIES = {"backward", "create_graph", "jacfwd"}  # CG on a nonsymmetric Jacobian: one cell per order
EXACT_MODES = {"implicit", "inexact", "unrolled"}  # claim the exact derivative of their forward map

K_LARGE = 150  # check_large: max_steps, all < check_every (ρ ≤ 0.84: u_150 = u* to 1e-14)
K_SHORT, K_TRUNC = 8, 3  # tol0 for unrolled / truncated: exactly 8 steps, the last 3 differentiated
TRUNC_STEPS = 10  # truncated steps in the check_* options (> check_every = 3)
TRUNC_DEFAULT = 20  # truncated steps > the default check_every = 10 (all 20 must be differentiated)


def _cells():
    for prob in ("spd", "nonsym", "tanh"):
        for mode, options in OPTIONS.items():
            for opt in options:
                if prob in SUBSET and opt not in SUBSET[prob]:
                    continue
                for entry in ENTRIES:
                    if entry in ("gradcheck", "gradgradcheck") and (mode not in EXACT_MODES or opt == "default"):
                        continue
                    if opt == "cg" and prob != "spd" and entry not in CG_ENTRIES:
                        continue
                    yield pytest.param(prob, mode, opt, entry, id=f"{prob}-{mode}-{opt}-{entry}")


_PROBLEMS: dict[str, Any] = {}


def _problem(name: str):
    if name not in _PROBLEMS:
        _PROBLEMS[name] = make_tanh(seed=3) if name == "tanh" else make_linear(name, seed=1)
    return _PROBLEMS[name]


def configure(mode: str, opt: str) -> tuple[dict, Optional[str], tuple, float, bool]:
    """Solver kwargs, key, reference kind, relative tolerance and whether to prime a warm start."""
    tight = dict(eps=1e-12, delta=1e-12) if mode == "inexact" else dict(tol=1e-12)
    kw: dict[str, Any] = {}
    key, prime = None, False
    trunc_steps = TRUNC_STEPS
    ref: tuple = ("fixed",)
    tol = 1e-7
    if opt == "default":
        tol = 2e-2 if mode == "inexact" else 1e-4
        trunc_steps = TRUNC_DEFAULT
    elif opt == "tight":
        kw.update(tight, max_steps=2000)
    elif opt == "tol0":
        if mode in ("unrolled", "truncated"):
            kw.update(tol=0.0, max_steps=K_SHORT)
        else:
            kw.update(tol=0.0, max_steps=300)
            if mode == "inexact":
                kw.update(eps=1e-12, delta=1e-12)
    elif opt == "check_small":
        kw.update(tight, max_steps=2000, check_every=3)
    elif opt == "check_large":
        kw.update(tight, max_steps=K_LARGE, check_every=10_000)
    elif opt == "warm_key":
        kw.update(tight, max_steps=2000, warm_start=True)
        key, prime = "sample-0", True
    elif opt == "anderson":
        kw.update(tight, max_steps=2000, acceleration=hp.Anderson(history_size=5))
        tol = 1e-6
    elif opt == "cg":
        kw.update(tight, max_steps=2000, solver="cg", adjoint_maxiter=200)
    else:
        raise ValueError(opt)

    if mode == "unrolled":
        if opt == "tol0":
            ref = ("unrolled", K_SHORT)
        elif opt == "check_large":
            ref = ("unrolled", K_LARGE)  # exactly max_steps: the only check is at the last step
    elif mode == "truncated":
        if opt == "tol0":
            kw["steps"] = K_TRUNC
            ref = ("truncated", K_SHORT, K_TRUNC, True)
        else:
            kw["steps"] = trunc_steps
            ref = ("truncated", None, trunc_steps, False)
    elif mode == "first_order":
        ref = ("first_order",)
    return kw, key, ref, tol, prime


def run_entry(entry: str, solve: Callable, f: Callable, p, x0: torch.Tensor):
    m = x0.numel()
    if entry == "backward":
        x = x0.clone().requires_grad_(True)
        f(x).backward()
        return x.grad
    if entry == "autograd_grad":
        x = x0.clone().requires_grad_(True)
        return torch.autograd.grad(f(x), x)[0]
    if entry == "create_graph":
        x = x0.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(f(x), x, create_graph=True)
        return torch.stack([torch.autograd.grad(g[i], x, retain_graph=True)[0] for i in range(m)])
    if entry == "gradcheck":
        x = x0.clone().requires_grad_(True)
        return torch.autograd.gradcheck(solve, (x,), nondet_tol=1e-9)
    if entry == "gradgradcheck":
        x = x0.clone().requires_grad_(True)
        return torch.autograd.gradgradcheck(solve, (x,), nondet_tol=1e-9)
    if entry == "forward_ad":
        with fwAD.dual_level():
            u = solve(fwAD.make_dual(x0.clone(), p.t))
            tangent = fwAD.unpack_dual(u).tangent
        assert tangent is not None, "forward mode: the output carries no tangent (a zero derivative)"
        return tangent.clone()
    if entry == "func_grad":
        return torch.func.grad(f)(x0.clone())
    if entry == "jacrev":
        return torch.func.jacrev(solve)(x0.clone())
    if entry == "jacfwd":
        return torch.func.jacfwd(solve)(x0.clone())
    if entry == "hessian":
        return torch.func.hessian(f)(x0.clone())
    if entry == "vmap":
        return torch.func.vmap(solve)(p.X.clone())
    if entry == "vmap_grad":
        return torch.func.vmap(torch.func.grad(f))(p.X.clone())
    raise ValueError(entry)


_EXPECTED: dict[tuple, Any] = {}


def expected(entry: str, p, ref_kind: tuple):
    k = (p.kind, entry, ref_kind)
    if k not in _EXPECTED:
        _EXPECTED[k] = _expected(entry, p, ref_kind)
    return _EXPECTED[k]


def _expected(entry: str, p, ref_kind: tuple):
    r = reference(p, ref_kind, p.x0)
    if entry in ("backward", "autograd_grad", "func_grad"):
        return r.grad
    if entry in ("create_graph", "hessian"):
        return r.hess
    if entry in ("gradcheck", "gradgradcheck"):
        return True
    if entry == "forward_ad":
        return r.jac @ p.t
    if entry in ("jacrev", "jacfwd"):
        return r.jac
    if entry == "vmap":
        return torch.stack([reference(p, ref_kind, x).value for x in p.X])
    if entry == "vmap_grad":
        return torch.stack([reference(p, ref_kind, x).grad for x in p.X])
    raise ValueError(entry)


@pytest.mark.parametrize("prob,mode,opt,entry", list(_cells()))
def test_matrix(prob: str, mode: str, opt: str, entry: str) -> None:
    p = _problem(prob)
    ref = expected(entry, p, configure(mode, "tight" if opt == "anderson" else opt)[2])
    tol = configure(mode, "tight" if opt == "anderson" else opt)[3]
    if opt == "anderson":
        tol = 1e-6
    if prob == "tanh" and entry in ("create_graph", "hessian"):
        tol = max(tol, 1e-6)  # reference Hessian by central differences (h = 1e-4)

    def cell():
        kw, key, _, _, prime = configure(mode, opt)
        solver = hp.GKMSolver(p.T, hypergrad=mode, **kw)
        u0 = torch.zeros(p.n, dtype=DT)

        def solve(x):
            return solver(u0, x, key=key)

        def f(x):
            return p.F(solve(x))

        if prime:  # a first call (forward + backward) at another x fills the warm-start caches
            xp = p.X[0].clone().requires_grad_(True)
            f(xp).backward()
        return run_entry(entry, solve, f, p, p.x0)

    assert_right_or_named(cell, ref, tol, what=f"{prob}/{mode}/{opt}/{entry}")


def test_reference_self_check() -> None:
    """The references themselves, against peer computations: central differences of a direct
    ``torch.linalg.solve`` (linear), of the plain fixed-point loop (tanh), and plain autograd of a
    hand-written K-step loop (unrolled / truncated)."""
    for name in ("spd", "nonsym"):
        p = _problem(name)
        x = p.x0
        r = reference(p, ("fixed",), x)
        assert rel_err(p.T(r.value, x), r.value) < 1e-14
        from _oracles import fd_jacobian

        assert rel_err(fd_jacobian(p.u_star, x), r.jac) < 1e-8
        fgrad = lambda z: fd_jacobian(lambda w: p.F(p.u_star(w)).reshape(1), z)[0]  # noqa: E731
        assert rel_err(fgrad(x), r.grad) < 1e-8
        assert rel_err(fd_jacobian(lambda z: fgrad(z), x, 1e-3), r.hess) < 1e-5
        assert torch.linalg.matrix_norm(p.M, 2) < 0.95
        # unrolled / truncated closed forms vs autograd through a plain loop
        xr = x.clone().requires_grad_(True)
        u = torch.zeros(p.n, dtype=DT)
        for i in range(K_SHORT):
            if i == K_SHORT - K_TRUNC:
                u_trunc_start = u.detach()
            u = p.T(u, xr)
        ru = reference(p, ("unrolled", K_SHORT), x)
        assert rel_err(u.detach(), ru.value) < 1e-13
        assert rel_err(torch.autograd.grad(p.F(u), xr)[0], ru.grad) < 1e-12
        ut = u_trunc_start
        for _ in range(K_TRUNC):
            ut = p.T(ut, xr)
        rt = reference(p, ("truncated", K_SHORT, K_TRUNC, True), x)
        assert rel_err(torch.autograd.grad(p.F(ut), xr)[0], rt.grad) < 1e-12
        assert rel_err(ut.detach(), rt.value) < 1e-13
    # Truncated(50) of T = .9u + x gives Σ_{i<50} .9^i = 9.948 (test_hypergrad's truncated check)
    assert abs(sum(0.9**i for i in range(50)) - 9.948) < 1e-3
    # tanh: closed-form Jacobian vs central differences of the plain loop
    p = _problem("tanh")
    from _oracles import fd_jacobian

    r = reference(p, ("fixed",), p.x0)
    assert rel_err(fd_jacobian(p.u_star, p.x0), r.jac) < 1e-8
    ru = reference(p, ("unrolled", K_SHORT), p.x0)
    assert rel_err(fd_jacobian(lambda z: p.run(torch.zeros(p.n, dtype=DT), z, K_SHORT)[0], p.x0), ru.jac) < 1e-8
    rf = reference(p, ("first_order",), p.x0)
    us = p.u_star(p.x0)
    fo = lambda z: p.F(p.T(us, z)).reshape(1)  # noqa: E731
    assert rel_err(fd_jacobian(lambda z: fd_jacobian(fo, z)[0], p.x0, 1e-3), rf.hess) < 1e-5
    xr = p.x0.clone().requires_grad_(True)
    g = torch.autograd.grad(p.F(p.T(us, xr)), xr, create_graph=True)[0]
    Hd = torch.stack([torch.autograd.grad(g[i], xr, retain_graph=True)[0] for i in range(3)])
    assert rel_err(Hd, rf.hess) < 1e-12


def test_assert_right_or_named_rejects_wrong_and_unnamed() -> None:
    """The cell rule itself: a wrong number, a generic error and a named error without a mode fail."""
    ref = torch.ones(2, dtype=DT)
    assert_right_or_named(lambda: ref.clone(), ref, 1e-12)
    with pytest.raises(AssertionError):
        assert_right_or_named(lambda: 1.01 * ref, ref, 1e-3)
    with pytest.raises(RuntimeError):
        assert_right_or_named(lambda: (_ for _ in ()).throw(RuntimeError("inplace")), ref, 1e-3)

    def named(msg):
        def raise_():
            raise hp.LinearSolveError(msg)
        return raise_

    assert assert_right_or_named(named("use hypergrad='unrolled'"), ref, 1e-3) is None
    with pytest.raises(AssertionError):
        assert_right_or_named(named("something failed"), ref, 1e-3)



@pytest.mark.parametrize("entry", ["vmap", "vmap_grad"])
@pytest.mark.parametrize("mode", ["implicit", "inexact", "unrolled", "first_order"])
def test_vmap_per_sample_convergence(mode, entry):
    """A batch whose samples converge at different rates: T(u; x) = u − x₀(Qu − B x₁:), step x₀ = s or
    s/20 (ρ = 1 − x₀λ_min). Each sample must reach its own tolerance (a batch-averaged residual test
    would stop the slow sample early). u* = Q⁻¹B x₁: for every step; ∂f/∂x₀ = 0 at the fixed point;
    ∂f/∂x₁: = BᵀQ⁻ᵀ(u* − y) (first_order: x₀Bᵀ(u* − y))."""
    p = _problem("spd")
    n = p.n
    X = torch.cat([torch.tensor([[p.s], [p.s / 20], [p.s / 5]], dtype=DT), p.X], dim=1)
    tight = dict(eps=1e-11, delta=1e-11) if mode == "inexact" else dict(tol=1e-11)
    solver = hp.GKMSolver(lambda u, x: u - x[0] * (p.Q @ u - p.B @ x[1:]), hypergrad=mode, max_steps=20000,
                          **tight)

    def solve(x):
        return solver(torch.zeros(n, dtype=DT), x)

    def f(x):
        return p.F(solve(x))

    if entry == "vmap":
        ref = torch.stack([p.u_star(x[1:]) for x in X])
        fn = lambda: torch.func.vmap(solve)(X)  # noqa: E731
    else:
        rows = []
        for x in X:
            u = p.u_star(x[1:])
            J = x[0] * p.B if mode == "first_order" else torch.linalg.solve(p.Q, p.B)
            rows.append(torch.cat([torch.zeros(1, dtype=DT), J.T @ (u - p.y)]))
        ref = torch.stack(rows)
        fn = lambda: torch.func.vmap(torch.func.grad(f))(X)  # noqa: E731
    assert_right_or_named(fn, ref, 1e-7, what=f"per-sample vmap {mode}/{entry}")


# ------------------------------------------------------------------------------------------------
# where θ lives: passed as a parameter, captured in T's closure, a module attribute, a dict given to
# torch.func.functional_call (captured, or passed as the solver's parameter) — every entry point
# ------------------------------------------------------------------------------------------------
HOMES = ["passed", "closure", "module_attr", "functional_call_captured", "functional_call_passed",
         "functional_call_solver", "functional_call_parent"]
HOME_MODES = ["implicit", "inexact", "unrolled", "truncated", "first_order"]
HOME_ENTRIES = ENTRIES


class _AttrOp(torch.nn.Module):
    """T reading θ from a plain attribute (set before each solve)."""

    def __init__(self, p) -> None:
        super().__init__()
        self.p, self.x = p, None

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        return self.p.T(u, self.x)


class _Net(torch.nn.Module):
    """A module whose parameter is θ, evaluated with torch.func.functional_call."""

    def __init__(self, p) -> None:
        super().__init__()
        self.p = p
        self.x = torch.nn.Parameter(p.x0.clone())

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        return self.p.T(u, self.x)


class _Parent(torch.nn.Module):
    """A model holding a solver whose T reads a module from its closure (a DEQ or MAML layout)."""

    def __init__(self, p, kw: dict) -> None:
        super().__init__()
        self.net = net = _Net(p)
        self.solver = hp.GKMSolver(lambda u: net(u), **kw)

    def forward(self, u0: torch.Tensor) -> torch.Tensor:
        return self.solver(u0)


def home_solve(home: str, p, kw: dict) -> Callable[[torch.Tensor], torch.Tensor]:
    """``x -> u*(x)`` with θ = x living in ``home``."""
    u0 = torch.zeros(p.n, dtype=DT)
    fc = torch.func.functional_call
    if home == "passed":
        solver = hp.GKMSolver(p.T, **kw)
        return lambda x: solver(u0, x)
    if home == "closure":
        return lambda x: hp.GKMSolver(lambda u: p.T(u, x), **kw)(u0)
    if home == "module_attr":
        op = _AttrOp(p)
        solver = hp.GKMSolver(op, **kw)

        def solve(x: torch.Tensor) -> torch.Tensor:
            op.x = x
            return solver(u0)

        return solve
    if home == "functional_call_captured":
        net = _Net(p)
        return lambda x: hp.GKMSolver(lambda u: fc(net, {"x": x}, (u,)), **kw)(u0)
    if home == "functional_call_passed":
        net = _Net(p)
        solver = hp.GKMSolver(lambda u, prm: fc(net, prm, (u,)), **kw)
        return lambda x: solver(u0, {"x": x})
    if home == "functional_call_solver":  # around the solver (T a module): the derivative is taken after
        solver = hp.GKMSolver(_Net(p), **kw)  # functional_call has put the module's own tensor back
        return lambda x: fc(solver, {"T.x": x}, (u0,))
    if home == "functional_call_parent":  # around a model whose solver's T reads a module from its closure
        parent = _Parent(p, kw)
        return lambda x: fc(parent, {"net.x": x}, (u0,))
    raise ValueError(home)


def _home_cells():
    for prob in ("spd", "tanh"):
        for home in HOMES:
            if prob == "tanh" and home in ("module_attr", "functional_call_passed", "functional_call_solver"):
                continue  # the linear problem covers them; tanh adds T's second derivatives
            for mode in HOME_MODES:
                for entry in HOME_ENTRIES:
                    if entry in ("gradcheck", "gradgradcheck") and mode not in EXACT_MODES:
                        continue
                    yield pytest.param(prob, home, mode, entry, id=f"{prob}-{home}-{mode}-{entry}")


@pytest.mark.parametrize("prob,home,mode,entry", list(_home_cells()))
def test_param_home(prob: str, home: str, mode: str, entry: str) -> None:
    """The exact derivative wherever θ lives (a tensor T captures must not give a zero derivative)."""
    p = _problem(prob)
    kw, _, ref_kind, tol, _ = configure(mode, "tight")
    if prob == "tanh" and entry in ("create_graph", "hessian"):
        tol = max(tol, 1e-6)  # reference Hessian by central differences
    ref = expected(entry, p, ref_kind)

    def cell():
        solve = home_solve(home, p, dict(hypergrad=mode, **kw))
        return run_entry(entry, solve, lambda x: p.F(solve(x)), p, p.x0)

    assert_right_or_named(cell, ref, tol, what=f"{prob}/{home}/{mode}/{entry}")


# ------------------------------------------------------------------------------------------------
# start near / far / at zero, data scale 1e-8 ... 1e8, acceleration on / off: converged=True means
# ‖T(u) − u‖ ≤ max(tol·‖u‖, atol) at the returned u, and the values are within the tolerance's reach
# ------------------------------------------------------------------------------------------------
START_MODES = ["implicit", "inexact", "unrolled", "truncated", "first_order"]


def _residual(T, u, *params) -> float:
    with torch.no_grad():
        return float((T(u, *params) - u).norm())


@pytest.mark.parametrize("acc", [False, True], ids=["plain", "anderson"])
@pytest.mark.parametrize("scale", [1e-8, 1.0, 1e8])
@pytest.mark.parametrize("start", ["zero", "near", "far"])
@pytest.mark.parametrize("mode", START_MODES)
def test_start_and_scale(mode: str, start: str, scale: float, acc: bool) -> None:
    p = make_linear("spd", seed=11, cond=20.0, scale=scale)
    x = p.x0.clone()
    us = p.u_star(x)
    u0 = {"zero": torch.zeros(p.n, dtype=DT), "near": us * (1 + 1e-6), "far": 1e6 * us + 1e6 * scale}[start]
    tol = 1e-10
    kw: dict[str, Any] = dict(eps=tol, delta=tol) if mode == "inexact" else dict(tol=tol)
    if mode == "truncated":
        kw["steps"] = 5
    if acc:
        kw["acceleration"] = hp.Anderson(5)
    sigma = p.s * float(torch.linalg.eigvalsh(p.Q).min())  # σ_min(I − M): ‖u − u*‖ ≤ r / σ

    def run():
        solver = hp.GKMSolver(p.T, hypergrad=mode, max_steps=20000, **kw)
        xr = x.clone().requires_grad_(True)
        u, info = solver.solve(u0.clone(), xr)
        p.F(u).backward()
        return u.detach(), info, xr.grad

    try:
        u, info, g = run()
    except hp.ConfigurationError as e:  # Anderson with unrolled / truncated: refused by name
        assert acc and mode in ("unrolled", "truncated") and "implicit" in str(e)
        return
    r = _residual(p.T, u, x)
    assert info.converged, info.message
    assert r <= tol * float(u.norm()) * (1 + 1e-12), f"converged=True at a point with residual {r:.3e}"
    assert info.residual == pytest.approx(r, rel=1e-6, abs=1e-300)
    assert rel_err(u, us) <= 2 * tol / sigma
    if mode == "unrolled":  # the derivative of the steps that ran: du_K/dx = Σ_{i<K} M^i sB
        J = p.S(info.steps) @ (p.s * p.B)
        ref = J.T @ (u - p.y)
    elif mode == "truncated":
        ref = reference(p, ("truncated", None, 5, False), x).grad
    elif mode == "first_order":
        ref = reference(p, ("first_order",), x).grad
    else:
        ref = reference(p, ("fixed",), x).grad
    assert rel_err(g, ref) <= 1e-6


@pytest.mark.parametrize("path", ["single", "batch_dims", "inexact", "vmap"])
def test_anderson_converged_means_a_fixed_point(path: str) -> None:
    """T(u) = (1 − 1e-11)u + x: the Anderson step extrapolates to u* ~ 1e11 in two steps, where the
    residual is rounding; converged must hold at the returned point (it held at the checked point and
    the KM step from it was returned)."""
    T = lambda u, x: (1 - 1e-11) * u + x  # noqa: E731
    acc = hp.Anderson(3)
    mode = "inexact" if path == "inexact" else "implicit"
    kw = dict(eps=1e-10, delta=1e-10) if mode == "inexact" else {}
    if path == "batch_dims":
        solver = hp.GKMSolver(T, max_steps=50, check_every=1, acceleration=acc, batch_dims=1, hypergrad=mode, **kw)
        u, info = solver.solve(torch.zeros(3, 1, dtype=DT), torch.ones(3, 1, dtype=DT))
        r = (T(u, torch.ones(3, 1, dtype=DT)) - u).norm(dim=1)
        thr = 1e-10 * u.norm(dim=1)
        assert bool(((r <= thr) | ~info.converged_per_sample).all()) and info.converged
        return
    solver = hp.GKMSolver(T, max_steps=50, check_every=1, acceleration=acc, hypergrad=mode, **kw)
    if path == "vmap":
        with torch.no_grad():
            u = torch.func.vmap(lambda x: solver(torch.zeros(1, dtype=DT), x))(torch.ones(3, 1, dtype=DT))
        info = solver.info
        r = (T(u, torch.ones(3, 1, dtype=DT)) - u).norm(dim=1)
        assert bool((r <= 1e-10 * u.norm(dim=1)).all()) and info.converged
        return
    u, info = solver.solve(torch.zeros(1, dtype=DT), torch.ones(1, dtype=DT))
    r = _residual(T, u, torch.ones(1, dtype=DT))
    assert info.converged and r <= 1e-10 * float(u.norm())
    assert float(u) > 9.9e10  # u* = 1e11 (the residual test cannot resolve it further: σ_min = 1e-11)


# ------------------------------------------------------------------------------------------------
# grad mode: enabled / no_grad / inference_mode, every mode, acceleration on / off
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("acc", [False, True], ids=["plain", "anderson"])
@pytest.mark.parametrize("grad_mode", ["enabled", "no_grad", "inference_mode"])
@pytest.mark.parametrize("mode", START_MODES)
def test_grad_mode(mode: str, grad_mode: str, acc: bool) -> None:
    p = _problem("spd")
    kw: dict[str, Any] = dict(eps=1e-12, delta=1e-12) if mode == "inexact" else dict(tol=1e-12)
    if acc:
        if mode in ("unrolled", "truncated"):
            return  # refused at construction (test_start_and_scale)
        kw["acceleration"] = hp.Anderson(5)
    if mode == "truncated":
        kw["steps"] = 3
    solver = hp.GKMSolver(p.T, hypergrad=mode, max_steps=5000, **kw)
    ctx = {"enabled": torch.enable_grad, "no_grad": torch.no_grad, "inference_mode": torch.inference_mode}[grad_mode]
    x = p.x0.clone().requires_grad_(grad_mode == "enabled")
    with ctx():
        u = solver(torch.zeros(p.n, dtype=DT), x)
    assert rel_err(u.detach(), p.u_star(p.x0)) < 1e-9 and solver.info.converged
    assert u.requires_grad == (grad_mode == "enabled")
    assert u.is_inference() == (grad_mode == "inference_mode")
    if grad_mode == "enabled":
        p.F(u).backward()
        ref = reference(p, ("first_order",) if mode == "first_order" else
                        ("truncated", None, 3, False) if mode == "truncated" else ("fixed",), p.x0).grad
        assert rel_err(x.grad, ref) < 1e-7


# ------------------------------------------------------------------------------------------------
# object life: pickle, deepcopy, torch.save / torch.load of a module holding a solver
# ------------------------------------------------------------------------------------------------
class _Lower(torch.nn.Module):
    """T(u; x) = u − s(Qu − Bx) as a module (picklable, unlike a lambda)."""

    def __init__(self, Q: torch.Tensor, B: torch.Tensor, s: float) -> None:
        super().__init__()
        self.register_buffer("Q", Q.clone())
        self.register_buffer("B", B.clone())
        self.s = s

    def forward(self, u: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return u - self.s * (self.Q @ u - self.B @ x)


class _Model(torch.nn.Module):
    def __init__(self, p, mode: str) -> None:
        super().__init__()
        kw: dict[str, Any] = dict(eps=1e-12, delta=1e-12) if mode == "inexact" else dict(tol=1e-12)
        self.solver = hp.GKMSolver(_Lower(p.Q, p.B, p.s), hypergrad=mode, max_steps=5000, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.solver(torch.zeros(self.solver.T.Q.shape[0], dtype=DT), x, key="k")


@pytest.mark.parametrize("how", ["pickle", "deepcopy", "torch_save"])
@pytest.mark.parametrize("mode", START_MODES)
def test_object_life(mode: str, how: str) -> None:
    import copy
    import io
    import pickle

    p = _problem("spd")
    model = _Model(p, mode)
    x = p.x0.clone().requires_grad_(True)
    p.F(model(x)).backward()  # the inexact mode's counters and caches are now non-empty
    if how == "pickle":
        twin = pickle.loads(pickle.dumps(model))
    elif how == "deepcopy":
        twin = copy.deepcopy(model)
    else:
        buf = io.BytesIO()
        torch.save(model, buf)
        buf.seek(0)
        twin = torch.load(buf, weights_only=False)
    assert twin.solver.method is not model.solver.method
    k_before = getattr(model.solver.method, "k", None)
    for m in (twin, model):  # both work, each with its own state
        xr = p.x0.clone().requires_grad_(True)
        p.F(m(xr)).backward()
        ref = reference(p, ("first_order",) if mode == "first_order" else
                        ("truncated", None, 10, False) if mode == "truncated" else ("fixed",), p.x0).grad
        assert rel_err(xr.grad, ref) < 1e-7
    if k_before is not None:
        assert model.solver.method.k == k_before + 1 and twin.solver.method.k == k_before + 1
