"""The forward solve: warnings, divergence, scale-aware tolerances, in-place operators, argument
validation, torch.func transforms and per-sample convergence (issues 11, 12, 14).

Every reference is independent of the code: closed forms of affine maps, or the same solve run
one sample at a time.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import hodl_plugin as hp
from hodl_plugin.gkm import default_tol

D = torch.float64
MODES = ["implicit", "inexact", "first_order", "unrolled", "truncated"]


def _opts(mode):
    return {"steps": 5} if mode == "truncated" else {}


def spd(n, cond, seed=0, dtype=D):
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=dtype))
    ev = torch.logspace(0, math.log10(cond), n, dtype=dtype)
    return (U * ev) @ U.T, ev.max()


# -- item 5: non-convergence warns, slow divergence is caught ---------------------------------------
@pytest.mark.parametrize("mode", MODES)
def test_nonconverged_forward_warns_in_every_mode(mode):
    solver = hp.GKMSolver(lambda u, x: 0.99 * u + x, max_steps=30, hypergrad=mode, **_opts(mode))
    x = torch.ones(3, dtype=D, requires_grad=True)
    with pytest.warns(hp.ConvergenceWarning, match="did not converge") as rec:
        u = solver(torch.zeros(3, dtype=D), x)
    msg = str([w.message for w in rec if "did not converge" in str(w.message)][0])
    assert "30 steps" in msg and "threshold" in msg and "max_steps" in msg
    assert not solver.info.converged
    u.sum().backward()


def test_exact_steps_do_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error", hp.ConvergenceWarning)
        hp.GKMSolver(lambda u, x: 0.99 * u + x, max_steps=30, tol=0.0, hypergrad="unrolled")(
            torch.zeros(3, dtype=D), torch.ones(3, dtype=D))


def test_slow_divergence_is_caught():
    # T = 1.001 u + x: u_k = x (1.001^k - 1) / 0.001 grows without bound, slowly
    solver = hp.GKMSolver(lambda u, x: 1.001 * u + x, max_steps=1000)
    with pytest.raises(hp.DivergenceError, match="diverged at step 209.*not converging"):
        solver(torch.zeros(1, dtype=D), torch.ones(1, dtype=D))  # no decrease for 200 steps: not a contraction
    warn = hp.GKMSolver(lambda u, x: 1.001 * u + x, max_steps=1000, on_divergence="warn")
    with pytest.warns(hp.ConvergenceWarning, match="diverged"):
        u, info = warn.solve(torch.zeros(1, dtype=D), torch.ones(1, dtype=D))
    assert info.diverged and not info.converged and float(u) < 1717


def test_slow_convergence_is_not_called_divergence():
    # contraction 0.999: monotone residual decrease, must only warn "did not converge"
    solver = hp.GKMSolver(lambda u, x: 0.999 * u + x, max_steps=1000, check_every=1, hypergrad="unrolled")
    with pytest.warns(hp.ConvergenceWarning, match="did not converge"):
        u, info = solver.solve(torch.zeros(2, dtype=D), torch.ones(2, dtype=D))
    assert not info.diverged
    assert torch.allclose(u, torch.full((2,), (1 - 0.999**1000) / 0.001, dtype=D))


def test_noise_level_residual_jitter_with_tol0_is_not_divergence():
    # exactly K steps far past convergence: the residual jitters at rounding level
    Q, L = spd(30, 10.0)
    b = torch.randn(30, dtype=D, generator=torch.Generator().manual_seed(3))
    solver = hp.GKMSolver(lambda u, x: u - (Q @ u - x) / L, max_steps=3000, tol=0.0, check_every=1)
    u, info = solver.solve(torch.zeros(30, dtype=D), b)
    assert not info.diverged and info.converged
    assert torch.allclose(u, torch.linalg.solve(Q, b), rtol=1e-10)


# -- item 7: scale-aware tolerances -------------------------------------------------------------------
@pytest.mark.parametrize("scale", [1e-8, 1.0, 1e8])
@pytest.mark.parametrize("mode", ["implicit", "inexact", "first_order", "unrolled"])
def test_default_tolerance_is_relative(scale, mode):
    Q, L = spd(20, 50.0)
    b = scale * torch.randn(20, dtype=D, generator=torch.Generator().manual_seed(1))
    solver = hp.GKMSolver(lambda u, x: u - (Q @ u - x) / L, max_steps=20000, hypergrad=mode)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", hp.ConvergenceWarning)  # the inexact mode's own eps
        u, info = solver.solve(torch.zeros(20, dtype=D), b)
    exact = torch.linalg.solve(Q, b)
    err = float((u - exact).norm() / exact.norm())
    if mode != "inexact":  # the inexact mode stops at its own accuracy eps (not this item)
        assert info.converged
        assert err < 1e-7, err


def test_float32_default_is_reachable():
    Q, L = spd(20, 20.0, dtype=torch.float32)
    b = torch.randn(20, generator=torch.Generator().manual_seed(1))
    with warnings.catch_warnings():
        warnings.simplefilter("error", hp.ConvergenceWarning)
        u, info = hp.GKMSolver(lambda u, x: u - (Q @ u - x) / L, max_steps=5000).solve(torch.zeros(20), b)
    assert info.converged and info.tol <= default_tol(torch.float32) * 1.01 * float(u.norm())
    exact = torch.linalg.solve(Q.double(), b.double())
    assert float((u.double() - exact).norm() / exact.norm()) < 1e-3


def test_absolute_tolerance_on_request_and_relative_by_default():
    T = lambda u, x: 0.5 * u + x  # noqa: E731  u* = 2x, residual after k steps 2|x| 0.5^k... exactly |x| 0.5^k
    x = torch.full((1,), 1e-8, dtype=D)
    _, info = hp.GKMSolver(T, tol=0.0, atol=1e-6).solve(torch.zeros(1, dtype=D), x)
    assert info.converged and info.steps == 0  # absolute: u0's residual 1e-8 is already below 1e-6
    u, info = hp.GKMSolver(T).solve(torch.zeros(1, dtype=D), x)
    assert abs(float(u) - 2e-8) < 1e-17  # relative by default
    u, info = hp.GKMSolver(T, tol=1e-12).solve(torch.zeros(1, dtype=D), torch.ones(1, dtype=D))
    assert info.converged and abs(float(u) - 2.0) < 1e-11 and 39 <= info.steps <= 50


def test_zero_fixed_point_needs_an_absolute_tolerance():
    # u* = 0: a relative threshold tol·||u|| vanishes with u, so it is not met (the residual is ||u||/2);
    # the warning says to pass atol, and with atol the solve converges at the returned point
    with pytest.warns(hp.ConvergenceWarning, match="atol"):
        u, info = hp.GKMSolver(lambda u: 0.5 * u, max_steps=100).solve(torch.ones(3, dtype=D))
    assert not info.converged and info.steps == 100
    u, info = hp.GKMSolver(lambda u: 0.5 * u, atol=1e-12).solve(torch.ones(3, dtype=D))
    assert info.converged and float((0.5 * u - u).norm()) <= 1e-12 and info.residual == float((0.5 * u - u).norm())


# -- item 8: operators that write into their input -----------------------------------------------
@pytest.mark.parametrize("mode", MODES)
def test_inplace_operator_raises_and_leaves_u0(mode):
    u0 = torch.zeros(3, dtype=D)
    x = torch.ones(3, dtype=D, requires_grad=mode == "unrolled")
    solver = hp.GKMSolver(lambda u, x: u.mul_(0.5).add_(x), hypergrad=mode, **_opts(mode))
    with pytest.raises(ValueError, match="in place"):
        solver(u0, x.detach() if mode != "unrolled" else x.detach())
    assert torch.equal(u0, torch.zeros(3, dtype=D)) and u0._version == 0


def test_operator_writing_into_a_parameter_raises():
    x = torch.ones(2, dtype=D)
    with pytest.raises(ValueError, match=r"params\[0\] in place"):
        hp.GKMSolver(lambda u, x: 0.5 * u + x.mul_(1.0))(torch.zeros(2, dtype=D), x)


# -- item 23: validation at construction ---------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(max_steps=2.5), "max_steps"),
        (dict(max_steps=math.inf), "max_steps"),
        (dict(max_steps=math.nan), "max_steps"),
        (dict(max_steps=None), "max_steps"),
        (dict(max_steps=0), "max_steps"),
        (dict(tol=math.nan), "tol"),
        (dict(tol=-1.0), "tol"),
        (dict(atol=math.inf), "atol"),
        (dict(rtol=math.nan), "rtol"),
        (dict(divergence_factor=0.0), "divergence_factor"),
        (dict(divergence_factor=-3.0), "divergence_factor"),
        (dict(divergence_factor=math.nan), "divergence_factor"),
        (dict(check_every=2.5), "check_every"),
        (dict(check_every=0), "check_every"),
        (dict(batch_dims=-1), "batch_dims"),
        (dict(on_divergence="rasie"), "on_divergence"),
        (dict(acceleration="anderson"), "acceleration"),
    ],
)
def test_bad_arguments_are_named_at_construction(kwargs, name):
    with pytest.raises((ValueError, TypeError), match=name):
        hp.GKMSolver(lambda u: 0.5 * u, **kwargs)


def test_integral_float_max_steps_is_accepted():
    assert hp.GKMSolver(lambda u: 0.5 * u, max_steps=3.0).max_steps == 3


# -- item 24: NaN lower level, tol=0 -------------------------------------------------------------
def test_nan_lower_level_has_a_clear_message():
    with pytest.raises(hp.DivergenceError) as e:
        hp.GKMSolver(lambda u, x: torch.log(u) + x)(torch.zeros(2, dtype=D), torch.ones(2, dtype=D))
    assert "non-finite" in str(e.value) and "nan > nan" not in str(e.value)


def test_converged_with_tol_zero_means_working_accuracy():
    T = lambda u, x: 0.5 * u + x  # noqa: E731
    one = torch.ones(2, dtype=D)
    _, many = hp.GKMSolver(T, max_steps=80, tol=0.0).solve(torch.zeros(2, dtype=D), one)
    _, few = hp.GKMSolver(T, max_steps=5, tol=0.0).solve(torch.zeros(2, dtype=D), one)
    assert many.steps == 80 and many.converged  # 0.5^80 << 1e-10
    assert few.steps == 5 and not few.converged  # residual 0.5^4 = 6e-2


# -- torch.func: vmap / grad / jacrev / jacfwd through unrolled and truncated solves ---------------
def _affine_K(a, x, K):
    """u_K of u <- a u + x from 0: x (1 - a^K) / (1 - a)."""
    return x * (1 - a**K) / (1 - a)


@pytest.mark.parametrize("mode", ["unrolled", "truncated"])
def test_vmap_over_x_matches_per_sample_and_closed_form(mode):
    a = torch.tensor([0.5, 0.9, 0.99], dtype=D)  # per-coordinate contraction, so samples differ

    def T(u, x):
        return a * u + x

    xs = torch.tensor([[1.0, 2.0, 3.0], [1e-3, -1.0, 0.5], [0.0, 0.0, 0.0], [4.0, 1.0, -2.0]], dtype=D)
    solver = hp.GKMSolver(T, max_steps=3000, tol=1e-9, hypergrad=mode, check_every=7, **_opts(mode))
    batched = torch.func.vmap(lambda x: solver(torch.zeros(3, dtype=D), x))(xs)
    looped = torch.stack([solver(torch.zeros(3, dtype=D), x) for x in xs])
    assert torch.allclose(batched, looped, rtol=0, atol=1e-14)
    assert torch.allclose(batched, xs / (1 - a), rtol=1e-5, atol=1e-12)  # error <= tol |u| / (1 - 0.99)


def test_vmap_of_exact_K_steps_and_grad_transforms():
    K = 25

    def T(u, x):
        return 0.5 * u + x

    solver = hp.GKMSolver(T, max_steps=K, tol=0.0, hypergrad="unrolled")
    xs = torch.randn(6, 4, dtype=D, generator=torch.Generator().manual_seed(0))
    out = torch.func.vmap(lambda x: solver(torch.zeros(4, dtype=D), x))(xs)
    assert torch.allclose(out, _affine_K(0.5, xs, K), rtol=1e-14)
    c = (1 - 0.5**K) / 0.5
    f = lambda x: (solver(torch.zeros(4, dtype=D), x) ** 2).sum()  # noqa: E731
    g = torch.func.grad(f)(xs[0])
    assert torch.allclose(g, 2 * c * c * xs[0], rtol=1e-12)
    J = torch.func.jacrev(lambda x: solver(torch.zeros(4, dtype=D), x))(xs[0])
    Jf = torch.func.jacfwd(lambda x: solver(torch.zeros(4, dtype=D), x))(xs[0])
    eye = torch.eye(4, dtype=D)
    assert torch.allclose(J, c * eye, rtol=1e-12) and torch.allclose(Jf, c * eye, rtol=1e-12)
    per_sample = torch.func.vmap(torch.func.grad(f))(xs)
    assert torch.allclose(per_sample, 2 * c * c * xs, rtol=1e-12)


def test_vmap_early_stop_gradients_match_per_sample():
    # tol > 0: samples stop at different checks; the gradient is that of each sample's own K_i-step map
    def T(u, x):
        return 0.8 * u + x

    solver = hp.GKMSolver(T, max_steps=500, tol=1e-6, hypergrad="unrolled", check_every=3)
    xs = torch.tensor([[1.0], [1e-9], [100.0]], dtype=D)
    f = lambda x: solver(torch.zeros(1, dtype=D), x).sum()  # noqa: E731
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

    xs = torch.tensor([[0.5], [2.0]], dtype=D)
    out = torch.func.vmap(lambda x: hp.GKMSolver(T, hypergrad="unrolled")(torch.zeros(1, dtype=D), x))(xs)
    assert torch.allclose(out[0], torch.tensor([2.0], dtype=D)) and torch.isnan(out[1]).all()


# -- issue 14: per-sample convergence with batch_dims ------------------------------------------------
def _batch_problem(conds, n=8, seed=0):
    Qs, Ls = zip(*(spd(n, c, seed=seed + i) for i, c in enumerate(conds)))
    Q, L = torch.stack(Qs), torch.stack(Ls)
    b = torch.randn(len(conds), n, dtype=D, generator=torch.Generator().manual_seed(seed))
    return Q, L, b


@pytest.mark.parametrize("accel", [None, "anderson"])
def test_batch_dims_each_sample_equals_its_own_solve(accel):
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
            torch.zeros(8, dtype=D), b[i])
        if accel is None:  # bitwise the same iteration
            assert int(info.steps_per_sample[i]) == inf_i.steps
            assert torch.allclose(u[i], ui, rtol=1e-12, atol=1e-14)
        else:  # batched vs single small least squares round differently: equal to the tolerance
            assert abs(int(info.steps_per_sample[i]) - inf_i.steps) <= 10
            assert float((u[i] - ui).norm() / ui.norm()) < 1e-7
    # the slow sample (cond 300) does not hold the others back
    assert int(info.steps_per_sample[2]) > 5 * int(info.steps_per_sample[0])


def test_batch_slow_sample_does_not_change_the_others():
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


def test_batch_unconverged_sample_is_named():
    Q, L, b = _batch_problem([2.0, 1000.0])

    def T(u, x):
        return u - torch.einsum("bij,bj->bi", Q, u) / L[:, None] + x / L[:, None]

    with pytest.warns(hp.ConvergenceWarning, match=r"1 of 2 samples, e.g. \[1\]"):
        _, info = hp.GKMSolver(T, max_steps=200, batch_dims=1).solve(torch.zeros_like(b), b)
    assert info.converged_per_sample.tolist() == [True, False]


def test_batch_dims_unrolled_gradient_is_each_samples_own_K_step_map():
    a = torch.tensor([[0.5], [0.9], [0.99]], dtype=D)  # per-sample contraction: samples stop at different k

    def T(u, x):
        return a * u + x

    x = torch.ones(3, 2, dtype=D, requires_grad=True)
    solver = hp.GKMSolver(T, max_steps=5000, tol=1e-8, batch_dims=1, hypergrad="unrolled", check_every=1)
    u = solver(torch.zeros(3, 2, dtype=D), x)
    u.sum().backward()
    K = solver.info.steps_per_sample.to(D).unsqueeze(-1)
    assert torch.allclose(u, _affine_K(a, x.detach(), K), rtol=1e-12)  # u_K of each sample's own K
    assert torch.allclose(x.grad, ((1 - a**K) / (1 - a)).expand(3, 2), rtol=1e-12)
    assert len(set(solver.info.steps_per_sample.tolist())) == 3
