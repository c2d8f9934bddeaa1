"""hodl_plugin's bilevel baselines against BOAT 1.1.1's and against independent references.

``python -m benchmarks.baselines [--quick] [--no-readme] [--readme PATH]``

Two tables: the first-order methods that move both levels (below), and the hypergradient methods of
``GKMSolver`` — PTT, a learned start, FD, IGA — (:mod:`benchmarks.hg_baselines`).

For each method (BOME, PGDO, MESO, ALTO) and each problem (the MAID quadratic with a closed form, and
hyper-cleaning on digits; :mod:`benchmarks.fo_problems`), from the same start and with the same
settings:

- **ours vs BOAT**: max abs difference of (x, y) after K steps between hodl_plugin's class and BOAT's
  operation (``VFO``, ``PGDO``, ``MESO``, ``ALTO``) run through its ``Problem``. 0 to rounding where the
  algorithms coincide (PGDO, ALTO); where BOAT departs from the paper (VFO, MESO), the size of the
  departure;
- **BOAT vs rebuilt**: BOAT's iterates against :mod:`benchmarks.boat_explained`, which rebuilds BOAT's
  step from the paper's pieces plus each named difference (BOAT runs with float64 as torch's default
  dtype here, which removes its float32 direction buffers; their effect is the "BOAT float32" column);
- **ours vs reference**: against :mod:`benchmarks.fo_reference`, the paper's equations with
  hand-written gradients (no autograd, no BOAT);
- **x dist**: ‖x − x*‖/‖x*‖ to the closed-form bilevel solution after N steps (quadratic only);
- **time ours/BOAT**: median over steps of (our step time)/(BOAT's step time), steps interleaved one by
  one, one torch thread, under the CPU lock when run by ``make``.

A full run rewrites the block between ``<!-- baselines:start -->`` and ``<!-- baselines:end -->`` of
README.md (with the machine and the date); ``--quick`` (fewer steps, about a minute) only prints.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

import hodl_plugin.baselines as B

from . import boat_explained, fo_reference, hg_baselines, report
from .fo_problems import HyperCleaningBLO, QuadraticBLO
from .peers import available, boat_fo

BEGIN, END = "<!-- baselines:start -->", "<!-- baselines:end -->"


@dataclass
class Case:
    """One method on one problem: our class and keywords, BOAT's op and configuration, the rebuild."""

    method: str
    ours: dict[str, Any]
    boat_op: str
    boat_cfg: dict[str, Any]
    boat_lower_iters: int
    boat_lr: tuple[float, float]  # (x, y) SGD step sizes of BOAT's optimizers
    rebuilt: Optional[Callable[..., Any]] = None  # boat_explained.<op>(P, iters, **rebuilt_kw)
    rebuilt_kw: dict[str, Any] = field(default_factory=dict)
    long: dict[str, Any] = field(default_factory=dict)  # settings of the convergence run (quadratic)


def cases(P: Any, quadratic: bool) -> list[Case]:
    """The settings of each method on P (step sizes from P's lower smoothness constant)."""
    a = 1.0 / P.L_lower
    xl, yl = (0.02, 0.02) if quadratic else (100.0, 0.1)
    gamma = 10.0
    s = 1.0 / (gamma + 1e-8)  # BOAT scales its PGDO step by min(1/(γ + 1e-8), 1)
    return [
        Case("BOME", dict(inner_steps=10, inner_lr=a, eta=0.5 if quadratic else 1.0, x_lr=xl, y_lr=yl),
             "VFO", dict(y_hat_lr=a, eta=0.0, u1=0.5 if quadratic else 1.0), 10, (xl, yl),
             boat_explained.vfo, dict(T=10, y_hat_lr=a, u1=0.5 if quadratic else 1.0, x_lr=xl, y_lr=yl),
             long=dict(inner_steps=50, inner_lr=a, eta=0.5, x_lr=0.02, y_lr=0.02)),
        Case("PGDO", dict(gamma=gamma, inner_steps=10, inner_lr=a, x_lr=xl * s, y_lr=yl * s),
             "PGDO", dict(y_hat_lr=a, gamma_init=gamma, gamma_max=gamma, gamma_argmax_step=1,
                          update_y_ahead=False, penalty="difference"), 10, (xl, yl),
             long=dict(gamma=gamma, inner_steps=10, inner_lr=a, x_lr=0.5 / (gamma * P.L_lower),
                       y_lr=0.5 / (gamma * P.L_lower))),
        Case("MESO", dict(gamma=0.5, eta=0.5 * a, c0=1.0, p=0.25, x_lr=xl, y_lr=yl),
             "MESO", dict(eta=0.5 * a, gamma_1=2.0, c0=1.0, y_hat_lr=a), 1, (xl, yl),
             boat_explained.meso, dict(eta=0.5 * a, gamma_1=2.0, c0=1.0, x_lr=xl, y_lr=yl),
             long=dict(gamma=0.5, eta=0.5 * a, c0=10.0, p=0.25, x_lr=0.05, y_lr=0.05)),
        Case("ALTO", dict(x_lr=xl, y_lr=a if quadratic else yl), "ALTO", {}, 1, (xl, a if quadratic else yl),
             long=dict(x_lr=0.02, y_lr=a)),
    ]


