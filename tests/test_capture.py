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
