"""Every hypergradient mode against closed forms on a quadratic lower level (float64)."""

from __future__ import annotations

import pytest
import torch

import hodl_plugin as hp
from conftest import DT, make_quadratic, rel_err

EXACT = [
    ("implicit", {"solver": "cg"}),
    ("implicit", {"solver": "gmres"}),
    ("implicit", {"solver": "bicgstab"}),
    ("implicit", {"solver": "fixed_point", "adjoint_maxiter": 20000}),
    ("unrolled", {}),
]


def hypergrad(solver, q, x0):
    x = x0.clone().requires_grad_(True)
    u = solver(torch.zeros(q.n, dtype=DT), x)
    q.F(u, x).backward()
    return x.grad


@pytest.mark.parametrize("mode,opts", EXACT, ids=[f"{m}-{o.get('solver', '')}" for m, o in EXACT])
def test_exact_modes_match_closed_form(quad, mode, opts):
    x0 = torch.tensor([0.3, -1.0, 2.0], dtype=DT)
    solver = hp.GKMSolver(quad.T, max_steps=20000, tol=1e-13, hypergrad=mode, **opts)
    g = hypergrad(solver, quad, x0)
    assert solver.info.converged
    assert rel_err(g, quad.hypergrad(x0)) < 1e-8


@pytest.mark.parametrize("beta", [0.5, hp.Constant(0.8)])
def test_km_relaxation_same_fixed_point_and_hypergradient(quad, beta):
    x0 = torch.tensor([1.0, 0.0, -1.0], dtype=DT)
    for mode in ("implicit", "unrolled"):
        solver = hp.GKMSolver(quad.T, max_steps=40000, tol=1e-13, beta=beta, hypergrad=mode)
        assert rel_err(hypergrad(solver, quad, x0), quad.hypergrad(x0)) < 1e-8


def _k_step_jacobian(q, k):
    """d u_K / d x through k plain steps u <- (I - sQ) u + sBx:  sum_{i<k} (I - sQ)^i sB."""
    M = torch.eye(q.n, dtype=DT) - q.s * q.Q
    acc, P = torch.zeros_like(q.B), torch.eye(q.n, dtype=DT)
    for _ in range(k):
        acc = acc + P @ (q.s * q.B)
        P = M @ P
    return acc


def test_unrolled_differentiates_the_k_step_map_exactly(quad):
    """Not converged (K = 7): unrolled equals the derivative of the 7-step map, in closed form."""
    x0 = torch.tensor([0.5, 0.5, -0.5], dtype=DT)
    K = 7
    solver = hp.GKMSolver(quad.T, max_steps=K, tol=0.0, hypergrad="unrolled")
    x = x0.clone().requires_grad_(True)
    u = solver(torch.zeros(quad.n, dtype=DT), x)
    quad.F(u, x).backward()
    M = torch.eye(quad.n, dtype=DT) - quad.s * quad.Q
    uK = sum(torch.linalg.matrix_power(M, i) @ (quad.s * quad.B @ x0) for i in range(K))
    expected = _k_step_jacobian(quad, K).T @ (uK - quad.y) + quad.c * x0
    assert solver.info.steps == K
    assert torch.allclose(u.detach(), uK, rtol=1e-12, atol=1e-12)
    assert rel_err(x.grad, expected) < 1e-10


@pytest.mark.parametrize("k", [1, 3, 10])
def test_truncated_matches_closed_form_of_last_k_steps(quad, k):
    x0 = torch.tensor([0.2, -0.4, 1.0], dtype=DT)
    solver = hp.GKMSolver(quad.T, max_steps=5000, tol=1e-13, hypergrad="truncated", steps=k)
    g = hypergrad(solver, quad, x0)
    u = quad.u_star(x0)
    expected = _k_step_jacobian(quad, k).T @ (u - quad.y) + quad.c * x0
    assert rel_err(g, expected) < 1e-8
    # and truncation converges to the implicit gradient as k grows
    if k == 10:
        assert rel_err(g, quad.hypergrad(x0)) < rel_err(_first_order(quad, x0), quad.hypergrad(x0))


def _first_order(q, x0):
    return q.s * q.B.T @ (q.u_star(x0) - q.y) + q.c * x0


def test_first_order_is_jacobian_free_formula(quad):
    x0 = torch.tensor([0.2, -0.4, 1.0], dtype=DT)
    solver = hp.GKMSolver(quad.T, max_steps=5000, tol=1e-13, hypergrad="first_order")
    assert rel_err(hypergrad(solver, quad, x0), _first_order(quad, x0)) < 1e-8


def test_implicit_forward_keeps_no_graph_and_no_grad_returns_plain_tensor(quad):
    x = torch.ones(3, dtype=DT, requires_grad=True)
    solver = hp.GKMSolver(quad.T, max_steps=5000, tol=1e-12)
    with torch.no_grad():
        u = solver(torch.zeros(quad.n, dtype=DT), x)
    assert not u.requires_grad
    u = solver(torch.zeros(quad.n, dtype=DT), x)
    # one operator application is on the graph, whatever K: the graph is a single T evaluation
    assert u.grad_fn is not None and solver.info.steps > 50


def test_gradient_step_operator_uses_cg_by_default(quad):
    x0 = torch.tensor([0.3, -1.0, 2.0], dtype=DT)
    T = hp.GradientStep(grad=lambda u, x: quad.Q @ u - quad.B @ x, step=quad.s)
    solver = hp.GKMSolver(T, max_steps=20000, tol=1e-13)
    g = hypergrad(solver, quad, x0)
    assert solver.info.adjoint.method == "cg"
    assert rel_err(g, quad.hypergrad(x0)) < 1e-8


