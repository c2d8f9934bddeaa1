"""Anderson acceleration: fixed points and hypergradients against closed forms / Newton,
step counts against plain KM to the same relative tolerance, refusals, batching, safeguards."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import hodl_plugin as hp

D = torch.float64


def spd(n, cond, seed=0):
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=D))
    ev = torch.logspace(0, math.log10(cond), n, dtype=D)
    return (U * ev) @ U.T, float(ev.max())


@pytest.fixture(scope="module")
def quadratic():
    """T(u; x) = u - (Q u - x)/L, Q SPD of condition 1e3, n = 500: u* = Q⁻¹x."""
    Q, L = spd(500, 1e3)
    b = torch.randn(500, dtype=D, generator=torch.Generator().manual_seed(1))
    return Q, L, b


@pytest.fixture(scope="module")
def tanh_eq():
    """u = tanh(A u + x), A nonsymmetric (I - Q/L + 0.01 K, K skew) scaled to ||A||_2 = 1, n = 100."""
    Q, L = spd(100, 1e3, seed=2)
    K = torch.randn(100, 100, dtype=D, generator=torch.Generator().manual_seed(3))
    K = (K - K.T) / torch.linalg.matrix_norm(K - K.T, 2)
    A = torch.eye(100, dtype=D) - Q / L + 0.01 * K
    A = A / torch.linalg.matrix_norm(A, 2)
    x = 0.01 * torch.randn(100, dtype=D, generator=torch.Generator().manual_seed(4))
    return A, x


def newton(A, x, iters=50):
    """The tanh equilibrium by Newton's method on u - tanh(Au + x) = 0 (independent reference)."""
    u = torch.zeros_like(x)
    for _ in range(iters):
        z = A @ u + x
        J = torch.eye(len(x), dtype=D) - (1 - torch.tanh(z) ** 2)[:, None] * A
        u = u - torch.linalg.solve(J, u - torch.tanh(z))
    return u


def solve(T, x, acc, tol=1e-9, **kw):
    solver = hp.GKMSolver(T, max_steps=100000, tol=tol, acceleration=acc, **kw)
    return solver.solve(torch.zeros_like(x), x)


def test_quadratic_fixed_point_and_step_ratio(quadratic):
    Q, L, b = quadratic

    def T(u, x):
        return u - (Q @ u - x) / L

    exact = torch.linalg.solve(Q, b)
    u_plain, plain = solve(T, b, None)
    u_aa, aa = solve(T, b, hp.Anderson(history_size=5))
    assert plain.converged and aa.converged
    for u in (u_plain, u_aa):  # relative residual 1e-9, condition 1e3: error <= 1e-6
        assert float((u - exact).norm() / exact.norm()) < 2e-6
    ratio = aa.steps / plain.steps
    assert ratio <= 0.2, (aa.steps, plain.steps)  # measured 2090 / 12830 = 0.163


def test_tanh_equilibrium_fixed_point_and_step_ratio(tanh_eq):
    A, x = tanh_eq

    def T(u, x):
        return torch.tanh(A @ u + x)

    ref = newton(A, x)
    u_plain, plain = solve(T, x, None)
    u_aa, aa = solve(T, x, hp.Anderson(history_size=5))
    for u in (u_plain, u_aa):
        assert float((u - ref).norm() / ref.norm()) < 1e-6
    assert aa.steps / plain.steps <= 0.5, (aa.steps, plain.steps)  # measured 210 / 1090 = 0.19


