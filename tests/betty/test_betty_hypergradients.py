"""The Betty adapter (:mod:`hodl_plugin.betty`) against the real Betty (betty-ml 0.2.1), float64, closed forms:
the first hypergradient of every GKM node type, Betty's own argmin nodes with the adapter's implicit
methods, aggregation in an engine, wiring errors, per-sample warm starts, diagnostics in Betty's logger."""

from __future__ import annotations

import pytest
import torch
from _oracles import DT, nonsingleton, rel_err

betty = pytest.importorskip("betty")
from betty.configs import EngineConfig  # noqa: E402
from betty.engine import Engine  # noqa: E402
from betty.problems import ImplicitProblem  # noqa: E402

import hodl_plugin as hp  # noqa: E402
import hodl_plugin.betty as hb  # noqa: E402

hb.set_log_level("WARNING")


def quad(n=30, m=4, cond=20.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=DT))
    Q = (U * torch.logspace(0, torch.log10(torch.tensor(cond)).item(), n, dtype=DT)) @ U.T
    Q = 0.5 * (Q + Q.T)
    B = torch.randn(n, m, generator=g, dtype=DT)
    y = torch.randn(n, generator=g, dtype=DT)
    return Q, B, y, 1.0 / cond


class XModule(torch.nn.Module):
    def __init__(self, x0):
        super().__init__()
        self.x = torch.nn.Parameter(x0.clone())


class Upper(ImplicitProblem):
    """F(u*(x)) = ½||u* - y||²; records the hypergradient Betty computed before each update."""

    y = None
    lower_name = "lower"
    grads: list

    def get_batch(self):
        return None

    def training_step(self, batch):
        return 0.5 * ((getattr(self, self.lower_name).u - self.y) ** 2).sum()

    def grad_callback(self):
        self.grads.append(self.module.x.grad.detach().clone())


def make_upper(x0, y, lr=0.1, lower_name="lower"):
    xm = XModule(x0)
    up = Upper("upper", hb.HODLConfig(type="darts"), module=xm, optimizer=torch.optim.SGD(xm.parameters(), lr=lr))
    up.y, up.grads, up.lower_name = y, [], lower_name
    return up, xm


def gkm_lower(Q, B, s, config):
    class Lower(hb.GKMProblem):
        def operator(self, u, batch):
            return u - s * (Q @ u - B @ self.upper.module.x)

        def initial_state(self, batch):
            return torch.zeros(Q.shape[0], dtype=DT)

    return Lower("lower", config)


def run(upper, lower, iters):
    eng = Engine([upper, lower], EngineConfig(train_iters=iters, strategy="cpu"),
                 dependencies={"u2l": {upper: [lower]}, "l2u": {lower: [upper]}})
    eng.run()
    return eng


@pytest.mark.parametrize("kind,opts", [
    ("gkm_implicit", {"linear_solver": "cg"}),
    ("gkm_implicit", {"linear_solver": "gmres"}),
    ("gkm_unrolled", {}),
    ("gkm_inexact", {"eps": 1e-13, "delta": 1e-13}),
])
def test_first_hypergradient_matches_closed_form(kind, opts):
    Q, B, y, s = quad()
    x0 = torch.tensor([0.5, -1.0, 0.3, 2.0], dtype=DT)
    upper, _ = make_upper(x0, y)
    tol = {} if kind == "gkm_inexact" else {"tol": 1e-13}  # the inexact forward stops at eps
    lower = gkm_lower(Q, B, s, hb.HODLConfig(type=kind, max_steps=20000, **tol, **opts))
    run(upper, lower, 1)
    u_star = torch.linalg.solve(Q, B @ x0)
    exact = B.T @ torch.linalg.solve(Q, u_star - y)
    assert rel_err(upper.grads[0], exact) < 1e-8
    assert lower.stats["converged"] == 1.0 and lower.stats["hypergrad_norm"] > 0


