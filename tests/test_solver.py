"""``GKMSolver`` (:mod:`hodl_plugin.solver`) and its options: one meaning per option, validated at construction
and naming the argument; configured linear solvers; methods configured by objects. References are closed
forms."""

from __future__ import annotations

import math
import re
import warnings

import pytest
import torch
from _assertions import zeros
from _oracles import DT

import hodl_plugin as hp
from hodl_plugin import linear_solve as ls

MODES = ["implicit", "inexact", "unrolled", "truncated", "first_order"]


Q = torch.tensor([[2.0, 0.5], [0.5, 1.0]], dtype=DT)


def T(u, x):
    return u - 0.3 * (Q @ u - x)


def exact_grad(x):  # f = Σ u*(x), u* = Q⁻¹x: ∇f = Q⁻ᵀ1
    return torch.linalg.solve(Q.T, torch.ones(2, dtype=DT))


@pytest.mark.parametrize("bad", [2.5, 0, -1, "3", True])
def test_truncated_steps_must_be_an_integer(bad):
    with pytest.raises(ValueError, match="Truncated"):
        hp.Truncated(bad)


@pytest.mark.parametrize("solver", [
    ls.cg(rtol=1e-12), ls.gmres(rtol=1e-12, restart=5), ls.bicgstab(rtol=1e-12), ls.fixed_point(rtol=1e-12),
    ls.torchopt_cg(rtol=1e-12), ls.anderson_fixed_point(rtol=1e-12), "gmres",
])
def test_a_configured_solver_is_used_as_given(solver):
    """hp.Implicit(hp.linear_solve.cg(rtol=1e-12)) was accepted, then failed at backward() (TypeError)."""
    Tsym = hp.GradientStep(grad=lambda u, x: Q @ u - x, step=0.3)
    s = hp.GKMSolver(Tsym, tol=1e-13, hypergrad=hp.Implicit(solver))
    x = torch.tensor([1.0, -2.0], dtype=DT, requires_grad=True)
    s(torch.zeros(2, dtype=DT), x).sum().backward()
    assert torch.allclose(x.grad, exact_grad(x), rtol=1e-10)
    if not isinstance(solver, str):
        assert s.info.adjoint.threshold <= 1e-12 * float(torch.linalg.solve(Q, torch.ones(2, dtype=DT)).norm()) * 10


def test_a_solver_function_is_wrapped_and_checked():
    """Your own solve(matvec, b, x0): its answer is checked against the tolerance (a bad one is named)."""
    def direct(matvec, b, x0=None):
        n = b.numel()
        A = torch.stack([matvec(e) for e in torch.eye(n, dtype=b.dtype)], dim=1)
        return torch.linalg.solve(A, b)

    x = torch.tensor([1.0, -2.0], dtype=DT, requires_grad=True)
    s = hp.GKMSolver(T, tol=1e-13, hypergrad=hp.Implicit(direct))
    s(torch.zeros(2, dtype=DT), x).sum().backward()
    assert torch.allclose(x.grad, exact_grad(x), rtol=1e-10) and s.info.adjoint.method == "direct"
    s = hp.GKMSolver(T, tol=1e-13, hypergrad=hp.Implicit(lambda matvec, b, x0=None: 0 * b))
    with pytest.raises(hp.LinearSolveError, match="was not solved"):
        s(torch.zeros(2, dtype=DT), x).sum().backward()


def test_a_factory_is_refused_at_construction_naming_the_configured_form():
    with pytest.raises(TypeError, match=r"hp\.linear_solve\.cg\(rtol=1e-12\)"):
        hp.Implicit(ls.cg)
    with pytest.raises(TypeError, match="solver must be"):
        hp.Implicit(42)


def test_a_tolerance_given_twice_is_refused():
    with pytest.raises(hp.ConfigurationError, match="give each tolerance once"):
        hp.Implicit(ls.cg(rtol=1e-12), adjoint_rtol=1e-8)
    with pytest.raises(hp.ConfigurationError, match="adjoint tolerance of the inexact mode is delta"):
        hp.Inexact(solver=ls.cg(rtol=1e-12))
    hp.Implicit(ls.cg(), adjoint_rtol=1e-8)  # the solver leaves it to adjoint_rtol: fine


@pytest.mark.parametrize("name,value", [("adjoint_rtol", -1), ("adjoint_atol", float("nan")),
                                        ("adjoint_maxiter", 2.5)])
def test_adjoint_options_are_named(name, value):
    with pytest.raises(ValueError, match=name):
        hp.Implicit(**{name: value})


def test_solver_defaults_follow_the_dtype():
    """rtol=None: 1e-10 in float64, about 1e-5 in float32 (reachable there)."""
    s32 = hp.GKMSolver(lambda u, x: u - 0.3 * (Q.float() @ u - x), hypergrad=hp.Implicit("gmres"))
    x = torch.tensor([1.0, -2.0], requires_grad=True)
    s32(torch.zeros(2), x).sum().backward()
    assert s32.info.adjoint.converged
    assert s32.info.adjoint.threshold == pytest.approx(ls.default_rtol(torch.float32) * float(
        torch.linalg.vector_norm(torch.ones(2))), rel=1e-6)