@pytest.mark.parametrize("mode", ["implicit", "inexact", "first_order"])
def test_hypergradient_with_accelerated_forward(tanh_eq, mode):
    A, x0 = tanh_eq

    def T(u, x):
        return torch.tanh(A @ u + x)

    ref = newton(A, x0)
    D_ = 1 - torch.tanh(A @ ref + x0) ** 2
    dudx = torch.linalg.solve(torch.eye(100, dtype=D) - D_[:, None] * A, torch.diag(D_))
    exact = dudx.T @ ref  # F = ½‖u*‖²
    opts = {"eps": 1e-10, "constants": None} if mode == "inexact" else {}
    grads = []
    for acc in (None, hp.Anderson(5)):
        x = x0.clone().requires_grad_(True)
        tol = {} if mode == "inexact" else {"tol": 1e-12}  # inexact: its eps in opts
        solver = hp.GKMSolver(T, max_steps=100000, hypergrad=mode, acceleration=acc, **tol, **opts)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", hp.ConvergenceWarning)
            u = solver(torch.zeros(100, dtype=D), x)
        (0.5 * (u**2).sum()).backward()
        grads.append(x.grad)
    assert float((grads[0] - grads[1]).norm() / grads[0].norm()) < 1e-6  # accelerated = plain forward
    if mode != "first_order":
        assert float((grads[1] - exact).norm() / exact.norm()) < 1e-6  # measured 3e-10 / 1e-8 (inexact)


def test_quadratic_hypergradient_closed_form():
    Q, L = spd(60, 1e3, seed=5)
    y = torch.randn(60, dtype=D, generator=torch.Generator().manual_seed(6))

    def T(u, x):
        return u - (Q @ u - x) / L

    x = torch.randn(60, dtype=D, generator=torch.Generator().manual_seed(7), requires_grad=True)
    solver = hp.GKMSolver(T, max_steps=50000, tol=1e-12, solver="cg", acceleration=hp.Anderson(5))
    u = solver(torch.zeros(60, dtype=D), x)
    (0.5 * ((u - y) ** 2).sum()).backward()
    us = torch.linalg.solve(Q, x.detach())
    exact = torch.linalg.solve(Q, us - y)
    assert float((x.grad - exact).norm() / exact.norm()) < 1e-8
    assert solver.info.steps < 5000  # plain KM: about 1e3 ln(1e12) = 27600


@pytest.mark.parametrize("mode", ["unrolled", "truncated"])
def test_refused_with_differentiated_iterations(mode):
    with pytest.raises(ValueError, match="acceleration"):
        hp.GKMSolver(lambda u, x: 0.5 * u + x, hypergrad=mode, acceleration=hp.Anderson())


def test_refused_with_aggregation_allowed_with_alpha_zero():
    F = lambda u, x: 0.5 * (u**2).sum()  # noqa: E731
    with pytest.raises(ValueError, match="aggregation"):
        hp.GKMSolver(lambda u, x: 0.5 * u + x, upper=F, acceleration=hp.Anderson())
    s = hp.GKMSolver(lambda u, x: 0.5 * u + x, upper=F, alpha=0, acceleration=hp.Anderson())
    assert torch.allclose(s(torch.zeros(2, dtype=D), torch.ones(2, dtype=D)), torch.full((2,), 2.0, dtype=D))


def test_refused_when_a_custom_method_runs_it_with_grad():
    class Through(hp.HypergradMethod):
        name = "through"

        def run(self, it, u0, params, info, max_steps, key=None):
            return it.run(u0, params, info, start=0, num_steps=max_steps)

    s = hp.GKMSolver(lambda u, x: 0.5 * u + x, hypergrad=Through(), acceleration=hp.Anderson())
    with pytest.raises(ValueError, match="without autograd"):
        s(torch.zeros(2, dtype=D), torch.ones(2, dtype=D, requires_grad=True))


@pytest.mark.parametrize(
    "kwargs", [dict(history_size=0), dict(history_size=2.5), dict(mixing=0.0), dict(mixing=1.5),
               dict(regularization=-1.0), dict(restart_cond=1.0), dict(safeguard=0.5)]
)
def test_bad_anderson_arguments(kwargs):
    name = next(iter(kwargs))
    with pytest.raises(ValueError, match=name):
        hp.Anderson(**kwargs)


