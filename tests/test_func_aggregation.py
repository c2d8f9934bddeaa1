"""torch.func transforms through the aggregated GKM step (``upper=``, α_k ≠ 0), unrolled/truncated.

∇_u F inside the step used ``requires_grad_``, which torch.func refuses; it now goes through
``torch.func.grad``. Reference: central finite differences of a hand-written SPEC §0 loop (float64).
"""

from __future__ import annotations

import pytest
import torch

import hodl_plugin as hp

DT = torch.float64
n, K = 4, 12
g = torch.Generator().manual_seed(3)
A = torch.randn(n, n, generator=g, dtype=DT)
Q = A @ A.T + n * torch.eye(n, dtype=DT)
L = float(torch.linalg.matrix_norm(Q, 2))
z = torch.randn(n, generator=g, dtype=DT)


def T(u, x):
    return u - (Q @ torch.tanh(u) - x) / L


def F(u, x):
    return 0.5 * ((u - z) ** 2).sum() + 0.3 * (x * u).sum()


def hand_loop(x, steps=K):
    """SPEC §0 with β = 1, s = 1, α_k = 1/(k+1), written out (∇_u F = u − z + 0.3x)."""
    u = torch.zeros(n, dtype=DT)
    for k in range(steps):
        u = T(u - (u - z + 0.3 * x) / (k + 1), x)
    return u


def loss(u, x):
    return (u ** 3).sum() + F(u, x)


def fd_grad(x, h=1e-6):
    e = torch.eye(n, dtype=DT)
    return torch.stack([(loss(hand_loop(x + h * e[i]), x + h * e[i]) - loss(hand_loop(x - h * e[i]), x - h * e[i]))
                        / (2 * h) for i in range(n)])


@pytest.mark.parametrize("mode", ["unrolled", "truncated"])
def test_func_grad_vmap_jacfwd_through_aggregation(mode):
    hg = "unrolled" if mode == "unrolled" else hp.Truncated(K)  # truncated with k = K: every step
    s = hp.GKMSolver(T, upper=F, alpha=hp.schedules.Harmonic(1.0), hypergrad=hg, max_steps=K, tol=0, atol=0)

    def f(x):
        return loss(s(torch.zeros(n, dtype=DT), x), x)

    x = torch.randn(n, generator=torch.Generator().manual_seed(5), dtype=DT)
    ref = fd_grad(x)
    assert torch.allclose(hand_loop(x), s(torch.zeros(n, dtype=DT), x), atol=1e-13)  # the forward is SPEC §0
    assert torch.allclose(torch.func.grad(f)(x), ref, atol=1e-7)
    assert torch.allclose(torch.func.jacfwd(f)(x), ref, atol=1e-7)
    xs = torch.stack([x, 0.5 * x])
    refs = torch.stack([ref, fd_grad(0.5 * x)])
    assert torch.allclose(torch.func.vmap(torch.func.grad(f))(xs), refs, atol=1e-7)
