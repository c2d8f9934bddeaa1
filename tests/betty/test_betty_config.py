"""HODLConfig's defaults and tolerances against the core's, through a real Betty graph (betty-ml 0.2.1).

The same quadratic bilevel problem, :math:`u^*(x) = Q^{-1}Bx`, upper :math:`\\tfrac12\\|u^* - y\\|^2`, is
solved through both doors with default options — ``hp.GKMSolver(T)`` (cold start) and a Betty graph
with ``HODLConfig()`` (warm starts across Betty steps) — in float64 and float32; each hypergradient is
compared with the closed form :math:`B^\\top Q^{-1}(u^* - y)` at the ``x`` of that Betty step.
"""

from __future__ import annotations

import pytest
import torch
from _oracles import make_quadratic, rel_err

betty = pytest.importorskip("betty")
from betty.configs import EngineConfig  # noqa: E402
from betty.engine import Engine  # noqa: E402
from betty.problems import ImplicitProblem  # noqa: E402

import hodl_plugin as hp  # noqa: E402
import hodl_plugin.betty as hb  # noqa: E402

hb.set_log_level("WARNING")

#: the accuracy both doors must reach with default options: 100× the dtype's default relative tolerance
#: (1e-10 / 1e-5): the fixed point's error is the residual times 1/(1 - L) = 20 for this T, times a margin
ACCURACY = {torch.float64: 1e-8, torch.float32: 1e-3}
X0 = (0.5, -1.0, 0.3, 2.0)


def problem(dtype):
    P = make_quadratic(n=30, m=4, cond=20.0, seed=0)
    return P.Q.to(dtype), P.B.to(dtype), P.y.to(dtype), P.s


def closed_form(Q, B, y, x):
    Q, B, y, x = (t.double() for t in (Q, B, y, x))
    u = torch.linalg.solve(Q, B @ x)
    return u, B.T @ torch.linalg.solve(Q, u - y)


def betty_run(dtype, config, iters=3):
    """The graph; returns (x, hypergradient, lower.u) of every Betty step and the lower node."""
    Q, B, y, s = problem(dtype)
    xm = torch.nn.Module()
    xm.x = torch.nn.Parameter(torch.tensor(X0, dtype=dtype))
    rec = []

    class Lower(hb.GKMProblem):
        def operator(self, u, batch):
            return u - s * (Q @ u - B @ self.upper.module.x)

        def initial_state(self, batch):
            return torch.zeros(Q.shape[0], dtype=dtype)

    class Upper(ImplicitProblem):
        def get_batch(self):
            return None

        def training_step(self, batch):
            rec.append([self.module.x.detach().clone(), None, self.lower.u.detach().clone()])
            return 0.5 * ((self.lower.u - y) ** 2).sum()

        def grad_callback(self):
            rec[-1][1] = self.module.x.grad.detach().clone()

    low = Lower("lower", config)
    up = Upper("upper", hb.HODLConfig(type="darts"), module=xm, optimizer=torch.optim.SGD(xm.parameters(), lr=0.1))
    Engine([up, low], EngineConfig(train_iters=iters, strategy="cpu"),
           dependencies={"u2l": {up: [low]}, "l2u": {low: [up]}}).run()
    return rec, low


def core_hypergrad(dtype, x):
    """The core with its defaults, from u0 = 0."""
    Q, B, y, s = problem(dtype)
    x = x.clone().requires_grad_(True)
    u = hp.GKMSolver(lambda u, x: u - s * (Q @ u - B @ x))(torch.zeros(Q.shape[0], dtype=dtype), x)
    (0.5 * ((u - y) ** 2).sum()).backward()
    return x.grad


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("config", [{}, {"type": "gkm_implicit", "max_steps": 1000}], ids=["HODLConfig()", "docs"])
def test_both_doors_reach_the_same_accuracy_with_defaults(dtype, config):
    Q, B, y, _ = problem(dtype)
    rec, low = betty_run(dtype, hb.HODLConfig(**config))
    assert len(rec) == 3
    for x, g_betty, u_betty in rec[1:]:  # from the 2nd step on, the node's solve is warm-started
        u_star, exact = closed_form(Q, B, y, x)
        g_core = core_hypergrad(dtype, x)
        assert g_betty.dtype == dtype
        assert rel_err(g_core.double(), exact) < ACCURACY[dtype]
        assert rel_err(g_betty.double(), exact) < ACCURACY[dtype]
        assert rel_err(u_betty.double(), u_star) < ACCURACY[dtype]
    assert low.info.converged


