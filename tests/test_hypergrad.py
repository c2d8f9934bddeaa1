"""The hypergradient methods (:mod:`hodl_plugin.hypergrad`: Unrolled, Truncated, FirstOrder; the implicit
modes beside them) against closed forms on a quadratic lower level T(u; x) = u − s(Qu − Bx) (float64):
the derivative of the K-step map, of its last k steps, the Jacobian-free formula (:ref:`math-choosing`,
:ref:`math-unrolled`); forward mode and NaN upstream gradients in every mode.
"""

from __future__ import annotations

import re

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from _assertions import assert_right_or_named, run_recording, zeros
from _oracles import DT, affine_k_steps, make_linear, make_quadratic, rel_err

import hodl_plugin as hp

MODES = ["implicit", "inexact", "unrolled", "truncated", "first_order"]


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


def test_larger_quadratic_all_modes_agree():
    q = make_quadratic(n=120, m=4, cond=50.0, seed=3)
    x0 = torch.linspace(-1, 1, 4, dtype=DT)
    ref = q.hypergrad(x0)
    for mode, opts in EXACT[:3]:
        solver = hp.GKMSolver(q.T, max_steps=50000, tol=1e-13, hypergrad=mode, **opts)
        assert rel_err(hypergrad(solver, q, x0), ref) < 1e-8


# -- unrolled: the K-step map ---------------------------------------------------------------------------
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


def test_batch_dims_unrolled_gradient_is_each_samples_own_K_step_map():
    a = torch.tensor([[0.5], [0.9], [0.99]], dtype=DT)  # per-sample contraction: samples stop at different k

    def T(u, x):
        return a * u + x

    x = torch.ones(3, 2, dtype=DT, requires_grad=True)
    solver = hp.GKMSolver(T, max_steps=5000, tol=1e-8, batch_dims=1, hypergrad="unrolled", check_every=1)
    u = solver(torch.zeros(3, 2, dtype=DT), x)
    u.sum().backward()
    K = solver.info.steps_per_sample.to(DT).unsqueeze(-1)
    assert torch.allclose(u, affine_k_steps(a, x.detach(), K), rtol=1e-12)  # u_K of each sample's own K
    assert torch.allclose(x.grad, ((1 - a**K) / (1 - a)).expand(3, 2), rtol=1e-12)
    assert len(set(solver.info.steps_per_sample.tolist())) == 3


# -- truncated: the last k steps ------------------------------------------------------------------------
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


@pytest.mark.parametrize("check_every", [None, 1, 3, 10, 49, 50, 100, 5000])
def test_truncated_backprops_all_k_steps_whatever_check_every(check_every):
    kw = {} if check_every is None else {"check_every": check_every}
    solver = hp.GKMSolver(lambda u, x: 0.9 * u + x, hypergrad="truncated", steps=50, **kw)
    x = torch.ones(1, dtype=DT, requires_grad=True)
    solver(zeros(1), x).backward()
    expected = sum(0.9**i for i in range(50))  # 9.948 (6.513 = Σ_{i<10}: only the last check_every steps)
    assert abs(float(x.grad) - expected) < 1e-9, (float(x.grad), expected)


# -- first order: the Jacobian-free formula ---------------------------------------------------------------
def _first_order(q, x0):
    return q.s * q.B.T @ (q.u_star(x0) - q.y) + q.c * x0


def test_first_order_is_jacobian_free_formula(quad):
    x0 = torch.tensor([0.2, -0.4, 1.0], dtype=DT)
    solver = hp.GKMSolver(quad.T, max_steps=5000, tol=1e-13, hypergrad="first_order")
    assert rel_err(hypergrad(solver, quad, x0), _first_order(quad, x0)) < 1e-8


# -- every mode: forward mode, NaN upstream gradients ------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("entry", ["jacfwd", "forward_ad"])
def test_forward_mode_gives_du_star_dx_not_dT_dx(mode, entry):
    kw = {"steps": 5} if mode == "truncated" else {}
    solver = hp.GKMSolver(lambda u, x: 0.5 * u + x, hypergrad=mode, tol=1e-13, max_steps=200, **kw)
    x0 = torch.tensor([1.0, -2.0, 0.5], dtype=DT)
    t = torch.tensor([0.3, 1.0, -1.0], dtype=DT)
    factor = {"first_order": 1.0, "truncated": sum(0.5**i for i in range(5))}.get(mode, 2.0)

    def run():
        if entry == "jacfwd":
            return torch.func.jacfwd(lambda x: solver(zeros(3), x))(x0)
        with fwAD.dual_level():
            tan = fwAD.unpack_dual(solver(zeros(3), fwAD.make_dual(x0, t))).tangent
        assert tan is not None, "forward mode: no tangent on the output"
        return tan.clone()

    ref = factor * (torch.eye(3, dtype=DT) if entry == "jacfwd" else t)
    assert_right_or_named(run, ref, 1e-10, what=f"{mode}/{entry}")


@pytest.mark.parametrize("mode,kw", [(m, {}) for m in MODES] + [("implicit", {"on_fail": "warn"}),
                                                                  ("inexact", {"on_fail": "raise"})],
                         ids=MODES + ["implicit-warn", "inexact-raise"])
def test_a_nan_upstream_gradient_is_nan_or_named_in_every_mode(mode, kw):
    p = make_linear("nonsym", seed=9)
    kw = dict(kw, steps=5) if mode == "truncated" else kw
    solver = hp.GKMSolver(p.T, hypergrad=mode, **kw)
    x = p.x0.clone().requires_grad_(True)

    def run():
        u = solver(zeros(p.n), x)
        u.backward(torch.full_like(u, float("nan")))
        return x.grad

    g, err, rec = run_recording(run)
    texts = [str(w.message) for w in rec] + ([str(err)] if err is not None else [])
    for t in texts:  # "residual nan > nan" says nothing; the message must name the NaN
        assert "nan > nan" not in t.lower(), t
    if err is not None:
        assert isinstance(err, hp.HODLError), f"generic error {type(err).__name__}: {err}"
        assert re.search(r"(?i)non-finite|nan", str(err)), str(err)
        return
    assert g is not None and bool(torch.isnan(g).any()), f"{mode}: NaN upstream gradient became {g}"
