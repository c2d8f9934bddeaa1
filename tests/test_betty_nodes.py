"""The GKM node as a Betty user wires it: config dicts, wiring that would lose the hypergradient, solves that
do not converge, ``self.lower(batch)``, ``acceleration``, ``gkm_truncated`` — closed forms or named errors."""

from __future__ import annotations

import warnings

import pytest
import torch

from conftest import DT, rel_err

pytest.importorskip("betty")
from betty.configs import EngineConfig  # noqa: E402
from betty.engine import Engine  # noqa: E402
from betty.problems import ImplicitProblem  # noqa: E402

import hodl_plugin as hp  # noqa: E402
import hodl_plugin.betty as hb  # noqa: E402

hb.set_log_level("WARNING")


def problem(n=6, m=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    R = torch.randn(n, n, generator=g, dtype=DT)
    Q = R @ R.T / n + torch.eye(n, dtype=DT)
    B = torch.randn(n, m, generator=g, dtype=DT)
    y = torch.randn(n, generator=g, dtype=DT)
    return Q, B, y, 1.0 / float(torch.linalg.eigvalsh(Q).max())


Q, B, Y, S = problem()
X0 = torch.tensor([0.7, -1.3], dtype=DT)


def closed_form(x, c=None):
    """u*(x) = Q⁻¹B(x + c) and ∇ₓ ½||u* - y||² = BᵀQ⁻¹(u* - y)."""
    c = torch.zeros_like(x) if c is None else c
    u = torch.linalg.solve(Q, B @ (x + c))
    return u, B.T @ torch.linalg.solve(Q, u - Y)


class Lower(hb.GKMProblem):
    def operator(self, u, batch):
        c = 0.0 if batch is None else batch[0]
        return u - S * (Q @ u - B @ (self.upper.module.x + c))

    def initial_state(self, batch):
        return torch.zeros(Q.shape[0], dtype=DT)


class Upper(ImplicitProblem):
    read = staticmethod(lambda self: self.lower.u)

    def get_batch(self):
        return None

    def training_step(self, batch):
        return 0.5 * ((self.read(self) - Y) ** 2).sum()

    def grad_callback(self):
        self.grads.append(self.module.x.grad.detach().clone())


def engine(config, read=None, iters=1, lower_cls=Lower, deps=None, data=None):
    xm = torch.nn.Module()
    xm.x = torch.nn.Parameter(X0.clone())
    up = Upper("upper", hb.HODLConfig(type="darts"), module=xm, optimizer=torch.optim.SGD(xm.parameters(), lr=0.1))
    up.grads = []
    if read is not None:
        up.read = read
    low = lower_cls("lower", config, train_data_loader=data)
    deps = deps or {"u2l": {up: [low]}, "l2u": {low: [up]}}
    eng = Engine([up, low], EngineConfig(train_iters=iters, strategy="cpu"), dependencies=deps)
    eng.run()
    return up, low, xm


# ---------------------------------------------------------------------------------------------- config
def test_config_as_a_dict_is_accepted():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # neither a wiring nor a convergence warning on the right path
        up, low, _ = engine({"type": "gkm_implicit", "tol": 1e-12, "max_steps": 5000})
    assert isinstance(low.config, hb.HODLConfig) and low.config.tol == 1e-12
    assert rel_err(up.grads[0], closed_form(X0)[1]) < 1e-8


@pytest.mark.parametrize("config,err,match", [
    ({"tolerance": 1e-9}, TypeError, r"unknown key\(s\) \['tolerance'\]"),
    ([("type", "gkm_implicit")], TypeError, "config must be a HODLConfig, a Betty Config or a dict"),
    ({"on_nonconvergence": "wran"}, ValueError, "on_nonconvergence"),
    ({"type": "darts"}, hp.HODLError, "needs Config"),
    ({"on_divergence": "rasie"}, ValueError, "on_divergence"),
])
def test_bad_config_is_refused_at_construction(config, err, match):
    with pytest.raises(err, match=match):
        Lower("lower", config)


# ---------------------------------------------------------------------------------------------- wiring
def test_l2u_only_graph_is_refused():
    xm = torch.nn.Module()
    xm.x = torch.nn.Parameter(X0.clone())
    up = Upper("upper", hb.HODLConfig(type="darts"), module=xm, optimizer=torch.optim.SGD(xm.parameters(), lr=0.1))
    low = Lower("lower", hb.HODLConfig())
    with pytest.raises(hp.HODLError, match=r"no upper node lists it in u2l.*add u2l \{upper: \[lower\]\}"):
        Engine([up, low], EngineConfig(train_iters=1, strategy="cpu"),
               dependencies={"u2l": {}, "l2u": {low: [up]}})


def test_upper_reading_a_detached_solution_warns_what_to_wire():
    """The upper loss ½||u.detach() - y||² + ½·10⁻³||x||²: only the regulariser's gradient reaches x."""
    def detached(self):
        return self.lower.u.detach() + 0.0 * self.module.x.sum()

    with pytest.warns(hb.WiringWarning, match=r"reads self.lower.u.detach\(\).*read self.lower.u instead"):
        up, _, xm = engine(hb.HODLConfig(tol=1e-12, max_steps=5000), read=detached, iters=2)
    assert torch.equal(up.grads[0], torch.zeros(2, dtype=DT))  # what the warning is about: no hypergradient


# ---------------------------------------------------------------------------------------------- convergence
def test_a_solve_that_stops_before_its_tolerance_is_reported():
    with pytest.warns(hp.ConvergenceWarning, match="GKM node 'lower'"):
        engine(hb.HODLConfig(type="gkm_unrolled", tol=1e-12, max_steps=5))
    with pytest.raises(hp.HODLError, match="stopped after 5 steps"):
        engine(hb.HODLConfig(type="gkm_unrolled", tol=1e-12, max_steps=5, on_nonconvergence="raise"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        engine(hb.HODLConfig(type="gkm_unrolled", tol=0.0, max_steps=5))  # exactly K steps: asked for
        engine(hb.HODLConfig(type="gkm_unrolled", tol=1e-12, max_steps=5, on_nonconvergence="ignore"))


def test_the_cores_convergence_warning_is_not_swallowed():
    """The core's own warning (implicit mode, stopped before tol) reaches the user, naming the node."""
    with pytest.warns(hp.ConvergenceWarning) as record:
        engine(hb.HODLConfig(type="gkm_implicit", tol=1e-12, max_steps=3))
    msgs = [str(w.message) for w in record if issubclass(w.category, hp.ConvergenceWarning)]
    core = [m for m in msgs if m.startswith("GKM node 'lower': ") and "this step's hypergradient" not in m]
    assert core, msgs  # the core's own text, prefixed with the node's name


# ---------------------------------------------------------------------------------------------- self.lower(batch)
def test_calling_the_node_like_a_betty_child():
    """``self.lower()`` / ``self.lower(self.lower.cur_batch)`` is this step's solution; ``self.lower(other)`` the
    solution for that other batch, whose hypergradient reaches x through the fresh solve."""
    data = [(torch.tensor([0.2, -0.4], dtype=DT),)]
    other = (torch.tensor([1.0, 0.5], dtype=DT),)
    cfg = hb.HODLConfig(tol=1e-12, max_steps=5000)
    c = data[0][0]
    for read, cc in ((lambda self: self.lower(), c), (lambda self: self.lower(self.lower.cur_batch), c),
                     (lambda self: self.lower(other), other[0])):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            up, low, _ = engine(cfg, read=read, data=data)
        assert rel_err(up.grads[0], closed_form(X0, cc)[1]) < 1e-8
    x = up.module.x.detach()  # after the engine's one SGD step
    assert rel_err(low(other).detach(), closed_form(x, other[0])[0]) < 1e-10
    with pytest.raises(TypeError, match=r"self.lower.u"):
        low(other, other)


# ---------------------------------------------------------------------------------------------- acceleration
@pytest.mark.skipif(hasattr(hp, "Anderson"), reason="GKMSolver(acceleration=...) exists: tested below")
def test_acceleration_without_core_support_is_a_named_error():
    with pytest.raises(hp.HODLError, match=r"acceleration=None"):
        Lower("lower", hb.HODLConfig(acceleration=object()))


@pytest.mark.skipif(not hasattr(hp, "Anderson"), reason="needs hp.Anderson (issue 14, another branch)")
def test_acceleration_is_passed_to_the_solver():
    plain = engine(hb.HODLConfig(tol=1e-12, max_steps=5000))[1]
    up, low, _ = engine(hb.HODLConfig(tol=1e-12, max_steps=5000, acceleration=hp.Anderson(history_size=5)))
    assert rel_err(up.grads[0], closed_form(X0)[1]) < 1e-8
    assert low.info.steps < plain.info.steps


@pytest.mark.skipif(not hasattr(hp, "Anderson"), reason="needs hp.Anderson (issue 14)")
def test_acceleration_bad_values_are_named_errors_at_construction():
    with pytest.raises(TypeError, match=r"HODLConfig\(acceleration=\.\.\.\) must be None or hodl_plugin.Anderson"):
        hb.HODLConfig(acceleration=5)
    with pytest.raises(hp.ConfigurationError, match="unrolled"):  # differentiating through the extrapolation
        Lower("lower", hb.HODLConfig(type="gkm_unrolled", acceleration=hp.Anderson(5)))


# ---------------------------------------------------------------------------------------------- gkm_truncated
def test_truncated_longer_than_check_every_with_warm_starts():
    """Truncated(k) back-propagates through k steps, k > check_every, also when the warm-started forward
    converges at once (closed form: Jₖ = Σ_{i<k} Mⁱ sB, M = I - sQ, at the converged u*)."""
    k = 30
    M = torch.eye(Q.shape[0], dtype=DT) - S * Q
    J = sum(torch.linalg.matrix_power(M, i) for i in range(k)) @ (S * B)
    up, low, xm = engine(hb.HODLConfig(type="gkm_truncated", truncate=k, check_every=10, tol=1e-12, max_steps=5000),
                         iters=3)
    x = X0.clone()
    for g in up.grads:
        u = torch.linalg.solve(Q, B @ x)
        assert rel_err(g, J.T @ (u - Y)) < 1e-8
        x = x - 0.1 * g


# ---------------------------------------------------------------------------------------------- docs example
def test_the_docs_example_runs_and_finds_x_star():
    """tests/compat/betty_example.py, shown in docs/betty.rst: x* = A y."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parent / "compat" / "betty_example.py"
    spec = importlib.util.spec_from_file_location("betty_example", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert torch.allclose(mod.main(), mod.A @ mod.y, atol=1e-6)
