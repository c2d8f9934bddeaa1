"""``hp.custom_fixed_point`` / ``hp.custom_root``: the implicit derivative of any solver function,
against closed forms at every order and under every transform."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import scipy.optimize
import torch
import torch.autograd.forward_ad as fwAD
from _oracles import DT, rel_err

import hodl_plugin as hp

D = torch.float64
g = torch.Generator().manual_seed(0)
X = torch.randn(12, 4, dtype=D, generator=g)
Y = torch.randn(12, dtype=D, generator=g)
H0 = X.T @ X


def ridge_exact(lam: torch.Tensor) -> torch.Tensor:
    """w*(λ) = (XᵀX + λI)⁻¹Xᵀy: differentiable by plain autograd through torch.linalg.solve."""
    return torch.linalg.solve(H0 + lam * torch.eye(4, dtype=D), X.T @ Y)


def G(w, lam):  # ∇_w of ½‖Xw − y‖² + λ/2 ‖w‖²
    return X.T @ (X @ w - Y) + lam * w


def T(w, lam):  # a gradient step of the same objective: its fixed point is the ridge solution
    return w - 0.02 * G(w, lam)


def direct(w0, lam):  # "any solver": a closed form, under no_grad
    return torch.linalg.solve(H0 + lam * torch.eye(4, dtype=D), X.T @ Y)


def lbfgs(w0, lam):  # scipy, outside torch entirely
    def fun(w):
        wt = torch.tensor(w, dtype=D)
        r = X @ wt - Y
        return float(0.5 * r @ r + 0.5 * float(lam) * wt @ wt), G(wt, float(lam)).numpy()

    res = scipy.optimize.minimize(fun, w0.numpy(), jac=True, method="L-BFGS-B",
                                  options={"gtol": 1e-13, "ftol": 0.0, "maxiter": 10000})
    return torch.from_numpy(res.x)


def direct_keyword_only(w0, *, lam):
    return direct(w0, lam)


_by_keyword = hp.custom_fixed_point(T)(direct)
_keyword_only = hp.custom_root(lambda w, *, lam: G(w, lam))(direct_keyword_only)

SOLVERS = {
    "fixed_point-direct": hp.custom_fixed_point(T)(direct),
    "fixed_point-keyword": lambda w0, lam: _by_keyword(w0, lam=lam),  # solve(w0, lam=...) on def direct(w0, lam)
    "root-keyword-only": lambda w0, lam: _keyword_only(w0, lam=lam),  # def direct_keyword_only(w0, *, lam)
    "fixed_point-cg": hp.custom_fixed_point(T, solve=hp.linear_solve.cg(rtol=1e-13))(direct),
    "root-direct": hp.custom_root(G)(direct),
    "root-cg": hp.custom_root(G, solve=hp.linear_solve.cg(rtol=1e-13))(direct),
    "root-lbfgs": hp.custom_root(G, solve="cg")(lbfgs),
}
W0 = torch.zeros(4, dtype=D)


def loss(w):
    return ((w - 1.0) ** 3).sum()


@pytest.mark.parametrize("name", list(SOLVERS))
@pytest.mark.parametrize("entry", ["backward", "create_graph", "gradcheck", "gradgradcheck", "forward_ad",
                                   "jacrev", "jacfwd", "hessian", "vmap_grad"])
def test_decorated_solver_matches_the_closed_form(name, entry):
    solve = SOLVERS[name]
    lam0 = torch.tensor(0.7, dtype=D)
    f = lambda lam: loss(solve(W0, lam))  # noqa: E731
    fe = lambda lam: loss(ridge_exact(lam))  # noqa: E731
    tol = 1e-6 if "lbfgs" in name else 1e-9
    if entry == "backward":
        lam = lam0.clone().requires_grad_(True)
        f(lam).backward()
        got, ref = lam.grad, torch.func.grad(fe)(lam0)
    elif entry == "create_graph":
        lam = lam0.clone().requires_grad_(True)
        (d,) = torch.autograd.grad(f(lam), lam, create_graph=True)
        (got,) = torch.autograd.grad(d, lam)
        ref = torch.func.hessian(fe)(lam0)
    elif entry in ("gradcheck", "gradgradcheck"):
        if "lbfgs" in name:
            pytest.skip("L-BFGS to 1e-13 is not smooth to finite-difference accuracy")
        check = torch.autograd.gradcheck if entry == "gradcheck" else torch.autograd.gradgradcheck
        assert check(lambda lam: solve(W0, lam), (lam0.clone().requires_grad_(True),))
        return
    elif entry == "forward_ad":
        with fwAD.dual_level():
            w = solve(W0, fwAD.make_dual(lam0, torch.ones((), dtype=D)))
            got = fwAD.unpack_dual(w).tangent
        ref = torch.func.jacfwd(ridge_exact)(lam0)
    elif entry == "jacrev":
        got, ref = torch.func.jacrev(lambda lam: solve(W0, lam))(lam0), torch.func.jacrev(ridge_exact)(lam0)
    elif entry == "jacfwd":
        got, ref = torch.func.jacfwd(lambda lam: solve(W0, lam))(lam0), torch.func.jacfwd(ridge_exact)(lam0)
    elif entry == "hessian":
        got, ref = torch.func.hessian(f)(lam0), torch.func.hessian(fe)(lam0)
    else:
        if "lbfgs" in name:
            pytest.skip("vmap over a numpy solver: the samples are solved one by one, covered by 'direct'")
        lams = torch.tensor([0.3, 0.7, 2.0], dtype=D)
        got, ref = torch.func.vmap(torch.func.grad(f))(lams), torch.func.vmap(torch.func.grad(fe))(lams)
    assert torch.allclose(got, ref, rtol=tol, atol=tol), (got, ref)


def test_tensors_the_optimality_function_captures_get_gradients():
    """The data X captured by G (not an argument) gets its exact gradient, as a torch.func user expects."""
    lam = torch.tensor(0.5, dtype=D)

    def f_custom(Xc):
        Gc = lambda w, lam: Xc.T @ (Xc @ w - Y) + lam * w  # noqa: E731

        @hp.custom_root(Gc)
        def solve(w0, lam):
            return torch.linalg.solve(Xc.T @ Xc + lam * torch.eye(4, dtype=D), Xc.T @ Y)

        return loss(solve(W0, lam))

    def f_exact(Xc):
        return loss(torch.linalg.solve(Xc.T @ Xc + lam * torch.eye(4, dtype=D), Xc.T @ Y))

    assert torch.allclose(torch.func.grad(f_custom)(X), torch.func.grad(f_exact)(X), rtol=1e-9, atol=1e-10)


def test_static_and_pytree_arguments():
    @hp.custom_fixed_point(lambda w, p, scale: w - 0.02 * (X.T @ (X @ w - Y) + p["lam"] * w) * scale)
    def solve(w0, p, scale):
        assert isinstance(scale, float)
        return torch.linalg.solve(H0 + p["lam"] * torch.eye(4, dtype=D), X.T @ Y)

    lam = torch.tensor(0.7, dtype=D, requires_grad=True)
    loss(solve(W0, {"lam": lam}, 1.0)).backward()
    assert torch.allclose(lam.grad, torch.func.grad(lambda la: loss(ridge_exact(la)))(lam.detach()), rtol=1e-9)


def test_a_wrong_solution_is_refused_by_name():
    bad = hp.custom_fixed_point(T)(lambda w0, lam: torch.zeros(3, dtype=D))
    with pytest.raises(TypeError, match="must return the solution"):
        bad(W0, torch.tensor(0.7, dtype=D, requires_grad=True))
    with pytest.raises(TypeError, match="must be callable"):
        hp.custom_root(42)
    with pytest.raises(ValueError, match="on_fail"):
        hp.custom_root(G, on_fail="ignore")


def test_a_singular_jacobian_raises_a_named_error():
    """G(w) = 0·w + λ: ∂G/∂w = 0 is singular; the derivative is undefined — a LinearSolveError, not a number."""
    solve = hp.custom_root(lambda w, lam: 0 * w + lam - 1.0)(lambda w0, lam: w0)
    lam = torch.tensor(1.0, dtype=D, requires_grad=True)
    with pytest.raises(hp.LinearSolveError):
        solve(torch.zeros(2, dtype=D), lam).sum().backward()


def test_no_grad_calls_the_solver_as_it_is():
    calls = []

    @hp.custom_fixed_point(T)
    def solve(w0, lam):
        calls.append(1)
        return direct(w0, lam)

    with torch.no_grad():
        w = solve(W0, torch.tensor(0.7, dtype=D))
    assert len(calls) == 1 and np.allclose(w.numpy(), ridge_exact(torch.tensor(0.7, dtype=D)).numpy())


def test_the_returned_point_is_checked():
    """A decorated solver's answer is checked: NaN is a DivergenceError, another dtype a TypeError, a point
    that is not a fixed point / root to the tolerance a ConvergenceWarning (the derivative was taken there
    silently)."""
    lam = torch.tensor(0.7, dtype=D, requires_grad=True)
    with pytest.raises(hp.DivergenceError, match="NaN"):
        hp.custom_fixed_point(T)(lambda w0, lam: torch.full((4,), float("nan"), dtype=D))(W0, lam)
    with pytest.raises(TypeError, match="dtype"):
        hp.custom_root(G)(lambda w0, lam: direct(w0, lam).float())(W0, lam)
    with pytest.warns(hp.ConvergenceWarning, match="not a root"):
        hp.custom_root(G)(lambda w0, lam: 0.9 * direct(w0, lam))(W0, lam)
    with pytest.warns(hp.ConvergenceWarning, match="not a fixed point"):
        hp.custom_fixed_point(T)(lambda w0, lam: 0.9 * direct(w0, lam))(W0, lam)
    hp.custom_root(G, tol=0.2)(lambda w0, lam: 0.9 * direct(w0, lam))(W0, lam)  # accepted when asked


def test_keyword_arguments_bind_to_the_solver_signature():
    """TorchOpt/jaxopt style calls: keywords (and the initial point by name) are bound to the decorated
    function's signature; a wrong one is a TypeError naming the solver and its signature."""
    lam = torch.tensor(0.7, dtype=D, requires_grad=True)
    loss(_by_keyword(w0=W0, lam=lam)).backward()
    assert torch.allclose(lam.grad, torch.func.grad(lambda la: loss(ridge_exact(la)))(lam.detach()), rtol=1e-9)
    with pytest.raises(TypeError, match=r"direct\(w0, lam\): missing a required argument: 'lam'"):
        _by_keyword(W0, mu=lam)


