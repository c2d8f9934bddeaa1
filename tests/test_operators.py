"""Operator library: values against formulas, gradients through learned parts, KM averaging."""

from __future__ import annotations

import pytest
import torch
from _oracles import DT, rel_err

import hodl_plugin as hp


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


def _hypergrad(solver, q, x0):
    x = x0.clone().requires_grad_(True)
    u = solver(torch.zeros(q.n, dtype=DT), x)
    q.F(u, x).backward()
    return x.grad


def test_gradient_step_operator_uses_cg_by_default(quad):
    x0 = torch.tensor([0.3, -1.0, 2.0], dtype=DT)
    T = hp.GradientStep(grad=lambda u, x: quad.Q @ u - quad.B @ x, step=quad.s)
    solver = hp.GKMSolver(T, max_steps=20000, tol=1e-13)
    g = _hypergrad(solver, quad, x0)
    assert solver.info.adjoint.method == "cg"
    assert rel_err(g, quad.hypergrad(x0)) < 1e-8


def test_objective_gradient_step_by_autograd(quad):
    x0 = torch.tensor([0.3, -1.0, 2.0], dtype=DT)
    f = lambda u, x: 0.5 * u @ (quad.Q @ u) - (quad.B @ x) @ u  # noqa: E731
    T = hp.GradientStep(objective=f, step=quad.s)
    for mode in ("implicit", "unrolled"):
        solver = hp.GKMSolver(T, max_steps=20000, tol=1e-13, hypergrad=mode)
        assert rel_err(_hypergrad(solver, quad, x0), quad.hypergrad(x0)) < 1e-8


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


# --- GradientStep(step=): a number, a scalar tensor, a callable -------------------------------------------------


def _diag_problem():
    """f(u; b) = ½ Σ a_i u_i² - b·u: K unrolled steps from 0 give u_K = (b/a)(1 - (1 - s a)^K)."""
    a = torch.tensor([1.0, 2.0, 3.0], dtype=DT)
    b = torch.tensor([1.0, -2.0, 0.5], dtype=DT)
    return a, b, (lambda u, b_: a * u - b_)


def _unrolled_ds(a, b, s, K):
    """d/ds Σ_i u_K,i = Σ_i b_i K (1 - s a_i)^(K-1) (closed form)."""
    return float((b * K * (1 - s * a) ** (K - 1)).sum())


def test_tensor_step_is_learnable_unrolled_closed_form():
    a, b, grad = _diag_problem()
    K, s0 = 7, 0.2
    s = torch.nn.Parameter(torch.tensor(s0, dtype=DT))
    T = hp.GradientStep(grad=grad, step=s)
    assert any(p is s for p in T.parameters())  # registered: a learned variable of the operator
    u = hp.GKMSolver(T, max_steps=K, tol=0.0, hypergrad="unrolled")(torch.zeros(3, dtype=DT), b)
    assert rel_err(u.detach(), b / a * (1 - (1 - s0 * a) ** K)) < 1e-14
    u.sum().backward()
    assert abs(s.grad.item() - _unrolled_ds(a, b, s0, K)) < 1e-12 * abs(_unrolled_ds(a, b, s0, K))


def test_tensor_step_implicit_gradient_closed_form():
    """u* = b/a does not depend on s: ∂F/∂s = 0 exactly; ∂F/∂b = (u* - y)/a; CG stays the default."""
    a, b, grad = _diag_problem()
    y = torch.tensor([0.3, 0.1, -0.2], dtype=DT)
    s = torch.nn.Parameter(torch.tensor([0.25], dtype=DT))  # one element, shape (1,): used as a scalar
    bb = b.clone().requires_grad_(True)
    solver = hp.GKMSolver(hp.GradientStep(grad=grad, step=s), max_steps=5000, tol=1e-14, hypergrad="implicit")
    u = solver(torch.zeros(3, dtype=DT), bb)
    assert u.shape == (3,)
    (0.5 * ((u - y) ** 2).sum()).backward()
    assert solver.info.adjoint.method == "cg"
    assert rel_err(bb.grad, (b / a - y) / a) < 1e-10
    assert abs(s.grad.item()) < 1e-12