def test_objective_gradient_step_by_autograd(quad):
    x0 = torch.tensor([0.3, -1.0, 2.0], dtype=DT)
    f = lambda u, x: 0.5 * u @ (quad.Q @ u) - (quad.B @ x) @ u  # noqa: E731
    T = hp.GradientStep(objective=f, step=quad.s)
    for mode in ("implicit", "unrolled"):
        solver = hp.GKMSolver(T, max_steps=20000, tol=1e-13, hypergrad=mode)
        assert rel_err(hypergrad(solver, quad, x0), quad.hypergrad(x0)) < 1e-8


def test_maid_quadratic_oracle_T1():
    """SPEC T1 (MAID's toy, smaller): IFT hypergradient and the optimum θ* in closed form."""
    g = torch.Generator().manual_seed(29)
    n, m = 200, 10
    A1, A2, A3 = (torch.rand(n, m, generator=g, dtype=DT) for _ in range(3))
    x1, x2, th_e = (torch.rand(m, generator=g, dtype=DT) for _ in range(3))
    b1 = A1 @ x1 + 0.01 * torch.randn(n, generator=g, dtype=DT)
    b2 = A2 @ x2 + A3 @ th_e + 0.01 * torch.randn(n, generator=g, dtype=DT)
    H = A2.T @ A2
    s = 1.0 / torch.linalg.eigvalsh(H).max().item()
    T = hp.GradientStep(grad=lambda x, th: A2.T @ (A2 @ x + A3 @ th - b2), step=s)
    G = lambda x, th: 0.5 * ((A1 @ x - b1) ** 2).sum()  # noqa: E731
    c = torch.linalg.solve(H, A2.T @ b2)
    M = torch.linalg.solve(H, A2.T @ A3)
    A1M = A1 @ M
    theta_star = torch.linalg.solve(A1M.T @ A1M, A1M.T @ (A1 @ c - b1))
    theta = torch.zeros(m, dtype=DT, requires_grad=True)
    solver = hp.GKMSolver(T, max_steps=200000, tol=1e-11, hypergrad="implicit")
    u = solver(torch.zeros(m, dtype=DT), theta)
    G(u, theta).backward()
    exact = -A1M.T @ (A1 @ c - A1M @ theta.detach() - b1)
    assert rel_err(theta.grad, exact) < 1e-8
    # the hypergradient vanishes at θ* (closed form) ...
    th = theta_star.clone().requires_grad_(True)
    G(solver(c - M @ theta_star, th), th).backward()
    assert float(th.grad.norm()) < 1e-7 * float(exact.norm())
    # ... and L-BFGS driven by the implicit hypergradient reaches θ*
    opt = torch.optim.LBFGS([theta], lr=1.0, max_iter=200, tolerance_grad=1e-12,
                            tolerance_change=0, history_size=20, line_search_fn="strong_wolfe")
    warm = [torch.zeros(m, dtype=DT)]

    def closure():
        opt.zero_grad()
        u = solver(warm[0], theta)
        warm[0] = u.detach()
        loss = G(u, theta)
        loss.backward()
        return loss

    opt.step(closure)
    assert rel_err(theta.detach(), theta_star) < 1e-5


def test_module_operator_parameters_receive_implicit_gradients():
    """A learned operator (nn.Module): grads of its weights match unrolled-to-convergence."""
    torch.manual_seed(0)
    n = 6
    net = torch.nn.Linear(n, n, dtype=DT)
    with torch.no_grad():
        net.weight.mul_(0.3 / torch.linalg.matrix_norm(net.weight, 2))
    T = hp.LearnedResidual(lambda u, x: u - net(u) - x, step=1.0)  # T(u) = net(u) + x
    T.add_module("inner", net)
    y = torch.randn(n, dtype=DT)
    grads = {}
    for mode in ("implicit", "unrolled"):
        net.zero_grad()
        solver = hp.GKMSolver(T, max_steps=2000, tol=1e-14, hypergrad=mode)
        x = torch.zeros(n, dtype=DT)
        u = solver(torch.zeros(n, dtype=DT), x)
        ((u - y) ** 2).sum().backward()
        grads[mode] = (net.weight.grad.clone(), net.bias.grad.clone())
    for a, b in zip(grads["implicit"], grads["unrolled"]):
        assert rel_err(a, b) < 1e-9


def test_functional_operator_route_matches_module_route():
    torch.manual_seed(1)
    n = 5
    net = torch.nn.Linear(n, n, dtype=DT)
    with torch.no_grad():
        net.weight.mul_(0.5 / torch.linalg.matrix_norm(net.weight, 2))
    fn, w = hp.functional_operator(net)
    solver = hp.GKMSolver(fn, max_steps=3000, tol=1e-14, hypergrad="implicit")
    u = solver(torch.zeros(n, dtype=DT), *w)
    (u**2).sum().backward()
    g_func = net.weight.grad.clone()
    net.zero_grad()
    solver2 = hp.GKMSolver(net, max_steps=3000, tol=1e-14, hypergrad="unrolled")
    (solver2(torch.zeros(n, dtype=DT)) ** 2).sum().backward()
    assert rel_err(g_func, net.weight.grad) < 1e-9


def test_larger_quadratic_all_modes_agree():
    q = make_quadratic(n=120, m=4, cond=50.0, seed=3)
    x0 = torch.linspace(-1, 1, 4, dtype=DT)
    ref = q.hypergrad(x0)
    for mode, opts in EXACT[:3]:
        solver = hp.GKMSolver(q.T, max_steps=50000, tol=1e-13, hypergrad=mode, **opts)
        assert rel_err(hypergrad(solver, q, x0), ref) < 1e-8
