"""Learning a convex Field-of-Experts regulariser (ISGD): ISGD vs MAID-style vs unrolled, by cost.

The ISGD experiment (Salehi et al., SSVM 2025) at CPU scale: patches of scikit-image's
bundled natural images, Gaussian noise σ = 25/255 (denoising, A = I) or a 5×5 Gaussian blur of std 1
plus noise 0.01 (deblurring). Lower level, per patch:

    x̂(θ) = argmin_x ½||Ax - y||² + R_θ(x),   R_θ(x) = e^c Σ_j e^{w_j} Σ_p (√((K_j * x)_p² + e^s) - e^{s/2}),

a convex FoE (filters K_j kept zero-mean by projection after each step, weights e^{w_j}, smoothing
e^s, scale e^c), solved by the GKM gradient step T(x) = x - τ∇_x h with τ = 1/L(θ). Upper level:
the mean squared error to the clean patches. Compared at equal *cost* — cumulative lower-level +
adjoint (CG) iterations, times the patches processed (ISGD's x-axis):

- ISGD: mini-batches in a fixed order, ``hypergrad="inexact"`` with decaying accuracies
  ε_k = δ_k = ε₀(k+1)^{-p}, warm starts per batch, Adam with steps α₀(k+1)^{-q};
- MAID-style: full batch, deterministic inexact gradient descent with backtracking; the accuracy is
  tightened (×0.5) when backtracking fails and loosened (×1.05) after a success (as in MAID, without
  MAID's a-posteriori slack terms);
- unrolled: K fixed lower steps from y, back-propagation through them, same Adam schedule (cost K
  forward + K backward per patch).

Reports test PSNR (test patches solved to tolerance 1e-6) against cost; learned_regularizer.png.
``--anderson M`` accelerates the lower solves of ISGD, MAID and the test evaluation (the unrolled
run differentiates its plain steps).
``--data-dir``: a folder of images (PNG/JPG) whose first images are for training, the last two for test.
"""

from __future__ import annotations

import itertools
import time
import warnings
from typing import Any, Optional

import numpy as np
import torch

import hodl_plugin as hp

from ._common import (
    add_anderson,
    choice,
    parse_list,
    parser,
    plot_curves,
    print_table,
    progress,
    save_json,
    setup,
)
from ._foe import FoE, Task, adam_with_decay, upper_loss
from ._images import psnr

NAME = "learned_regularizer"


