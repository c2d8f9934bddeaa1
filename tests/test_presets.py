"""``paper_config`` (:mod:`hodl_plugin.presets`): exactly K unrolled steps of the outside form with a geometric
weight, as the papers' codes run (:ref:`math-aggregation`); against a hand-written loop and central
differences."""

from __future__ import annotations

import pytest
import torch
from _oracles import DT, gkm_loop, gradient_step_tanh, rel_err

import hodl_plugin as hp


def test_paper_config_runs_exactly_K_unrolled_outside_steps():
    T, F, grad_F, t, n, m = gradient_step_tanh()
    g = torch.Generator().manual_seed(9)
    x0 = torch.randn(m, generator=g, dtype=DT)
    u0 = torch.randn(n, generator=g, dtype=DT)
    K = 7
    with pytest.warns(hp.SummableScheduleWarning):
        solver = hp.GKMSolver(T, upper=F, **hp.paper_config(steps=K))
    x = x0.clone().requires_grad_(True)
    u = solver(u0, x)
    assert solver.info.steps == K and solver.info.exact_steps
    alpha = hp.Geometric(0.5, 0.9)
    assert rel_err(u.detach(), gkm_loop(T, grad_F, x0, u0, K, 1.0, alpha, 1.0, "outside")) < 1e-14
    u.sum().backward()  # unrolled: the gradient of the K-step map, checked against FD
    h = 1e-6
    fd = torch.stack([
        (gkm_loop(T, grad_F, x0 + h * e, u0, K, 1.0, alpha, 1.0, "outside").sum()
         - gkm_loop(T, grad_F, x0 - h * e, u0, K, 1.0, alpha, 1.0, "outside").sum()) / (2 * h)
        for e in torch.eye(m, dtype=DT)
    ])
    assert rel_err(x.grad, fd) < 1e-7


def test_paper_config_rejects_bad_arguments():
    with pytest.raises(ValueError, match="steps"):
        hp.paper_config(steps=0)
    with pytest.raises(ValueError, match="aggregation"):
        hp.paper_config(steps=5, aggregation="middle")