def ours(P: Any, method: str, kw: dict[str, Any]) -> tuple[Any, torch.Tensor, torch.Tensor]:
    """Our method on fresh copies of P's start."""
    x, y = P.x0.clone().requires_grad_(True), P.y0.clone().requires_grad_(True)
    return getattr(B, method)(x, y, P.upper, P.lower, **kw), x, y


def run_ours(P: Any, method: str, kw: dict[str, Any], iters: int) -> tuple[torch.Tensor, torch.Tensor]:
    m, x, y = ours(P, method, kw)
    for _ in range(iters):
        m.step()
    return x.detach(), y.detach()


def maxdiff(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor]) -> float:
    return max(float((u - v).abs().max()) for u, v in zip(a, b))


def timing(P: Any, case: Case, steps: int) -> float:
    """Median of (our step time)/(BOAT's step time), steps interleaved one by one."""
    m, _, _ = ours(P, case.method, case.ours)
    prob = boat_fo.problem(P, case.boat_op, case.boat_cfg, case.boat_lower_iters, *case.boat_lr)
    ratios = []
    for k in range(steps):
        t0 = time.perf_counter()
        m.step()
        t1 = time.perf_counter()
        boat_fo.one_step(prob, k)
        t2 = time.perf_counter()
        ratios.append((t1 - t0) / (t2 - t1))
    return statistics.median(ratios)


def measure(name: str, P: Any, quadratic: bool, K: int, N: int, time_steps: int, boat: bool) -> list[dict[str, Any]]:
    rows = []
    for case in cases(P, quadratic):
        t0 = time.perf_counter()
        ours_xy = run_ours(P, case.method, case.ours, K)
        ref = fo_reference.REFERENCES[case.method](P, K, **case.ours)
        row: dict[str, Any] = {"problem": name, "method": case.method, "BOAT op": case.boat_op, "K": K,
                               "ours vs reference": maxdiff(ours_xy, ref)}
        if boat:
            boat64 = boat_fo.run(P, case.boat_op, case.boat_cfg, case.boat_lower_iters, *case.boat_lr, K,
                                 dtype=torch.float64)[:2]
            boat32 = boat_fo.run(P, case.boat_op, case.boat_cfg, case.boat_lower_iters, *case.boat_lr, K)[:2]
            rebuilt = ours_xy if case.rebuilt is None else case.rebuilt(P, K, **case.rebuilt_kw)
            row.update({"ours vs BOAT": maxdiff(ours_xy, boat32), "BOAT vs rebuilt": maxdiff(boat64, rebuilt),
                        "BOAT float32": maxdiff(boat64, boat32), "time ours/BOAT": timing(P, case, time_steps)})
        if quadratic:
            row["x dist"] = P.dist(run_ours(P, case.method, case.long, N)[0])
            row["N"] = N
        row["wall s"] = time.perf_counter() - t0
        rows.append(row)
        print(f"  {name} {case.method}: done in {row['wall s']:.1f} s", flush=True)
    return rows


COLUMNS = ["problem", "method", "BOAT op", "K", "ours vs BOAT", "BOAT vs rebuilt", "BOAT float32", "ours vs reference",
           "x dist", "N", "time ours/BOAT"]