def test_callable_step_of_the_params_closed_form():
    """s(θ) = 0.1 (1 + θ²), evaluated at every step: dF/dθ = dF/ds · 0.2 θ (unrolled closed form)."""
    a, b, grad = _diag_problem()
    K, th0 = 5, 0.8
    theta = torch.tensor(th0, dtype=DT, requires_grad=True)
    calls = []

    def step(b_, th):
        calls.append(1)
        return 0.1 * (1 + th**2)

    T = hp.GradientStep(grad=lambda u, b_, th: grad(u, b_), step=step)
    u = hp.GKMSolver(T, max_steps=K, tol=0.0, hypergrad="unrolled")(torch.zeros(3, dtype=DT), b, theta)
    s0 = 0.1 * (1 + th0**2)
    assert rel_err(u.detach(), b / a * (1 - (1 - s0 * a) ** K)) < 1e-14
    u.sum().backward()
    expected = _unrolled_ds(a, b, s0, K) * 0.2 * th0
    assert abs(theta.grad.item() - expected) < 1e-12 * abs(expected)
    assert len(calls) >= K
    # a float-valued callable works too and gives the same iterate
    T2 = hp.GradientStep(grad=grad, step=lambda b_: s0)
    with torch.no_grad():
        u2 = hp.GKMSolver(T2, max_steps=K, tol=0.0, hypergrad="unrolled")(torch.zeros(3, dtype=DT), b)
    assert rel_err(u2, u.detach()) < 1e-14


def test_step_argument_errors():
    g = lambda u: u  # noqa: E731
    with pytest.raises(ValueError, match="scalar"):
        hp.GradientStep(grad=g, step=torch.ones(2, dtype=DT))
    with pytest.raises(ValueError, match="positive"):
        hp.GradientStep(grad=g, step=torch.tensor(-0.1))
    with pytest.raises(ValueError, match="positive"):
        hp.GradientStep(grad=g, step=float("nan"))
    with pytest.raises(ValueError, match="floating"):
        hp.GradientStep(grad=g, step=torch.tensor(1))
    with pytest.raises(TypeError, match="step"):
        hp.GradientStep(grad=g, step="0.1")
    with pytest.raises(TypeError, match="step"):
        hp.GradientStep(grad=g, step=True)
    u = torch.zeros(2, dtype=DT)
    with pytest.raises(ValueError, match="callable step returned shape"):
        hp.GradientStep(grad=g, step=lambda: torch.ones(2))(u)
    with pytest.raises(ValueError, match="callable step returned"):
        hp.GradientStep(grad=g, step=lambda: -1.0)(u)


# --- symmetric_jacobian on a user's function operator -------------------------------------------------------------


def test_symmetric_jacobian_selects_cg_for_a_function_operator():
    torch.manual_seed(1)
    n = 12
    Q = torch.randn(n, n, dtype=DT)
    Q = Q @ Q.T / n + torch.eye(n, dtype=DT)
    y = torch.randn(n, dtype=DT)
    s = 1 / torch.linalg.eigvalsh(Q).max().item()
    exact = None
    for claim in (None, True):
        T = lambda u, x: u - s * (Q @ u - x)  # noqa: E731
        if claim:
            T.symmetric_jacobian = True
        x = torch.ones(n, dtype=DT, requires_grad=True)
        solver = hp.GKMSolver(T, max_steps=20000, tol=1e-14, hypergrad="implicit")
        (0.5 * ((solver(torch.zeros(n, dtype=DT), x) - y) ** 2).sum()).backward()
        exact = torch.linalg.solve(Q, torch.linalg.solve(Q, x.detach()) - y)
        assert solver.info.adjoint.method == ("cg" if claim else "gmres")
        assert rel_err(x.grad, exact) < 1e-9


