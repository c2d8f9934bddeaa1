"""Small smooth problems, where users compare with TorchOpt and scipy: fixed costs, a Krylov forward.

    python -m benchmarks.small            # full: writes the README block (between small:start / small:end)
    python -m benchmarks.small --quick    # about a minute, prints only
    python -m benchmarks.small --against DIR   # also the fixed costs of the checkout in DIR, interleaved
    python -m benchmarks.small --against DIR --leads --no-readme   # and benchmarks.hypergrad's ratios of both

Single-threaded (torch and BLAS), medians of interleaved repeats (every method timed once per round,
in turn), float64 unless said:

- **ridge** — TorchOpt's own test ``tests/test_implicit.py::test_rr_solve_cg``, copied: data of 4
  batches of 1024 × 10 (seed 42), ``l2reg`` drawn by ``torch.rand``, ``custom_root`` of the gradient
  of ½ mean (Xw − y)² + ½λ‖w‖² around ``solve_cg(ridge=n·λ, init=params, maxiter=20)``, the validation
  MSE's gradient in λ, 4 SGD steps (lr 1e-3); and the same at 200 × 10. Each of our documented paths
  runs the same loop; the error is the largest relative error of the 4 hypergradients against the
  closed form :math:`-\\langle (H+\\lambda I)^{-1}\\nabla_w F, w^*\\rangle`, the time the whole loop's.
- **HOAG** — log λ of an ℓ2 logistic regression on scikit-learn's breast_cancer (standardised, 50/50
  split, mean log-loss + ½e^θ‖w‖², validation log-loss above), to :math:`|\\theta - \\theta^*| \\le 10^{-6}`
  (θ* from Newton on the exact hypergradient): scipy's ``minimize_scalar`` (bounded Brent) over an
  L-BFGS-B lower level, against our hypergradient with secant steps on θ (a 1-D quasi-Newton descent)
  and warm-started lower solves.
- **fixed costs** — a 10-dimensional ridge step T (200 × 10 data): time and aten operations per call
  and per step besides T, the no-grad forward and the implicit forward + backward.
- **torch.compile** of the step (full run only): compile time and time per step against eager.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

import hodl_plugin as hp

from . import report

BEGIN, END = "<!-- small:start -->", "<!-- small:end -->"


# ---------------------------------------------------------------------------- timing
def interleaved(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    """Median wall time of each function, the functions timed in turn in each of ``repeats`` rounds
    (after one warm-up call each), so that a machine that slows down hits all of them alike."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


