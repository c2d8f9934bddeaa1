"""Both accelerators per sample (``batch_dims``), under ``vmap``, and through the common interface:
fixed points against closed forms and a tight plain iteration, each sample as if solved alone,
restarts, safeguards, NaN, implicit hypergradients against closed forms."""

from __future__ import annotations

import math
import warnings
from collections import Counter

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import hodl_plugin as hp

D = torch.float64
ACCS = {"anderson": lambda: hp.Anderson(6), "broyden": lambda: hp.Broyden(20)}


def make(kind, path="auto"):
    """``path``: "auto" (the default), "host" (numpy decisions; the compiled loop where numba is
    installed), "numpy" (the host path without the compiled loop), "masked" (torch only)."""
    acc = ACCS[kind]()
    if path != "auto":
        acc._host_decisions = path in ("host", "numpy")
    if path == "numpy":
        acc._compiled = False
    return acc


def affine_batch(B=6, n=12, seed=0):
    """T_b(u) = A_b u + c_b with per-sample contractions from 0.5 to 0.97: u*_b = (I - A_b)⁻¹ c_b."""
    g = torch.Generator().manual_seed(seed)
    Q = torch.linalg.qr(torch.randn(B, n, n, generator=g, dtype=D))[0]
    rho = torch.linspace(0.5, 0.97, B, dtype=D)
    A = rho[:, None, None] * Q
    c = torch.randn(B, n, generator=g, dtype=D)
    exact = torch.linalg.solve(torch.eye(n, dtype=D) - A, c)
    return A, c, exact


def tanh_batch(B=8, n=16, c=0.95, seed=1):
    g = torch.Generator().manual_seed(seed)
    W = c * torch.linalg.qr(torch.randn(n, n, generator=g, dtype=D))[0]
    x = 0.3 * torch.randn(B, n, generator=g, dtype=D)
    return W, x


def tight_plain(T, x, u0):
    """The reference: plain fixed-point iteration to ‖T(u) - u‖ ≤ 1e-15 (a contraction: independent of
    any accelerator)."""
    u = u0.clone()
    for _ in range(100000):
        u_new = T(u, x)
        if float((u_new - u).abs().max()) <= 1e-15:
            return u_new
        u = u_new
    raise AssertionError("reference did not converge")


def bsolve(kind, T, u0, *params, path="auto", **kw):
    kw = {"max_steps": 20000, "tol": 1e-11, "batch_dims": 1, **kw}
    with torch.no_grad():
        return hp.GKMSolver(T, acceleration=make(kind, path), **kw).solve(u0, *params)


# ---------------------------------------------------------------------------- fixed points, per sample
@pytest.mark.parametrize("path", ["host", "numpy", "masked"])
@pytest.mark.parametrize("kind", ["anderson", "broyden"])
def test_per_sample_affine_fixed_points_are_the_closed_forms(kind, path):
    A, c, exact = affine_batch()
    T = lambda u, c: torch.einsum("bij,bj->bi", A, u) + c  # noqa: E731
    u, info = bsolve(kind, T, torch.zeros_like(c), c, path=path)
    assert info.converged and info.converged_per_sample.all()
    err = (u - exact).norm(dim=1) / exact.norm(dim=1)
    assert float(err.max()) < 1e-9, err  # relative residual 1e-11, 1/(1 - 0.97) amplification
    with torch.no_grad():
        _, plain = hp.GKMSolver(T, max_steps=20000, tol=1e-11, batch_dims=1).solve(torch.zeros_like(c), c)
    # the hardest sample (contraction 0.97, rotation-like spectrum): plain KM needs ~ln(1e11)/0.03 steps
    assert info.steps < 0.5 * plain.steps, (info.steps, plain.steps)
    assert bool((info.steps_per_sample[1:] >= info.steps_per_sample[:1]).all())  # easy samples stop first


