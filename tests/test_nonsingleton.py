"""SPEC T5: a non-singleton fixed-point set. Plain KM depends on u0; HODL selects argmin F over Fix T."""

from __future__ import annotations

import pytest
import torch

import hodl_plugin as hp
from conftest import DT, nonsingleton, rel_err


@pytest.fixture
def ns():
    A, b, s, z, proj = nonsingleton()
    T = lambda u, *x: u - s * A.T @ (A @ u - b)  # noqa: E731  (rank-deficient least squares)
    return A, b, z, proj, T


def test_plain_km_converges_to_a_fixed_point_that_depends_on_u0(ns):
    A, b, z, proj, T = ns
    solver = hp.GKMSolver(T, max_steps=100000, tol=1e-13)
    outs = []
    for seed in (0, 1):
        u0 = torch.randn(12, generator=torch.Generator().manual_seed(seed), dtype=DT)
        with torch.no_grad():
            u = solver(u0)
        assert rel_err(u, proj(u0)) < 1e-10  # the projection of u0: depends on u0
        outs.append(u)
    assert rel_err(outs[0], outs[1]) > 0.1
    assert rel_err(outs[0], proj(z)) > 0.1  # and is not the upper-optimal fixed point


def test_hodl_aggregation_selects_the_upper_optimal_fixed_point(ns):
    A, b, z, proj, T = ns
    u_sel = proj(z)  # argmin ½||u - z||² over Fix(T), closed form
    F = lambda u: 0.5 * ((u - z) ** 2).sum()  # noqa: E731
    errs = {}
    for K in (1000, 4000):
        for seed in (0, 1):
            u0 = torch.randn(12, generator=torch.Generator().manual_seed(seed), dtype=DT)
            solver = hp.GKMSolver(T, max_steps=K, tol=0.0, upper=F, upper_step=1.0, alpha=hp.Harmonic(1.0))
            with torch.no_grad():
                u = solver(u0)
            errs[K, seed] = rel_err(u, u_sel)
    # converges to u_sel from any start, at the O(1/K) rate of the harmonic weights
    assert max(errs[4000, 0], errs[4000, 1]) < 2e-3
    assert errs[4000, 0] < 0.3 * errs[1000, 0]


def test_hyper_training_through_the_selection(ns):
    """z = ω, task loss ½||u_sel(ω) - u_gt||², u_gt ∈ Fix T: d/dω of the limit = P_null(A)(u_sel - u_gt).

    Unrolled through the aggregated iteration (HODL's hypergradient) approaches it as K grows.
    """
    A, b, z, proj, T = ns
    u_gt = proj(torch.zeros(12, dtype=DT) + 0.3)
    F = lambda u, w: 0.5 * ((u - w) ** 2).sum()  # noqa: E731
    P_null = torch.eye(12, dtype=DT) - A.T @ torch.linalg.solve(A @ A.T, A)
    expected = P_null @ (proj(z) - u_gt)
    errs = []
    for K in (300, 1200):
        w = z.clone().requires_grad_(True)
        solver = hp.GKMSolver(T, max_steps=K, tol=0.0, upper=F, alpha=hp.Harmonic(1.0), hypergrad="unrolled")
        u = solver(torch.zeros(12, dtype=DT), w)
        (0.5 * ((u - u_gt) ** 2).sum()).backward()
        errs.append(rel_err(w.grad, expected))
    assert errs[1] < 0.05 and errs[1] < errs[0]


def test_implicit_mode_reports_singular_adjoint(ns):
    """Fix(T) is not a singleton, so I - ∂T is singular: the implicit method must not return garbage."""
    A, b, z, proj, T = ns
    T2 = lambda u, x: T(u) + 0 * x  # noqa: E731
    solver = hp.GKMSolver(T2, max_steps=5000, tol=1e-12, hypergrad="implicit", solver="fixed_point",
                          adjoint_maxiter=200)
    x = torch.zeros(12, dtype=DT, requires_grad=True)
    u = solver(torch.zeros(12, dtype=DT), x)
    with pytest.raises(hp.LinearSolveError, match="singular"):
        ((u - z) ** 2).sum().backward()