def _minibatch_training(task: Task, args: Any, budget: float, label: str, foe: FoE, T: hp.GradientStep,
                        solve, step_cost, max_steps: Optional[int] = None) -> dict[str, Any]:
    """Adam on θ over mini-batches in a fixed order until the cost budget (or ``max_steps`` steps); test
    PSNR every few steps."""
    opt, sched = adam_with_decay(foe, args.lr, args.q)
    B, N = args.batch, len(task.y_train)
    cost, xs, ys, k = 0.0, [0.0], [task.test_psnr(foe)], 0
    ts, t0, t_eval = [0.0], time.perf_counter(), 0.0  # training seconds, test evaluations excluded
    bar = iter(progress(itertools.count(), args, desc=label))  # a tqdm is iterable, not an iterator
    while cost < budget and (max_steps is None or k < max_steps):
        b = k % (N // B)
        y, x = task.y_train[b * B:(b + 1) * B], task.x_train[b * B:(b + 1) * B]
        task.set_step(T, foe)
        opt.zero_grad()
        upper_loss(solve(y, b), x).backward()
        opt.step()
        sched.step()
        foe.project()
        cost += B * step_cost()
        k += 1
        next(bar, None)
        if k % args.eval_every == 0 or cost >= budget or k == max_steps:
            t1 = time.perf_counter()
            xs.append(cost)
            ts.append(t1 - t0 - t_eval)
            ys.append(task.test_psnr(foe))
            t_eval += time.perf_counter() - t1
    return {"method": label, "test_psnr": ys[-1], "cost": cost, "steps": k, "curve_cost": xs, "curve_psnr": ys,
            "curve_time": ts, "foe": foe}


def run_isgd(task: Task, args: Any, budget: float, label: str, max_steps: Optional[int] = None) -> dict[str, Any]:
    """Inexact hypergradients with ε_k = δ_k = ε₀(k+1)^-p and per-batch warm starts (key = batch)."""
    foe = FoE(args.filters, args.ksize, args.seed)
    T = task.operator(foe)
    eps = hp.Polynomial(args.eps0, args.p)
    solver = hp.GKMSolver(T, max_steps=args.max_lower, hypergrad="inexact", eps=eps, delta=eps, solver="cg",
                          constants=None, check_every=5, relative=False,  # ISGD: absolute accuracies
                          acceleration=task.acc)
    return _minibatch_training(task, args, budget, label, foe, T,
                               solve=lambda y, b: solver(y.clone(), y, key=b),
                               step_cost=lambda: solver.info.steps + solver.info.adjoint.iterations,
                               max_steps=max_steps)


def run_unrolled(task: Task, args: Any, budget: float, label: str) -> dict[str, Any]:
    """K fixed lower steps from y, back-propagated (cost: K forward + K backward per patch)."""
    foe = FoE(args.filters, args.ksize, args.seed)
    T = task.operator(foe)
    solver = hp.GKMSolver(T, max_steps=args.unroll, tol=0.0, hypergrad="unrolled", check_every=args.unroll)
    return _minibatch_training(task, args, budget, label, foe, T,
                               solve=lambda y, b: solver(y.clone(), y),
                               step_cost=lambda: 2 * args.unroll)


def run_maid(task: Task, args: Any, budget: float, label: str) -> dict[str, Any]:
    """Full-batch inexact gradient descent with backtracking and adaptive accuracy (MAID-style)."""
    foe = FoE(args.filters, args.ksize, args.seed)
    T = task.operator(foe)
    eps_k = args.eps0
    solver = hp.GKMSolver(T, max_steps=args.max_lower, hypergrad="inexact", eps=eps_k, solver="cg",
                          constants=None, check_every=5, relative=False, acceleration=task.acc)
    fwd = hp.GKMSolver(T, max_steps=args.max_lower, tol=0.0, atol=eps_k, check_every=5, acceleration=task.acc)
    y, x, N = task.y_train, task.x_train, len(task.y_train)
    step, rho, eta = args.maid_step, 0.5, 1e-4
    cost, xs, ys, k = 0.0, [0.0], [task.test_psnr(foe)], 0
    while cost < budget:
        solver.method.eps = solver.method.delta = hp.Constant(eps_k)
        task.set_step(T, foe)
        foe.zero_grad()
        loss = upper_loss(solver(y.clone(), y, key="full"), x)
        loss.backward()
        cost += N * (solver.info.steps + solver.info.adjoint.iterations)
        params = list(foe.parameters())
        grads = [p.grad.detach().clone() for p in params]
        g2 = float(sum((gr * gr).sum() for gr in grads))
        old = [p.detach().clone() for p in params]
        accepted = False
        for i in range(5):
            trial = step * rho**i
            with torch.no_grad():
                for p, o, gr in zip(params, old, grads):
                    p.copy_(o - trial * gr)
                foe.project()
                task.set_step(T, foe)
                fwd.iteration = fwd.iteration.replace(atol=eps_k)  # absolute, like the inexact solver
                f_new = float(upper_loss(fwd(solver.method.u_cache["full"].clone(), y), x))
            cost += N * fwd.info.steps
            if f_new <= float(loss.detach()) - eta * trial * g2:
                accepted, step = True, trial * 1.1
                eps_k *= 1.05
                break
        if not accepted:
            with torch.no_grad():
                for p, o in zip(params, old):
                    p.copy_(o)
            eps_k *= 0.5
        k += 1
        if k % max(1, args.eval_every // 4) == 0 or cost >= budget:
            xs.append(cost)
            ys.append(task.test_psnr(foe))
    return {"method": label, "test_psnr": ys[-1], "cost": cost, "steps": k, "curve_cost": xs, "curve_psnr": ys}


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    ap = parser(NAME, __doc__.split("\n")[0])
    ap.add_argument("--paper", action="store_true",
                    help="ISGD-like sizes: 256 patches 40×40, 10 filters 7×7, denoise and deblur, budget 2e5 "
                         "(over 30 min on 2 cores; the default is 64 patches 24×24, 6 filters 5×5, 8–11 min)")
    ap.add_argument("--tasks", default=None, help="comma list of denoise, deblur (default: denoise / both --paper)")
    ap.add_argument("--budget", type=float, default=None,
                    help="cost budget (default 2e4 --quick / 1e5 / 2e5 --paper)")
    ap.add_argument("--filters", type=int, default=None, help="FoE filters (default 6 / 10 --paper)")
    ap.add_argument("--ksize", type=int, default=None, help="filter size (default 5 / 7 --paper)")
    ap.add_argument("--batch", type=int, default=16, help="training patches per ISGD / unrolled step")
    ap.add_argument("--lr", type=float, default=0.05, help="Adam α₀ (ISGD and unrolled)")
    ap.add_argument("--q", type=float, default=0.5, help="step decay α_k = α₀(k+1)^-q")
    ap.add_argument("--eps0", type=float, default=1e-2, help="ISGD accuracy ε₀ (ε_k = δ_k = ε₀(k+1)^-p)")
    ap.add_argument("--p", type=float, default=0.5, help="accuracy decay exponent p of ε_k = δ_k = ε₀(k+1)^-p")
    ap.add_argument("--unroll", type=int, default=20, help="unrolled lower steps")
    ap.add_argument("--maid-step", type=float, default=0.05, help="MAID initial step")
    ap.add_argument("--max-lower", type=int, default=1000, help="cap on the lower GKM steps of one solve")
    ap.add_argument("--eval-every", type=int, default=None, help="outer steps between test evaluations")
    ap.add_argument("--betty", action="store_true",
                    help="ISGD in the core loop and ISGD as a Betty graph (recipes/_isgd_betty.py) only, same "
                         "seed and batches; needs betty-ml")
    ap.add_argument("--plot", default=None, help="path of the PNG (default OUT/learned_regularizer.png)")
    add_anderson(ap, default=0)
    args = ap.parse_args(argv)
    setup(args)
    args.filters = args.filters or (10 if args.paper else 6)
    args.ksize = args.ksize or (7 if args.paper else 5)
    args.eval_every = args.eval_every or (10 if args.paper else 4)
    budget = args.budget or (2e4 if args.quick else 2e5 if args.paper else 1e5)
    tasks = parse_list(ap, "--tasks", args.tasks or ("denoise,deblur" if args.paper else "denoise"),
                       choice(["denoise", "deblur"]))
    rng = np.random.default_rng(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    rows, panels = [], []
    warnings.simplefilter("ignore", hp.ConvergenceWarning)
    for kind in tasks:
        task = Task(kind, args, rng, g)
        noisy = psnr(task.y_test, task.x_test)
        res = []
        methods: list[tuple[Any, str]] = [(run_isgd, "ISGD (inexact, decaying ε_k)")]
        if args.betty:
            from ._isgd_betty import run_isgd_betty  # imports Betty

            methods.append((run_isgd_betty, "ISGD in a Betty graph"))
        else:
            methods += [(run_maid, "MAID-style (full batch, adaptive ε)"),
                        (run_unrolled, f"unrolled (K={args.unroll})")]
        for fn, label in methods:
            t0 = time.perf_counter()
            res.append(fn(task, args, budget, label))
            res[-1]["time_s"] = time.perf_counter() - t0
        rows.append({"task": kind, "method": "observation y", "test_psnr": noisy})
        for r in res:
            rows.append({"task": kind, **{k: v for k, v in r.items() if k != "foe"}})
        panels.append((f"test PSNR (dB), {kind}", {r["method"]: (r["curve_cost"], r["curve_psnr"]) for r in res}))
        if args.betty:  # the same curves by training seconds (Betty's overhead), beside those by cost
            panels.append((f"test PSNR (dB), {kind}", {r["method"]: (r["curve_time"], r["curve_psnr"]) for r in res}))
    cost_label = "cumulative lower + adjoint iterations × patches"
    xlabels, styles = None, ("-",)
    if args.betty:  # identical iterates: the Betty curve dashed over the core one
        xlabels, styles = [cost_label, "training seconds (test evaluations excluded)"] * len(tasks), ("-", "--")
    png = plot_curves(args.plot or f"{args.out}/{NAME}.png", {}, cost_label, "", logy=False,
                      title="learned FoE regulariser: test PSNR vs cost", ax_pairs=panels, xlabels=xlabels,
                      linestyles=styles)
    print_table(rows, ["task", "method", "test_psnr", "cost", "steps", "time_s"],
                title=f"# {NAME}: test PSNR (dB) at a cost budget of {budget:.3g}")
    results = {"budget": budget, "rows": rows, "plot": png}
    print(f"wrote {save_json(args, NAME, results)} and {png}")
    return results


if __name__ == "__main__":
    main()
