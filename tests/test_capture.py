"""What T reads (:mod:`hodl_plugin._capture`): tensors in its closure, the parameters of a module operator,
the tensors of a ``functional_call`` get the exact derivative at every order, against closed forms and
the unrolled iteration. (``test_matrix.py``'s ``test_param_home`` runs every place θ can live × every mode
× every entry point.)"""

from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from _oracles import DT, rel_err, small_linear

import hodl_plugin as hp

MODES = {"implicit": {}, "inexact": {"eps": 1e-13, "delta": 1e-13}}


@pytest.mark.parametrize("mode", list(MODES))
def test_tensors_read_from_the_operators_closure(mode):
    """Tensors captured by T (as a Betty node's operator reads its parents) get the exact derivative
    at every order: first, second (double backward) and forward mode, against the closed forms."""
    Q, B, y, s = small_linear()
    theta = torch.tensor([0.3, -0.7, 1.1], dtype=DT, requires_grad=True)
    solver = hp.GKMSolver(lambda u: u - s * (Q @ u - B @ theta), max_steps=100000, tol=1e-13,
                          hypergrad=mode, **MODES[mode])
    Qi_B = torch.linalg.solve(Q, B)
    (0.5 * ((solver(torch.zeros(5, dtype=DT)) - y) ** 2).sum()).backward()
    torch.testing.assert_close(theta.grad, Qi_B.T @ (Qi_B @ theta.detach() - y), rtol=1e-8, atol=1e-10)
    loss = 0.5 * ((solver(torch.zeros(5, dtype=DT)) - y) ** 2).sum()
    (g,) = torch.autograd.grad(loss, theta, create_graph=True)
    w = torch.tensor([1.0, -2.0, 0.5], dtype=DT)
    (hv,) = torch.autograd.grad(g @ w, theta)
    torch.testing.assert_close(hv, Qi_B.T @ (Qi_B @ w), rtol=1e-8, atol=1e-10)
    with fwAD.dual_level():
        dual = fwAD.make_dual(theta.detach(), torch.ones(3, dtype=DT))
        solver2 = hp.GKMSolver(lambda u: u - s * (Q @ u - B @ dual), tol=1e-12, hypergrad=mode, **MODES[mode])
        tangent = fwAD.unpack_dual(solver2(torch.zeros(5, dtype=DT))).tangent
    torch.testing.assert_close(tangent, Qi_B @ torch.ones(3, dtype=DT), rtol=1e-8, atol=1e-10)


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


# ------------------------------------------------------------------------------------------------
# paths a torch-function mode cannot re-route: exact at first order, named at higher orders
# ------------------------------------------------------------------------------------------------
W0 = torch.tensor([[0.3, -0.2, 0.1], [0.1, 0.4, 0.0], [0.0, 0.2, -0.3]], dtype=DT)
X0 = torch.tensor([0.5, -1.0, 0.3], dtype=DT)


def _unrolled_grad(T_of_W, W):
    """d/dW Σ u*(W) by plain autograd through 300 steps of the contraction (the reference)."""
    Wr = W.detach().clone().requires_grad_(True)
    u = torch.zeros(3, dtype=DT)
    for _ in range(300):
        u = T_of_W(u, Wr)
    (g,) = torch.autograd.grad(u.sum(), Wr)
    return g


class _MatVec(torch.autograd.Function):
    """A user's custom Function computing with the captured W (its backward is exact)."""

    @staticmethod
    def forward(ctx, A, v):
        ctx.save_for_backward(A, v)
        return A @ v

    @staticmethod
    def backward(ctx, g):
        A, v = ctx.saved_tensors
        return torch.outer(g, v), A.T @ g


@pytest.mark.parametrize("mode", list(MODES))
def test_a_parameter_also_read_from_the_closure(mode):
    """solver(u0, a) with T reading a both as its parameter and from its closure: both paths count
    (the closure's was dropped: du*/da 0.612 for 2.041)."""
    a = torch.tensor(0.3, dtype=DT, requires_grad=True)
    solver = hp.GKMSolver(lambda u, p: p * u + a, tol=1e-14, max_steps=500, hypergrad=mode, **MODES[mode])
    solver(torch.zeros((), dtype=DT), a).backward()
    assert float(a.grad) == pytest.approx(1 / (1 - 0.3) ** 2, rel=1e-9)
    g = torch.func.grad(lambda b: hp.GKMSolver(lambda u, p: p * u + b, tol=1e-14, max_steps=500)(
        torch.zeros((), dtype=DT), b))(torch.tensor(0.3, dtype=DT))
    assert float(g) == pytest.approx(1 / (1 - 0.3) ** 2, rel=1e-9)