def test_defaults_follow_the_dtype_like_the_core():
    """The config leaves the tolerances to the core (None): the node's first (cold) solve is the core's solve
    with default options, step for step, in each dtype."""
    cfg = hb.HODLConfig()
    assert cfg.tol is None and cfg.adjoint_rtol is None and cfg.atol == 0.0
    for dtype in (torch.float64, torch.float32):
        Q, B, y, s = problem(dtype)
        rec, low = betty_run(dtype, hb.HODLConfig(), iters=1)
        core = hp.GKMSolver(lambda u: u - s * (Q @ u - B @ rec[0][0]))
        u = core(torch.zeros(Q.shape[0], dtype=dtype))
        assert (low.info.steps, low.info.tol) == (core.info.steps, core.info.tol)
        assert torch.equal(u, rec[0][2])
        assert low.info.adjoint.threshold / float(torch.linalg.vector_norm(rec[0][2] - y)) == pytest.approx(
            {torch.float64: 1e-10, torch.float32: 1.1920928955078125e-05}[dtype], rel=1e-5)


def test_solver_options_default_to_the_cores():
    """The GKMSolver options HODLConfig spells have GKMSolver's defaults (warm_start, which the core does not
    have, is the stated difference)."""
    import dataclasses
    import inspect

    core = inspect.signature(hp.GKMSolver.__init__).parameters
    shared = ["max_steps", "tol", "atol", "beta", "alpha", "upper_step", "aggregation", "check_every",
              "on_divergence", "acceleration"]
    defaults = {f.name: f.default for f in dataclasses.fields(hb.HODLConfig)}
    for name in shared:
        assert defaults[name] == core[name].default, name
    assert "warm_start" not in core and defaults["warm_start"] is True


@pytest.mark.parametrize("kind", hb.GKM_METHODS)
def test_the_method_a_default_config_builds_is_the_cores_default(kind):
    """Every option of the hypergradient method that HODLConfig(type=kind) builds equals the core's default
    (hp.GKMSolver(T, hypergrad=name) builds the same object), e.g. on_fail: implicit raises, inexact warns."""
    built = hb.config._method_for(hb.HODLConfig(type=kind))
    core = hp.hypergrad.get_method(kind[len("gkm_"):])
    assert type(built) is type(core)
    own = {k: v for k, v in vars(core).items() if not k.startswith("_")}
    for k, v in own.items():
        assert repr(getattr(built, k)) == repr(v), (kind, k)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_warm_and_cold_solves_stop_at_the_same_accuracy(dtype):
    """warm_start=True (the default) changes the steps, not the accuracy: both meet the closed form."""
    warm, wl = betty_run(dtype, hb.HODLConfig(), iters=4)
    cold, cl = betty_run(dtype, hb.HODLConfig(warm_start=False), iters=4)
    Q, B, y, _ = problem(dtype)
    for (xw, gw, uw), (xc, gc, uc) in zip(warm[1:], cold[1:]):
        assert rel_err(uw.double(), closed_form(Q, B, y, xw)[0]) < ACCURACY[dtype]
        assert rel_err(uc.double(), closed_form(Q, B, y, xc)[0]) < ACCURACY[dtype]
        assert rel_err(gw.double(), gc.double()) < 2 * ACCURACY[dtype]
    assert wl.info.steps < cl.info.steps  # the warm start is what saves steps


def test_atol_is_the_absolute_stop():
    """tol=0, atol=a: the node stops as soon as ||T(u) - u|| <= a (checked here from u), as the core does."""
    dtype = torch.float64
    Q, B, y, s = problem(dtype)
    rec, low = betty_run(dtype, hb.HODLConfig(tol=0.0, atol=1e-3, check_every=1, warm_start=False), iters=1)
    x, _, u = rec[0]
    res = float(torch.linalg.vector_norm(u - s * (Q @ u - B @ x) - u))
    assert res <= 1e-3 and low.info.converged
    core = hp.GKMSolver(lambda u: u - s * (Q @ u - B @ x), tol=0.0, atol=1e-3, check_every=1)
    core(torch.zeros(Q.shape[0], dtype=dtype))
    assert low.info.steps == core.info.steps < 200  # far from the 1000 steps tol=0, atol=0 would run


def test_rtol_is_refused_with_what_replaces_it():
    with pytest.raises(TypeError, match=r"HODLConfig\(rtol=\.\.\.\) was removed: tol is the relative.*atol"):
        hb.HODLConfig(rtol=1e-8)
    with pytest.raises(TypeError, match=r"rtol=\.\.\.\) was removed.*pass tol="):
        hb.config.as_config({"type": "gkm_implicit", "rtol": 1e-8})
    assert "rtol" not in {f.name for f in __import__("dataclasses").fields(hb.HODLConfig)}