def test_gradcheck_says_false_for_a_warm_started_inexact_solve():
    """The warm start makes the forward depend on the previous call (within eps = 1e-4 ≫ gradcheck's
    step): gradcheck must not report True for it (warm_start=False, or eps ≪ the step, does)."""
    x = torch.tensor([1.0, -2.0], dtype=DT, requires_grad=True)
    warm = hp.GKMSolver(T, hypergrad="inexact")
    f = lambda z: warm(torch.zeros(2, dtype=DT), z)  # noqa: E731
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        f(x)
        assert not torch.autograd.gradcheck(f, (x,), raise_exception=False)
        tight = hp.GKMSolver(T, hypergrad="inexact", eps=1e-13)
        g = lambda z: tight(torch.zeros(2, dtype=DT), z)  # noqa: E731
        g(x)
        assert torch.autograd.gradcheck(g, (x,))


def test_max_steps_belongs_to_the_iteration():
    s = hp.GKMSolver(T, max_steps=7, tol=0.0)
    assert s.iteration.max_steps == 7 == s.max_steps
    s.max_steps = 3
    u = s(torch.zeros(2, dtype=DT), torch.ones(2, dtype=DT))
    assert s.info.steps == 3
    ref = torch.zeros(2, dtype=DT)
    for _ in range(3):
        ref = T(ref, torch.ones(2, dtype=DT))
    assert torch.equal(u, ref)
    with pytest.raises(ValueError, match="max_steps"):
        s.max_steps = 0
    with pytest.raises(Exception, match="frozen|cannot assign"):
        s.iteration.tol = 1e-3  # options are replaced, not mutated: s.iteration.replace(tol=...)


@pytest.mark.parametrize("name, value", [("tol", 1e-3), ("atol", 1.0), ("check_every", 1), ("batch_dims", 1),
                                         ("hypergrad", "unrolled"), ("acceleration", None), ("beta", 0.5),
                                         ("T", lambda u, x: u), ("method", None), ("on_divergence", "warn")])
def test_options_set_after_construction_are_refused_not_ignored(name, value):
    """Setting ``solver.tol = ...`` (or any constructor option but max_steps) created a plain attribute
    that changed nothing (after ``s.batch_dims = 1`` a batch was still one problem); now it raises and the
    solver is unchanged."""
    s = hp.GKMSolver(T, tol=1e-12, check_every=7)
    with pytest.raises(AttributeError, match=f"GKMSolver.{name} is fixed at construction"):
        setattr(s, name, value)
    assert (s.tol, s.check_every, s.batch_dims, s.hypergrad.name, s.acceleration) == (1e-12, 7, 0, "implicit", None)
    u, info = s.solve(torch.zeros(2, dtype=DT), torch.ones(2, dtype=DT))
    assert info.converged and s.method.name == "implicit" and s.iteration.tol == 1e-12
    s.info = None  # other attributes stay free


# -- bad arguments are refused at construction, naming the argument -----------------------------------------
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


_T = lambda u, x: 0.5 * u + x  # noqa: E731


BAD_CONSTRUCTIONS = {
    "max_steps=2.5": (lambda: hp.GKMSolver(_T, max_steps=2.5), "max_steps"),
    "max_steps=inf": (lambda: hp.GKMSolver(_T, max_steps=float("inf")), "max_steps"),
    "max_steps=nan": (lambda: hp.GKMSolver(_T, max_steps=float("nan")), "max_steps"),
    "max_steps=None": (lambda: hp.GKMSolver(_T, max_steps=None), "max_steps"),
    "tol=nan": (lambda: hp.GKMSolver(_T, tol=float("nan")), "tol"),
    "divergence_factor=0": (lambda: hp.GKMSolver(_T, divergence_factor=0.0), "divergence_factor"),
    "divergence_factor=-1": (lambda: hp.GKMSolver(_T, divergence_factor=-1.0), "divergence_factor"),
    "Inexact(solver='qr')": (lambda: hp.Inexact(solver="qr"), "solver"),
    "GKMSolver(inexact, solver='qr')": (lambda: hp.GKMSolver(_T, hypergrad="inexact", solver="qr"), "solver"),
    "Implicit(adjoint_rtol=-1)": (lambda: hp.Implicit(adjoint_rtol=-1), "adjoint_rtol"),
    "GKMSolver(adjoint_rtol=-1)": (lambda: hp.GKMSolver(_T, adjoint_rtol=-1.0), "adjoint_rtol"),
    "Inexact(on_fail='rasie')": (lambda: hp.Inexact(on_fail="rasie"), "on_fail"),
}


@pytest.mark.parametrize("case", list(BAD_CONSTRUCTIONS))
def test_bad_construction_names_the_argument(case):
    make, name = BAD_CONSTRUCTIONS[case]
    with pytest.raises((ValueError, TypeError, hp.HODLError), match=re.escape(name)):
        make()


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"solver": "qr"}, "unknown linear solver"),
        ({"on_fail": "rasie"}, "on_fail"),
        ({"adjoint_maxiter": 2.5}, "adjoint_maxiter"),
    ],
)
@pytest.mark.parametrize("mode", ["implicit", "inexact"])
def test_method_options_are_validated_at_construction(mode, kwargs, match):
    with pytest.raises(ValueError, match=match):
        hp.GKMSolver(lambda u, x: 0.5 * u + x, hypergrad=mode, **kwargs)


