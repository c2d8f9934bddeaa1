"""Hypergradient accuracy, time and memory of every GKMSolver mode, side by side with TorchOpt.

    python -m benchmarks.hypergrad            # full: K in {10, 100, 1000}, quadratic n=1000 + conv net
    python -m benchmarks.hypergrad --quick    # small sizes, a few seconds

Prints, per problem and K, for each mode: relative error of the hypergradient against an independent
reference (closed form for the quadratic; unrolled to convergence for the conv net), its time as a
ratio to the K-step forward solve (``total/fwd``: solve + backward; ``bwd/fwd``: the backward alone),
the bytes of the distinct tensors autograd saved for the backward, and the peak resident-memory growth
of one solve + backward (Linux high-water mark, reset before the call).
Then a reference comparison (quadratic n=200, condition 100, K=2000, float64)
against ``torchopt.diff.implicit.custom_root`` + CG and plain autograd through the K steps.
Writes a JSON of everything to ``--out`` (default ``out/bench_hypergrad.json``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import statistics
import time
from typing import Any, Callable, Iterator

import torch

import hodl_plugin as hp

DT = torch.float64


# ---------------------------------------------------------------------------- problems
def quadratic(n: int, cond: float, seed: int = 0) -> dict[str, Any]:
    """T(u; x) = u - s(Qu - x), F = ½||u - y||²: u* = Q⁻¹x, ∇f(x) = Q⁻¹(u* - y)."""
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=DT))
    eig = torch.logspace(0, math.log10(cond), n, dtype=DT)
    Q = (U * eig) @ U.T
    Q = 0.5 * (Q + Q.T)
    s = 1.0 / cond
    y = torch.randn(n, generator=g, dtype=DT)
    x0 = torch.randn(n, generator=g, dtype=DT)
    T = hp.GradientStep(grad=lambda u, x: Q @ u - x, step=s)
    F = lambda u, x: 0.5 * ((u - y) ** 2).sum()  # noqa: E731
    u_star = torch.linalg.solve(Q, x0)
    ref = torch.linalg.solve(Q, u_star - y)
    return {"T": T, "F": F, "u0": torch.zeros(n, dtype=DT), "x0": x0, "ref": ref, "module": None,
            "Q": Q, "s": s, "y": y}


class ConvBlock(torch.nn.Module):
    """T(u; x) = x + ½ tanh(conv(u)): a contraction (factor ≤ ½) with learned conv weights."""

    def __init__(self, channels: int, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.conv = torch.nn.Conv2d(channels, channels, 3, padding=1, bias=False, dtype=DT)
        with torch.no_grad():  # ||conv||₂ ≤ ||w||₁ summed over taps and input channels: make it ≤ 1
            self.conv.weight.div_(self.conv.weight.abs().sum(dim=(1, 2, 3)).max())

    def forward(self, u: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return x + 0.5 * torch.tanh(self.conv(u))


def convnet(batch: int, channels: int, size: int, seed: int = 0) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    T = ConvBlock(channels, seed)
    y = torch.randn(batch, channels, size, size, generator=g, dtype=DT)
    x0 = torch.randn(batch, channels, size, size, generator=g, dtype=DT)
    F = lambda u, x: 0.5 * ((u - y) ** 2).sum()  # noqa: E731
    # independent reference: unrolled back-propagation run to convergence (contraction ½: 80 steps)
    ref_solver = hp.GKMSolver(T, max_steps=80, tol=0.0, hypergrad="unrolled")
    x = x0.clone().requires_grad_(True)
    F(ref_solver(torch.zeros_like(x0), x), x).backward()
    return {"T": T, "F": F, "u0": torch.zeros_like(x0), "x0": x0, "ref": x.grad.detach(), "module": T}


PROBLEMS: dict[str, Callable[[bool], dict[str, Any]]] = {
    "quadratic": lambda quick: quadratic(200 if quick else 1000, 100.0),
    "convnet": lambda quick: convnet(2, 4 if quick else 8, 16 if quick else 32),
}


def methods(problem: str, K: int) -> dict[str, dict[str, Any]]:
    solver = "cg" if problem == "quadratic" else "gmres"
    return {
        "unrolled": {"hypergrad": "unrolled"},
        "truncated(10)": {"hypergrad": "truncated", "steps": min(10, K)},
        f"implicit({solver})": {"hypergrad": "implicit", "solver": solver, "adjoint_rtol": 1e-10, "on_fail": "warn"},
        "inexact": {"hypergrad": "inexact", "eps": 1e-8, "delta": 1e-8, "solver": solver, "constants": None,
                    "warm_start": False, "relative": False},
        "first_order": {"hypergrad": "first_order"},
    }


# ---------------------------------------------------------------------------- measurement
@contextlib.contextmanager
def saved_tensor_counter(acc: list[int]) -> Iterator[None]:
    """Add to ``acc[0]`` the bytes of the distinct storages autograd saves inside the block."""
    seen: set[int] = set()

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        if st.data_ptr() not in seen:
            seen.add(st.data_ptr())
            acc[0] += st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield


def _saved_bytes(fn: Callable[[], Any]) -> tuple[Any, int]:
    """Bytes of the distinct storages autograd saves for the backward while ``fn`` runs."""
    total = [0]
    with saved_tensor_counter(total):
        out = fn()
    return out, total[0]


def _median_time(fn: Callable[[], Any], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(problem: str, K: int, name: str, opts: dict[str, Any], quick: bool, repeats: int) -> dict[str, Any]:
    import warnings

    P = PROBLEMS[problem](quick)
    T, F, u0, x0, ref = P["T"], P["F"], P["u0"], P["x0"], P["ref"]
    opts = dict(opts)
    mode = opts.pop("hypergrad")
    solver = hp.GKMSolver(T, max_steps=K, tol=0.0, hypergrad=mode, **opts)
    fwd_solver = hp.GKMSolver(T, max_steps=K, tol=0.0, hypergrad="implicit")

    def forward() -> None:
        with torch.no_grad():
            fwd_solver(u0, x0)

    state: dict[str, Any] = {}

    def call() -> torch.Tensor:
        x = x0.clone().requires_grad_(True)
        if P["module"] is not None:
            P["module"].zero_grad()
        u = solver(u0, x)
        loss = F(u, x)
        state["x"] = x
        return loss

    def full() -> None:
        call().backward()

    def backward_only() -> float:
        loss = call()
        t0 = time.perf_counter()
        loss.backward()
        return time.perf_counter() - t0

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        full()  # warm-up
        # interleaved (forward, forward+backward, backward alone per repeat): a machine that speeds
        # up or slows down moves both sides of each ratio alike
        fwd_t, full_t, bwd_t = [], [], []
        for _ in range(repeats):
            fwd_t.append(_median_time(forward, 1))
            full_t.append(_median_time(full, 1))
            bwd_t.append(backward_only())
        t_fwd, t_full, t_bwd = (statistics.median(t) for t in (fwd_t, full_t, bwd_t))
        loss, saved = _saved_bytes(call)
        loss.backward()
        rss_runs = [peak_rss_growth(full) for _ in range(3)]
        rss = None if None in rss_runs else min(rss_runs)  # the allocator adds noise, never removes it
    g = state["x"].grad
    err = float((g - ref).norm() / ref.norm())
    return {"problem": problem, "K": K, "method": name, "rel_error": err, "t_forward_s": t_fwd,
            "total_over_fwd": t_full / t_fwd, "bwd_over_fwd": t_bwd / t_fwd, "saved_MB": saved / 2**20,
            "rss_growth_MB": rss}


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def peak_rss_growth(run: Callable[[], Any]) -> float | None:
    """Peak resident-memory growth (MiB) while ``run`` executes, on Linux.

    Resets the kernel's high-water mark (``/proc/self/clear_refs`` ← 5) and reads ``VmHWM`` after,
    minus ``VmRSS`` before; ``None`` where that interface is unavailable.
    """
    import ctypes
    import gc

    try:
        gc.collect()
        try:  # hand freed heap pages back to the OS, so the baseline is what is really in use
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:
            pass
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = _status_kib("VmRSS")
        run()
        return (_status_kib("VmHWM") - before) / 1024.0
    except OSError:
        return None


# ---------------------------------------------------------------------------- reference comparison
def reference_comparison(repeats: int, n: int = 200, cond: float = 100.0, K: int = 2000) -> dict[str, Any]:
    """One reference point (n = 200, cond 100, K = 2000): our implicit/unrolled vs TorchOpt custom_root+CG and
    plain autograd through the K steps."""
    import torchopt

    P = quadratic(n, cond, seed=1)
    Q, s, x0, ref = P["Q"], P["s"], P["x0"], P["ref"]
    u0 = torch.zeros(n, dtype=DT)
    F = P["F"]

    def step(u: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return u - s * (Q @ u - x)

    def plain_forward(x: torch.Tensor) -> torch.Tensor:
        u = u0
        for _ in range(K):
            u = step(u, x)
        return u

    def forward_nograd() -> None:
        with torch.no_grad():
            plain_forward(x0)

    rows: dict[str, Any] = {}
    t_fwd = _median_time(forward_nograd, repeats)
    rows["plain torch loop, no_grad (the forward)"] = {"time_ratio": 1.0, "rel_error": None}

    def grad_and_time(fn_total: Callable[[torch.Tensor], torch.Tensor]) -> tuple[float, float, float]:
        """Interleaved with the forward (one forward, one forward+backward per repeat), so a
        machine that speeds up or slows down moves both sides of each ratio alike."""
        def run() -> tuple[torch.Tensor, float, float]:
            x = x0.clone().requires_grad_(True)
            t0 = time.perf_counter()
            loss = F(fn_total(x), x)
            t1 = time.perf_counter()
            loss.backward()
            t2 = time.perf_counter()
            return x.grad, t2 - t0, t2 - t1

        run()
        fwd, total, bwd = [], [], []
        for _ in range(repeats):
            t0 = time.perf_counter()
            forward_nograd()
            fwd.append(time.perf_counter() - t0)
            g, t_total, t_bwd = run()
            total.append(t_total)
            bwd.append(t_bwd)
        f = statistics.median(fwd)
        return float((g - ref).norm() / ref.norm()), statistics.median(total) / f, statistics.median(bwd) / f

    # plain autograd through the K steps
    e, tot, bwd = grad_and_time(plain_forward)
    rows["plain autograd through K steps"] = {"rel_error": e, "total_over_fwd": tot, "bwd_over_fwd": bwd}

    # TorchOpt custom_root + CG (its documented pattern)
    def optimality(u: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return Q @ u - x

    @torchopt.diff.implicit.custom_root(optimality, argnums=1,
                                        solve=torchopt.linear_solve.solve_cg(rtol=1e-10, maxiter=1000))
    def torchopt_solve(u_init: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            u = u_init
            for _ in range(K):
                u = step(u, x)
        return u

    e, tot, bwd = grad_and_time(lambda x: torchopt_solve(u0, x))
    rows["torchopt custom_root + solve_cg(rtol=1e-10)"] = {"rel_error": e, "total_over_fwd": tot, "bwd_over_fwd": bwd}

    for label, opts in [
        ("hodl_plugin implicit (cg, rtol=1e-10)",
         {"hypergrad": "implicit", "solver": "cg", "adjoint_rtol": 1e-10}),
        ("hodl_plugin implicit (gmres, rtol=1e-10)",
         {"hypergrad": "implicit", "solver": "gmres", "adjoint_rtol": 1e-10}),
        ("hodl_plugin unrolled", {"hypergrad": "unrolled"}),
    ]:
        opts = dict(opts)
        solver = hp.GKMSolver(step, max_steps=K, tol=0.0, check_every=K, hypergrad=opts.pop("hypergrad"), **opts)
        e, tot, bwd = grad_and_time(lambda x, solver=solver: solver(u0, x))
        rows[label] = {"rel_error": e, "total_over_fwd": tot, "bwd_over_fwd": bwd}
    return {"n": n, "cond": cond, "K": K, "t_forward_s": t_fwd, "rows": rows}


# ---------------------------------------------------------------------------- second order
def second_order(repeats: int, n: int = 200, cond: float = 100.0, K: int = 2000) -> dict[str, Any]:
    r"""Cost of the second-order path on the reference quadratic (closed form ``∇²f = Q⁻²``): a
    Hessian-vector product by double backward and by forward-over-reverse (``jvp(grad(f))``) next
    to the first-order gradient, each including the K-step solve, interleaved with a plain no-grad
    loop of the same K steps (the unit). Theory: one more linear solve per order."""
    P = quadratic(n, cond, seed=1)
    Q, s, x0, F = P["Q"], P["s"], P["x0"], P["F"]
    u0 = torch.zeros(n, dtype=DT)
    w = torch.randn(n, generator=torch.Generator().manual_seed(5), dtype=DT)
    hvp_ref = torch.linalg.solve(Q, torch.linalg.solve(Q, w))

    def step(u: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return u - s * (Q @ u - x)

    solver = hp.GKMSolver(step, max_steps=K, tol=0.0, check_every=K, hypergrad="implicit", solver="cg",
                          adjoint_rtol=1e-10)

    def f(x: torch.Tensor) -> torch.Tensor:
        return F(solver(u0, x), x)

    def forward_nograd() -> None:
        with torch.no_grad():
            u = u0
            for _ in range(K):
                u = step(u, x0)

    def first() -> torch.Tensor:
        x = x0.clone().requires_grad_(True)
        return torch.autograd.grad(f(x), x)[0]

    def double_backward() -> torch.Tensor:
        x = x0.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(f(x), x, create_graph=True)
        return torch.autograd.grad(g, x, w)[0]

    def fwd_over_rev() -> torch.Tensor:
        return torch.func.jvp(torch.func.grad(f), (x0,), (w,))[1]

    cases = {"gradient (first order)": first, "HVP by double backward": double_backward,
             "HVP by jvp(grad(f))": fwd_over_rev}
    solves = {}
    for name, fn in cases.items():
        fn()  # warm-up, and the number of linear solves it makes
        solves[name] = 1 + (solver.info.higher_solves if hasattr(solver.info, "higher_solves") else 0)
    times: dict[str, list[float]] = {name: [] for name in ["forward", *cases]}
    for _ in range(repeats):
        times["forward"].append(_median_time(forward_nograd, 1))
        for name, fn in cases.items():
            times[name].append(_median_time(fn, 1))
    t_fwd = statistics.median(times["forward"])
    g_ref = torch.linalg.solve(Q, torch.linalg.solve(Q, x0) - P["y"])
    errs = {"gradient (first order)": float((first() - g_ref).norm() / g_ref.norm()),
            "HVP by double backward": float((double_backward() - hvp_ref).norm() / hvp_ref.norm()),
            "HVP by jvp(grad(f))": float((fwd_over_rev() - hvp_ref).norm() / hvp_ref.norm())}
    rows = {name: {"rel_error": errs[name], "over_fwd": statistics.median(times[name]) / t_fwd,
                   "linear_solves": solves[name]} for name in cases}
    return {"n": n, "cond": cond, "K": K, "rows": rows}


# ---------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes (seconds)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="out/bench_hypergrad.json")
    args = ap.parse_args(argv)
    Ks = [10, 100] if args.quick else [10, 100, 1000]
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
    print(f"# hodl_plugin hypergradient benchmark ({'quick' if args.quick else 'full'}); {machine}")
    results: list[dict[str, Any]] = []
    for problem in PROBLEMS:
        print(f"\n## {problem}  (float64, CPU; reference: "
              f"{'closed form' if problem == 'quadratic' else 'unrolled to convergence'})")
        print(f"{'K':>5} {'method':<18} {'rel.err':>9} {'total/fwd':>9} {'bwd/fwd':>8} {'saved MB':>9} {'ΔRSS MB':>8}")
        for K in Ks:
            for name, opts in methods(problem, K).items():
                r = measure(problem, K, name, opts, args.quick, args.repeats)
                results.append(r)
                rss = "-" if r["rss_growth_MB"] is None else f"{r['rss_growth_MB']:.1f}"
                print(f"{K:>5} {name:<18} {r['rel_error']:>9.2e} {r['total_over_fwd']:>9.2f} "
                      f"{r['bwd_over_fwd']:>8.2f} {r['saved_MB']:>9.2f} {rss:>8}", flush=True)
    ref = reference_comparison(args.repeats, n=200, cond=100.0, K=500 if args.quick else 2000)
    print(f"\n## reference: quadratic n={ref['n']}, condition {ref['cond']:g}, K={ref['K']}, float64 "
          f"(forward {ref['t_forward_s'] * 1e3:.1f} ms)")
    print(f"{'method':<46} {'rel.err':>9} {'total/fwd':>9} {'bwd/fwd':>8}")
    for label, r in ref["rows"].items():
        if r["rel_error"] is None:
            print(f"{label:<46} {'-':>9} {1.0:>9.2f} {'-':>8}")
        else:
            print(f"{label:<46} {r['rel_error']:>9.2e} {r['total_over_fwd']:>9.2f} {r['bwd_over_fwd']:>8.2f}")
    so = second_order(max(args.repeats, 5), n=200, cond=100.0, K=500 if args.quick else 2000)
    print("\n## second order: same quadratic; closed form Hessian Q^-2 (time includes the K-step solve)")
    print(f"{'what':<28} {'rel.err':>9} {'time/fwd':>9} {'linear solves':>14}")
    for label, r in so["rows"].items():
        print(f"{label:<28} {r['rel_error']:>9.2e} {r['over_fwd']:>9.2f} {r['linear_solves']:>14}")
    out = {"machine": machine, "quick": args.quick, "results": results, "reference": ref, "second_order": so}
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    print(f"\nwrote {args.out}")
    return out


if __name__ == "__main__":
    main()