def test_tol_with_inexact_warns_that_eps_is_used():
    with pytest.warns(hp.UnusedOptionWarning, match="eps"):
        hb.HODLConfig(type="gkm_inexact", tol=1e-8)


# ------------------------------------------------------------------ the adjoint's failure in Betty's words
def test_float32_adjoint_below_resolution_is_said_in_config_terms():
    """adjoint_rtol=1e-10 in float32 cannot be met: the error says so, and names HODLConfig's fields."""
    with pytest.raises(hp.LinearSolveError) as e:
        betty_run(torch.float32, hb.HODLConfig(adjoint_rtol=1e-10, adjoint_maxiter=200), iters=1)
    msg = str(e.value)
    assert "GKM node 'lower'" in msg and "below what torch.float32 resolves" in msg
    assert "HODLConfig(adjoint_rtol=None)" in msg
    # gmres just ran: no advice to switch to it, and no keyword the config lacks
    assert "gmres stopped" in msg and "solver='gmres'" not in msg
    assert "(solver=" not in msg and "hypergrad=" not in msg


def test_cg_failure_points_to_the_config_field():
    with pytest.raises(hp.LinearSolveError) as e:
        betty_run(torch.float64, hb.HODLConfig(linear_solver="cg", adjoint_maxiter=2), iters=1)
    msg = str(e.value)
    assert "HODLConfig(linear_solver='gmres')" in msg and "HODLConfig(adjoint_maxiter=...)" in msg
    assert "below what" not in msg  # 1e-10 is reachable in float64: the iteration count is at fault


def argmin_graph(config):
    """Betty's argmin node θ*(x) = argmin ½θᵀQθ - (Bx)ᵀθ in float32, started at θ*; one hypergradient."""
    Q, B, y, s = problem(torch.float32)
    x0 = torch.tensor(X0, dtype=torch.float32)
    xm = torch.nn.Module()
    xm.x = torch.nn.Parameter(x0.clone())
    grads = []

    class Up(ImplicitProblem):
        def get_batch(self):
            return None

        def training_step(self, batch):
            return 0.5 * ((self.lower.module.theta - y) ** 2).sum()

        def grad_callback(self):
            grads.append(self.module.x.grad.detach().clone())

    class Low(ImplicitProblem):
        def get_batch(self):
            return None

        def training_step(self, batch):
            th = self.module.theta
            return 0.5 * th @ (Q @ th) - (B @ self.upper.module.x) @ th

    u_star, exact = closed_form(Q, B, y, x0)
    tm = torch.nn.Module()
    tm.theta = torch.nn.Parameter(u_star.float())
    low = Low("lower", config, module=tm, optimizer=torch.optim.SGD(tm.parameters(), lr=s))
    up = Up("upper", hb.HODLConfig(type="darts"), module=xm, optimizer=torch.optim.SGD(xm.parameters(), lr=0.0))
    Engine([up, low], EngineConfig(train_iters=1, strategy="cpu"),
           dependencies={"u2l": {up: [low]}, "l2u": {low: [up]}}).run()
    return low, grads, exact


def test_argmin_node_default_adjoint_tolerance_follows_the_dtype():
    """implicit_cg on Betty's argmin node, float32, default adjoint_rtol: reachable, close to the closed form."""
    low, grads, exact = argmin_graph(hb.HODLConfig(type="implicit_cg"))
    assert low.hodl_adjoint_info.converged
    assert rel_err(grads[0].double(), exact) < ACCURACY[torch.float32]
    with pytest.raises(hp.LinearSolveError, match=r"below what torch.float32 resolves.*adjoint_rtol=None"):
        argmin_graph(hb.HODLConfig(type="implicit_cg", adjoint_rtol=1e-10))