def test_module_parameters_passed_and_read_as_attributes():
    """The TorchOpt habit: solver(u0, *net.parameters()) with T calling net(u) (weight.grad was None)."""
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 3).double()
    with torch.no_grad():
        net.weight.mul_(0.3)
    T = lambda u, *ps: torch.tanh(net(u) + X0)  # noqa: E731
    solver = hp.GKMSolver(T, tol=1e-14, max_steps=1000)
    solver(torch.zeros(3, dtype=DT), *net.parameters()).sum().backward()
    ref = _unrolled_grad(lambda u, W: torch.tanh(u @ W.T + net.bias.detach() + X0), net.weight)
    assert rel_err(net.weight.grad, ref) < 1e-9


@pytest.mark.parametrize("inside", ["custom_function", "vmap_in_T"])
@pytest.mark.parametrize("mode", list(MODES))
def test_an_unrouted_path_is_exact_at_first_order_and_named_beyond(mode, inside):
    """W captured and used through a custom autograd.Function, or inside a torch.vmap that T runs: the
    first-order gradient is exact (was None / half of it); a higher order raises a named error."""
    if inside == "custom_function":
        def T_of(u, W):
            return torch.tanh(_MatVec.apply(W, u) + X0)
    else:
        def T_of(u, W):
            rows = torch.vmap(lambda w, v: w @ v, in_dims=(0, None))(W, u)
            return torch.tanh(0.5 * rows + 0.5 * W @ u + X0)
    W = W0.clone().requires_grad_(True)
    solver = hp.GKMSolver(lambda u: T_of(u, W), tol=1e-14, max_steps=1000, hypergrad=mode, **MODES[mode])
    solver(torch.zeros(3, dtype=DT)).sum().backward()
    assert rel_err(W.grad, _unrolled_grad(T_of, W0)) < 1e-9
    with pytest.raises(hp.HODLError, match="pass them as parameters"):
        (g,) = torch.autograd.grad(solver(torch.zeros(3, dtype=DT)).sum(), W, create_graph=True)


def test_a_vmap_inside_T_under_torch_func_is_named():
    def f(W):
        T = lambda u: torch.tanh(torch.vmap(lambda w, v: w @ v, in_dims=(0, None))(W, u) + X0)  # noqa: E731
        return hp.GKMSolver(T, tol=1e-14)(torch.zeros(3, dtype=DT)).sum()

    with pytest.raises(hp.HODLError, match="Pass them as parameters"):
        torch.func.grad(f)(W0)


