"""The hypergradient baselines of ``GKMSolver`` (PTT, a learned start, FD, IGA) against BOAT 1.1.1 and references.

Part of ``python -m benchmarks.baselines``. For each method and problem (:mod:`benchmarks.fo_problems`; the lower
level as ``hp.GradientStep(objective=f, step=1/L)``, K steps with ``tol=0``), from the same start:

- **ours vs BOAT**: the relative difference ``max|g_ours - g_BOAT| / max|g_BOAT|`` of the hypergradient (and of the
  start's gradient with a learned start) and BOAT's operation (``PTT`` + ``RAD``, ``DI``, ``FD``, ``IGA``,
  ``IAD`` + ``RAD``; ``GDA`` for the aggregated rows) run through its ``Problem``: rounding where the algorithms
  coincide, the size of BOAT's departure where they do not;
- **BOAT vs rebuilt**: BOAT against :mod:`benchmarks.gm_reference`'s formula with that departure written in
  (FD at K > 1: the finite difference at :math:`y_0`; IGA with ``GDA``: the mixture in the multiplier);
- **ours vs reference**: against :mod:`benchmarks.gm_reference` (the papers' formulas with hand-written
  gradients; PTT and the learned start by central differences of the hand-written trajectory);
- **x dist**: ‖x − x*‖/‖x*‖ after N outer gradient steps with the method's hypergradient (quadratic);
- **time ours/BOAT**: median over interleaved calls of (our forward + backward)/(BOAT's ``run_iter``).
"""

from __future__ import annotations

import statistics
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

import hodl_plugin as hp

from . import gm_reference as R
from .peers import boat_gm

Tensor = torch.Tensor
GDA = (0.5, 0.9)  # BOAT's GDA example configuration: alpha_init, alpha_decay


@dataclass
class Case:
    """One method on one problem: our solver's options, BOAT's operations, the references."""

    label: str
    boat_op: str
    K: int
    method: str
    boat: dict[str, Any]
    reference: Callable[..., tuple[Tensor, Optional[Tensor]]]
    start: bool = False  # the start is learned (its gradient is compared too)
    gda: bool = False
    rebuilt: Optional[Callable[..., Tensor]] = None  # BOAT's departure, rebuilt from the formula
    outer: bool = False  # run N outer steps for "x dist" (quadratic)
    note: str = ""
    options: dict[str, Any] = field(default_factory=dict)


def solver(P: Any, case: Case) -> hp.GKMSolver:
    """Our ``GKMSolver`` for a case (``f = P.lower``, ``F = P.upper``, step 1/L, K steps)."""
    s = 1.0 / P.L_lower
    T = hp.GradientStep(objective=lambda u, x: P.lower(x, u), step=s)
    kw: dict[str, Any] = {}
    if case.method == "ptt":
        kw = dict(upper=lambda u, x: P.upper(x, u), alpha=0)
    if case.gda:  # BOAT's GDA: one gradient step on (1 - α_k) f + α_k F, α_k = 0.5·0.9^k
        kw = dict(upper=lambda u, x: P.upper(x, u), alpha=hp.Geometric(*GDA), aggregation="outside", upper_step=s)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", hp.SummableScheduleWarning)
        method = "unrolled" if case.method == "iad" else case.method  # iad: unrolled from a learned start
        return hp.GKMSolver(T, max_steps=case.K, tol=0.0, hypergrad=method, **kw, **case.options)


def ours(P: Any, case: Case, S: hp.GKMSolver, x0: Tensor, y0: Tensor) -> tuple[Tensor, Optional[Tensor]]:
    """Our hypergradient of F(x, u(x, y0)) (and its gradient in y0 with a learned start)."""
    iad = case.method == "iad"  # MAML: the gradient in the start is the hypergradient, x is fixed
    x = x0.clone().requires_grad_(not iad)
    z = y0.clone().requires_grad_(case.start or iad)
    u = S(z, x)
    wrt = [z] if iad else [x] + ([z] if case.start else [])
    grads = torch.autograd.grad(P.upper(x, u), wrt)
    if iad:
        return grads[0], None
    return grads[0], (grads[1] if case.start else None)


def boat_problem(P: Any, case: Case, x0: Tensor, y0: Tensor) -> Callable[[], tuple[Tensor, Optional[Tensor]]]:
    """BOAT's hypergradient as a call on a Problem built once."""
    s = 1.0 / P.L_lower
    if case.method == "iad":
        return lambda: (boat_gm.iad_hypergradient(P, x0, y0, case.K, s), None)
    prob = boat_gm.build(P, case.boat["na_op"], case.K, s, x0=x0, y0=y0, di=case.start,
                         gda=GDA if case.gda else None)
    prob.save_losses = lambda **kw: None  # BOAT's run_iter writes a JSON log each call: not the algorithm
    return lambda: boat_gm.call(prob)