def test_false_symmetric_claim_is_refused():
    """A non-symmetric Jacobian claimed symmetric: the claim is tested before CG runs and refused with
    LinearSolveError, also with on_fail="warn" (never a wrong hypergradient)."""
    torch.manual_seed(0)
    n = 30
    Q = torch.randn(n, n, dtype=DT)
    Q = Q @ Q.T / n + torch.eye(n, dtype=DT)
    S = torch.randn(n, n, dtype=DT)
    M = Q + 0.3 * (S - S.T)
    s = 0.5 / torch.linalg.matrix_norm(M, 2).item()
    T = lambda u, x: u - s * (M @ u - x)  # noqa: E731
    T.symmetric_jacobian = True
    y = torch.randn(n, dtype=DT)
    x = torch.randn(n, dtype=DT, requires_grad=True)
    exact = torch.linalg.solve(M.T, torch.linalg.solve(M, x.detach()) - y)
    u = hp.GKMSolver(T, max_steps=20000, tol=1e-13, hypergrad="implicit")(torch.zeros(n, dtype=DT), x)
    with pytest.raises(hp.LinearSolveError, match="cg"):
        (0.5 * ((u - y) ** 2).sum()).backward()
    x.grad = None
    u = hp.GKMSolver(T, max_steps=20000, tol=1e-13, hypergrad=hp.Implicit(on_fail="warn"))(torch.zeros(n, dtype=DT), x)
    with pytest.raises(hp.LinearSolveError, match="symmetric"):
        (0.5 * ((u - y) ** 2).sum()).backward()
    assert x.grad is None
    u = hp.GKMSolver(T, max_steps=20000, tol=1e-13, hypergrad=hp.Implicit("gmres"))(torch.zeros(n, dtype=DT), x)
    (0.5 * ((u - y) ** 2).sum()).backward()  # the explicit choice is always right
    assert rel_err(x.grad, exact) < 1e-9


def _quadratic(u, b, lam):  # a top-level objective: picklable
    return 0.5 * ((u - b) ** 2).sum()


@pytest.mark.parametrize("make", [
    lambda: hp.GradientStep(objective=_quadratic, step=0.5),
    lambda: hp.ProximalGradient(objective=_quadratic, prox=hp.prox.l1(0.1), step=0.5),
    lambda: hp.ProximalGradient(objective=_quadratic, prox=hp.prox.l1_param(1), step=0.5),
    lambda: hp.ProximalGradient(objective=_quadratic, prox=hp.prox.box(-1.0, 1.0), step=0.5),
    lambda: hp.ProximalGradient(objective=_quadratic, prox=hp.prox.nonnegative(), step=0.5),
])
def test_operators_with_library_parts_can_be_saved(make):
    """torch.save / pickle / deepcopy of a solver over a library operator (the prox maps and the
    autograd gradient were local lambdas: 'Can't pickle local object')."""
    import copy
    import io
    import pickle

    solver = hp.GKMSolver(make(), tol=1e-12, max_steps=2000)
    b = torch.tensor([2.0, -0.05, 0.5], dtype=torch.float64)
    lam = torch.tensor(0.1, dtype=torch.float64)
    u = solver(torch.zeros(3, dtype=torch.float64), b, lam)
    buf = io.BytesIO()
    torch.save(solver, buf)
    buf.seek(0)
    for twin in (pickle.loads(pickle.dumps(solver)), copy.deepcopy(solver), torch.load(buf, weights_only=False)):
        assert torch.equal(twin(torch.zeros(3, dtype=torch.float64), b, lam), u)


@pytest.mark.parametrize("mode", ["implicit", "inexact", "first_order"])
def test_an_autograd_gradient_step_under_inference_mode(mode):
    """GradientStep(objective=f) takes ∇_u f with autograd: under torch.inference_mode its inputs are inference
    tensors, which autograd cannot record (it raised a message about an upper objective nobody passed)."""
    D = torch.float64
    T = hp.GradientStep(objective=lambda u, x: 0.5 * ((u - x) ** 2).sum(), step=0.5)
    x = torch.tensor([1.0, -2.0], dtype=D)
    with torch.inference_mode():
        assert torch.equal(T(torch.zeros(2, dtype=D), x), 0.5 * x)  # u - s(u - x) at u = 0
        u = hp.GKMSolver(T, hypergrad=mode)(torch.zeros(2, dtype=D), x)
    assert torch.allclose(u, x, atol=1e-8) and u.is_inference()
