"""``GKMSolver`` and its options: one meaning per option, validated at construction; configured
linear solvers; methods configured by objects. References are closed forms."""

from __future__ import annotations

import warnings

import pytest
import torch

import hodl_plugin as hp
from hodl_plugin import linear_solve as ls

D = torch.float64
Q = torch.tensor([[2.0, 0.5], [0.5, 1.0]], dtype=D)


def T(u, x):
    return u - 0.3 * (Q @ u - x)


def exact_grad(x):  # f = Σ u*(x), u* = Q⁻¹x: ∇f = Q⁻ᵀ1
    return torch.linalg.solve(Q.T, torch.ones(2, dtype=D))


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
    x = torch.tensor([1.0, -2.0], dtype=D, requires_grad=True)
    s(torch.zeros(2, dtype=D), x).sum().backward()
    assert torch.allclose(x.grad, exact_grad(x), rtol=1e-10)
    if not isinstance(solver, str):
        assert s.info.adjoint.threshold <= 1e-12 * float(torch.linalg.solve(Q, torch.ones(2, dtype=D)).norm()) * 10


def test_a_solver_function_is_wrapped_and_checked():
    """Your own solve(matvec, b, x0): its answer is checked against the tolerance (a bad one is named)."""
    def direct(matvec, b, x0=None):
        n = b.numel()
        A = torch.stack([matvec(e) for e in torch.eye(n, dtype=b.dtype)], dim=1)
        return torch.linalg.solve(A, b)

    x = torch.tensor([1.0, -2.0], dtype=D, requires_grad=True)
    s = hp.GKMSolver(T, tol=1e-13, hypergrad=hp.Implicit(direct))
    s(torch.zeros(2, dtype=D), x).sum().backward()
    assert torch.allclose(x.grad, exact_grad(x), rtol=1e-10) and s.info.adjoint.method == "direct"
    s = hp.GKMSolver(T, tol=1e-13, hypergrad=hp.Implicit(lambda matvec, b, x0=None: 0 * b))
    with pytest.raises(hp.LinearSolveError, match="was not solved"):
        s(torch.zeros(2, dtype=D), x).sum().backward()


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
    x = torch.tensor([1.0, -2.0], dtype=D, requires_grad=True)
    warm = hp.GKMSolver(T, hypergrad="inexact")
    f = lambda z: warm(torch.zeros(2, dtype=D), z)  # noqa: E731
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        f(x)
        assert not torch.autograd.gradcheck(f, (x,), raise_exception=False)
        tight = hp.GKMSolver(T, hypergrad="inexact", eps=1e-13)
        g = lambda z: tight(torch.zeros(2, dtype=D), z)  # noqa: E731
        g(x)
        assert torch.autograd.gradcheck(g, (x,))


def test_max_steps_belongs_to_the_iteration():
    s = hp.GKMSolver(T, max_steps=7, tol=0.0)
    assert s.iteration.max_steps == 7 == s.max_steps
    s.max_steps = 3
    u = s(torch.zeros(2, dtype=D), torch.ones(2, dtype=D))
    assert s.info.steps == 3
    ref = torch.zeros(2, dtype=D)
    for _ in range(3):
        ref = T(ref, torch.ones(2, dtype=D))
    assert torch.equal(u, ref)
    with pytest.raises(ValueError, match="max_steps"):
        s.max_steps = 0
    with pytest.raises(Exception, match="frozen|cannot assign"):
        s.iteration.tol = 1e-3  # options are replaced, not mutated: s.iteration.replace(tol=...)