@pytest.mark.parametrize("path", ["host", "numpy", "masked"])
@pytest.mark.parametrize("kind", ["anderson", "broyden"])
def test_per_sample_tanh_equilibria_match_a_tight_plain_iteration(kind, path):
    W, x = tanh_batch()
    T = lambda z, x: torch.tanh(z @ W.T + x)  # noqa: E731
    ref = tight_plain(T, x, torch.zeros_like(x))
    u, info = bsolve(kind, T, torch.zeros_like(x), x, path=path)
    assert info.converged
    assert float(((u - ref).norm(dim=1) / ref.norm(dim=1)).max()) < 1e-9


@pytest.mark.parametrize("kind", ["anderson", "broyden"])
def test_each_sample_as_if_solved_alone(kind):
    """Per-sample coefficients, restarts and stopping: the batch gives every sample the iterate and the
    step count of its own one-problem solve."""
    W, x = tanh_batch(B=5, c=0.99)
    T = lambda z, x: torch.tanh(z @ W.T + x)  # noqa: E731
    u, info = bsolve(kind, T, torch.zeros_like(x), x, check_every=1)
    for b in range(5):
        with torch.no_grad():
            ub, ib = hp.GKMSolver(T, max_steps=20000, tol=1e-11, check_every=1, acceleration=make(kind)).solve(
                torch.zeros_like(x[b]), x[b])
        assert int(info.steps_per_sample[b]) == ib.steps, (b, info.steps_per_sample.tolist(), ib.steps)
        assert float((u[b] - ub).norm() / ub.norm()) < 1e-12
    assert len(set(info.steps_per_sample.tolist())) > 1  # the samples really stop at different steps


@pytest.mark.parametrize("kind", ["anderson", "broyden"])
def test_host_and_masked_paths_take_the_same_steps(kind):
    W, x = tanh_batch(B=4, c=0.99)
    T = lambda z, x: torch.tanh(z @ W.T + x)  # noqa: E731
    uh, ih = bsolve(kind, T, torch.zeros_like(x), x, path="host", check_every=1)
    um, im = bsolve(kind, T, torch.zeros_like(x), x, path="masked", check_every=1)
    assert torch.equal(ih.steps_per_sample, im.steps_per_sample)
    assert torch.allclose(uh, um, rtol=1e-12, atol=1e-14)


