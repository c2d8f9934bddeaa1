"""Adjoint linear solvers against torch.linalg.solve (float64)."""

from __future__ import annotations

import pytest
import torch

from conftest import DT, rel_err
from hodl_plugin import linear_solve as ls


def spd(n, cond, seed):
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=DT))
    return U @ torch.diag(torch.logspace(0, torch.log10(torch.tensor(cond)).item(), n, dtype=DT)) @ U.T


def nonsym(n, seed, rho=0.9):
    g = torch.Generator().manual_seed(seed)
    J = torch.randn(n, n, generator=g, dtype=DT)
    J = rho * J / torch.linalg.matrix_norm(J, 2)
    return torch.eye(n, dtype=DT) - J.T  # the adjoint matrix (I - J)^T of a contraction


@pytest.mark.parametrize("name", ["cg", "torchopt_cg", "gmres", "bicgstab"])
def test_spd(name):
    M = spd(80, 100.0, 0)
    b = torch.randn(80, dtype=DT, generator=torch.Generator().manual_seed(1))
    x, info = ls.get(name, rtol=1e-12, maxiter=2000)(lambda v: M @ v, b)
    assert info.converged and info.residual <= info.threshold * (1 + 1e-6)
    assert rel_err(x, torch.linalg.solve(M, b)) < 1e-9


@pytest.mark.parametrize("name", ["gmres", "bicgstab", "fixed_point"])
def test_nonsymmetric(name):
    M = nonsym(60, 2)
    b = torch.randn(60, dtype=DT, generator=torch.Generator().manual_seed(3))
    x, info = ls.get(name, rtol=1e-12, maxiter=5000)(lambda v: M @ v, b)
    assert info.converged
    assert rel_err(x, torch.linalg.solve(M, b)) < 1e-9


def test_matrix_shaped_unknowns_and_warm_start():
    M = nonsym(12, 4)
    B = torch.randn(3, 4, dtype=DT)
    mv = lambda V: (M @ V.reshape(-1)).reshape(3, 4)  # noqa: E731
    x, info = ls.gmres(rtol=1e-12, restart=5)(mv, B)
    assert x.shape == (3, 4) and info.converged
    x2, info2 = ls.gmres(rtol=1e-12, restart=5)(mv, B, x0=x)
    assert info2.iterations <= 2  # started at the solution: one residual product
    assert rel_err(x2, x) < 1e-10


def test_reports_non_convergence():
    M = spd(50, 1e4, 5)
    b = torch.ones(50, dtype=DT)
    for name in ("cg", "gmres", "bicgstab", "fixed_point"):
        _, info = ls.get(name, rtol=1e-14, maxiter=3)(lambda v: M @ v, b)
        assert not info.converged and info.residual > info.threshold


def test_bad_arguments():
    with pytest.raises(ValueError):
        ls.cg(rtol=0.0, atol=0.0)
    with pytest.raises(ValueError):
        ls.gmres(maxiter=0)
    with pytest.raises(ValueError, match="unknown linear solver"):
        ls.get("lu")


def test_fast_vjp_equals_public_autograd():
    from hodl_plugin._autodiff import make_vjp

    W = torch.randn(7, 7, dtype=DT)
    u = torch.randn(7, dtype=DT, requires_grad=True)
    out = torch.tanh(W @ u)
    v = torch.randn(7, dtype=DT)
    (ref,) = torch.autograd.grad(out, u, v, retain_graph=True)
    vjp = make_vjp(out, u)
    assert torch.equal(vjp(v), ref) and torch.equal(vjp(2 * v), 2 * ref)
    # unused input -> zeros
    w = torch.randn(3, dtype=DT, requires_grad=True)
    assert torch.equal(make_vjp(out, w)(v), torch.zeros(3, dtype=DT))