def test_first_order_and_truncated_match_their_closed_forms():
    Q, B, y, s = quad()
    x0 = torch.tensor([0.5, -1.0, 0.3, 2.0], dtype=DT)
    u_star = torch.linalg.solve(Q, B @ x0)
    M = torch.eye(Q.shape[0], dtype=DT) - s * Q
    for kind, k in (("gkm_first_order", 1), ("gkm_truncated", 3)):
        upper, _ = make_upper(x0, y)
        lower = gkm_lower(Q, B, s, hb.HODLConfig(type=kind, max_steps=20000, tol=1e-13, truncate=k))
        run(upper, lower, 1)
        J = sum(torch.linalg.matrix_power(M, i) for i in range(k)) @ (s * B)
        assert rel_err(upper.grads[0], J.T @ (u_star - y)) < 1e-8


def test_upper_variable_reaches_closed_form_optimum():
    Q, B, y, s = quad(n=12, m=3, cond=5.0, seed=1)
    upper, xm = make_upper(torch.zeros(3, dtype=DT), y, lr=0.2)
    lower = gkm_lower(Q, B, s, hb.HODLConfig(type="gkm_implicit", max_steps=5000, tol=1e-12))
    run(upper, lower, 400)
    G = torch.linalg.solve(Q, B)  # u* = G x  ⇒  x* = argmin ½||Gx - y||²
    x_star = torch.linalg.lstsq(G, y.unsqueeze(1)).solution.squeeze(1)
    assert rel_err(xm.x.detach(), x_star) < 1e-6
    assert lower.stats["steps"] < 200  # warm starts across Betty steps: later solves are short


class ArgminLower(ImplicitProblem):
    """Betty's ordinary argmin node: θ*(x) = argmin ½θᵀQθ - (Bx)ᵀθ, trained by SGD."""

    Q = B = None

    def get_batch(self):
        return None

    def training_step(self, batch):
        th = self.module.theta
        return 0.5 * th @ (self.Q @ th) - (self.B @ self.upper.module.x) @ th


def argmin_case(kind, n=200, cond=100.0, lower_cfg=None):
    Q, B, y, s = quad(n=n, m=5, cond=cond, seed=2)
    x0 = torch.linspace(-1, 1, 5, dtype=DT)
    upper, _ = make_upper(x0, y, lower_name="lower")
    upper.training_step = lambda batch: 0.5 * ((upper.lower.module.theta - y) ** 2).sum()
    u_star = torch.linalg.solve(Q, B @ x0)
    tm = torch.nn.Module()
    tm.theta = torch.nn.Parameter(u_star.clone())  # the lower level solved (its gradient is ~1e-13)
    cfg = lower_cfg or hb.HODLConfig(type=kind)
    lower = ArgminLower("lower", cfg, module=tm, optimizer=torch.optim.SGD(tm.parameters(), lr=s))
    lower.Q, lower.B = Q, B
    run(upper, lower, 1)
    exact = B.T @ torch.linalg.solve(Q, u_star - y)
    return rel_err(upper.grads[0], exact), lower


@pytest.mark.parametrize("kind", ["implicit_cg", "implicit_gmres"])
def test_correct_implicit_method_for_betty_argmin_nodes(kind):
    """n=200, condition 100: ours reaches 1e-8 in <= 100 iterations (Betty's own cg does not)."""
    err, lower = argmin_case(kind, lower_cfg=hb.HODLConfig(type=kind, adjoint_rtol=1e-9))
    assert err < 1e-8
    if kind == "implicit_cg":  # matrix products, the final residual check included
        assert lower.hodl_adjoint_info.iterations <= 100


def test_betty_builtin_cg_is_wrong_on_the_same_problem():
    """The figure the adapter exists for: Betty's cg (20 iterations) misses the hypergradient."""
    err, _ = argmin_case("cg", lower_cfg=hb.HODLConfig(type="cg", cg_iterations=20, cg_alpha=1.0))
    assert err > 1e-2


