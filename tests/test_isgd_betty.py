"""ISGD inside Betty (recipes/_isgd_betty.py) equals the core ISGD loop of recipes/learned_regularizer.py.

Same seed, same mini-batches in the same order, Adam with the same step decay, ``gkm_inexact`` with the
same absolute accuracies ε_k = δ_k = ε₀(k+1)^-p and warm starts per patch: after more outer steps than
there are batches (so warm starts are used) the FoE parameters agree to 1e-10 and the cost to the
iteration. The two runs share no code beyond the recipe's FoE/task definitions.
"""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch

pytest.importorskip("betty")
pytest.importorskip("skimage")

from recipes import learned_regularizer as lr  # noqa: E402
from recipes._isgd_betty import run_isgd_betty  # noqa: E402

STEPS = 5  # 16 training patches / batch 4 = 4 batches: step 5 reuses the warm starts of batch 0


def small_task():
    args = argparse.Namespace(paper=False, data_dir=None, filters=2, ksize=3, seed=0, batch=4, lr=0.05, q=0.5,
                              eps0=1e-2, p=0.5, max_lower=1000, eval_every=10**6, no_progress=True)
    torch.manual_seed(0)
    task = lr.Task("denoise", args, np.random.default_rng(0), torch.Generator().manual_seed(0))
    task.x_train, task.y_train = task.x_train[:16], task.y_train[:16]  # a smaller problem, same code
    task.test_psnr = lambda foe: 0.0  # no test solves: the comparison is of the training iterates
    return task, args


def test_isgd_in_betty_equals_the_core_loop():
    task, args = small_task()
    core = lr.run_isgd(task, args, budget=float("inf"), label="core", max_steps=STEPS)
    betty = run_isgd_betty(task, args, budget=float("inf"), label="betty", max_steps=STEPS)
    assert core["steps"] == betty["steps"] == STEPS
    print("cost", core["cost"], betty["cost"])
    assert core["cost"] == betty["cost"]  # the same lower steps and CG iterations, step by step
    moved = 0.0
    init = lr.FoE(args.filters, args.ksize, args.seed)
    for (name, p), q, p0 in zip(core["foe"].named_parameters(), betty["foe"].parameters(), init.parameters()):
        err = float((p.detach() - q.detach()).abs().max() / p.detach().abs().max())
        print(name, f"{err:.1e}")
        assert err < 1e-10, (name, err)
        moved = max(moved, float((p.detach() - p0.detach()).abs().max() / p0.detach().abs().max()))
    assert moved > 1e-2  # θ moved: the comparison is not of the initial values