def test_solver_rejects_bad_aggregation_arguments():
    T = lambda u: 0.5 * u  # noqa: E731
    F = lambda u: (u**2).sum()  # noqa: E731
    for bad in ("Outside", "both", None, 1):
        with pytest.raises(ValueError, match="aggregation must be one of"):
            hp.GKMSolver(T, upper=F, aggregation=bad)
    with pytest.raises(ValueError, match="needs the upper objective"):
        hp.GKMSolver(T, aggregation="outside")
    with pytest.raises(hp.ScheduleError, match=r"\[0, 1\]"):  # alpha_0 > 1 stays an error
        hp.GKMSolver(T, upper=F, alpha=hp.Geometric(1.5, 0.9), aggregation="outside")
    with pytest.raises(hp.ScheduleError, match="decrease to 0"):  # so does a non-vanishing weight
        hp.GKMSolver(T, upper=F, alpha=0.5, aggregation="outside")


def test_anderson_is_refused_with_either_form():
    T = lambda u: 0.5 * u  # noqa: E731
    F = lambda u: (u**2).sum()  # noqa: E731
    for agg in ("inside", "outside"):
        with pytest.raises(hp.ConfigurationError, match="aggregation"):
            hp.GKMSolver(T, upper=F, alpha=hp.Harmonic(1.0), aggregation=agg, acceleration=hp.Anderson())


def test_an_upper_grad_of_the_wrong_shape_is_refused():
    solver = hp.GKMSolver(lambda u, x: 0.5 * u + x, upper_grad=lambda u, x: torch.ones(1, dtype=DT),
                          alpha=hp.Harmonic(1.0))
    with pytest.raises((hp.HODLError, ValueError, TypeError), match=r"upper_grad"):
        solver(zeros(3), torch.ones(3, dtype=DT))


def test_upper_objective_independent_of_u_is_named():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match="does not depend on u"):
            hp.GKMSolver(lambda u, x: 0.5 * u + x, upper=lambda u, x: (x**2).sum())(
                torch.zeros(2, dtype=DT), torch.ones(2, dtype=DT))


@pytest.mark.parametrize("mode", MODES)
def test_an_upper_independent_of_u_is_refused_in_every_mode(mode):
    """An upper objective that does not depend on u: refused at construction or at the first call."""
    kw = {"steps": 5} if mode == "truncated" else {}
    with pytest.raises((ValueError, TypeError, hp.HODLError), match="upper"):
        solver = hp.GKMSolver(_T, upper=lambda u, x: (x**2).sum(), hypergrad=mode, **kw)
        x = torch.ones(2, dtype=DT, requires_grad=True)
        solver(zeros(2), x).sum().backward()


@pytest.mark.parametrize("make", [
    lambda: hp.GKMSolver(lambda u: u, tol=1.0),
    lambda: hp.GKMSolver(lambda u: u, hypergrad=hp.Implicit(adjoint_rtol=1.0)),
    lambda: hp.Implicit(ls.cg(rtol=2.0)),
    lambda: hp.Inexact(eps=2.0),
    lambda: hp.Inexact(eps=1e-3, delta=1.5),
    lambda: hp.GKMSolver(lambda u: u, strict="yes"),
])
def test_meaningless_values_are_refused_at_construction(make):
    """A relative tolerance >= 1 accepts any point (it gave u0 back as 'converged' and a zero
    hypergradient); strict must be a bool."""
    with pytest.raises((ValueError, TypeError)):
        make()


def test_an_absolute_inexact_accuracy_may_exceed_one():
    hp.Inexact(eps=2.0, relative=False)


def test_a_function_solver_object_with_its_tolerance():
    def direct(matvec, b, x0=None):
        A = torch.stack([matvec(e) for e in torch.eye(b.numel(), dtype=b.dtype)], dim=1)
        return torch.linalg.solve(A, b)

    x = torch.tensor([1.0, -2.0], dtype=DT, requires_grad=True)
    solver = hp.GKMSolver(lambda u, x: 0.5 * u + x, tol=1e-13,
                          hypergrad=hp.Implicit(ls.FunctionSolver(fn=direct, rtol=1e-8)))
    solver(torch.zeros(2, dtype=DT), x).sum().backward()
    assert torch.allclose(x.grad, torch.full((2,), 2.0, dtype=DT))


def test_a_stateless_method_refuses_another_methods_state():
    inexact = hp.GKMSolver(lambda u, x: 0.5 * u + x, hypergrad="inexact")
    x = torch.ones(2, dtype=DT, requires_grad=True)
    inexact(torch.zeros(2, dtype=DT), x).sum().backward()
    for mode in ("implicit", "unrolled"):
        with pytest.raises(ValueError, match="holds no state"):
            hp.GKMSolver(lambda u, x: 0.5 * u + x, hypergrad=mode).load_state_dict(inexact.state_dict())
