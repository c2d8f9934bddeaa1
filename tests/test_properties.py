"""Property tests (hypothesis) over random contractive linear operators and SPD quadratics."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import hodl_plugin as hp
from conftest import DT, rel_err

cases = st.fixed_dictionaries(
    {
        "n": st.integers(2, 12),
        "m": st.integers(1, 4),
        "rho": st.floats(0.05, 0.9),
        "seed": st.integers(0, 10_000),
    }
)


@settings(max_examples=25, deadline=None)
@given(cases, st.sampled_from(["gmres", "bicgstab", "fixed_point"]))
def test_contractive_affine_operator_implicit_is_closed_form(c, solver_name):
    """T(u; x) = W u + B x with ||W|| = ρ < 1: u* = (I-W)^{-1}Bx, ∇f = Bᵀ(I-W)^{-T}(u* - y)."""
    g = torch.Generator().manual_seed(c["seed"])
    n, m = c["n"], c["m"]
    W = torch.randn(n, n, generator=g, dtype=DT)
    W = c["rho"] * W / torch.linalg.matrix_norm(W, 2)
    B = torch.randn(n, m, generator=g, dtype=DT)
    y = torch.randn(n, generator=g, dtype=DT)
    x = torch.randn(m, generator=g, dtype=DT, requires_grad=True)
    I = torch.eye(n, dtype=DT)
    solver = hp.GKMSolver(lambda u, x: W @ u + B @ x, max_steps=5000, tol=1e-14,
                          solver=solver_name, adjoint_maxiter=5000)
    u = solver(torch.zeros(n, dtype=DT), x)
    (0.5 * ((u - y) ** 2).sum()).backward()
    u_star = torch.linalg.solve(I - W, B @ x.detach())
    expected = B.T @ torch.linalg.solve((I - W).T, u_star - y)
    assert rel_err(u.detach(), u_star) < 1e-10
    assert rel_err(x.grad, expected) < 1e-8 or float((x.grad - expected).norm()) < 1e-12


@settings(max_examples=20, deadline=None)
@given(cases, st.sampled_from(["implicit", "unrolled"]), st.floats(0.3, 1.0))
def test_spd_quadratic_gradient_step(c, mode, beta):
    """T(u) = u - s(Qu - Bx) with Q SPD, any KM relaxation β: hypergradient = Bᵀ Q⁻¹ (u* - y)."""
    g = torch.Generator().manual_seed(c["seed"])
    n, m = c["n"], c["m"]
    R = torch.randn(n, n, generator=g, dtype=DT)
    Q = R @ R.T / n + (0.2 + c["rho"]) * torch.eye(n, dtype=DT)
    s = 1.0 / float(torch.linalg.eigvalsh(Q).max())
    B = torch.randn(n, m, generator=g, dtype=DT)
    y = torch.randn(n, generator=g, dtype=DT)
    x = torch.randn(m, generator=g, dtype=DT, requires_grad=True)
    T = hp.GradientStep(grad=lambda u, x: Q @ u - B @ x, step=s)
    solver = hp.GKMSolver(T, max_steps=200000, tol=1e-13, beta=beta, hypergrad=mode)
    u = solver(torch.zeros(n, dtype=DT), x)
    (0.5 * ((u - y) ** 2).sum()).backward()
    expected = B.T @ torch.linalg.solve(Q, torch.linalg.solve(Q, B @ x.detach()) - y)
    assert rel_err(x.grad, expected) < 1e-8 or float((x.grad - expected).norm()) < 1e-12