def test_hodl_aggregation_selects_upper_optimal_fixed_point_in_engine():
    A, b, s, z0, proj = nonsingleton()
    n = A.shape[1]

    class Lower(hb.GKMProblem):
        def operator(self, u, batch):
            return u - s * A.T @ (A @ u - b) + 0 * self.upper.module.x.sum()

        def upper_objective(self, u, batch):
            return 0.5 * ((u - self.upper.module.x) ** 2).sum()

        def initial_state(self, batch):
            return torch.zeros(n, dtype=DT)

    upper, _ = make_upper(z0, torch.zeros(n, dtype=DT), lr=0.0)
    lower = Lower("lower", hb.HODLConfig(type="gkm_unrolled", max_steps=4000, tol=0.0, alpha=hp.Harmonic(1.0)))
    run(upper, lower, 1)
    u_sel = proj(z0)
    u_km = proj(torch.zeros(n, dtype=DT))  # plain KM from 0: the minimum-norm solution
    assert rel_err(lower.u.detach(), u_sel) < 2e-3
    assert rel_err(u_km, u_sel) > 0.1


def test_wiring_errors():
    Q, B, y, s = quad()
    with pytest.raises(hp.HODLError, match="needs Config"):
        gkm_lower(Q, B, s, hb.HODLConfig(type="darts"))
    lone = gkm_lower(Q, B, s, hb.HODLConfig())
    with pytest.raises(hp.HODLError, match="has no upper node"):
        Engine([lone], EngineConfig(train_iters=1, strategy="cpu"), dependencies={"u2l": {}, "l2u": {}})
    # a GKM method name on an ordinary argmin node
    with pytest.raises(hp.HODLError, match="is a GKM hypergradient but node"):
        argmin_case("gkm_implicit", n=10, cond=5.0)
    # an argmin method name on a GKM node
    upper, _ = make_upper(torch.zeros(4, dtype=DT), y)

    class Detached(hb.GKMProblem):
        def operator(self, u, batch):
            return u - s * (Q @ u - B @ self.upper.module.x.detach())  # does not depend on x

        def initial_state(self, batch):
            return torch.zeros(Q.shape[0], dtype=DT)

    with pytest.raises(hp.HODLError, match="does not depend on"):
        run(upper, Detached("lower", hb.HODLConfig(type="gkm_implicit")), 1)


@pytest.mark.parametrize("kind,opts", [("gkm_implicit", {"tol": 1e-10}), ("gkm_inexact", {"eps": 1e-10})])
def test_per_sample_warm_starts_across_betty_steps(kind, opts):
    """A data loader of per-sample problems: the second epoch starts every sample from its own iterate,
    and no batch ever starts from another batch's iterate (first epoch = cold solves)."""
    Q, B, y, s = quad(n=8, m=2, cond=10.0, seed=3)
    N = 6
    data = [(torch.tensor([i, i + 1]), torch.randn(2, 2, dtype=DT)) for i in range(0, N, 2)]

    def T(u, c, x):
        return u - s * (u @ Q.T - (c + x) @ B.T)

    class Lower(hb.GKMProblem):
        def operator(self, u, batch):
            return T(u, batch[1], self.upper.module.x)

        def initial_state(self, batch):
            return torch.zeros(batch[0].shape[0], Q.shape[0], dtype=DT)

        def sample_keys(self, batch):
            return batch[0].tolist()

    upper, _ = make_upper(torch.zeros(2, dtype=DT), torch.zeros(8, dtype=DT), lr=0.0)
    upper.training_step = lambda batch: 0.5 * (upper.lower.u**2).sum()
    lower = Lower("lower", hb.HODLConfig(type=kind, max_steps=5000, **opts), train_data_loader=data)
    steps = []
    orig = lower.one_step_descent

    def spy(batch=None):
        out = orig(batch)
        steps.append(lower.info.steps)
        return out

    lower.one_step_descent = spy
    run(upper, lower, 2 * len(data))
    assert len(lower.warm) == N
    cold = []
    for _, c in data:
        # the same solve, cold: a fresh solver and method built from the node's config (no caches)
        cfg = lower.config
        tols = {} if kind == "gkm_inexact" else {"tol": cfg.tol, "atol": cfg.atol}
        solver = hp.GKMSolver(lambda u, c=c: T(u, c, torch.zeros(2, dtype=DT)), max_steps=cfg.max_steps,
                              hypergrad=hb.config._method_for(cfg), **tols)
        solver(torch.zeros(2, 8, dtype=DT))
        cold.append(solver.info.steps)
    first, second = steps[: len(data)], steps[len(data):]
    assert first == cold
    assert all(b <= 10 for b in second)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_gkm_node_on_cuda():
    Q, B, y, s = (t.cuda() if isinstance(t, torch.Tensor) else t for t in quad())
    upper, xm = make_upper(torch.zeros(4, dtype=DT, device="cuda"), y)
    lower = gkm_lower(Q, B, s, hb.HODLConfig(type="gkm_implicit", tol=1e-12, max_steps=5000))
    lower.initial_state = lambda batch: torch.zeros(Q.shape[0], dtype=DT, device="cuda")
    eng = Engine([upper, lower], EngineConfig(train_iters=3, strategy="gpu"),
                 dependencies={"u2l": {upper: [lower]}, "l2u": {lower: [upper]}})
    eng.run()
    assert lower.u.is_cuda and upper.grads[0].is_cuda