@pytest.mark.parametrize("call", ["positional", "keyword"])
def test_non_finite_inputs_are_named(call):
    """As GKMSolver: NaN/Inf in an input is a ValueError naming the argument, not the solver's NaN result."""
    solve = hp.custom_root(G)(direct)
    bad = torch.tensor(float("nan"), dtype=D, requires_grad=True)
    for grad_mode in (True, False):
        with torch.set_grad_enabled(grad_mode), pytest.raises(ValueError, match=r"non-finite .* in lam \(an arg"):
            solve(W0, bad) if call == "positional" else solve(W0, lam=bad)
    with pytest.raises(ValueError, match="in w0"):
        solve(torch.full((4,), float("inf"), dtype=D), torch.tensor(0.7, dtype=D))


def _batch_problem():
    g = torch.Generator().manual_seed(0)
    n = 20
    M = torch.randn(n, n, generator=g, dtype=DT)
    M = 0.95 * M / torch.linalg.matrix_norm(M, 2)

    def T(z, x, c):
        return c[:, None] * torch.tanh(z @ M.T) + x

    x = torch.randn(3, n, generator=g, dtype=DT) * torch.tensor([[1e-6], [1.0], [1e3]], dtype=DT)
    return M, T, x, torch.tensor([0.5, 0.9, 0.99], dtype=DT)


