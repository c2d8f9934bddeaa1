"""``torch.func.vmap`` over a GKM solve (one batched solve) vs a Python loop over the samples.

    python -m benchmarks.vmap            # B = 32 samples, n = 100, 5 interleaved repeats
    python -m benchmarks.vmap --quick    # B = 32, n = 100, 3 repeats, about a minute

Problem (float64): T(u; x) = u - s_i(Qu - c_i) with x = (s_i, c_i), Q SPD of condition 30 and
per-sample steps s_i from 1/L down to 1/(4L), so the samples need very different numbers of steps
(relative tolerance 1e-8, implicit mode, CG adjoint). Two entry points:

- ``forward``: ``vmap(solve)(X)`` vs ``torch.stack([solve(x) for x in X])``;
- ``vmap∘grad``: ``vmap(grad(f))(X)`` vs ``[grad(f)(x) for x in X]``, f = ½‖u* - y‖².

It prints the median wall time of each (the runs are interleaved: batched, loop, batched, ...), the
loop / batched ratio, the total Python calls of T (the batch: one per step of the slowest sample;
the loop: the sum of the samples' steps), the per-sample steps, and the largest difference between
the two results (they must agree).
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from typing import Callable, Optional

import torch

import hodl_plugin as hp

DT = torch.float64


def problem(B: int, n: int) -> tuple[Callable, torch.Tensor, Callable, dict]:
    g = torch.Generator().manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=DT))
    ev = torch.logspace(0, math.log10(30), n, dtype=DT)
    Q, L = (U * ev) @ U.T, float(ev.max())
    steps = torch.logspace(0, -math.log10(4), B, dtype=DT) / L
    X = torch.cat([steps.unsqueeze(1), torch.randn(B, n, generator=g, dtype=DT)], dim=1)
    y = torch.randn(n, generator=g, dtype=DT)
    count = {"T": 0}

    def T(u: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        count["T"] += 1
        return u - x[0] * (Q @ u - x[1:])

    solver = hp.GKMSolver(T, tol=1e-8, max_steps=100000, hypergrad=hp.Implicit("cg"))

    def solve(x: torch.Tensor) -> torch.Tensor:
        return solver(torch.zeros(n, dtype=DT), x)

    def f(x: torch.Tensor) -> torch.Tensor:
        return 0.5 * ((solve(x) - y) ** 2).sum()

    return solve, X, f, {"count": count, "solver": solver}


def _timed(fn: Callable[[], torch.Tensor]) -> tuple[float, torch.Tensor]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="3 repeats (< 1 min)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave it); on a "
                    "loaded machine 1 avoids thread thrashing in the small batched matmuls")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats = 3 if args.quick else 5
    solve, X, f, ctx = problem(args.batch, args.n)
    count, solver = ctx["count"], ctx["solver"]
    entries = {
        "forward": (lambda: torch.func.vmap(solve)(X), lambda: torch.stack([solve(x) for x in X])),
        "vmap∘grad": (lambda: torch.func.vmap(torch.func.grad(f))(X),
                      lambda: torch.stack([torch.func.grad(f)(x) for x in X])),
    }
    print(f"B = {args.batch} samples, n = {args.n}, {repeats} interleaved repeats (medians), "
          f"{torch.get_num_threads()} thread(s)")
    print(f"{'entry':10} {'batched s':>10} {'loop s':>10} {'loop/batched':>13} {'T calls b/l':>14} {'max diff':>9}")
    for name, (batched, loop) in entries.items():
        tb, tl = [], []
        calls = [0, 0]
        for _ in range(repeats):
            count["T"] = 0
            t, ob = _timed(batched)
            tb.append(t)
            calls[0] = count["T"]
            steps = solver.info.steps_per_sample
            count["T"] = 0
            t, ol = _timed(loop)
            tl.append(t)
            calls[1] = count["T"]
        mb, ml = statistics.median(tb), statistics.median(tl)
        diff = float((ob - ol).abs().max() / ol.abs().max())
        print(f"{name:10} {mb:10.3f} {ml:10.3f} {ml / mb:12.1f}x {calls[0]:>6}/{calls[1]:<7} {diff:9.1e}")
    print(f"per-sample steps (forward): min {int(steps.min())}, max {int(steps.max())}, "
          f"sum {int(steps.sum())}")


if __name__ == "__main__":
    main()