@contextlib.contextmanager
def one_thread():
    """torch and the BLAS under numpy / scipy single-threaded."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        from threadpoolctl import threadpool_limits
        limits: Any = threadpool_limits(1)
    except ImportError:  # pragma: no cover - threadpoolctl comes with scikit-learn
        limits = contextlib.nullcontext()
    with limits:
        try:
            yield
        finally:
            torch.set_num_threads(old)


# ---------------------------------------------------------------------------- ridge (TorchOpt's test)
def ridge_data(dtype: torch.dtype, n: int = 1024, d: int = 10, batches: int = 4) -> tuple:
    """TorchOpt's ``get_rr_dataset_torch`` and the test's ``init_params`` / ``l2reg`` (seed 42)."""
    torch.manual_seed(42)
    init = torch.randn(d, dtype=dtype)
    l2reg = torch.rand(1, dtype=dtype).squeeze_()
    torch.manual_seed(42)
    cols = [torch.randn(batches * n, d), torch.randn(batches * n), torch.randn(batches * n, d),
            torch.randn(batches * n)]
    data = [tuple(c[i * n:(i + 1) * n].to(dtype) for c in cols) for i in range(batches)]
    return init, l2reg, data


def ridge_exact(l2reg: torch.Tensor, data: list, lr: float = 1e-3) -> list[torch.Tensor]:
    """The closed-form hypergradients of the 4 SGD steps (float64)."""
    lam, out = float(l2reg), []
    for xs, ys, xq, yq in data:
        xs, ys, xq, yq = (t.double() for t in (xs, ys, xq, yq))
        n, d = xs.shape
        A = xs.T @ xs / n + lam * torch.eye(d, dtype=torch.float64)
        w = torch.linalg.solve(A, xs.T @ ys / n)
        gw = 2 * xq.T @ (xq @ w - yq) / len(yq)
        g = -float(torch.linalg.solve(A, gw) @ w)
        out.append(g)
        lam -= lr * g
    return out


def ridge_objective(params: torch.Tensor, l2reg: torch.Tensor, data: tuple) -> torch.Tensor:
    X, y = data
    residuals = X @ params - y
    return 0.5 * torch.mean(torch.square(residuals)) + 0.5 * l2reg * torch.sum(torch.square(params))


def ridge_torchopt() -> Callable[..., tuple]:
    """The test's loop as written (TorchOpt ``custom_root`` + ``solve_cg``)."""
    import torchopt

    @torchopt.diff.implicit.custom_root(torch.func.grad(ridge_objective, argnums=0), argnums=1)
    def solver(params, l2reg, data):
        X, y = data
        solve = torchopt.linear_solve.solve_cg(ridge=len(y) * l2reg.item(), init=params, maxiter=20)
        return solve(matvec=lambda u: X.T @ (X @ u), b=X.T @ y)

    def run(init, l2reg, data, lr=1e-3):
        optim = torchopt.sgd(lr)
        lam = l2reg.clone().requires_grad_(True)
        state = optim.init(lam)
        grads = []
        for xs, ys, xq, yq in data:
            w = solver(init, lam, (xs, ys))
            (g,) = torch.autograd.grad(F.mse_loss(xq @ w, yq), lam)
            grads.append(float(g))
            updates, state = optim.update(g, state)
            lam = torchopt.apply_updates(lam, updates)
        return grads
    return run


def ridge_ours(path: str) -> Callable[..., tuple]:
    """The same loop through one of our documented paths:

    - ``custom_root``: ``hp.custom_root`` (TorchOpt's decorator, ours) around the same CG forward
      (``hp.linear_solve.cg``), the adjoint by CG;
    - ``gkm`` / ``anderson`` / ``krylov``: ``GKMSolver`` on the gradient step of the ridge objective
      (step 1/L, L = λ_max(XᵀX/n) + λ), plain GKM, ``acceleration=hp.Anderson(10)``, or
      ``forward="krylov"`` (CG on the affine fixed-point equation)."""
    grad = torch.func.grad(ridge_objective, argnums=0)

    if path == "custom_root":
        @hp.custom_root(lambda w, lam, X, y: grad(w, lam, (X, y)), solve=hp.linear_solve.cg())
        def solver(params, lam, X, y):
            n = len(y)
            cg = hp.linear_solve.cg(maxiter=20)
            w, _ = cg(lambda u: X.T @ (X @ u) / n + lam * u, X.T @ y / n, params)
            return w

        def solve(init, lam, xs, ys):
            return solver(init, lam, xs, ys)
    else:
        opts = {"gkm": {}, "anderson": {"acceleration": hp.Anderson(history_size=10)},
                "krylov": {"forward": "krylov"}}[path]

        def solve(init, lam, xs, ys):
            n = len(ys)
            L = float(torch.linalg.eigvalsh(xs.T @ xs / n)[-1]) + float(lam)
            T = hp.GradientStep(grad=lambda u, lam, X, y: X.T @ (X @ u - y) / n + lam * u, step=1.0 / L)
            return hp.GKMSolver(T, max_steps=100_000, **opts)(init, lam, xs, ys)

    def run(init, l2reg, data, lr=1e-3):
        lam = l2reg.clone()
        grads = []
        for xs, ys, xq, yq in data:
            lam_ = lam.clone().requires_grad_(True)
            w = solve(init, lam_, xs, ys)
            (g,) = torch.autograd.grad(F.mse_loss(xq @ w, yq), lam_)
            grads.append(float(g))
            lam = lam - lr * g.detach()
        return grads
    return run