def test_diagnostics_reach_bettys_logger():
    import logging

    from betty.logging import get_logger

    records = []

    class Grab(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    h = Grab(level=logging.INFO)
    log = get_logger()
    log.addHandler(h)
    old = log.level
    log.setLevel(logging.INFO)
    try:
        Q, B, y, s = quad(n=10, m=2, cond=5.0, seed=5)
        upper, _ = make_upper(torch.zeros(2, dtype=DT), y)
        lower = gkm_lower(Q, B, s, hb.HODLConfig(type="gkm_inexact", eps=hp.Polynomial(1e-4, 0.5), log_step=1,
                                                 max_steps=5000))
        run(upper, lower, 3)
    finally:
        log.removeHandler(h)
        log.setLevel(old)
    lines = [r for r in records if '"lower"' in r]
    assert len(lines) == 3
    for key in ("residual", "steps", "converged", "eps", "delta"):
        assert key in lines[0]
    assert "hypergrad_norm" in lines[-1] and "adjoint_iterations" in lines[-1]


def test_gkm_vjp_of_a_stale_solution_is_named():
    """gkm_vjp after the engine's optimizer step, before a new solve: the stored solution's graph reads
    parameters changed in place; a HODLError says to solve again (torch's raw in-place RuntimeError before),
    and after a solve the hypergradient is 2v (u* = 2x)."""
    class Low(hb.GKMProblem):
        def operator(self, u, batch):
            return 0.5 * u + self.up.module.x

        def initial_state(self, batch):
            return torch.zeros(2, dtype=DT)

    class Up(ImplicitProblem):
        def get_batch(self):
            return None

        def training_step(self, batch):
            return ((self.low.u - 1.0) ** 2).sum()

    m = torch.nn.Module()
    m.x = torch.nn.Parameter(torch.zeros(2, dtype=DT))
    up = Up("up", hb.HODLConfig(), module=m, optimizer=torch.optim.SGD(m.parameters(), lr=0.1))
    low = Low("low", hb.HODLConfig(type="gkm_implicit", tol=1e-12))
    hb.HODLEngine([up, low], EngineConfig(train_iters=1, strategy="cpu"),
                  dependencies={"u2l": {up: [low]}, "l2u": {low: [up]}}).run()
    with pytest.raises(hp.HODLError, match="Solve again first"):
        hb.gkm_vjp([torch.ones(2, dtype=DT)], low, up)
    low.one_step_descent()
    (g,) = hb.gkm_vjp([torch.ones(2, dtype=DT)], low, up)
    assert torch.allclose(g, torch.full((2,), 2.0, dtype=DT), rtol=1e-9)
