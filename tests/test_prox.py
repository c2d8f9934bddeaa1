"""Proximal maps: closed forms, and learned weights that leave the valid range (issue 11, item 13)."""

from __future__ import annotations

import math

import pytest
import torch

import hodl_plugin as hp
from hodl_plugin import prox

DT = torch.float64


def test_l1_param_is_the_soft_threshold_closed_form():
    v = torch.tensor([-2.0, -0.3, 0.0, 0.4, 3.0], dtype=DT)
    lam = torch.tensor([0.5, 0.5, 0.5, 0.1, 0.0], dtype=DT)  # per-coordinate weights
    out = prox.l1_param(1)(v, 2.0, torch.ones(1, dtype=DT), lam)
    # argmin_u 1/2 (u - v)^2 + 2 lam |u|, coordinate-wise
    ref = torch.tensor([-1.0, 0.0, 0.0, 0.2, 3.0], dtype=DT)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("bad, word", [(-0.5, "negative"), (math.nan, "non-finite"), (math.inf, "non-finite")])
def test_l1_param_rejects_invalid_weight(bad, word):
    with pytest.raises(ValueError, match=rf"l1_param weight params\[0\] is {word}"):
        prox.l1_param(0)(torch.ones(3, dtype=DT), 1.0, torch.tensor(bad, dtype=DT))


def test_l1_param_rejects_one_negative_coordinate():
    lam = torch.tensor([0.1, -1e-9, 0.2], dtype=DT)
    with pytest.raises(ValueError, match="negative"):
        prox.l1_param(0)(torch.ones(3, dtype=DT), 1.0, lam)


def test_l1_param_bad_index():
    with pytest.raises(ValueError, match="index"):
        prox.l1_param(-1)
    with pytest.raises(ValueError, match="params\\[2\\]"):
        prox.l1_param(2)(torch.ones(2), 1.0, torch.tensor(0.1))


@pytest.mark.parametrize("bad", [-0.5, math.nan, math.inf])
def test_fixed_l1_weight_rejected_at_construction(bad):
    with pytest.raises(ValueError, match="l1 weight"):
        prox.l1(bad)


def test_box_rejects_nan():
    with pytest.raises(ValueError, match="box"):
        prox.box(math.nan, 1.0)


def _lasso_operator():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(8, 5, generator=g, dtype=DT)
    b = torch.randn(8, generator=g, dtype=DT)
    s = 1.0 / float(torch.linalg.matrix_norm(A, 2)) ** 2
    T = hp.ProximalGradient(grad=lambda u, lam: A.T @ (A @ u - b), prox=prox.l1_param(0), step=s)
    return T


@pytest.mark.parametrize("mode", ["implicit", "unrolled", "inexact", "first_order"])
def test_weight_that_turns_negative_during_training_raises(mode):
    """Train λ with SGD until a step makes it negative: the next solve raises, it does not
    'converge'. The in-place optimizer step bumps the tensor version, so the check runs again."""
    T = _lasso_operator()
    lam = torch.tensor(0.05, dtype=DT, requires_grad=True)
    solver = hp.GKMSolver(T, max_steps=5000, tol=1e-9, hypergrad=mode)
    opt = torch.optim.SGD([lam], lr=1.0)
    u = solver(torch.zeros(5, dtype=DT), lam)
    (u.sum() ** 2).backward()
    with torch.no_grad():
        lam.grad.fill_(0.3)  # a step that overshoots below 0
    opt.step()
    assert float(lam.detach()) < 0
    with pytest.raises(ValueError, match="negative"):
        solver(torch.zeros(5, dtype=DT), lam)


def test_check_runs_once_per_tensor_version(monkeypatch):
    """No per-step validation: the same unchanged tensor is checked once (one host sync per solve)."""
    calls = {"n": 0}
    real = torch.isfinite

    def counting(t):
        calls["n"] += 1
        return real(t)

    p = prox.l1_param(0)
    lam = torch.tensor(0.1, dtype=DT)
    monkeypatch.setattr(torch, "isfinite", counting)
    for _ in range(50):
        p(torch.ones(3, dtype=DT), 1.0, lam)
    assert calls["n"] == 1
    lam.sub_(0.05)  # an in-place change: checked again
    p(torch.ones(3, dtype=DT), 1.0, lam)
    assert calls["n"] == 2
    lam.sub_(0.1)
    with pytest.raises(ValueError):
        p(torch.ones(3, dtype=DT), 1.0, lam)


def test_under_torch_func_invalid_weights_poison_with_nan():
    """vmap cannot read values (no ValueError possible): invalid entries give NaN, never a number."""
    p = prox.l1_param(0)
    v = torch.tensor([1.0, -0.2, 3.0], dtype=DT)
    out = torch.func.vmap(lambda w: p(v, 1.0, w))(torch.tensor([0.5, -0.1, math.nan], dtype=DT))
    assert torch.equal(out[0], torch.tensor([0.5, 0.0, 2.5], dtype=DT))
    assert torch.isnan(out[1:]).all()
    jac = torch.func.jacrev(lambda w: p(v, 1.0, w))(torch.tensor(0.5, dtype=DT))
    assert torch.equal(jac, torch.tensor([-1.0, 0.0, -1.0], dtype=DT))  # d/dλ S_λ(v) = -sign(v) off the kink