RIDGE_PATHS = {"TorchOpt custom_root + solve_cg (its test)": None,
               "hp.custom_root + linear_solve.cg": "custom_root",
               "GKMSolver(GradientStep)": "gkm",
               "GKMSolver(GradientStep, acceleration=Anderson(10))": "anderson",
               'GKMSolver(GradientStep, forward="krylov")': "krylov"}


def ridge(quick: bool, repeats: int) -> list[dict[str, Any]]:
    rows = []
    for n in (1024, 200):
        for dtype in (torch.float64, torch.float32):
            init, l2reg, data = ridge_data(dtype, n=n)
            ref = ridge_exact(l2reg, data)
            fns: dict[str, Callable[[], Any]] = {}
            errs: dict[str, float] = {}
            for label, path in RIDGE_PATHS.items():
                run = ridge_torchopt() if path is None else ridge_ours(path)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    got = run(init, l2reg, data)
                errs[label] = max(abs(a - b) / abs(b) for a, b in zip(got, ref))
                fns[label] = (lambda run=run: run(init, l2reg, data))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                t = interleaved(fns, repeats)
            base = t[next(iter(RIDGE_PATHS))]
            for label in RIDGE_PATHS:
                rows.append({"problem": f"ridge {n} × 10, {str(dtype).replace('torch.', '')}", "method": label,
                             "rel_error": errs[label], "time_ms": 1e3 * t[label], "ratio": t[label] / base})
            print_rows(rows[-len(RIDGE_PATHS):])
    return rows