def test_a_tensor_read_inside_torch_jit_is_named():
    W = W0.clone().requires_grad_(True)

    @torch.jit.script
    def step(u: torch.Tensor, A: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(A @ u + x)

    solver = hp.GKMSolver(lambda u: step(u, W, X0), tol=1e-14)
    with pytest.raises(hp.HODLError, match="torch.jit"):
        solver(torch.zeros(3, dtype=DT)).sum().backward()
    # passed as a parameter it is exact
    solver = hp.GKMSolver(lambda u, A: step(u, A, X0), tol=1e-14, max_steps=1000)
    solver(torch.zeros(3, dtype=DT), W).sum().backward()
    assert rel_err(W.grad, _unrolled_grad(lambda u, A: torch.tanh(A @ u + X0), W0)) < 1e-9


class _Affine(torch.nn.Module):
    """T(u, x) = W u + x with W a parameter of the module."""

    def __init__(self, W: torch.Tensor) -> None:
        super().__init__()
        self.W = torch.nn.Parameter(W.clone())

    def forward(self, u: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.W @ u + x


@pytest.mark.parametrize("mode", ["implicit", "inexact"])
def test_functional_call_state_is_the_state_differentiated(mode):
    """``functional_call(solver, {"T.W": W1})`` with W1 carrying no gradient: the derivative in x is taken
    with W1, the matrix the solve used, though the module holds its own W again by the time of backward:
    (I - W1)^-T 1, not (I - W0)^-T 1."""
    W0 = torch.tensor([[0.2, 0.1], [0.0, 0.3]], dtype=DT)
    W1 = torch.tensor([[0.5, -0.2], [0.1, 0.4]], dtype=DT)
    solver = hp.GKMSolver(_Affine(W0), hypergrad=mode, **({"eps": 1e-13, "delta": 1e-13} if mode == "inexact" else
                                                            {"tol": 1e-13}))
    x = torch.tensor([1.0, -2.0], dtype=DT, requires_grad=True)
    u = torch.func.functional_call(solver, {"T.W": W1}, (torch.zeros(2, dtype=DT), x))
    (g,) = torch.autograd.grad(u.sum(), x)
    eye = torch.eye(2, dtype=DT)
    assert rel_err(u, torch.linalg.solve(eye - W1, x)) < 1e-11
    assert rel_err(g, torch.linalg.solve((eye - W1).T, torch.ones(2, dtype=DT))) < 1e-10
    assert isinstance(solver.T.W, torch.nn.Parameter) and torch.equal(solver.T.W, W0)  # its own W again


def test_functional_call_around_a_custom_fixed_point():
    """A decorated solver function whose T is a module of the model ``functional_call`` is called on."""
    m = _Affine(torch.zeros(2, 2, dtype=DT))

    @hp.custom_fixed_point(m)
    def solve(u0, x):
        return torch.linalg.solve(torch.eye(2, dtype=DT) - m.W.detach(), x.detach())  # the closed form

    class Holder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.m = m

        def forward(self, u0: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
            return solve(u0, x)

    W = torch.tensor([[0.5, -0.2], [0.1, 0.4]], dtype=DT, requires_grad=True)
    x = torch.tensor([1.0, -2.0], dtype=DT)
    u = torch.func.functional_call(Holder(), {"m.W": W}, (torch.zeros(2, dtype=DT), x))
    (gW,) = torch.autograd.grad(u.sum(), W)
    A = torch.eye(2, dtype=DT) - W.detach()
    v = torch.linalg.solve(A.T, torch.ones(2, dtype=DT))
    assert rel_err(gW, torch.outer(v, torch.linalg.solve(A, x))) < 1e-10  # dL/dW = v u*^T


def test_functional_call_around_a_model_whose_gradient_step_reads_a_module():
    """The most common operator, a GradientStep whose objective calls a module of the model: a
    functional_call around the model differentiates the tensors it put in (closed form: the minimiser of
    ½‖Au - x‖² + ½‖u‖² is u* = (AᵀA + I)⁻¹Aᵀx)."""
    class Model(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(3, 2, bias=False, dtype=DT)
            lin = self.lin
            f = lambda u, x: 0.5 * ((lin(u) - x) ** 2).sum() + 0.5 * (u ** 2).sum()  # noqa: E731
            self.solver = hp.GKMSolver(hp.GradientStep(objective=f, step=0.2), tol=1e-13)

        def forward(self, u0: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
            return self.solver(u0, x)

    A = torch.tensor([[0.5, -0.2, 0.1], [0.3, 0.4, -0.6]], dtype=DT, requires_grad=True)
    x = torch.tensor([1.0, -2.0], dtype=DT)
    u = torch.func.functional_call(Model(), {"lin.weight": A}, (torch.zeros(3, dtype=DT), x))
    (gA,) = torch.autograd.grad(u.sum(), A)

    def closed(A: torch.Tensor) -> torch.Tensor:
        return torch.linalg.solve(A.T @ A + torch.eye(3, dtype=DT), A.T @ x).sum()

    assert rel_err(gA, torch.func.grad(closed)(A.detach())) < 1e-9


class _Lin(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.W = torch.nn.Parameter(torch.zeros(2, 2, dtype=DT))

    def step(self, u: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.W @ u + x


_NET = _Lin()


def _global_T(u: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return _helper(u) + x


def _helper(u: torch.Tensor) -> torch.Tensor:
    return _NET.W @ u  # a module-level module, read through another function


@pytest.mark.parametrize("where", ["bound_method", "global_function"])
def test_functional_call_when_T_reaches_the_module_by_name(where):
    """T a bound method of the module, or a module-level function that reaches a module-level module
    through a helper: functional_call around a parent still differentiates the tensors it put in."""
    net = _Lin() if where == "bound_method" else _NET
    T = net.step if where == "bound_method" else _global_T

    class Parent(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net, self.solver = net, hp.GKMSolver(T, tol=1e-13)

        def forward(self, u0: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
            return self.solver(u0, x)

    W = torch.tensor([[0.5, -0.2], [0.1, 0.4]], dtype=DT, requires_grad=True)
    x = torch.tensor([1.0, -2.0], dtype=DT)
    u = torch.func.functional_call(Parent(), {"net.W": W}, (torch.zeros(2, dtype=DT), x))
    (gW,) = torch.autograd.grad(u.sum(), W)
    A = torch.eye(2, dtype=DT) - W.detach()
    assert rel_err(gW, torch.outer(torch.linalg.solve(A.T, torch.ones(2, dtype=DT)), torch.linalg.solve(A, x))) < 1e-10
    assert torch.equal(net.W, torch.zeros(2, 2, dtype=DT))  # the module's own parameter again