@pytest.mark.parametrize("compiled", [True, False])
def test_history_larger_than_dimension_restarts_and_converges(compiled):
    # n = 3 < m = 8: the differences become linearly dependent once the iterate has converged; the scaled
    # Gram is singular up to the ridge and the torch path (compiled=False) restarts; the compiled batch-of-one
    # path sees the converged point not move (γ = 0, no restart); both return the closed form
    Q = torch.tensor([[3.0, 1.0, 0.0], [1.0, 2.0, 0.5], [0.0, 0.5, 1.0]], dtype=D)
    b = torch.tensor([1.0, -2.0, 0.5], dtype=D)
    acc = hp.Anderson(8)
    acc._compiled = compiled
    u, info = solve(lambda u, x: u - 0.25 * (Q @ u - x), b, acc, tol=1e-13)
    assert info.converged and torch.allclose(u, torch.linalg.solve(Q, b), rtol=1e-11)
    assert compiled or info.restarts >= 1


@pytest.mark.parametrize("compiled", [True, False])
def test_safeguard_falls_back_to_the_km_step_of_the_last_accepted_point(compiled):
    # drive the state machine by hand: T(u) = a ⊙ u + c, then a point whose residual is 100x larger
    acc = hp.Anderson(3, safeguard=2.0)
    acc._compiled = compiled
    a = torch.tensor([0.5, 0.6, 0.7, 0.8, 0.9], dtype=D)
    c = torch.tensor([1.0, -2.0, 0.5, 3.0, -1.0], dtype=D)
    u = torch.zeros(5, dtype=D)
    st = acc.init(u, 0)
    pts = []
    for _ in range(3):
        f = a * u + c - u
        pts.append((u, f))
        u = acc.step(st, u, f, f.norm(), 0.7)
    u2, f2 = pts[-1]
    assert int(st.restarts.max()) == 0 and float(torch.as_tensor(st.W).abs().sum()) > 0
    bad = 100 * f2.norm() * torch.ones(5, dtype=D) / 5**0.5
    out = acc.step(st, u, bad, bad.norm(), 0.7)
    assert torch.allclose(out, u2 + 0.7 * f2, rtol=0, atol=1e-15)  # the plain KM step from u2
    assert int(st.restarts.max()) == 1 and float(torch.as_tensor(st.W).abs().sum()) == 0.0  # history cleared
    f = a * out + c - out
    nxt = acc.step(st, out, f, 1e6 * f.norm(), 0.7)  # the fall-back point is accepted whatever its residual
    assert int(st.restarts.max()) == 1 and not torch.allclose(nxt, out + 0.7 * f)  # and extrapolated from