# ---------------------------------------------------------------------------- HOAG (breast_cancer)
class Hoag:
    r"""log λ of an ℓ2 logistic regression: lower :math:`\min_w \frac1n\sum\log(1+e^{-y_i x_i^\top w})
    + \frac{e^\theta}{2}\|w\|^2` (train half), upper the validation mean log-loss."""

    def __init__(self) -> None:
        import numpy as np
        from sklearn.datasets import load_breast_cancer

        X, y = load_breast_cancer(return_X_y=True)
        X = (X - X.mean(0)) / X.std(0)
        y = 2.0 * y - 1.0
        perm = np.random.RandomState(0).permutation(len(y))
        half = len(y) // 2
        tr, va = perm[:half], perm[half:]
        self.np = (X[tr], y[tr], X[va], y[va])
        self.Xt, self.yt, self.Xv, self.yv = (torch.tensor(a, dtype=torch.float64) for a in self.np)
        n = len(tr)
        self.Ld = float(torch.linalg.eigvalsh(self.Xt.T @ self.Xt / n)[-1]) / 4  # logistic curvature ≤ 1/4
        self.theta0 = 0.0
        self.theta_star = self.reference()

    # -- torch pieces
    def grad_lower(self, w: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        z = self.yt * (self.Xt @ w)
        return -self.Xt.T @ (self.yt * torch.sigmoid(-z)) / len(self.yt) + theta.exp() * w

    def upper(self, w: torch.Tensor) -> torch.Tensor:
        return F.softplus(-self.yv * (self.Xv @ w)).mean()

    # -- the reference θ* (Newton on the lower, Newton on the exact hypergradient)
    def w_exact(self, theta: float) -> torch.Tensor:
        w = torch.zeros(self.Xt.shape[1], dtype=torch.float64)
        th = torch.tensor(theta, dtype=torch.float64)
        for _ in range(100):
            g = self.grad_lower(w, th)
            if float(g.norm()) < 1e-15:
                break
            w = w - torch.linalg.solve(self.hess(w, theta), g)
        return w

    def hess(self, w: torch.Tensor, theta: float) -> torch.Tensor:
        s = torch.sigmoid(self.yt * (self.Xt @ w))
        D = s * (1 - s)
        return (self.Xt.T * D) @ self.Xt / len(self.yt) + math.exp(theta) * torch.eye(self.Xt.shape[1],
                                                                                      dtype=torch.float64)

    def hypergrad_exact(self, theta: float) -> float:
        w = self.w_exact(theta).requires_grad_(True)
        (gF,) = torch.autograd.grad(self.upper(w), w)
        v = torch.linalg.solve(self.hess(w.detach(), theta), gF)
        return -math.exp(theta) * float(v @ w.detach())

    def reference(self) -> float:
        th, h = self.theta0, 1e-5
        for _ in range(60):
            g = self.hypergrad_exact(th)
            c = (self.hypergrad_exact(th + h) - self.hypergrad_exact(th - h)) / (2 * h)
            step = g / c
            th -= step
            if abs(step) < 1e-13:
                break
        return th

    # -- scipy: minimize_scalar (bounded Brent) over an L-BFGS-B lower level
    def scipy_run(self, warm: bool, gtol: float = 1e-10, xatol: float = 1e-7) -> tuple[float, int]:
        import numpy as np
        from scipy.optimize import minimize, minimize_scalar
        from scipy.special import expit, log1p

        Xt, yt, Xv, yv = self.np
        n = len(yt)
        state = {"w": np.zeros(Xt.shape[1]), "evals": 0}

        def lower(w: Any, lam: float) -> tuple:
            z = yt * (Xt @ w)
            loss = np.logaddexp(0.0, -z).mean() + 0.5 * lam * (w @ w)
            grad = -Xt.T @ (yt * expit(-z)) / n + lam * w
            return loss, grad

        def f(theta: float) -> float:
            w0 = state["w"] if warm else np.zeros(Xt.shape[1])
            res = minimize(lower, w0, args=(math.exp(theta),), jac=True, method="L-BFGS-B",
                           options={"gtol": gtol, "ftol": 0.0, "maxiter": 10_000})
            state["w"] = res.x
            state["evals"] += 1
            return float(np.logaddexp(0.0, -yv * (Xv @ res.x)).mean())

        del log1p
        res = minimize_scalar(f, bounds=(-10.0, 4.0), method="bounded", options={"xatol": xatol})
        return float(res.x), state["evals"]

    # -- ours: hypergradient + secant steps, warm-started lower solves
    def ours_run(self, mode: str = "inexact", m: int = 10) -> tuple[float, int]:
        r"""Secant steps on θ with our hypergradients; the lower level is the gradient step of the
        logistic loss in λ = e^θ (step 1/(L + λ) passed as a constant), ``acceleration=Anderson(m)``,
        each solve warm-started at the last ``w``; ``mode="inexact"``: forward and adjoint accuracies
        ε_k = 1e-3·0.1^k (the inexact mode's schedules, its adjoint warm-started too), ``"implicit"``:
        the default tolerances. Stops when a step is below 1e-7 (superlinear: the error is then far
        smaller)."""
        Xt, yt = self.Xt, self.yt
        n = len(yt)

        def grad(w: torch.Tensor, lam: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
            return -Xt.T @ (yt * torch.sigmoid(-yt * (Xt @ w))) / n + lam * w

        T = hp.GradientStep(grad=grad, step=lambda lam, s: s)
        method = (hp.Inexact(eps=hp.Geometric(1e-3, 0.1), constants=None) if mode == "inexact" else hp.Implicit())
        solver = hp.GKMSolver(T, max_steps=100_000, hypergrad=method, acceleration=hp.Anderson(history_size=m))
        w = torch.zeros(Xt.shape[1], dtype=torch.float64)
        th, prev, its = self.theta0, None, 0
        while its < 100:
            its += 1
            theta = torch.tensor(th, dtype=torch.float64, requires_grad=True)
            s = torch.tensor(1.0 / (self.Ld + math.exp(th)), dtype=torch.float64)
            w = solver(w.detach(), theta.exp(), s)
            (g,) = torch.autograd.grad(self.upper(w), theta)
            g = float(g)
            if prev is None:
                step = g / 0.1  # a first step of 10·|g| (curvature guess 0.1)
            else:
                c = (g - prev[1]) / (th - prev[0])
                step = g / c if c > 0 else g / 0.1
            prev = (th, g)
            th -= step
            if abs(step) < 1e-7:
                break
        return th, its


def hoag(quick: bool, repeats: int) -> list[dict[str, Any]]:
    P = Hoag()
    cases: dict[str, Callable[[], tuple[float, int]]] = {
        "scipy minimize_scalar + L-BFGS-B (cold lower)": lambda: P.scipy_run(warm=False),
        "scipy minimize_scalar + L-BFGS-B (warm lower)": lambda: P.scipy_run(warm=True),
        "ours implicit + Anderson(10), secant on θ": lambda: P.ours_run("implicit", 10),
        "ours inexact(ε_k = 1e-3·0.1^k) + Anderson(10), secant on θ": lambda: P.ours_run("inexact", 10),
    }
    out: dict[str, tuple] = {}
    fns = {}
    for k, fn in cases.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out[k] = fn()
        fns[k] = (lambda fn=fn: fn())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t = interleaved(fns, repeats)
    base = min(t[k] for k in cases if k.startswith("scipy"))
    rows = [{"problem": f"HOAG breast_cancer, θ* = {P.theta_star:.6f}", "method": k,
             "rel_error": abs(out[k][0] - P.theta_star), "evals": out[k][1], "time_ms": 1e3 * t[k],
             "ratio": t[k] / base} for k in cases]
    print_rows(rows, err="|θ − θ*|")
    return rows


# ---------------------------------------------------------------------------- fixed costs
OVERHEAD_SNIPPET = r'''
import json, statistics, sys, time, torch
from torch.utils._python_dispatch import TorchDispatchMode
import hodl_plugin as hp
torch.set_num_threads(1)
DT = torch.float64
g = torch.Generator().manual_seed(0)
X = torch.randn(200, 10, generator=g, dtype=DT); y = torch.randn(200, generator=g, dtype=DT)
L = float(torch.linalg.eigvalsh(X.T @ X / 200).max()) + 0.5
T = hp.GradientStep(grad=lambda u, lam: X.T @ (X @ u - y) / 200 + lam * u, step=1.0 / L)
lam0, u0 = torch.tensor(0.5, dtype=DT), torch.zeros(10, dtype=DT)
class Count(TorchDispatchMode):
    n = 0
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        Count.n += 1
        return func(*args, **(kwargs or {}))
def ops(fn):
    Count.n = 0
    with Count():
        fn()
    return Count.n
def S(K, every, **kw):
    return hp.GKMSolver(T, max_steps=K, tol=0.0, check_every=every, **kw)
def nograd(s):
    def f():
        with torch.no_grad():
            s(u0, lam0)
    return f
def fwdbwd(s):
    def f():
        lam = lam0.clone().requires_grad_(True)
        (s(u0, lam) ** 2).sum().backward()
    return f
def bare(K):
    def f():
        with torch.no_grad():
            u = u0
            for _ in range(K):
                u = T(u, lam0)
    return f
cases = {"ng10": nograd(S(10, 10)), "ng110": nograd(S(110, 110)), "ng110c": nograd(S(110, 10)),
         "fb10": fwdbwd(S(10, 10)), "fb110": fwdbwd(S(110, 110)), "T10": bare(10), "T110": bare(110),
         "ngtol": nograd(hp.GKMSolver(T)), "fbtol": fwdbwd(hp.GKMSolver(T))}
try:
    cases["ngkry"] = nograd(hp.GKMSolver(T, forward="krylov"))
    cases["fbkry"] = fwdbwd(hp.GKMSolver(T, forward="krylov"))
except TypeError:
    pass
for f in cases.values():
    for _ in range(20):
        f()
reps = int(sys.argv[1])
times = {k: [] for k in cases}
for _ in range(reps):
    for k, f in cases.items():
        t0 = time.perf_counter(); f(); times[k].append(time.perf_counter() - t0)
out = {k: statistics.median(v) * 1e6 for k, v in times.items()}
out.update({"ops " + k: ops(f) for k, f in cases.items()})
print(json.dumps(out))
'''

COST_ROWS = ["per step besides T (no check)", "per residual check", "per call, no-grad forward",
             "per call, implicit forward + backward", "T itself, per evaluation",
             "default tol: no-grad solve", "default tol: forward + backward",
             'forward="krylov": no-grad solve', 'forward="krylov": forward + backward']


def costs_of(tree: str, reps: int) -> dict[str, float]:
    """The fixed-cost measurements of the hodl_plugin in ``tree`` (a subprocess importing it)."""
    env = dict(os.environ, PYTHONPATH=tree, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", OVERHEAD_SNIPPET, str(reps)], env=env, cwd=tree,
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def derive(m: dict[str, float], pre: str = "") -> dict[str, float]:
    g = lambda k: m.get(pre + k, math.nan)  # noqa: E731
    t_step = (g("T110") - g("T10")) / 100
    step = (g("ng110") - g("ng10")) / 100
    fb_step = (g("fb110") - g("fb10")) / 100
    return {COST_ROWS[0]: step - t_step, COST_ROWS[1]: (g("ng110c") - g("ng110")) / 10,
            COST_ROWS[2]: g("ng10") - 10 * step, COST_ROWS[3]: g("fb10") - 10 * fb_step, COST_ROWS[4]: t_step,
            COST_ROWS[5]: g("ngtol"), COST_ROWS[6]: g("fbtol"), COST_ROWS[7]: g("ngkry"), COST_ROWS[8]: g("fbkry")}


def fixed_costs(quick: bool, against: Optional[str]) -> list[dict[str, Any]]:
    here = os.path.dirname(os.path.dirname(os.path.abspath(hp.__file__)))
    trees = {"this checkout": here, **({"against": os.path.abspath(against)} if against else {})}
    reps, rounds = (100, 1) if quick else (300, 3)
    runs: dict[str, list] = {k: [] for k in trees}
    for _ in range(rounds):
        for k, tree in trees.items():
            runs[k].append(costs_of(tree, reps))
    rows = []
    med = {k: {key: statistics.median(r[key] for r in v) for key in v[0]} for k, v in runs.items()}
    for k in trees:
        t, o = derive(med[k]), derive(med[k], "ops ")
        for name in COST_ROWS:
            rows.append({"problem": "fixed costs, 10-dim ridge step", "checkout": k, "what": name,
                         "time_us": t[name], "ops": o[name]})
    print(f"\n## fixed costs of a 10-dimensional solve (µs and aten operations; {rounds} × {reps} interleaved)")
    print(f"{'':42s}" + "".join(f"{k:>28s}" for k in trees))
    for name in COST_ROWS:
        cells = []
        for k in trees:
            r = next(r for r in rows if r["checkout"] == k and r["what"] == name)
            cells.append(f"{r['time_us']:10.1f} us {r['ops']:7.1f} ops   ")
        print(f"{name:42s}" + "".join(f"{c:>28s}" for c in cells))
    return rows


# ---------------------------------------------------------------------------- today's leads, against DIR
LEADS_SNIPPET = r'''
import json, sys
from benchmarks import hypergrad as H
reps = int(sys.argv[1])
ref = H.reference_comparison(reps, n=200, cond=100.0, K=int(sys.argv[2]))
so = H.second_order(max(reps, 5), n=200, cond=100.0, K=int(sys.argv[2]))
out = {}
for label, r in ref["rows"].items():
    if r.get("rel_error") is not None:
        out["first order, bwd/fwd: " + label] = r["bwd_over_fwd"]
        out["first order, total/fwd: " + label] = r["total_over_fwd"]
for label, r in so["rows"].items():
    out["second order, time/fwd: " + label] = r["over_fwd"]
print(json.dumps(out))
'''


def leads(against: str, quick: bool) -> list[dict[str, Any]]:
    """``benchmarks.hypergrad``'s reference comparison (first order, ratios to the no-grad forward) and
    second-order block, from this checkout and from ``against``, in alternating subprocesses."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(hp.__file__)))
    trees = {"this checkout": here, "against": os.path.abspath(against)}
    reps, K, rounds = (3, 500, 1) if quick else (5, 2000, 3)
    runs: dict[str, list] = {k: [] for k in trees}
    for _ in range(rounds):
        for k, tree in trees.items():
            env = dict(os.environ, PYTHONPATH=tree)
            out = subprocess.run([sys.executable, "-c", LEADS_SNIPPET, str(reps), str(K)], env=env, cwd=tree,
                                 capture_output=True, text=True, check=True)
            runs[k].append(json.loads(out.stdout.strip().splitlines()[-1]))
    keys = [k for k in runs["this checkout"][0] if k in runs["against"][0]]
    rows = []
    print(f"\n## benchmarks.hypergrad (K={K}), this checkout against {against}: medians of {rounds} alternating runs")
    for key in keys:
        a = statistics.median(r[key] for r in runs["this checkout"])
        b = statistics.median(r[key] for r in runs["against"])
        rows.append({"what": key, "this": a, "against": b, "ratio": a / b})
        print(f"{key:<78s} {a:8.3f} {b:8.3f} {a / b:6.2f}")
    return rows


# ---------------------------------------------------------------------------- torch.compile
def compile_trial(repeats: int) -> list[dict[str, Any]]:
    """torch.compile of the step on the 10-dim ridge: one compiled step, and ten steps in one graph."""
    DT = torch.float64
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(200, 10, generator=g, dtype=DT), torch.randn(200, generator=g, dtype=DT)
    L = float(torch.linalg.eigvalsh(X.T @ X / 200).max()) + 0.5

    def step(u: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        return u - (X.T @ (X @ u - y) / 200 + lam * u) / L

    def ten(u: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        for _ in range(10):
            u = step(u, lam)
        return u

    lam, u0 = torch.tensor(0.5, dtype=DT), torch.zeros(10, dtype=DT)
    rows = []
    for label, fn, k in (("one step", step, 1), ("ten steps in one graph", ten, 10)):
        try:
            t0 = time.perf_counter()
            cfn = torch.compile(fn)
            with torch.no_grad():
                cfn(u0, lam)
            t_compile = time.perf_counter() - t0
        except Exception as e:  # noqa: BLE001 - a backend missing on this machine is a result too
            rows.append({"problem": "torch.compile", "method": label, "error": f"{type(e).__name__}: {e}"[:200]})
            continue

        def eager(fn=fn):
            with torch.no_grad():
                u = u0
                for _ in range(100 // k):
                    u = fn(u, lam)

        def compiled(cfn=cfn):
            with torch.no_grad():
                u = u0
                for _ in range(100 // k):
                    u = cfn(u, lam)

        t = interleaved({"eager": eager, "compiled": compiled}, repeats)
        rows.append({"problem": "torch.compile", "method": label, "compile_s": t_compile,
                     "eager_us_per_step": t["eager"] * 1e4, "compiled_us_per_step": t["compiled"] * 1e4,
                     "ratio": t["compiled"] / t["eager"]})
        r = rows[-1]
        print(f"torch.compile {label}: compile {t_compile:.1f} s; per step eager {r['eager_us_per_step']:.2f} µs, "
              f"compiled {r['compiled_us_per_step']:.2f} µs ({r['ratio']:.2f}×)")
    return rows


# ---------------------------------------------------------------------------- report
def fmt(v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        if v != v:
            return "—"
        return f"{v:.2g}" if (abs(v) < 1e-2 and v != 0) else f"{v:.3g}"
    return str(v)


def print_rows(rows: list[dict[str, Any]], err: str = "rel. error") -> None:
    if not rows:
        return
    print(f"\n## {rows[0]['problem']}")
    print(f"{'method':<58s} {err:>10s} {'time ms':>9s} {'ratio':>6s}")
    for r in rows:
        print(f"{r['method']:<58s} {r['rel_error']:>10.2e} {r['time_ms']:>9.2f} {r['ratio']:>6.2f}")


def markdown(ridge_rows: list, hoag_rows: list, cost_rows: list, compile_rows: list, note: str) -> str:
    lines = [note, "", "| problem | method | error | time | ratio |", "|---|---|---|---|---|"]
    for r in ridge_rows:
        lines.append(f"| {r['problem']} | {r['method']} | {fmt(r['rel_error'])} | {r['time_ms']:.2f} ms | "
                     f"{r['ratio']:.2f} |")
    for r in hoag_rows:
        lines.append(f"| HOAG breast_cancer (\\|θ − θ*\\|) | {r['method']} ({r['evals']} lower solves) | "
                     f"{fmt(r['rel_error'])} | {r['time_ms']:.1f} ms | {r['ratio']:.2f} |")
    if cost_rows:
        trees = list(dict.fromkeys(r["checkout"] for r in cost_rows))
        intro = "Fixed costs of a 10-dimensional solve (ridge step, 200 × 10 data; µs, aten operations)"
        if len(trees) > 1:  # --against DIR: an earlier checkout, measured in the same run
            intro += "; `against` is the checkout given with `--against` (here: main before the per-call cuts)"
        lines += ["", intro + ":", "",
                  "| | " + " | ".join(trees) + " |", "|---|" + "---|" * len(trees)]
        for name in COST_ROWS:
            cells = [next(r for r in cost_rows if r["checkout"] == k and r["what"] == name) for k in trees]
            body = " | ".join(f"{c['time_us']:.1f} µs, {c['ops']:.0f} ops" for c in cells)
            lines.append(f"| {name} | {body} |")
    for r in compile_rows:
        if "error" in r:
            lines.append(f"\n`torch.compile` ({r['method']}): {r['error']}")
        else:
            lines.append(f"\n`torch.compile` of the step ({r['method']}): compile {r['compile_s']:.1f} s, "
                         f"{r['compiled_us_per_step']:.2f} µs per step against {r['eager_us_per_step']:.2f} µs eager "
                         f"({r['ratio']:.2f}×).")
    return "\n".join(lines)


def write_readme(path: str, block: str) -> None:
    """This benchmark's README block (:func:`benchmarks.report.write_readme`; added to the Performance
    section when the README has no markers yet)."""
    report.write_readme(path, block, BEGIN, END, "Small smooth problems (`python -m benchmarks.small`)")


def machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, 1 thread"


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer repeats (about a minute); prints, does not write")
    ap.add_argument("--against", default=None, help="another checkout whose fixed costs are measured alongside")
    ap.add_argument("--leads", action="store_true",
                    help="with --against: also benchmarks.hypergrad's first- and second-order ratios of both")
    ap.add_argument("--no-readme", action="store_true", help="do not rewrite the README block")
    ap.add_argument("--readme", default="README.md", help="the file whose marker block is rewritten")
    ap.add_argument("--out", default=None, help="also write every row as JSON here")
    args = ap.parse_args(argv)
    repeats = 5 if args.quick else 15
    print(f"# benchmarks.small ({'quick' if args.quick else 'full'}); {machine()}")
    with one_thread():
        ridge_rows = ridge(args.quick, repeats)
        hoag_rows = hoag(args.quick, 3 if args.quick else 7)
        cost_rows = fixed_costs(args.quick, args.against)
        compile_rows = [] if args.quick else compile_trial(repeats)
    lead_rows = leads(args.against, args.quick) if (args.leads and args.against) else []
    out = {"machine": machine(), "ridge": ridge_rows, "hoag": hoag_rows, "costs": cost_rows, "compile": compile_rows,
           "leads": lead_rows}
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as fh:
            json.dump(out, fh, indent=1)
    note = (f"`python -m benchmarks.small` ({time.strftime('%Y-%m-%d')}, {machine()}; medians of {repeats} "
            "interleaved runs; ratio = time / TorchOpt's (ridge) or / the faster scipy (HOAG)):")
    if not (args.quick or args.no_readme):
        write_readme(args.readme, markdown(ridge_rows, hoag_rows, cost_rows, compile_rows, note))
        print(f"\nwritten to {args.readme}")
    return out


if __name__ == "__main__":
    main()