LEGEND = """Each "vs" column is the largest absolute difference of (x, y) after K steps from the same start.
*ours vs BOAT*: hodl_plugin's class against BOAT's operation with the same settings — rounding where the
algorithms coincide (PGDO, ALTO), the size of BOAT's departures from the paper where they do not (VFO,
MESO; listed in `benchmarks/boat_explained.py` and the Baselines page of the docs). *BOAT vs rebuilt*:
BOAT (run with float64 as torch's default dtype) against the paper's step plus those departures — rounding,
so the list is complete. *BOAT float32*: BOAT as shipped against the same in float64 (VFO builds its
direction in float32 buffers). *ours vs reference*: against the paper's equations with hand-written
gradients (`benchmarks/fo_reference.py`). *x dist*: ‖x − x*‖/‖x*‖ to the closed form after N steps of
each method's convergence settings (BOME settles O(step) away, PGDO O(1/γ), MESO as c_k grows; ALTO drives
x to 0: its x-direction ∂_x F = ρx ignores how y* moves with x). *time ours/BOAT*: median per-step ratio;
BOAT's VFO runs 2T lower steps per step where BOME runs T."""


def fmt(v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.2g}" if v != 0 else "0"
    return str(v)


def table(rows: list[dict[str, Any]], columns: Optional[list[str]] = None) -> str:
    """Plain-text table (printed)."""
    columns = COLUMNS if columns is None else columns
    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    w = [max(len(c), *(len(x[i]) for x in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(x) for c, x in zip(columns, w)), "  ".join("-" * x for x in w)]
    lines += ["  ".join(v.ljust(x) for v, x in zip(row, w)) for row in cells]
    return "\n".join(lines)


def markdown(rows: list[dict[str, Any]], note: str, columns: Optional[list[str]] = None,
             legend: str = LEGEND) -> str:
    """The README block (one table and its legend).

    >>> print(markdown([{"problem": "q", "method": "ALTO", "K": 3}], "m").splitlines()[4])
    | q | ALTO | — | 3 | — | — | — | — | — | — | — |
    """
    columns = COLUMNS if columns is None else columns
    head = "| " + " | ".join(columns) + " |"
    lines = [note, "", head, "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines + ["", legend])


def write_readme(path: str, block: str) -> None:
    """This benchmark's README block (:func:`benchmarks.report.write_readme`; added to the Performance
    section when the README has no markers yet)."""
    report.write_readme(path, block, BEGIN, END, "Bilevel baselines against BOAT (`python -m benchmarks.baselines`)")


def machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, 1 thread"


def main(argv: Optional[list[str]] = None) -> list[dict[str, Any]]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer steps (about a minute); prints, does not write")
    ap.add_argument("--no-readme", action="store_true", help="do not rewrite the README block")
    ap.add_argument("--readme", default="README.md", help="the file whose marker block is rewritten")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    boat = available("boat_torch") is None
    if not boat:
        print(f"boat_torch: {available('boat_torch')} — the BOAT columns are left empty")
    K, N, T = (30, 300, 10) if args.quick else (40, 2000, 40)
    quad, hc = QuadraticBLO(), HyperCleaningBLO()
    rows = measure("quadratic", quad, True, K, N, T, boat)
    rows += measure("hyper-cleaning", hc, False, K, N, T, boat)
    print("\n" + table(rows))
    HK, HN = 10, (100 if args.quick else 300)
    hg_rows = hg_baselines.measure("quadratic", quad, True, HK, HN, T, boat)
    hg_rows += hg_baselines.measure("hyper-cleaning", hc, False, HK, HN, T, boat)
    print("\n" + table(hg_rows, hg_baselines.COLUMNS))
    note = (f"`python -m benchmarks.baselines` ({time.strftime('%Y-%m-%d')}, {machine()}, shared machine; "
            f"K steps from the same start, x dist after N steps, time = median ratio of {T} interleaved steps):")
    if not (args.quick or args.no_readme):
        block = markdown(rows, note) + "\n\n" + markdown(
            hg_rows, "Hypergradient methods of `GKMSolver`, same problems (lower step 1/L, `tol=0`):",
            hg_baselines.COLUMNS, hg_baselines.LEGEND)
        write_readme(args.readme, block)
        print(f"\nwritten to {args.readme}")
    return rows + hg_rows


if __name__ == "__main__":
    main()