@pytest.mark.parametrize("solve", ["gmres", "bicgstab"])
def test_batch_dims_gives_every_sample_its_own_adjoint_accuracy(solve):
    """Three samples at 1e-6, 1 and 1e3 and the loss ½Σz²: one adjoint system for the batch met its tolerance
    on the largest sample and left the smallest at relative error 1e-6 (silently); with batch_dims=1 each
    sample is within 1e-8 of dense implicit differentiation (GMRES per sample, BiCGSTAB with each sample's
    right-hand side scaled to unit size)."""
    M, T, x, c = _batch_problem()
    n = x.shape[1]

    @hp.custom_fixed_point(T, batch_dims=1, solve=solve)
    def fp(z0, x, c):
        return hp.GKMSolver(T, batch_dims=1, tol=1e-14, max_steps=10000).solve(z0, x, c)[0]

    x, c = x.clone().requires_grad_(True), c.clone().requires_grad_(True)
    z = fp(torch.zeros_like(x), x, c)
    gx, gc = torch.autograd.grad(0.5 * (z**2).sum(), (x, c))
    for i in range(3):  # dense: w = (I - J)⁻ᵀ z_i, ∇x_i = w, ∇c_i = wᵀ tanh(M z_i)
        zi = z[i].detach()
        J = (c[i].detach() * (1 - torch.tanh(zi @ M.T) ** 2))[:, None] * M
        w = torch.linalg.solve(torch.eye(n, dtype=DT) - J.T, zi)
        assert rel_err(gx[i], w) < 1e-8
        assert abs(float(gc[i]) - float(w @ torch.tanh(zi @ M.T))) <= 1e-8 * abs(float(w @ torch.tanh(zi @ M.T)))


def test_batch_dims_checks_the_returned_point_per_sample():
    """A solver that leaves the smallest sample unsolved: the check of the whole batch's residual passed
    (the large samples dominate its norm); per sample it names the sample."""
    _, T, x, c = _batch_problem()

    def few_steps(z0, x, c):
        z = hp.GKMSolver(T, batch_dims=1, tol=1e-14, max_steps=10000).solve(z0, x, c)[0].clone()
        z[0] = 0.0  # sample 0 (at 1e-6) not solved
        return z

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hp.custom_fixed_point(T)(few_steps)(torch.zeros_like(x), x, c)  # one norm for the batch: passes
    with pytest.warns(hp.ConvergenceWarning, match=r"sample 0 of the batch_dims=1 batch"):
        hp.custom_fixed_point(T, batch_dims=1)(few_steps)(torch.zeros_like(x), x, c)
    with pytest.raises(ValueError, match="batch_dims=3 but the initial point"):
        hp.custom_fixed_point(T, batch_dims=3)(few_steps)(torch.zeros_like(x), x, c)
    with pytest.raises(ValueError, match="batch_dims"):
        hp.custom_root(T, batch_dims=-1)


