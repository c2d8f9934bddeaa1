"""Anderson acceleration vs the plain KM iteration: steps and wall time, side by side.

    python -m benchmarks.anderson                 # n = 500 quadratic + n = 200 tanh equilibrium, 5 repeats
    python -m benchmarks.anderson --quick         # n = 200 / 100, 1 repeat, well under 30 s
    python -m benchmarks.anderson --write-readme  # also replace the README block between
                                                  # <!-- anderson:begin --> and <!-- anderson:end -->

Problems (float64, forward to the same relative tolerance 1e-9, then the implicit backward):

- ``quadratic``: T(u; x) = u - (Qu - x)/L, Q SPD of condition 1e3; F = ½‖u - y‖², CG adjoint;
- ``tanh``: u = tanh(Au + x), A nonsymmetric (I - Q/L + 0.01 K, K skew, ‖A‖₂ = 1); F = ½‖u‖²,
  GMRES adjoint.

For each method (plain KM, ``Anderson(m)`` for several m) it prints the forward steps, the step
ratio to plain, the median wall time of forward + implicit backward and its ratio to plain (the runs
are interleaved: plain, Anderson(5), ..., plain, ...), the same ratio in CPU time of the process
(less sensitive to other processes on a busy machine), and the relative hypergradient error against
the closed form (quadratic) / dense implicit differentiation at a Newton solution (tanh). It then
prints the Markdown table of the README (``--write-readme`` writes it there, atomically, with the date
and the machine, and keeps the measured rows in ``benchmarks/results/anderson.json``: the source that
``tests/test_readme.py`` renders the README block from).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import time
from typing import Any, Callable, Optional

import torch

import hodl_plugin as hp

from . import report

DT = torch.float64
TOL = 1e-9


def _spd(n: int, cond: float, seed: int) -> tuple[torch.Tensor, float]:
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=DT))
    ev = torch.logspace(0, math.log10(cond), n, dtype=DT)
    return (U * ev) @ U.T, float(ev.max())


def quadratic(n: int) -> dict[str, Any]:
    """u* = Q⁻¹x, ∇f(x) = Q⁻¹(u* - y)."""
    Q, L = _spd(n, 1e3, 0)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(n, generator=g, dtype=DT), torch.randn(n, generator=g, dtype=DT)
    ref = torch.linalg.solve(Q, torch.linalg.solve(Q, x) - y)
    return dict(T=lambda u, x: u - (Q @ u - x) / L, F=lambda u: 0.5 * ((u - y) ** 2).sum(), x=x, ref=ref,
                solver="cg")


def tanh_equilibrium(n: int) -> dict[str, Any]:
    """Reference: Newton on u - tanh(Au + x) = 0, then du*/dx = (I - DA)⁻¹D, D = sech²(Au* + x)."""
    Q, L = _spd(n, 1e3, 2)
    K = torch.randn(n, n, dtype=DT, generator=torch.Generator().manual_seed(3))
    K = (K - K.T) / torch.linalg.matrix_norm(K - K.T, 2)
    A = torch.eye(n, dtype=DT) - Q / L + 0.01 * K
    A = A / torch.linalg.matrix_norm(A, 2)
    x = 0.01 * torch.randn(n, dtype=DT, generator=torch.Generator().manual_seed(4))
    u = torch.zeros(n, dtype=DT)
    for _ in range(50):
        z = A @ u + x
        u = u - torch.linalg.solve(torch.eye(n, dtype=DT) - (1 - torch.tanh(z) ** 2)[:, None] * A, u - torch.tanh(z))
    d = 1 - torch.tanh(A @ u + x) ** 2
    ref = torch.linalg.solve(torch.eye(n, dtype=DT) - d[:, None] * A, torch.diag(d)).T @ u
    return dict(T=lambda u, x: torch.tanh(A @ u + x), F=lambda u: 0.5 * (u**2).sum(), x=x, ref=ref,
                solver="gmres")


def run_once(P: dict[str, Any], acc: Optional[hp.Anderson]) -> tuple[float, float, int, float]:
    """Forward + implicit backward: (wall s, CPU s, forward steps, relative hypergradient error)."""
    solver = hp.GKMSolver(P["T"], max_steps=200000, tol=TOL, solver=P["solver"], acceleration=acc,
                          check_every=10)
    x = P["x"].clone().requires_grad_(True)
    t, c = time.perf_counter(), time.process_time()
    u = solver(torch.zeros_like(x), x)
    P["F"](u).backward()
    dt, dc = time.perf_counter() - t, time.process_time() - c
    assert solver.info is not None and solver.info.converged
    err = float((x.grad - P["ref"]).norm() / P["ref"].norm())
    return dt, dc, solver.info.steps, err


def bench(name: str, P: dict[str, Any], methods: dict[str, Callable[[], Optional[hp.Anderson]]],
          repeats: int) -> list[dict[str, Any]]:
    """Interleaved runs; prints the table and returns its rows."""
    times: dict[str, list[float]] = {k: [] for k in methods}
    cpu: dict[str, list[float]] = {k: [] for k in methods}
    steps: dict[str, int] = {}
    errs: dict[str, float] = {}
    for make in methods.values():  # warm-up (first-call costs of autograd and the solvers)
        run_once(P, make())
    for _ in range(repeats):  # interleaved: every method once per round
        for key, make in methods.items():
            dt, dc, k, e = run_once(P, make())
            times[key].append(dt)
            cpu[key].append(dc)
            steps[key], errs[key] = k, e
    base_t, base_c, base_k = statistics.median(times["plain"]), statistics.median(cpu["plain"]), steps["plain"]
    rows = []
    for key in methods:
        t, c = statistics.median(times[key]), statistics.median(cpu[key])
        rows.append(dict(problem=name, method=key, steps=steps[key], steps_ratio=steps[key] / base_k, time_s=t,
                         time_ratio=t / base_t, cpu_ratio=c / base_c, error=errs[key]))
    print(f"\n{name}  (forward to relative residual {TOL:g} + implicit backward, median of {repeats})")
    print(f"{'method':<16}{'steps':>8}{'steps/plain':>13}{'time [s]':>11}{'time/plain':>12}{'cpu/plain':>11}"
          f"{'hypergrad err':>15}")
    for r in rows:
        print(f"{r['method']:<16}{r['steps']:>8}{r['steps_ratio']:>13.3f}{r['time_s']:>11.3f}{r['time_ratio']:>12.3f}"
              f"{r['cpu_ratio']:>11.3f}{r['error']:>15.2e}")
    return rows


BEGIN, END = "<!-- anderson:begin -->", "<!-- anderson:end -->"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results", "anderson.json")


def stamp() -> dict[str, str]:
    """When and where a run was measured: the date, the machine, the torch build and its threads."""
    return dict(date=datetime.date.today().isoformat(),
                machine=f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}",
                threads=str(torch.get_num_threads()))


def markdown(rows: list[dict[str, Any]], repeats: int, when: Optional[dict[str, str]] = None) -> str:
    """The README block: one Markdown table of every problem and method, with the date and machine.

    >>> print(markdown([dict(problem="q", method="plain", steps=10, steps_ratio=1.0, time_s=0.5,
    ...                      time_ratio=1.0, cpu_ratio=1.0, error=1e-9)], 5).splitlines()[-1])
    | q | plain | 10 | 1 | 0.500 s | 1 | 1 | 1.0e-09 |
    """
    when = when or stamp()
    lines = [
        f"`python -m benchmarks.anderson` ({when['date']}, {when['machine']}, {when['threads']} thread(s); "
        f"forward to a relative residual {TOL:g} + implicit backward, interleaved runs, medians of {repeats}):",
        "",
        "| problem | method | forward steps | steps / plain | time | time / plain | CPU time / plain "
        "| hypergradient rel. error |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['problem']} | {r['method']} | {r['steps']} | {r['steps_ratio']:.3g} | {r['time_s']:.3f} s "
                     f"| {r['time_ratio']:.3g} | {r['cpu_ratio']:.3g} | {r['error']:.1e} |")
    return "\n".join(lines)


def write_readme(path: str, block: str, begin: str = BEGIN, end: str = END) -> None:
    """This benchmark's README block (:func:`benchmarks.report.write_readme`)."""
    report.write_readme(path, block, begin, end)


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes, one repeat (< 30 s)")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--write-readme", action="store_true",
                    help=f"replace the block between {BEGIN} and {END} of --readme by the table")
    ap.add_argument("--readme", default="README.md", help="the file --write-readme edits (default README.md)")
    args = ap.parse_args(argv)
    n_q, n_t, repeats = (200, 100, 1) if args.quick else (500, 200, 5)
    repeats = args.repeats or repeats
    torch.set_num_threads(1)  # timings of small problems: one thread, no pool contention
    methods: dict[str, Callable[[], Optional[hp.Anderson]]] = {
        "plain": lambda: None,
        "Anderson(5)": lambda: hp.Anderson(history_size=5),
        "Anderson(10)": lambda: hp.Anderson(history_size=10),
        "Anderson(20)": lambda: hp.Anderson(history_size=20),
    }
    rows = bench(f"quadratic n={n_q}, cond 1e3", quadratic(n_q), methods, repeats)
    rows += bench(f"tanh equilibrium n={n_t}, nonsymmetric", tanh_equilibrium(n_t), methods, repeats)
    when = stamp()
    block = markdown(rows, repeats, when)
    print("\n" + block)
    if args.write_readme:  # the rows go beside the README edited: benchmarks/results/anderson.json
        results = os.path.join(os.path.dirname(os.path.abspath(args.readme)), os.path.relpath(RESULTS, ROOT))
        os.makedirs(os.path.dirname(results), exist_ok=True)
        with open(results, "w", encoding="utf-8") as fh:  # the source of the README block
            json.dump(dict(rows=rows, repeats=repeats, when=when), fh, indent=1)
        write_readme(args.readme, block)
        print(f"\nwritten to {args.readme} (rows in {results})")


if __name__ == "__main__":
    main()
