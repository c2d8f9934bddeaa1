"""What the fixed-cost cuts must keep: one evaluation of T per step (the binding run is the first),
its checks, CG's own symmetry test, the one-sync finiteness test, and the problem copy."""

from __future__ import annotations

import pytest
import torch

import hodl_plugin as hp
from hodl_plugin import linear_solve as ls
from hodl_plugin._checks import all_finite

D = torch.float64


class Counted:
    """T(u, x) = 0.5 u + x, counting its evaluations."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, u: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return 0.5 * u + x


@pytest.mark.parametrize("grad", [False, True])
def test_an_implicit_solve_evaluates_T_once_per_step(grad):
    """K exact steps cost K evaluations of T, differentiable or not: the run that finds the tensors
    T captures is the solve's first step."""
    T = Counted()
    solver = hp.GKMSolver(T, max_steps=7, tol=0.0, check_every=7)
    x = torch.ones(3, dtype=D, requires_grad=grad)
    with torch.set_grad_enabled(grad):
        u = solver(torch.zeros(3, dtype=D), x)
    assert T.calls == 7 and solver.info.steps == 7
    # the value is the 7-step iterate: u_7 = 2(1 - 0.5^7) x
    torch.testing.assert_close(u.detach(), 2 * (1 - 0.5 ** 7) * torch.ones(3, dtype=D))


def test_the_first_step_of_a_differentiable_solve_is_still_checked():
    def writes_u(u, x):
        u.mul_(0.5)
        return u + x

    def wrong_shape(u, x):
        return torch.cat([u, x])

    x = torch.ones(2, dtype=D, requires_grad=True)
    with pytest.raises(ValueError, match="modified its input u in place"):
        hp.GKMSolver(writes_u)(torch.zeros(2, dtype=D), x)
    with pytest.raises(ValueError, match="returned shape"):
        hp.GKMSolver(wrong_shape)(torch.zeros(2, dtype=D), x)

    def writes_c(u, x, c):
        c.mul_(1.0)
        return 0.5 * u + x * c

    with pytest.raises(ValueError, match=r"modified its input params\[1\] in place"):
        hp.GKMSolver(writes_c)(torch.zeros(2, dtype=D), x, torch.ones(2, dtype=D))


def test_aggregation_does_not_reuse_T_at_the_start_point():
    """With α_0 > 0 the first step evaluates T at the shifted w_0, not at u_0: the binding run's
    T(u_0) must not stand in for it. Exact 2-step iterate of the inside form, by hand."""
    T = lambda u, x: 0.5 * u + x  # noqa: E731
    F = lambda u, x: 0.5 * (u ** 2).sum()  # noqa: E731
    x = torch.ones(2, dtype=D, requires_grad=True)
    solver = hp.GKMSolver(T, upper=F, alpha=hp.Harmonic(0.5), max_steps=2, tol=0.0, check_every=2,
                          check_unique=False)
    u = solver(torch.zeros(2, dtype=D), x)
    u_ = torch.zeros(2, dtype=D)
    for k in range(2):
        w = u_ - 0.5 / (k + 1) * u_  # ∇F(u) = u, s = 1, α_k = 0.5/(k+1)
        u_ = 0.5 * w + 1.0
    torch.testing.assert_close(u.detach(), u_)


def test_cg_reports_the_symmetry_of_its_matrix():
    M = torch.tensor([[4.0, 1.0, 0.0], [1.0, 3.0, 0.5], [0.0, 0.5, 2.0]], dtype=D)
    b = torch.tensor([1.0, -2.0, 0.5], dtype=D)
    _, info = ls.cg(rtol=1e-12)(lambda v: M @ v, b)
    assert info.converged and info.symmetry_defect is not None and info.symmetry_defect < 1e-14
    K = torch.tensor([[0.0, 1.0, -0.5], [-1.0, 0.0, 0.3], [0.5, -0.3, 0.0]], dtype=D)
    _, info = ls.cg(rtol=1e-12, maxiter=50)(lambda v: (M + K) @ v, b)
    assert info.symmetry_defect > 1e-3
    _, info = ls.cg(rtol=1e-12)(lambda v: 2 * v, b)  # one product: nothing to compare, and exact
    assert info.symmetry_defect is None and info.converged


def test_the_implicit_mode_refuses_cg_on_an_asymmetric_jacobian_after_one_solve():
    A = torch.tensor([[1.0, 0.4], [-0.4, 1.0]], dtype=D)
    T = lambda u, x: u - 0.5 * (A @ u - x)  # noqa: E731
    T.symmetric_jacobian = True  # false
    x = torch.ones(2, dtype=D, requires_grad=True)
    u = hp.GKMSolver(T, tol=1e-12)(torch.zeros(2, dtype=D), x)
    with pytest.raises(hp.LinearSolveError, match="not symmetric"):
        u.sum().backward()


def test_all_finite_reads_every_tensor():
    big = torch.tensor([1e308, 1e308], dtype=D)  # a plain sum would overflow to inf
    assert all_finite([big, torch.zeros(3, dtype=D)])
    for bad in (float("nan"), float("inf"), -float("inf")):
        assert not all_finite([torch.zeros(2, dtype=D), torch.tensor([0.0, bad], dtype=D)])
    assert not all_finite([torch.tensor(float("nan"), dtype=torch.float16)])


def test_problem_copies_refuse_unknown_fields():
    from hodl_plugin.implicit import FixedPointProblem

    p = FixedPointProblem(op=lambda u, ts: u, forward=lambda *a: None, solver=ls.cg())
    q = p.replace(on_fail="warn", sign=-1.0)
    assert (q.on_fail, q.sign, p.on_fail, p.sign) == ("warn", -1.0, "raise", 1.0)
    assert q.solver is p.solver and q.op is p.op
    with pytest.raises(TypeError, match="no field"):
        p.replace(tolerance=1.0)
