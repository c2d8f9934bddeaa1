"""Bad input gets a clear error (:mod:`hodl_plugin.errors`, checks in :mod:`hodl_plugin._checks`) naming the
problem — wrong types, dtypes, devices, shapes, non-finite values, operators that work in place; opt-outs warn
and flag info.converged = False."""

from __future__ import annotations

import math

import pytest
import torch
from _oracles import DT

import hodl_plugin as hp

T = lambda u, x: 0.5 * u + x  # noqa: E731  (contraction, fixed point 2x)


def test_wrong_types_dtypes_devices_shapes():
    s = hp.GKMSolver(T, max_steps=50)
    x = torch.ones(3, dtype=DT)
    with pytest.raises(TypeError, match="u0 must be a torch.Tensor"):
        s([0.0, 0.0, 0.0], x)
    with pytest.raises(TypeError, match="floating dtype"):
        s(torch.zeros(3, dtype=torch.int64), x)
    with pytest.raises(TypeError, match=r"params\[0\] must be a torch.Tensor"):
        s(torch.zeros(3, dtype=DT), 1.0)
    with pytest.raises(TypeError, match=r"params\[0\] has dtype torch.float32 but u0 has dtype torch.float64"):
        s(torch.zeros(3, dtype=DT), torch.ones(3))
    with pytest.raises(ValueError, match="returned shape"):
        hp.GKMSolver(lambda u, x: u.sum() + x, max_steps=5)(torch.zeros(3, dtype=DT), torch.ones(1, dtype=DT))
    with pytest.raises(TypeError, match="returned dtype"):
        hp.GKMSolver(lambda u: u.float(), max_steps=5)(torch.zeros(3, dtype=DT))
    with pytest.raises(TypeError, match="must return a tensor"):
        hp.GKMSolver(lambda u: 1.0, max_steps=5)(torch.zeros(3, dtype=DT))
    with pytest.raises(ValueError, match="scalar"):
        hp.GKMSolver(T, max_steps=5, upper=lambda u, x: u, alpha=hp.Harmonic())(torch.zeros(3, dtype=DT), x)


def test_module_dtype_mismatch_named():
    net = torch.nn.Linear(3, 3)  # float32 weights
    with pytest.raises(TypeError, match="parameter/buffer of the operator"):
        hp.GKMSolver(net, max_steps=5)(torch.zeros(3, dtype=DT))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_device_mismatch_named():
    with pytest.raises(ValueError, match="is on cuda"):
        hp.GKMSolver(T, max_steps=5)(torch.zeros(3, dtype=DT), torch.ones(3, dtype=DT, device="cuda"))


def test_non_finite_inputs():
    s = hp.GKMSolver(T, max_steps=5)
    with pytest.raises(ValueError, match=r"non-finite values .* in u0"):
        s(torch.tensor([0.0, math.nan, 0.0], dtype=DT), torch.ones(3, dtype=DT))
    with pytest.raises(ValueError, match=r"params\[0\]"):
        s(torch.zeros(3, dtype=DT), torch.tensor([0.0, math.inf, 0.0], dtype=DT))


def test_diverging_operator_raises_or_warns():
    expand = lambda u: 2.0 * u + 1.0  # noqa: E731
    with pytest.raises(hp.DivergenceError, match="diverged"):
        hp.GKMSolver(expand, max_steps=1000)(torch.zeros(3, dtype=DT))
    s = hp.GKMSolver(expand, max_steps=1000, on_divergence="warn")
    with pytest.warns(hp.ConvergenceWarning, match="diverged"):
        u = s(torch.zeros(3, dtype=DT))
    assert s.info.diverged and not s.info.converged
    assert bool(torch.isfinite(u).all())


def test_nan_producing_operator_raises():
    nan_op = lambda u: torch.log(u - 1.0)  # noqa: E731  NaN for u < 1
    with pytest.raises(hp.DivergenceError, match="non-finite"):
        hp.GKMSolver(nan_op, max_steps=30)(torch.zeros(3, dtype=DT))


def test_a_nan_from_the_upper_objective_is_not_blamed_on_T_alone():
    T_ok = lambda u: 0.5 * u  # noqa: E731  finite everywhere
    F_nan = lambda u: torch.sqrt(u - 10.0).sum()  # noqa: E731  NaN gradient near the fixed point 0
    with pytest.raises(hp.DivergenceError, match=r"upper objective's gradient"):
        hp.GKMSolver(T_ok, upper=F_nan, alpha=hp.Harmonic(0.5), max_steps=30)(torch.zeros(3, dtype=DT))
    with pytest.raises(hp.DivergenceError) as e:  # no aggregation: only T can produce it
        hp.GKMSolver(lambda u: torch.log(u - 1.0), max_steps=30)(torch.zeros(3, dtype=DT))
    assert "upper" not in str(e.value) and "T(u, *params) returned NaN" in str(e.value)