# ------------------------------------------------------------------- vmap, implicit hypergradients
@pytest.mark.parametrize("kind", ["anderson", "broyden"])
def test_vmap_equals_the_batch(kind):
    W, x = tanh_batch(B=4, c=0.95)
    T = lambda z, x: torch.tanh(W @ z + x)  # noqa: E731
    solver = hp.GKMSolver(T, max_steps=5000, tol=1e-12, hypergrad="first_order", acceleration=make(kind))
    with torch.no_grad():
        out = torch.func.vmap(lambda xb: solver(torch.zeros(16, dtype=D), xb))(x)
    ref = tight_plain(lambda z, x: torch.tanh(z @ W.T + x), x, torch.zeros_like(x))
    assert torch.allclose(out, ref, rtol=1e-9, atol=1e-12)
    ub, _ = bsolve(kind, lambda z, x: torch.tanh(z @ W.T + x), torch.zeros_like(x), x, tol=1e-12)
    assert torch.allclose(out, ub, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("kind", ["anderson", "broyden"])
@pytest.mark.parametrize("mode", ["implicit", "inexact"])
def test_per_sample_implicit_hypergradient_closed_form(kind, mode):
    """F = Σ_b ½‖u*_b‖², u*_b = (I - A_b)⁻¹ x_b: ∇_x F = (I - A_b)⁻ᵀ u*_b."""
    A, c, exact_u = affine_batch(B=4, n=10, seed=3)
    T = lambda u, x: torch.einsum("bij,bj->bi", A, u) + x  # noqa: E731
    x = c.clone().requires_grad_(True)
    opts = {"eps": 1e-11, "constants": None} if mode == "inexact" else {"tol": 1e-12}
    solver = hp.GKMSolver(T, max_steps=20000, batch_dims=1, hypergrad=mode, acceleration=make(kind), **opts)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", hp.ConvergenceWarning)
        u = solver(torch.zeros_like(c), x)
    (0.5 * (u**2).sum()).backward()
    exact = torch.linalg.solve(torch.eye(10, dtype=D) - A.transpose(1, 2), exact_u)
    assert float((x.grad - exact).norm() / exact.norm()) < 1e-8


# ------------------------------------------------------------------- safeguards, restarts, NaN (by hand)
def drive(acc, us_fs, beta=0.7, batch_dims=1):
    """Feed the state machine the given (u, f) pairs; return the state and the outputs."""
    st = acc.init(us_fs[0][0], batch_dims)
    outs = [acc.step(st, u, f, f.norm(dim=-1) if batch_dims else f.norm(), beta) for u, f in us_fs]
    return st, outs


@pytest.mark.parametrize("path", ["host", "numpy", "masked"])
@pytest.mark.parametrize("kind", ["anderson", "broyden"])
def test_safeguard_rejects_one_sample_and_leaves_the_others_alone(kind, path):
    a = torch.tensor([[0.5, 0.6, 0.7, 0.8, 0.9], [0.9, 0.8, 0.7, 0.6, 0.5]], dtype=D)
    c = torch.tensor([[1.0, -2.0, 0.5, 3.0, -1.0], [0.3, 0.1, -0.4, 1.0, 2.0]], dtype=D)
    acc, solo = make(kind, path), make(kind, path)
    acc.safeguard = solo.safeguard = 2.0
    st, st1 = acc.init(torch.zeros(2, 5, dtype=D), 1), solo.init(torch.zeros(1, 5, dtype=D), 1)
    u = torch.zeros(2, 5, dtype=D)
    pts = []
    for _ in range(3):
        f = a * u + c - u
        pts.append((u, f))
        u1 = solo.step(st1, u[1:], f[1:], f[1:].norm(dim=1), 0.7)
        u = acc.step(st, u, f, f.norm(dim=1), 0.7)
        assert torch.allclose(u[1:], u1, rtol=1e-13, atol=1e-15)  # sample 1 as if alone
    f = a * u + c - u
    f[0] = 100 * pts[-1][1][0].norm() / 5**0.5  # sample 0: a residual 100x the last accepted one
    out = acc.step(st, u, f, f.norm(dim=1), 0.7)
    u2, f2 = pts[-1]
    assert torch.allclose(out[0], u2[0] + 0.7 * f2[0], rtol=0, atol=1e-15)  # KM step of the last accepted point
    assert torch.allclose(out[1], solo.step(st1, u[1:], f[1:], f[1:].norm(dim=1), 0.7)[0], rtol=1e-13, atol=1e-15)
    assert [int(v) for v in st.restarts] == [1, 0]
    memory = torch.as_tensor(st.W if kind == "anderson" else st.A)
    assert float(memory[0].abs().sum()) == 0.0 and float(memory[1].abs().sum()) > 0  # only sample 0 forgot


@pytest.mark.parametrize("path", ["host", "numpy", "masked"])
@pytest.mark.parametrize("kind", ["anderson", "broyden"])
def test_nan_in_one_sample_diverges_that_sample_only(kind, path):
    A, c, exact = affine_batch(B=3, n=8, seed=4)

    def T(u, x):
        out = torch.einsum("bij,bj->bi", A, u) + x
        bad = torch.zeros_like(out[:, :1], dtype=torch.bool)
        bad[1] = (u[1].abs().sum() > 0.5 * exact[1].abs().sum())  # sample 1: NaN once halfway there
        return torch.where(bad, torch.full_like(out, math.nan), out)

    with pytest.warns(hp.ConvergenceWarning, match=r"batch samples \[1\].*non-finite"):
        u, info = bsolve(kind, T, torch.zeros_like(c), c, path=path, on_divergence="warn")
    assert info.diverged and info.converged_per_sample.tolist() == [True, False, True]
    assert torch.isfinite(u).all()  # the diverged sample keeps its last finite iterate
    for b in (0, 2):
        assert float((u[b] - exact[b]).norm() / exact[b].norm()) < 1e-9


@pytest.mark.parametrize("path", ["host", "numpy", "masked"])
def test_per_sample_anderson_step_is_the_ridge_least_squares_of_its_own_history(path):
    """Every sample's step is u + βf - (ΔU + βΔF)γ with γ = argmin ‖f - ΔFγ‖² + λ‖Dγ‖², D the column norms
    of its last m differences (a dense least-squares solve per sample, past the ring buffer's wrap); a
    sample fed the same point again (frozen by the loop) takes the plain step and is not restarted, and
    when it moves again its zero difference is a decoupled column (γ_j = 0), not a singular matrix."""
    B, n, m, beta = 3, 7, 3, 0.7
    g = torch.Generator().manual_seed(11)
    A = torch.linspace(0.6, 0.95, B, dtype=D)[:, None, None] * torch.linalg.qr(torch.randn(B, n, n, generator=g,
                                                                                           dtype=D))[0]
    c = torch.randn(B, n, generator=g, dtype=D)
    acc = hp.Anderson(m, regularization=1e-4, restart_cond=1e30)
    acc._host_decisions = path in ("host", "numpy")
    acc._compiled = path != "numpy"
    u = torch.zeros(B, n, dtype=D)
    st = acc.init(u, 1)
    hist = []
    for k in range(9):
        f = torch.einsum("bij,bj->bi", A, u) + c - u
        if k == 5:  # sample 2 frozen: the same point as the step before
            u, f = torch.cat([u[:2], hist[-1][0][2:]]), torch.cat([f[:2], hist[-1][1][2:]])
        out = acc.step(st, u, f, f.norm(dim=1), beta)
        hist.append((u, f))
        if k == 5:
            assert torch.allclose(out[2], hist[-1][0][2] + beta * hist[-1][1][2], rtol=0, atol=1e-15)
        if k >= 1:
            for b in range(B if k != 5 else 2):
                us = torch.stack([h[0][b] for h in hist[-m - 1:]])
                fs = torch.stack([h[1][b] for h in hist[-m - 1:]])
                dU, dF = (us[1:] - us[:-1]).T, (fs[1:] - fs[:-1]).T
                d = dF.norm(dim=0)
                lhs = torch.cat([dF, acc.regularization**0.5 * torch.diag(d)])
                rhs = torch.cat([f[b], torch.zeros(len(d), dtype=D)])
                gamma = torch.linalg.lstsq(lhs, rhs, driver="gelsd").solution  # (min-norm: a zero column gets 0)
                ref = u[b] + beta * f[b] - (dU + beta * dF) @ gamma
                assert torch.allclose(out[b], ref, rtol=1e-9, atol=1e-12), (k, b, (out[b] - ref).abs().max())
        u = out
    assert [int(v) for v in st.restarts] == [0, 0, 0]


# ------------------------------------------------------------------------------ cost of a step
class Count(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("kind", ["anderson", "broyden"])
@pytest.mark.parametrize("path, most", [("auto", 6), ("masked", 70)])
def test_per_sample_step_operations_and_no_sync(kind, path, most):
    """On the CPU the default is the host path, which computes in numpy (a handful of torch calls per
    step: views in, one tensor out); the masked path is pure torch and never reads the device (no
    ``_local_scalar_dense``)."""
    W, x = tanh_batch(B=16, n=50, c=0.99)
    acc = make(kind, path)
    u = torch.zeros_like(x)
    st = acc.init(u, 1)
    for _ in range(12):
        f = torch.tanh(u @ W.T + x) - u
        u = acc.step(st, u, f, f.norm(dim=1), 1.0)
    f = torch.tanh(u @ W.T + x) - u
    r = f.norm(dim=1)
    with Count() as cnt:
        acc.step(st, u, f, r, 1.0)
    assert sum(cnt.ops.values()) <= most, cnt.ops
    assert cnt.ops["aten._local_scalar_dense.default"] == 0, cnt.ops


# ------------------------------------------------------------------------------ the interface
def test_a_custom_accelerator_through_the_base_class():
    class KM(hp.acceleration.Accelerator):
        def init(self, u, batch_dims):
            return None

        def step(self, state, u, f, r, beta):
            return u + 0.5 * f

    u, info = hp.GKMSolver(lambda u: 0.5 * u + 1.0, tol=1e-12, acceleration=KM()).solve(torch.zeros(3, dtype=D))
    assert info.converged and torch.allclose(u, torch.full((3,), 2.0, dtype=D))
    with pytest.raises(ValueError, match="acceleration"):
        hp.GKMSolver(lambda u: u, hypergrad="unrolled", acceleration=KM())


def test_non_accelerators_are_refused_by_name():
    with pytest.raises(TypeError, match="acceleration must be None or an accelerator"):
        hp.GKMSolver(lambda u: u, acceleration="anderson")


@pytest.mark.parametrize("restart_cond", [1e8, math.inf])
@pytest.mark.parametrize("kind", ["anderson", "broyden"])
def test_report_counts_steps_and_no_restart_for_frozen_samples(kind, restart_cond):
    """The samples stop at different steps and the loop keeps them frozen: a sample that does not move
    is neither updated nor restarted."""
    W, x = tanh_batch(B=3)
    acc = make(kind)
    acc.restart_cond = restart_cond
    with torch.no_grad():
        _, info = hp.GKMSolver(lambda z, x: torch.tanh(z @ W.T + x), max_steps=2000, tol=1e-11, batch_dims=1,
                               check_every=1, acceleration=acc).solve(torch.zeros_like(x), x)
    assert len(set(info.steps_per_sample.tolist())) > 1
    assert info.steps - 1 <= info.accelerated <= info.steps and info.restarts == 0  # (the stopping step's proposal)


@pytest.mark.parametrize("path", ["host", "numpy", "masked"])
def test_per_sample_anderson_restart_on_a_degenerate_sample_only(path):
    """Sample 0's iterates stay on one line (T(u) = c + ½(u·e)e, e = c/‖c‖): its second difference is
    parallel to the first and Anderson's scaled Gram matrix is singular up to the ridge (Broyden's
    counterpart is in test_broyden.py); sample 1 is generic."""
    kind = "anderson"
    e = torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=D)
    A1 = torch.tensor([[0.5, 0.2, 0.0, 0.1], [0.0, 0.6, 0.3, 0.0], [0.1, 0.0, 0.7, 0.2], [0.0, 0.1, 0.0, 0.4]], dtype=D)
    c = torch.tensor([[2.0, 0.0, 0.0, 0.0], [1.0, -1.0, 0.5, 2.0]], dtype=D)

    def T(u):
        return torch.stack([c[0] + 0.5 * (u[0] @ e) * e, A1 @ u[1] + c[1]])

    acc = make(kind, path)
    u = torch.zeros(2, 4, dtype=D)
    st = acc.init(u, 1)
    for _ in range(6):
        f = T(u) - u
        u = acc.step(st, u, f, f.norm(dim=1), 1.0)
    restarts = [int(v) for v in st.restarts]
    assert restarts[0] >= 1 and restarts[1] == 0, restarts
    assert torch.allclose(u[0], torch.tensor([4.0, 0, 0, 0], dtype=D), rtol=1e-10)  # 1-D: exact after restarts


@pytest.mark.parametrize("path", ["host", "numpy", "masked"])
@pytest.mark.parametrize("kind", ["anderson", "broyden"])
def test_two_batch_dims_reach_the_closed_forms(kind, path):
    A, c, exact = affine_batch(B=6, n=9, seed=6)
    T = lambda u, c: (torch.einsum("bij,bj->bi", A, u.reshape(6, 9)) + c.reshape(6, 9)).reshape(2, 3, 9)  # noqa: E731
    u, info = bsolve(kind, T, torch.zeros(2, 3, 9, dtype=D), c.reshape(2, 3, 9), path=path, batch_dims=2)
    assert info.converged and info.steps_per_sample.shape == (2, 3)
    err = (u.reshape(6, 9) - exact).norm(dim=1) / exact.norm(dim=1)
    assert float(err.max()) < 1e-9, err


@pytest.mark.parametrize("kind", ["anderson", "broyden"])
def test_float32_batch(kind):
    A, c, exact = affine_batch(B=3, n=10, seed=5)
    T = lambda u, x: torch.einsum("bij,bj->bi", A.float(), u) + x  # noqa: E731
    u, info = bsolve(kind, T, torch.zeros(3, 10), c.float(), tol=None)
    assert info.converged and u.dtype == torch.float32
    # relative residual 1e-5 (float32's default), amplified up to 1/(1 - 0.97) = 33 into the error
    assert float(((u.double() - exact).norm(dim=1) / exact.norm(dim=1)).max()) < 1e-3


@pytest.mark.parametrize("kind", ["anderson", "broyden"])
@pytest.mark.parametrize("shape, batch_dims", [((0,), 0), ((3, 0), 0), ((3, 0), 1), ((0, 4), 1)])
def test_problems_without_entries_are_solved_at_once(kind, shape, batch_dims):
    """u of no entries: solved, nothing returned (the host norms measured empty rows 'again, scaled' and
    raised numpy's 'zero-size array to reduction operation')."""
    x = torch.ones(shape, dtype=D)
    u, info = hp.GKMSolver(lambda u, x: 0.5 * u + x, tol=1e-12, batch_dims=batch_dims,
                           acceleration=make(kind)).solve(torch.zeros(shape, dtype=D), x)
    assert info.converged and u.shape == shape and info.steps == 0


@pytest.mark.parametrize("kind", ["anderson", "broyden"])
@pytest.mark.parametrize("name, value", [("history_size", 0), ("history_size", 2.5), ("mixing", 0.0),
                                         ("safeguard", -1.0), ("restart_cond", math.nan)])
@pytest.mark.parametrize("batch_dims", [0, 1])
def test_options_changed_after_construction_are_checked_at_the_solve(kind, name, value, batch_dims):
    """An accelerator's attribute set after construction skipped the constructor's checks (history_size=0
    raised a raw ZeroDivisionError, mixing=0 or safeguard=-1 ran): every solve checks them again."""
    acc = make(kind)
    setattr(acc, name, value)
    x = torch.ones(2, 3, dtype=D)
    with pytest.raises(ValueError, match=name):
        hp.GKMSolver(lambda u, x: 0.5 * u + x, tol=1e-12, batch_dims=batch_dims, acceleration=acc).solve(
            torch.zeros_like(x), x)


@pytest.mark.parametrize("kind", ["anderson", "broyden"])
def test_a_compiled_loop_that_cannot_run_falls_back_to_numpy(kind, monkeypatch):
    """Where numba cannot type the arguments (it raises before the loop runs), the state drops its compiled
    step and the numpy step runs: the same fixed points, the same steps as the numpy path."""
    from hodl_plugin.acceleration import _kernels

    def refuse(*args):
        raise TypeError("no matching definition")

    A, c, exact = affine_batch()
    T = lambda u, c: torch.einsum("bij,bj->bi", A, u) + c  # noqa: E731
    _, ref = bsolve(kind, T, torch.zeros_like(c), c, path="numpy")
    monkeypatch.setattr(_kernels, kind, lambda: refuse)
    u, info = bsolve(kind, T, torch.zeros_like(c), c, path="host")
    assert info.converged and torch.equal(info.steps_per_sample, ref.steps_per_sample)
    assert torch.allclose(u, exact, rtol=1e-9, atol=0)


def test_no_compiled_loop_where_numba_would_run_it_as_python(monkeypatch):
    """NUMBA_DISABLE_JIT=1 makes numba run the loops as Python (far slower than numpy): no compiled loop."""
    numba = pytest.importorskip("numba")
    from hodl_plugin.acceleration import _kernels

    monkeypatch.setattr(numba.config, "DISABLE_JIT", True)
    assert _kernels._compile(_kernels._row_norms) is None
    monkeypatch.setattr(numba.config, "DISABLE_JIT", False)
    assert _kernels._compile(_kernels._row_norms) is not None
    njit = numba.njit

    def no_cache_dir(*args, cache=False, **kw):  # numba's error where no cache directory is writable
        if cache:
            raise RuntimeError("cannot cache function: no locator available")
        return njit(*args, **kw)

    monkeypatch.setattr(numba, "njit", no_cache_dir)
    norms = _kernels._compile(_kernels._row_norms)  # compiled without a disk cache
    r = np.empty(2)
    assert norms(np.array([[3.0, 4.0], [0.0, 1.0]]), r, 1e-3, 1e3) and r.tolist() == [5.0, 1.0]