def test_accelerated_solve_under_vmap():
    A = torch.tensor([[0.9, 0.05], [0.0, 0.8]], dtype=D)
    solver = hp.GKMSolver(lambda u, x: A @ u + x, hypergrad="first_order", tol=1e-12, max_steps=150,
                          acceleration=hp.Anderson(3))
    xs = torch.randn(5, 2, dtype=D, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = torch.func.vmap(lambda x: solver(torch.zeros(2, dtype=D), x))(xs)
    exact = torch.linalg.solve(torch.eye(2, dtype=D) - A, xs.T).T
    assert torch.allclose(out, exact, rtol=1e-10, atol=1e-12)


def test_batched_and_float32(quadratic):
    Q, L = spd(40, 100.0, seed=9)
    b = torch.randn(3, 40, generator=torch.Generator().manual_seed(2))
    Qf = Q.float()
    u, info = hp.GKMSolver(lambda u, x: u - (u @ Qf - x) / L, max_steps=10000, batch_dims=1,
                           acceleration=hp.Anderson(5)).solve(torch.zeros(3, 40), b)
    exact = torch.linalg.solve(Q, b.double().T).T
    assert info.converged and float(((u.double() - exact).norm(dim=1) / exact.norm(dim=1)).max()) < 1e-3
    assert info.steps < 150


def test_anderson_adjoint_solver_against_dense_solve_and_plain_neumann(tanh_eq):
    from hodl_plugin import linear_solve as ls

    J = tanh_eq[0]  # nonsymmetric, spectral radius 0.9986: a slow Neumann series
    b = torch.randn(100, dtype=D, generator=torch.Generator().manual_seed(11))
    A = torch.eye(100, dtype=D) - J.T
    exact = torch.linalg.solve(A, b)
    x, info = ls.anderson_fixed_point(rtol=1e-10, maxiter=20000)(lambda v: A @ v, b)
    _, plain = ls.fixed_point(rtol=1e-10, maxiter=20000)(lambda v: A @ v, b)
    assert info.converged and float((x - exact).norm() / exact.norm()) < 1e-8
    assert info.iterations < 0.2 * plain.iterations, (info.iterations, plain.iterations)
    x0 = exact + 1e-3
    _, warm = ls.anderson_fixed_point(rtol=1e-10)(lambda v: A @ v, b, x0)
    assert warm.converged


def test_anderson_adjoint_in_implicit_mode(tanh_eq):
    A, x0 = tanh_eq
    ref = newton(A, x0)
    D_ = 1 - torch.tanh(A @ ref + x0) ** 2
    exact = torch.linalg.solve(torch.eye(100, dtype=D) - D_[:, None] * A, torch.diag(D_)).T @ ref
    x = x0.clone().requires_grad_(True)
    solver = hp.GKMSolver(lambda u, x: torch.tanh(A @ u + x), max_steps=100000, tol=1e-12, solver="anderson",
                          acceleration=hp.Anderson(5))
    (0.5 * (solver(torch.zeros(100, dtype=D), x) ** 2).sum()).backward()
    assert solver.info.adjoint.method == "anderson" and solver.info.adjoint.converged
    assert float((x.grad - exact).norm() / exact.norm()) < 1e-8


# ------------------------------------------------------------------------------ the three code paths
# one problem on the CPU takes the fast path with host decisions; forced off it takes the masked,
# sync-free fast path (the one CUDA tensors take); batch_dims takes the batched path
PATHS = ["host", "masked", "batched"]


def path_solve(path, T, x, m, tol, **kw):
    acc = hp.Anderson(m)
    if path == "masked":
        acc._host_decisions = False
    if path == "batched":
        u, info = hp.GKMSolver(lambda u, x: T(u[0], x[0])[None], max_steps=100000, tol=tol, acceleration=acc,
                               batch_dims=1, **kw).solve(torch.zeros(1, len(x), dtype=D), x[None])
        return u[0], info
    return hp.GKMSolver(T, max_steps=100000, tol=tol, acceleration=acc, **kw).solve(torch.zeros_like(x), x)


@pytest.mark.parametrize("path", PATHS)
def test_each_path_reaches_the_closed_form_with_few_steps(path):
    Q, L = spd(40, 300.0, seed=12)
    b = torch.randn(40, dtype=D, generator=torch.Generator().manual_seed(13))
    u, info = path_solve(path, lambda u, x: u - (Q @ u - x) / L, b, 5, 1e-11)
    exact = torch.linalg.solve(Q, b)
    assert info.converged and float((u - exact).norm() / exact.norm()) < 1e-8
    assert info.steps < 0.2 * 300 * math.log(1e11), info.steps  # plain KM: about cond · ln(1/tol)


@pytest.mark.parametrize("path", PATHS)
def test_each_path_restarts_on_dependent_differences(path):
    # the iterates stay in the first 3 of 6 dims (b and u0 = 0 live there): more than 3 differences are
    # dependent although the history (8, capped at n = 6) has room for them
    Q = torch.block_diag(torch.tensor([[3.0, 1.0, 0.0], [1.0, 2.0, 0.5], [0.0, 0.5, 1.0]], dtype=D),
                         torch.eye(3, dtype=D))
    b = torch.tensor([1.0, -2.0, 0.5, 0.0, 0.0, 0.0], dtype=D)
    u, info = path_solve(path, lambda u, x: u - 0.25 * (Q @ u - x), b, 8, 1e-13)
    assert info.converged and torch.allclose(u, torch.linalg.solve(Q, b), rtol=1e-11)
    assert info.restarts >= 1


@pytest.mark.parametrize("host", [True, False])
def test_fast_path_safeguard_falls_back_to_the_km_step(host):
    acc = hp.Anderson(3, safeguard=2.0)
    acc._host_decisions, acc._compiled = host, False  # the torch one-problem path (no numba, or a GPU)
    a = torch.tensor([0.5, 0.6, 0.7, 0.8, 0.9], dtype=D)
    c = torch.tensor([1.0, -2.0, 0.5, 3.0, -1.0], dtype=D)
    u = torch.zeros(5, dtype=D)
    st = acc.init(u, 0)
    assert st.host is host
    pts = []
    for _ in range(3):
        f = a * u + c - u
        pts.append((u, f))
        u = acc.step(st, u, f, f.norm(), 0.7)
    u2, f2 = pts[-1]
    assert int(st.restarts.max()) == 0 and float(torch.as_tensor(st.W).abs().sum()) > 0
    bad = 100 * f2.norm() * torch.ones(5, dtype=D) / 5**0.5
    out = acc.step(st, u, bad, bad.norm(), 0.7)
    assert torch.allclose(out, u2 + 0.7 * f2, rtol=0, atol=1e-15)  # the plain KM step from u2
    assert int(st.restarts.max()) == 1 and float(torch.as_tensor(st.W).abs().sum()) == 0.0  # history cleared
    assert torch.equal(st.G, torch.eye(3, dtype=D) * (1 + acc.regularization))
    f = a * out + c - out
    nxt = acc.step(st, out, f, 1e6 * f.norm(), 0.7)  # the fall-back point is accepted whatever its residual
    # one secant pair (from u2): the type-II step with γ = <Δf, f>/<Δf, Δf> (ridge 1e-10 aside)
    du, df = out - u2, f - f2
    gamma = float(df @ f / (df @ df))
    assert int(st.restarts) == 1
    assert torch.allclose(nxt, out + 0.7 * f - gamma * (du + 0.7 * df), rtol=1e-8, atol=1e-12)


def test_fast_path_gram_matrix_is_that_of_the_unit_scaled_differences():
    # after more steps than the history holds (the ring buffer wrapped), G = D⁻¹ΔFᵀΔF D⁻¹ + λI with
    # ΔF the last m residual differences (recomputed here from the iterates)
    torch.manual_seed(0)
    A = 0.9 * torch.linalg.qr(torch.randn(30, 30, dtype=D))[0]
    c = torch.randn(30, dtype=D)
    acc, m = hp.Anderson(4, restart_cond=1e30), 4
    acc._compiled = False  # the torch one-problem path (no numba, or a GPU)
    u = torch.zeros(30, dtype=D)
    st = acc.init(u, 0)
    fs = []
    for _ in range(11):  # the last pair goes to row 1: rows 2, 3 are older (the column update matters)
        f = A @ u + c - u
        fs.append(f)
        u = acc.step(st, u, f, f.norm(), 1.0)
    assert int(st.restarts) == 0
    dF = torch.stack([fs[k + 1] - fs[k] for k in range(len(fs) - m - 1, len(fs) - 1)])
    dF = dF / dF.norm(dim=1, keepdim=True)
    G = dF @ dF.T + acc.regularization * torch.eye(m, dtype=D)
    # same set of rows, in ring-buffer order: compare the sorted spectra and the diagonal
    for uplo in ("L", "U"):
        assert torch.allclose(torch.linalg.eigvalsh(st.G, UPLO=uplo), torch.linalg.eigvalsh(G), rtol=1e-10, atol=1e-12)
    assert torch.allclose(st.G.diagonal(), torch.full((m,), 1 + acc.regularization, dtype=D), rtol=1e-12)


@pytest.mark.parametrize("host, compiled, most, syncs",
                         [(True, False, 14, 1), (False, False, 40, 0), (None, None, 4, 0)])
def test_fast_path_operation_count_and_syncs(host, compiled, most, syncs):
    """The per-step cost on small problems is the number of tensor operations (measured: 13 and a numpy solve with
    host decisions, 38 masked, against 67 before the fast path; the default CPU path with numba, one compiled loop,
    reads the tensors as numpy views); the masked path never syncs."""
    from collections import Counter

    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops[str(func)] += 1
            return func(*args, **(kwargs or {}))

    acc = hp.Anderson(10)
    acc._host_decisions, acc._compiled = host, compiled
    if compiled is None and hp.acceleration._kernels.anderson() is None:
        pytest.skip("numba is not installed")
    A = 0.9 * torch.linalg.qr(torch.randn(50, 50, dtype=D, generator=torch.Generator().manual_seed(0)))[0]
    u = torch.zeros(50, dtype=D)
    st = acc.init(u, 0)
    for _ in range(20):
        f = A @ u + 1.0 - u
        u = acc.step(st, u, f, f.norm(), 1.0)
    f = A @ u + 1.0 - u
    r = f.norm()
    with Count() as c:
        acc.step(st, u, f, r, 1.0)
    assert sum(c.ops.values()) <= most, c.ops
    assert c.ops["aten._local_scalar_dense.default"] == syncs, c.ops


def test_benchmark_writes_the_readme_block_atomically(tmp_path):
    from benchmarks.anderson import BEGIN, END, markdown, write_readme

    rows = [dict(problem="q", method="plain", steps=100, steps_ratio=1.0, time_s=1.0, time_ratio=1.0, cpu_ratio=1.0,
                 error=1e-7),
            dict(problem="q", method="Anderson(5)", steps=16, steps_ratio=0.16, time_s=0.3, time_ratio=0.3,
                 cpu_ratio=0.29, error=2e-7)]
    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n{BEGIN}\nold numbers\n{END}\ntail\n")
    write_readme(str(readme), markdown(rows, 5))
    text = readme.read_text()
    assert text.startswith(f"# title\n{BEGIN}\n") and text.endswith(f"{END}\ntail\n") and "old numbers" not in text
    assert "| q | Anderson(5) | 16 | 0.16 | 0.300 s | 0.3 | 0.29 | 2.0e-07 |" in text
    write_readme(str(readme), "second")  # idempotent markers: the block is replaced again
    assert readme.read_text() == f"# title\n{BEGIN}\nsecond\n{END}\ntail\n"
    for bad in ("no markers\n", f"{END}\n{BEGIN}\n", f"{BEGIN}\n{BEGIN}\n{END}\n"):
        readme.write_text(bad)
        with pytest.raises(ValueError, match="anderson:begin"):
            write_readme(str(readme), "x")
        assert readme.read_text() == bad  # untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md"]  # no temporary file left


def test_a_readme_without_markers_gets_them_under_its_heading_in_the_performance_section(tmp_path):
    """benchmarks.baselines and benchmarks.small add their block (and markers) to a README that has none."""
    from benchmarks.report import write_readme

    readme = tmp_path / "README.md"
    readme.write_text("# t\n## Performance\nintro\n## Next\nend\n")
    write_readme(str(readme), "rows", "<!-- b -->", "<!-- e -->", "New table")
    expected = "# t\n## Performance\nintro\n### New table\n\n<!-- b -->\nrows\n<!-- e -->\n\n## Next\nend\n"
    assert readme.read_text() == expected
    write_readme(str(readme), "rows 2", "<!-- b -->", "<!-- e -->", "New table")  # now it has markers
    assert readme.read_text().count("### New table") == 1 and "rows 2" in readme.read_text()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("batch_dims", [0, 1])
def test_half_precision_iterates(dtype, batch_dims):
    """float16 / bfloat16 iterates: the least squares in float32 (torch has no half-precision factorisation on
    the CPU: the solve raised NotImplementedError 'cholesky_cpu' / 'lu_cpu')."""
    A = torch.tensor([[0.5, 0.2, 0.0], [0.1, 0.6, 0.1], [0.0, 0.2, 0.4]])
    x = torch.tensor([[1.0, -2.0, 0.5], [0.3, 0.2, -1.0]])
    x = x if batch_dims else x[0]
    exact = torch.linalg.solve(torch.eye(3) - A, x.T).T if batch_dims else torch.linalg.solve(torch.eye(3) - A, x)
    solver = hp.GKMSolver(lambda u, x: u @ A.to(dtype).T + x, tol=1e-2, acceleration=hp.Anderson(3),
                          batch_dims=batch_dims)
    u, info = solver.solve(torch.zeros_like(x, dtype=dtype), x.to(dtype))
    assert u.dtype == dtype and info.converged and info.accelerated > 0
    assert float((u.float() - exact).abs().max() / exact.abs().max()) < 0.05


@pytest.mark.parametrize("scale", [1e80, 1e155, 1e160, 1e-100, 1e-160, 1e-300])
@pytest.mark.parametrize("make", [lambda: hp.Anderson(3), lambda: hp.Broyden(3)], ids=["anderson", "broyden"])
@pytest.mark.parametrize("batch_dims", [0, 1])
def test_acceleration_at_any_scale(scale, make, batch_dims):
    """A problem (or a batch sample) at 1e160 or 1e-300 is accelerated like one at 1 (its small matrices
    would over- or underflow: at 1e155 the Anderson batch raised a DivergenceError on a contraction, at
    1e-160 it fell back to plain steps, one problem at 1e160 took 129 steps for 9, Broyden lost its
    acceleration beyond 1e±70), without a numpy warning, and its point is the scaled point of the problem
    at 1."""
    T = lambda u, x: 0.9 * (0.6 * u + 0.4 * u.flip(-1)) + x  # noqa: E731
    x = torch.arange(1.0, 6.0, dtype=torch.float64)[None] if batch_dims else torch.arange(1.0, 6.0, dtype=torch.float64)
    ref, info1 = hp.GKMSolver(T, acceleration=make(), batch_dims=batch_dims).solve(torch.zeros_like(x), x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        u, info = hp.GKMSolver(T, acceleration=make(), batch_dims=batch_dims).solve(torch.zeros_like(x), x * scale)
    assert info.converged and info.steps == info1.steps
    assert torch.allclose(u / scale, ref, rtol=1e-12, atol=0)
    n = 5  # and both are the fixed point: u* = (I - 0.9(0.6 I + 0.4 J))⁻¹ x, J the flip
    M = 0.9 * (0.6 * torch.eye(n, dtype=torch.float64) + 0.4 * torch.eye(n, dtype=torch.float64).flip(0))
    exact = torch.linalg.solve(torch.eye(n, dtype=torch.float64) - M, torch.arange(1.0, 6.0, dtype=torch.float64))
    assert float((u / scale - exact).abs().max()) <= 1e-8 * float(exact.abs().max())


@pytest.mark.parametrize("scale", [1e17, 1e20, 1e30, 1e-19, 1e-30])
@pytest.mark.parametrize("make", [lambda: hp.Anderson(5), lambda: hp.Broyden(20)], ids=["anderson", "broyden"])
@pytest.mark.parametrize("compiled", [None, False], ids=["compiled", "numpy"])
@pytest.mark.parametrize("batch_dims", [0, 1])
def test_float32_acceleration_at_any_scale(scale, make, compiled, batch_dims):
    """float32 state at 1e20: the Gram matrix's entries (squares of the residuals) leave float32's range
    from about 1e±19 — Anderson raised a DivergenceError blaming T for a NaN, Broyden stalled; at 1e25 or
    1e-19 both fell back to plain steps. A sample at any scale is now accelerated as one at 1 and reaches
    the fixed point."""
    g = torch.Generator().manual_seed(0)
    Q = torch.linalg.qr(torch.randn(30, 30, generator=g, dtype=torch.float64))[0]
    M = 0.5 * (0.98 * Q + torch.eye(30, dtype=torch.float64))  # an averaged rotation: ‖M‖ < 1
    xb = torch.randn(30, generator=g, dtype=torch.float64)
    exact = torch.linalg.solve(torch.eye(30, dtype=torch.float64) - M, xb)
    M32 = M.float()
    T = lambda z, x: z @ M32.T + x  # noqa: E731

    def run(s):
        x = (xb * s).float()
        x = torch.stack([xb.float(), x]) if batch_dims else x
        acc = make()
        if compiled is False:
            acc._compiled = False
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            return hp.GKMSolver(T, acceleration=acc, batch_dims=batch_dims, max_steps=2000).solve(
                torch.zeros_like(x), x)

    u1, info1 = run(1.0)
    u, info = run(scale)
    assert info.converged and not info.diverged
    steps1 = info1.steps_per_sample.max() if batch_dims else info1.steps
    steps = info.steps_per_sample[1] if batch_dims else info.steps
    # accelerated as at scale 1 (the plain iteration takes about 680 steps; Broyden's step counts on this
    # rotation vary by a few checks with the rounding)
    assert int(steps) <= 1.5 * int(steps1) < 400, (int(steps), int(steps1))
    got = (u[1] if batch_dims else u).double() / scale
    assert float((got - exact).norm() / exact.norm()) < 1e-3


@pytest.mark.parametrize("make", [lambda: hp.Anderson(3), lambda: hp.Broyden(3)], ids=["anderson", "broyden"])
def test_per_sample_acceleration_converging_to_zero_keeps_accelerating(make):
    """u* = 0 from 1: the residual crosses 300 decades; the batch keeps accelerating (Anderson took 579
    steps before, where one problem takes 39)."""
    T = lambda u: 0.5 * (0.6 * u + 0.4 * u.flip(-1))  # noqa: E731
    u, info = hp.GKMSolver(T, acceleration=make(), batch_dims=1).solve(torch.ones(1, 5, dtype=torch.float64))
    assert info.converged and int(info.steps_per_sample[0]) < 100 and float(u.abs().max()) < 1e-250


@pytest.mark.parametrize("make", [lambda: hp.Anderson(5), lambda: hp.Broyden(10)], ids=["anderson", "broyden"])
def test_per_sample_acceleration_with_subnormal_and_huge_samples_side_by_side(make):
    """Samples at 1e-310 (subnormal), 1 and 1e300 in one batch: each converges to its own point (the subnormal
    one's units overflowed: it 'diverged' and took the 1e300 sample with it)."""
    torch.manual_seed(6)
    n, dt = 16, torch.float64
    M = torch.randn(n, n, dtype=dt)
    A = M / torch.linalg.matrix_norm(M, ord=2) * 0.95
    xb = torch.randn(n, dtype=dt)
    scales = [1e-310, 1.0, 1e300]
    x = torch.stack([xb * s for s in scales])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        u, info = hp.GKMSolver(lambda u, x: (u.unsqueeze(-2) * A).sum(-1) + x, batch_dims=1,
                               acceleration=make()).solve(torch.zeros_like(x), x)
    ref = torch.linalg.solve(torch.eye(n, dtype=dt) - A, xb)
    assert info.converged and not info.diverged
    for k, s in enumerate(scales):
        assert float((u[k] - ref * s).abs().max()) <= 1e-8 * float(ref.abs().max()) * s
