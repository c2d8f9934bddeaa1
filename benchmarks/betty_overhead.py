"""Betty adapter: cost of a hypergradient through Betty's Engine, and Betty's own methods' accuracy.

    python -m benchmarks.betty_overhead [--quick]

Quadratic bilevel problem (n=200, condition 100, float64, CPU): T(u; x) = u - s(Qu - x),
F = ½||u - y||², closed-form hypergradient Q⁻¹(u* - y).

1. One hypergradient through a Betty ``Engine`` with a ``GKMProblem`` node (``gkm_implicit``: the K
   GKM steps inside one Betty step) vs the same hypergradient from the core API; ratio of times.
2. Betty's own path for an iterative lower level: K lower steps as K Betty steps of an
   ``ImplicitProblem`` trained by SGD (``unroll_steps=K``) vs the same K steps in a plain torch loop.
3. Hypergradient relative error of Betty's ``cg`` and ``neumann`` (20 and 100 iterations, its
   documented ``cg_alpha``/``neumann_alpha`` = 1/L) vs ours, ``implicit_cg`` (tolerance 1e-10), on
   Betty's argmin node with the lower level solved to ~1e-13.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
import warnings
from typing import Any

import torch
from betty.configs import EngineConfig
from betty.engine import Engine
from betty.problems import ImplicitProblem

import hodl_plugin as hp
import hodl_plugin.betty as hb

from .hypergrad import quadratic

DT = torch.float64


def _median(fn, repeats: int) -> float:
    fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


class _X(torch.nn.Module):
    def __init__(self, x0: torch.Tensor) -> None:
        super().__init__()
        self.x = torch.nn.Parameter(x0.clone())


class _ArgminLower(ImplicitProblem):
    """Betty's argmin node u*(x) = argmin ½uᵀQu - xᵀu (x: the upper node's parameter)."""

    def __init__(self, Q: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.Q = Q

    def get_batch(self):
        return None

    def training_step(self, batch):
        u = self.module.u
        return 0.5 * u @ (self.Q @ u) - self.upper.module.x @ u


def engine_vs_core(K: int, repeats: int) -> dict[str, Any]:
    P = quadratic(200, 100.0, seed=1)
    Q, s, y, x0, ref = P["Q"], P["s"], P["y"], P["x0"], P["ref"]
    u0 = torch.zeros(200, dtype=DT)
    T = hp.GradientStep(grad=lambda u, x: Q @ u - x, step=s)
    solver = hp.GKMSolver(T, max_steps=K, tol=0.0, hypergrad="implicit", solver="cg")
    got: dict[str, torch.Tensor] = {}

    def core() -> None:
        x = x0.clone().requires_grad_(True)
        with warnings.catch_warnings():  # tol=0 (K fixed): the implicit mode warns, as the node does not
            warnings.simplefilter("ignore")
            (0.5 * ((solver(u0, x) - y) ** 2).sum()).backward()
        got["core"] = x.grad

    class Lower(hb.GKMProblem):
        def operator(self, u, batch):
            return T(u, self.upper.module.x)

        def initial_state(self, batch):
            return u0

    class Upper(ImplicitProblem):
        def get_batch(self):
            return None

        def training_step(self, batch):
            return 0.5 * ((self.lower.u - y) ** 2).sum()

        def grad_callback(self):
            got["engine"] = self.module.x.grad.detach().clone()

    xm = _X(x0)
    up = Upper("upper", hb.HODLConfig(type="darts"), module=xm, optimizer=torch.optim.SGD(xm.parameters(), lr=0.0))
    low = Lower("lower", hb.HODLConfig(type="gkm_implicit", max_steps=K, tol=0.0, warm_start=False,
                                            linear_solver="cg"))
    eng = Engine([up, low], EngineConfig(train_iters=1, strategy="cpu"),
                 dependencies={"u2l": {up: [low]}, "l2u": {low: [up]}})

    def engine_step() -> None:
        eng.global_step += 1
        eng.train_step()

    t_core = _median(core, repeats)
    t_eng = _median(engine_step, repeats)
    err_core = float((got["core"] - ref).norm() / ref.norm())
    err_eng = float((got["engine"] - ref).norm() / ref.norm())
    return {"K": K, "t_core_s": t_core, "t_engine_s": t_eng, "ratio": t_eng / t_core,
            "rel_error_core": err_core, "rel_error_engine": err_eng}


def betty_per_step(K: int, repeats: int) -> dict[str, Any]:
    """K gradient steps of the lower level: K Betty steps vs a plain loop."""
    P = quadratic(200, 100.0, seed=1)
    Q, s, x0 = P["Q"], P["s"], P["x0"]

    class Upper(ImplicitProblem):
        def get_batch(self):
            return None

        def training_step(self, batch):
            return (self.lower.module.u ** 2).sum()

    um = torch.nn.Module()
    um.u = torch.nn.Parameter(torch.zeros(200, dtype=DT))
    xm = _X(x0)
    low = _ArgminLower(Q, "lower", hb.HODLConfig(type="darts", unroll_steps=K), module=um,
                optimizer=torch.optim.SGD(um.parameters(), lr=s))
    up = Upper("upper", hb.HODLConfig(type="darts"), module=xm, optimizer=torch.optim.SGD(xm.parameters(), lr=0.0))
    eng = Engine([up, low], EngineConfig(train_iters=K, strategy="cpu"),
                 dependencies={"u2l": {up: [low]}, "l2u": {low: [up]}})

    def betty_k_steps() -> None:
        for _ in range(K):
            eng.global_step += 1
            eng.train_step()

    def autograd_k_steps() -> None:  # the same K SGD steps in plain torch (autograd + optimizer)
        u = torch.zeros(200, dtype=DT, requires_grad=True)
        opt = torch.optim.SGD([u], lr=s)
        for _ in range(K):
            opt.zero_grad()
            loss = 0.5 * u @ (Q @ u) - x0 @ u
            loss.backward()
            opt.step()

    def plain_k_steps() -> None:  # the same K steps as a bare loop, what a GKM node runs
        with torch.no_grad():
            u = torch.zeros(200, dtype=DT)
            for _ in range(K):
                u = u - s * (Q @ u - x0)

    t_b = _median(betty_k_steps, repeats)
    t_a = _median(autograd_k_steps, repeats)
    t_p = _median(plain_k_steps, repeats)
    return {"K": K, "t_betty_s": t_b, "t_autograd_loop_s": t_a, "t_plain_s": t_p,
            "ratio_plain": t_b / t_p, "ratio_autograd_loop": t_b / t_a}


def betty_methods() -> list[dict[str, Any]]:
    P = quadratic(200, 100.0, seed=1)
    Q, s, y, x0, ref = P["Q"], P["s"], P["y"], P["x0"], P["ref"]
    rows = []
    cases = [("cg", {"cg_iterations": it, "cg_alpha": s}, it) for it in (20, 100)]
    cases += [("neumann", {"neumann_iterations": it, "neumann_alpha": s}, it) for it in (20, 100)]
    cases += [("implicit_cg", {"adjoint_rtol": 1e-10}, None), ("implicit_gmres", {"adjoint_rtol": 1e-10}, None)]
    for kind, opts, its in cases:
        got: dict[str, torch.Tensor] = {}

        class Upper(ImplicitProblem):
            def get_batch(self):
                return None

            def training_step(self, batch):
                return 0.5 * ((self.lower.module.u - y) ** 2).sum()

            def grad_callback(self):
                got["g"] = self.module.x.grad.detach().clone()

        um = torch.nn.Module()
        um.u = torch.nn.Parameter(torch.linalg.solve(Q, x0))  # the lower level solved
        xm = _X(x0)
        low = _ArgminLower(Q, "lower", hb.HODLConfig(type=kind, **opts), module=um,
                    optimizer=torch.optim.SGD(um.parameters(), lr=s))
        up = Upper("upper", hb.HODLConfig(type="darts"), module=xm, optimizer=torch.optim.SGD(xm.parameters(), lr=0.0))
        eng = Engine([up, low], EngineConfig(train_iters=1, strategy="cpu"),
                     dependencies={"u2l": {up: [low]}, "l2u": {low: [up]}})
        t0 = time.perf_counter()
        eng.run()
        dt = time.perf_counter() - t0
        info = getattr(low, "hodl_adjoint_info", None)
        rows.append({"method": kind, "iterations": its if info is None else info.iterations,
                     "rel_error": float((got["g"] - ref).norm() / ref.norm()), "time_s": dt})
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default="out/bench_betty.json")
    args = ap.parse_args(argv)
    hb.set_log_level("WARNING")
    Ks = [100, 1000] if args.quick else [100, 1000, 2000]
    print(f"# Betty adapter benchmark (betty-ml {__import__('importlib.metadata').metadata.version('betty-ml')}, "
          f"torch {torch.__version__}, {os.cpu_count()} cores)")
    print("\n## 1. one hypergradient (gkm_implicit): through Betty's Engine vs the core API")
    print(f"{'K':>5} {'core ms':>9} {'engine ms':>10} {'ratio':>6} {'err core':>9} {'err engine':>10}")
    r1 = []
    for K in Ks:
        r = engine_vs_core(K, args.repeats)
        r1.append(r)
        print(f"{K:>5} {r['t_core_s'] * 1e3:>9.2f} {r['t_engine_s'] * 1e3:>10.2f} {r['ratio']:>6.2f} "
              f"{r['rel_error_core']:>9.1e} {r['rel_error_engine']:>10.1e}")
    print("\n## 2. K lower steps as K Betty steps (Betty's own iterative path) vs a plain torch loop")
    print(f"{'K':>5} {'bare loop ms':>12} {'autograd+SGD ms':>15} {'betty ms':>9} {'÷bare':>6} {'÷autograd':>9}")
    r2 = []
    for K in ([100] if args.quick else [100, 500]):
        r = betty_per_step(K, max(1, args.repeats // 2))
        r2.append(r)
        print(f"{K:>5} {r['t_plain_s'] * 1e3:>12.1f} {r['t_autograd_loop_s'] * 1e3:>15.1f} "
              f"{r['t_betty_s'] * 1e3:>9.1f} {r['ratio_plain']:>6.1f} {r['ratio_autograd_loop']:>9.1f}")
    print("\n## 3. implicit hypergradient on Betty's argmin node (n=200, condition 100, lower solved)")
    print(f"{'method':<16} {'iterations':>10} {'rel.err':>9} {'time ms':>8}")
    r3 = betty_methods()
    for r in r3:
        print(f"{r['method']:<16} {r['iterations']:>10} {r['rel_error']:>9.2e} {r['time_s'] * 1e3:>8.1f}")
    out = {"engine_vs_core": r1, "betty_per_step": r2, "methods": r3}
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    print(f"\nwrote {args.out}")
    return out


if __name__ == "__main__":
    main()