@pytest.mark.parametrize("dtype,scale", [(torch.float64, 1e200), (torch.float32, 1e28)])
def test_a_solution_near_the_top_of_the_dtype_is_checked_without_overflow(dtype, scale):
    """|u*| ~ 1e200 (float64) or 1e28 (float32): finite, but its squares are not — the check of the returned
    point raised 'returned a point with NaN/Inf entries'. The gradient is A⁻¹1 (linear T: scale-free)."""
    g = torch.Generator().manual_seed(0)
    A = torch.randn(6, 6, generator=g, dtype=torch.float64)
    A = A @ A.T / 6 + torch.eye(6, dtype=torch.float64)
    Ad = A.to(dtype)
    x = (scale * torch.randn(6, generator=g, dtype=torch.float64)).to(dtype).requires_grad_(True)
    for deco in (hp.custom_fixed_point(lambda u, x: u - 0.2 * (Ad @ u - x)), hp.custom_root(lambda u, x: Ad @ u - x)):
        u = deco(lambda u0, x: torch.linalg.solve(Ad, x))(torch.zeros(6, dtype=dtype), x)
        (grad,) = torch.autograd.grad(u.sum(), x)
        assert rel_err(grad.double(), torch.linalg.solve(A, torch.ones(6, dtype=torch.float64))) < (
            1e-12 if dtype == torch.float64 else 1e-5)


def test_custom_root_warm_started_at_the_root_does_not_warn_and_a_non_root_still_does():
    """init = the root: ||G(init)|| is rounding, and 'tol relative to ||G(init)||' made any returned point
    fail (7e-17 above 7e-22). The scale is now max(||G(init)||, ||G(0)||); a solver that returns a point
    that is not a root is still reported."""
    g = torch.Generator().manual_seed(1)
    M = torch.randn(3, 4, 4, generator=g, dtype=DT)
    A = M @ M.mT + torch.eye(4, dtype=DT)
    X = torch.randn(3, 4, generator=g, dtype=DT) * torch.tensor([[1.0], [1e-6], [1e6]], dtype=DT)
    G = lambda u, x: (A @ u[..., None])[..., 0] - x  # noqa: E731
    exact = torch.linalg.solve(A, X[..., None])[..., 0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hp.custom_root(G, batch_dims=1)(lambda u0, x: torch.linalg.solve(A, x[..., None])[..., 0])(exact.clone(), X)
    with pytest.warns(hp.ConvergenceWarning, match="sample 1"):
        hp.custom_root(G, batch_dims=1)(lambda u0, x: u0)(exact * torch.tensor([[1.0], [1.1], [1.0]], dtype=DT), X)


def test_a_failed_adjoint_of_a_decorated_solver_speaks_the_decorators_options():
    """A user's own solve= that misses its tolerance: the message named GKMSolver's options (adjoint_rtol,
    hypergrad='unrolled', adjoint_maxiter) that the decorators do not have, and for a batch_dims batch
    claimed the tolerance was 'below what float64 resolves' (it compared the scaled system's threshold with
    the unscaled right-hand side)."""
    g = torch.Generator().manual_seed(2)
    M = torch.randn(3, 5, 5, generator=g, dtype=DT)
    A = M @ M.mT / 5 + torch.eye(5, dtype=DT)
    G = lambda u, x: (A @ u[..., None])[..., 0] - x  # noqa: E731

    def sloppy(matvec, b, x0=None):  # right to 1e-4 only
        return torch.linalg.solve(A.mT, b[..., None])[..., 0] * (1 + 1e-4)

    X = (torch.randn(3, 5, generator=g, dtype=DT) * torch.tensor([[1.0], [1e-6], [1e6]], dtype=DT)).requires_grad_()
    for bd in (0, 1):
        u = hp.custom_root(G, batch_dims=bd, solve=sloppy)(
            lambda u0, x: torch.linalg.solve(A, x[..., None])[..., 0])(torch.zeros(3, 5, dtype=DT), X)
        with pytest.raises(hp.LinearSolveError) as e:
            u.sum().backward()
        msg = str(e.value)
        assert "solve=" in msg and "resolves" not in msg
        assert not any(w in msg for w in ("adjoint_rtol", "hypergrad", "adjoint_maxiter")), msg