def test_schedules_outside_convergence_conditions():
    F = lambda u, x: (u**2).sum()  # noqa: E731
    with pytest.raises(hp.ScheduleError, match="bounded away from 0"):
        hp.GKMSolver(T, beta=hp.Harmonic(1.0))
    with pytest.raises(hp.ScheduleError, match=r"beta_k must lie in \(0, 1\]"):
        hp.GKMSolver(T, beta=1.5)
    with pytest.raises(hp.ScheduleError, match="decrease to 0"):
        hp.GKMSolver(T, upper=F, alpha=0.5)
    with pytest.warns(hp.SummableScheduleWarning, match="outside the selection theory"):
        hp.GKMSolver(T, upper=F, alpha=hp.Polynomial(1.0, 2.0))  # summable: accepted, warned
    with pytest.raises(hp.ScheduleError, match="1/L_F"):
        hp.GKMSolver(T, upper=F, upper_step=1.0, upper_lipschitz=2.0)
    with pytest.raises(ValueError, match="needs the upper objective"):
        hp.GKMSolver(T, alpha=hp.Harmonic())
    with pytest.warns(hp.ConvergenceWarning, match="decrease to 0"):
        hp.GKMSolver(T, upper=F, alpha=0.5, strict=False)


def test_bad_options():
    with pytest.raises(ValueError, match="unknown hypergrad"):
        hp.GKMSolver(T, hypergrad="magic")
    with pytest.raises(ValueError, match="unknown linear solver"):
        hp.GKMSolver(T, hypergrad="implicit", solver="qr")
    with pytest.raises(ValueError, match="max_steps"):
        hp.GKMSolver(T, max_steps=0)
    with pytest.raises(ValueError, match="needs max_steps >= 5"):
        hp.GKMSolver(T, max_steps=3, hypergrad="truncated", steps=5)
    with pytest.raises(TypeError, match=r"takes the options .*adjoint_maxiter.*unknown \['maxiter'\]"):
        hp.GKMSolver(T, hypergrad="implicit", maxiter=5)
    with pytest.raises(TypeError, match="T must be callable"):
        hp.GKMSolver(3.0)


def test_unconverged_implicit_warns():
    slow = lambda u, x: 0.999 * u + x  # noqa: E731
    s = hp.GKMSolver(slow, max_steps=10, tol=1e-12)
    x = torch.ones(3, dtype=DT, requires_grad=True)
    with pytest.warns(hp.ConvergenceWarning, match="not a fixed point"):
        u = s(torch.zeros(3, dtype=DT), x)
    assert not s.info.converged
    u.sum().backward()  # still runs (the user was warned)


def test_adjoint_failure_raises_by_default_and_can_warn():
    slow = lambda u, x: 0.999 * u + x  # noqa: E731  contraction 0.999: Neumann needs ~10^4 terms
    x = torch.ones(3, dtype=DT, requires_grad=True)
    s = hp.GKMSolver(slow, max_steps=100000, tol=1e-11, hypergrad="implicit", solver="fixed_point", adjoint_maxiter=50)
    with pytest.raises(hp.LinearSolveError, match="not solved"):
        s(torch.zeros(3, dtype=DT), x).sum().backward()
    s = hp.GKMSolver(slow, max_steps=100000, tol=1e-11, hypergrad="implicit", solver="fixed_point",
                     adjoint_maxiter=50, on_fail="warn")
    with pytest.warns(hp.ConvergenceWarning, match="not solved"):
        s(torch.zeros(3, dtype=DT), x).sum().backward()
    assert not s.info.adjoint.converged


# -- operators that write into their input ---------------------------------------------------------------
MODES = ["implicit", "inexact", "unrolled", "truncated", "first_order"]


def _opts(mode):
    return {"steps": 5} if mode == "truncated" else {}


@pytest.mark.parametrize("mode", MODES)
def test_inplace_operator_raises_and_leaves_u0(mode):
    u0 = torch.zeros(3, dtype=DT)
    x = torch.ones(3, dtype=DT, requires_grad=mode == "unrolled")
    solver = hp.GKMSolver(lambda u, x: u.mul_(0.5).add_(x), hypergrad=mode, **_opts(mode))
    with pytest.raises(ValueError, match="in place"):
        solver(u0, x.detach() if mode != "unrolled" else x.detach())
    assert torch.equal(u0, torch.zeros(3, dtype=DT)) and u0._version == 0


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("grad", [True, False])
def test_inplace_operator_raises_with_or_without_grad(mode, grad):
    kw = {"steps": 5} if mode == "truncated" else {}
    solver = hp.GKMSolver(lambda u, x: u.mul_(0.5).add_(x), hypergrad=mode, **kw)
    u0 = torch.ones(3, dtype=DT)
    x = torch.ones(3, dtype=DT, requires_grad=grad)
    with pytest.raises((hp.HODLError, ValueError, TypeError), match=r"(?i)in.?place"):
        u = solver(u0, x)
        if grad:
            u.sum().backward()
    assert torch.equal(u0, torch.ones(3, dtype=DT)), f"the caller's u0 was modified: {u0}"


def test_operator_writing_into_a_parameter_raises():
    x = torch.ones(2, dtype=DT)
    with pytest.raises(ValueError, match=r"params\[0\] in place"):
        hp.GKMSolver(lambda u, x: 0.5 * u + x.mul_(1.0))(torch.zeros(2, dtype=DT), x)