# ------------------------------------------------------------------ every field's Python type, at construction
#: a wrong value for every field of HODLConfig (its own and Betty's Config's): (value, error)
BAD = {
    "type": [(3, TypeError), ("gkm_implict", ValueError)],
    "unroll_steps": [("1", TypeError), (0, ValueError), (1.5, ValueError)],
    "first_order": [(1, TypeError), ("true", TypeError)],
    "retain_graph": [(0, TypeError)],
    "allow_unused": [("yes", TypeError)],
    "gradient_accumulation": [(None, TypeError), (0, ValueError)],
    "gradient_clipping": [("1.0", TypeError), (-1.0, ValueError)],
    "precision": [(32, TypeError), ("fp64", ValueError)],
    "initial_dynamic_scale": [("4096", TypeError), (0.0, ValueError)],
    "scale_factor": [(None, TypeError), (-2.0, ValueError)],
    "warmup_steps": [(True, TypeError), (-1, ValueError)],
    "log_step": [("10", TypeError), (2.5, ValueError)],
    "log_local_step": [(1, TypeError)],
    "darts_alpha": [("0.01", TypeError), (float("nan"), ValueError)],
    "darts_multitask": [(None, TypeError)],
    "sama_adam_alpha": [([1.0], TypeError)],
    "sama_multitask": [("False", TypeError)],
    "neumann_iterations": [(1.0j, TypeError), (-1, ValueError)],
    "neumann_alpha": [(None, TypeError)],
    "cg_iterations": [("3", TypeError), (-1, ValueError)],
    "cg_alpha": [(True, TypeError)],
    "max_steps": [("1000", TypeError), (None, TypeError), (True, TypeError), (2.5, ValueError), (0, ValueError)],
    "tol": [("1e-8", TypeError), (torch.tensor(1e-8), TypeError), (-1e-8, ValueError), (float("inf"), ValueError)],
    "atol": [(None, TypeError), ("0", TypeError), (-1.0, ValueError)],
    "beta": [("1.0", TypeError), (None, TypeError), (float("nan"), ValueError)],
    "alpha": [("0.5", TypeError), ([0.5], TypeError)],
    "upper_step": [("1", TypeError), (0.0, ValueError), (None, TypeError)],
    "aggregation": [(1, TypeError), ("inner", ValueError)],
    "aggregate_upper": [(1, TypeError)],
    "check_every": [("10", TypeError), (0, ValueError)],
    "on_divergence": [(True, TypeError), ("ignore", ValueError)],
    "warm_start": [(1, TypeError), ("False", TypeError)],
    "linear_solver": [(1, TypeError), ("sgd", ValueError)],
    "adjoint_rtol": [("1e-10", TypeError), (-1e-10, ValueError)],
    "adjoint_atol": [(None, TypeError), (-1.0, ValueError)],
    "adjoint_maxiter": [("1000", TypeError), (0, ValueError), (10.5, ValueError)],
    "on_fail": [(3, TypeError), ("rasie", ValueError), ("ignore", ValueError)],
    "truncate": [("10", TypeError), (0, ValueError)],
    "fd_radius": [("0.01", TypeError), (0.0, ValueError), (float("nan"), ValueError)],
    "eps": [("1e-4", TypeError), (None, TypeError)],
    "delta": [("1e-4", TypeError)],
    "method": [("implicit", TypeError)],
    "acceleration": [(5, TypeError), ("anderson", TypeError)],
    "on_nonconvergence": [(False, TypeError), ("wran", ValueError)],
}


def test_every_field_has_a_bad_value_below():
    fields = {f.name for f in __import__("dataclasses").fields(hb.HODLConfig)}
    assert fields == set(BAD)


@pytest.mark.parametrize("field,value,err", [(f, v, e) for f, cases in BAD.items() for v, e in cases],
                         ids=lambda p: repr(p)[:20] if not isinstance(p, str) else p)
def test_a_wrong_value_is_refused_naming_the_field(field, value, err):
    with pytest.raises(err, match=rf"HODLConfig\({field}=\.\.\.\)"):
        hb.HODLConfig(**{field: value})
    with pytest.raises(err, match=rf"HODLConfig\({field}=\.\.\.\)"):  # the same through the dict form
        hb.config.as_config({field: value})


def test_right_values_are_kept_and_integral_floats_become_ints():
    cfg = hb.HODLConfig(max_steps=1e4, tol=0, atol=1e-9, beta=hp.Constant(0.5), alpha=0.1, eps=hp.Polynomial(1e-2, 0.5),
                        delta=1e-3, linear_solver="cg", adjoint_rtol=None, acceleration=hp.Anderson(3),
                        aggregate_upper="upper", on_fail="warn", log_step=-1, precision="bf16")
    assert cfg.max_steps == 10000 and isinstance(cfg.max_steps, int)
    assert (cfg.tol, cfg.atol, cfg.alpha, cfg.linear_solver, cfg.on_fail) == (0, 1e-9, 0.1, "cg", "warn")
    assert isinstance(cfg.beta, hp.Constant) and isinstance(cfg.eps, hp.Polynomial)
    factory = hp.linear_solve.cg  # a factory f(rtol=, atol=, maxiter=) is a linear solver too
    assert hb.HODLConfig(linear_solver=factory).linear_solver is factory
    assert hb.HODLConfig(type="darts").type == "darts"  # Betty's own names stay valid for upper nodes