def cases(P: Any, quadratic: bool, K: int) -> list[Case]:
    s = 1.0 / P.L_lower
    out = [
        Case("PTT", "PTT+RAD", K, "ptt", {"na_op": ["PTT", "RAD"]},
             lambda x, y: R.ptt(P, x, y, K, s)[:2], outer=True),
        Case("PTT + learned start", "PTT+RAD, DI", K, "ptt", {"na_op": ["PTT", "RAD"]},
             lambda x, y: R.ptt(P, x, y, K, s, start=True)[:2], start=True, outer=True),
        Case("PTT + GDA", "PTT+RAD, GDA", K, "ptt", {"na_op": ["PTT", "RAD"]},
             lambda x, y: R.ptt(P, x, y, K, s, gda=GDA)[:2], gda=True),
        Case("FD (K=1)", "FD", 1, "fd", {"na_op": ["FD"]}, lambda x, y: (R.darts(P, x, y, 1, s), None)),
        Case("FD", "FD", K, "fd", {"na_op": ["FD"]}, lambda x, y: (R.darts(P, x, y, K, s), None),
             rebuilt=lambda x, y: R.darts(P, x, y, K, s, at=0), outer=True,
             note="BOAT: the difference at y_0"),
        Case("IGA", "IGA", K, "iga", {"na_op": ["IGA"]}, lambda x, y: (R.iga(P, x, y, K, s), None), outer=True),
        Case("IGA + GDA", "IGA, GDA", K, "iga", {"na_op": ["IGA"]},
             lambda x, y: (R.iga(P, x, y, K, s, gda=GDA), None), gda=True,
             rebuilt=lambda x, y: R.iga(P, x, y, K, s, gda=GDA, mixture=GDA[0] / GDA[1]),
             note="BOAT: (1-a)f + aF in the multiplier, a = 0.5/0.9"),
    ]
    if quadratic:  # MAML: the start is the upper variable (x and y have one shape here)
        out.append(Case("unrolled, learned start", "IAD+RAD", K, "iad", {},
                        lambda x, y: (R.unrolled_start(P, x, y, K, s), None)))
    return out


def rel(a: Tensor, b: Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def pair_rel(a: tuple[Tensor, Optional[Tensor]], b: tuple[Tensor, Optional[Tensor]]) -> float:
    return max(rel(u, v) for u, v in zip(a, b) if u is not None and v is not None)


def x_dist(P: Any, case: Case, N: int, lr: float) -> float:
    """‖x − x*‖/‖x*‖ after N outer steps x ← x − lr·g (and the start likewise when it is learned)."""
    S = solver(P, case)
    x, z = P.x0.clone(), P.y0.clone()
    for _ in range(N):
        gx, gz = ours(P, case, S, x, z)
        x = x - lr * gx
        if gz is not None:
            z = z - lr * gz
    return P.dist(x)


def timing(P: Any, case: Case, x0: Tensor, y0: Tensor, calls: int) -> float:
    S, theirs = solver(P, case), boat_problem(P, case, x0, y0)
    ratios = []
    for _ in range(calls):
        t0 = time.perf_counter()
        ours(P, case, S, x0, y0)
        t1 = time.perf_counter()
        theirs()
        t2 = time.perf_counter()
        ratios.append((t1 - t0) / (t2 - t1))
    return statistics.median(ratios)


def start_of(P: Any, quadratic: bool) -> tuple[Tensor, Tensor]:
    """The benchmark's (x0, y0): P's start, with random weight logits on hyper-cleaning (x0 = 0 weighs all
    samples alike)."""
    if quadratic:
        return P.x0, P.y0
    g = torch.Generator().manual_seed(0)
    return 0.5 * torch.randn(P.x0.shape, generator=g, dtype=P.x0.dtype), P.y0


def measure(name: str, P: Any, quadratic: bool, K: int, N: int, calls: int, boat: bool) -> list[dict[str, Any]]:
    rows = []
    x0, y0 = start_of(P, quadratic)
    for case in cases(P, quadratic, K):
        t0 = time.perf_counter()
        S = solver(P, case)
        g = ours(P, case, S, x0, y0)
        kstar = f" (k*={S.info.steps})" if case.method == "ptt" else ""
        row: dict[str, Any] = {"problem": name, "method": case.label, "BOAT op": case.boat_op,
                               "K": f"{case.K}{kstar}", "ours vs reference": pair_rel(g, case.reference(x0, y0)),
                               "note": case.note}
        if boat:
            theirs = boat_problem(P, case, x0, y0)()
            row["ours vs BOAT"] = pair_rel(g, theirs)
            rebuilt = (g[0] if case.rebuilt is None else case.rebuilt(x0, y0), g[1])
            row["BOAT vs rebuilt"] = pair_rel(theirs, rebuilt)
            row["time ours/BOAT"] = timing(P, case, x0, y0, calls)
        if quadratic and case.outer:
            row["x dist"] = x_dist(P, case, N, 0.02)
            row["N"] = N
        row["wall s"] = time.perf_counter() - t0
        rows.append(row)
        print(f"  {name} {case.label}: done in {row['wall s']:.1f} s", flush=True)
    return rows


COLUMNS = ["problem", "method", "BOAT op", "K", "ours vs BOAT", "BOAT vs rebuilt", "ours vs reference", "x dist", "N",
           "time ours/BOAT", "note"]

LEGEND = """Hypergradient methods of `GKMSolver` (`hypergrad="ptt" | "fd" | "iga"`, `hp.LearnedInit`): each "vs"
column is the relative difference max|a − b|/max|b| of the hypergradient at the same point (with a
learned start, of the start's gradient too). *ours vs BOAT*: BOAT's operation with the same settings —
rounding where the algorithms coincide; where BOAT departs (FD at K > 1 takes its finite difference at
the trajectory's start y_0, not at y_{K−1}, which only a non-quadratic f shows; IGA with GDA puts the
aggregated loss, at a weight α_0/decay, in its multiplier) the size of the departure, and *BOAT vs
rebuilt* reproduces BOAT from the formula with that departure written in. *ours vs reference*:
`benchmarks/gm_reference.py`, the papers' formulas with hand-written gradients (PTT and the learned
start: central differences of the hand-written trajectory, k* held). *K (k*)*: the step PTT truncates at
(the largest F along the trajectory: the first iterate on these convex problems). *x dist*: after N
outer gradient steps (step 0.02) from the same start, each lower solve from y_0 (learned with a learned
start). *time ours/BOAT*: median ratio of one hypergradient (forward + backward) to one BOAT `run_iter`."""
