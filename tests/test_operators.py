"""Operator library: values against formulas, gradients through learned parts, KM averaging."""

from __future__ import annotations

import pytest
import torch

import hodl_plugin as hp
from conftest import DT, rel_err


def test_gradient_step_and_prox_values():
    b = torch.tensor([1.0, -3.0], dtype=DT)
    T = hp.GradientStep(grad=lambda u: u - b, step=0.25)
    assert torch.allclose(T(torch.zeros(2, dtype=DT)), 0.25 * b)
    P = hp.ProximalGradient(grad=lambda u: u - b, prox=hp.prox.nonnegative(), step=1.0)
    assert torch.equal(P(torch.zeros(2, dtype=DT)), torch.tensor([1.0, 0.0], dtype=DT))
    Bx = hp.ProximalGradient(grad=lambda u: u - b, prox=hp.prox.box(-1.0, 0.5), step=1.0)
    assert torch.equal(Bx(torch.zeros(2, dtype=DT)), torch.tensor([0.5, -1.0], dtype=DT))


def test_km_averaged_same_fixed_point_and_symmetric_flag():
    Q = torch.tensor([[2.0, 0.5], [0.5, 1.0]], dtype=DT)
    G = hp.GradientStep(grad=lambda u, x: Q @ u - x, step=0.4)
    K = hp.KMAveraged(G, beta=0.5)
    assert K.symmetric_jacobian
    x = torch.tensor([1.0, 2.0], dtype=DT)
    with torch.no_grad():
        u = hp.GKMSolver(K, max_steps=10000, tol=1e-14)(torch.zeros(2, dtype=DT), x)
    assert rel_err(u, torch.linalg.solve(Q, x)) < 1e-12
    with pytest.raises(ValueError):
        hp.KMAveraged(G, beta=0.0)


def test_operator_argument_errors():
    with pytest.raises(ValueError, match="exactly one"):
        hp.GradientStep(step=0.1)
    with pytest.raises(ValueError, match="positive"):
        hp.GradientStep(grad=lambda u: u, step=-1.0)
    with pytest.raises(TypeError, match="prox must be callable"):
        hp.ProximalGradient(grad=lambda u: u, prox=None, step=1.0)
    with pytest.raises(ValueError):
        hp.prox.box(1.0, 0.0)


def test_learned_upper_criterion_gets_gradients_through_aggregation():
    """HODL with a learnable upper criterion F_ω (an nn.Module): unrolled grads match finite differences."""
    torch.manual_seed(0)
    n = 4
    A = torch.randn(2, n, dtype=DT)
    b = A @ torch.randn(n, dtype=DT)
    s = 1.0 / torch.linalg.matrix_norm(A, 2).item() ** 2
    T = lambda u: u - s * A.T @ (A @ u - b)  # noqa: E731  non-singleton fixed-point set

    class Criterion(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.z = torch.nn.Parameter(torch.randn(n, dtype=DT))

        def forward(self, u):
            return 0.5 * ((u - self.z) ** 2).sum()

    crit = Criterion()
    target = torch.randn(n, dtype=DT)
    solver = hp.GKMSolver(T, max_steps=60, tol=0.0, upper=crit, alpha=hp.Harmonic(1.0), hypergrad="unrolled")

    def loss():
        return ((solver(torch.zeros(n, dtype=DT)) - target) ** 2).sum()

    loss().backward()
    g = crit.z.grad.clone()
    h = 1e-6
    fd = torch.zeros(n, dtype=DT)
    with torch.no_grad():
        for i in range(n):
            crit.z[i] += h
            lp = loss()
            crit.z[i] -= 2 * h
            lm = loss()
            crit.z[i] += h
            fd[i] = (lp - lm) / (2 * h)
    assert rel_err(g, fd) < 1e-7


def test_solver_moves_with_module_and_state_dict_contains_operator():
    net = torch.nn.Linear(3, 3, dtype=DT)
    solver = hp.GKMSolver(hp.LearnedResidual(net, step=0.1), max_steps=5)
    keys = set(solver.state_dict())
    assert "T.net.weight" in keys and "_extra_state" in keys
    solver.to(torch.float32)
    assert net.weight.dtype == torch.float32


def test_check_every_changes_sync_frequency_not_the_result():
    Q = torch.tensor([[2.0, 0.5], [0.5, 1.0]], dtype=DT)
    T = lambda u: u - 0.4 * (Q @ u - 1.0)  # noqa: E731
    outs = []
    for every in (1, 7, 50):
        s = hp.GKMSolver(T, max_steps=200, tol=0.0, check_every=every)
        with torch.no_grad():
            outs.append(s(torch.zeros(2, dtype=DT)))
        assert s.info.steps == 200
        assert s.info.residual_steps == sorted(set([0] + list(range(every - 1, 200, every)) + [199]))  # step 0: r_0
        assert s.info.residuals.shape == (len(s.info.residual_steps),)
    assert all(torch.equal(outs[0], o) for o in outs[1:])
