"""hodl_plugin against the libraries users would otherwise pick, on the same problems, in one process.

``python -m benchmarks.compare [--quick] [--only a,a2,h,b,c,d,deq] [--out DIR]``. The peers are
optional extras of the benchmark, not dependencies of the package; ``make install`` adds them
(``higher`` and ``boat-torch``, the latter with ``--no-deps`` after the pinned CPU torch; TorchOpt
and Betty are installed anyway). A peer that is not installed is reported as such in the table.

Problems (float64, CPU):

- **(a)** the quadratic bilevel problem with a closed form — lower T(u; x) = u − s(Qu − x), the
  gradient step of ½uᵀQu − xᵀu (n = 1000, condition number 100, s = 1/λ_max), upper
  F(u) = ½||u − y||², ∇f(x) = Q⁻¹(Q⁻¹x − y). Each method has one accuracy knob (adjoint
  iterations for implicit methods after a converged forward: K_fwd GKM steps, or ours accelerated by
  Anderson(20), or ours by the Krylov forward of this affine T, ``forward="cg"``; K for unrolled ones);
  every (knob, time, relative error) is one curve point, the time the median of rounds interleaved over
  the methods (machine drift hits all alike). Summary: the time each method needs to reach a relative
  error of 1e-3 / 1e-6 / 1e-9, and its ratio to ours.
- **(a2)** the same with a non-symmetric Jacobian, T(u; x) = u − s((Q + S)u − x) with S skew
  (TorchOpt's documented choice is then ``solve_normal_cg``; ours GMRES). Betty, BOAT, higher and
  MetaSGD take lower levels as losses only and have no entry here.
- **(h)** ours implicit vs TorchOpt ``custom_root``, interleaved call by call at a fixed iteration
  count (machine noise hits both alike).
- **(b)** data hyper-cleaning on digits (recipes/hyper_cleaning.py's problem, 800 samples, 50 %
  corrupted): the same outer loop (Adam on per-sample weight logits, K lower steps per outer step
  continuing from the last solution) through each library; wall time to a fixed validation loss
  (1.02 × the best final one), final test accuracy.
- **(c)** sparse coding (LISTA setting, K = 16): time per upper step and NMSE after a fixed
  training time, hodl_plugin vs the same loop in plain torch (no peer has a proximal-layer lower level).
- **(d)** memory: bytes autograd saves for the backward (saved-tensor hooks, every library in the
  same process) for unrolled and implicit methods of each library, as K grows 10 → 1000.
- **(deq)** DEQ batches against TorchDEQ 0.1.0 (its ``anderson`` / ``broyden`` forward and its implicit
  backward vs ours: time to the same per-sample residual, gradient errors against dense implicit
  differentiation and finite differences): :mod:`benchmarks.deq`'s tables, run here (one thread, as there).

Where things are: the problems in ``benchmarks.problems``; each library's wrappers in its own
module of ``benchmarks.peers`` (``hodl``, ``torchopt_peer``, ``higher_peer``, ``betty_peer``,
``boat_peer``, ``plain_torch``); tables and plot in ``benchmarks.report``; this module only runs
them and collects the results.

Peers and their settings (documented defaults or the settings their docs recommend): TorchOpt 0.7.3
``custom_root`` + ``solve_cg`` / ``solve_normal_cg`` (its README pattern) and ``MetaSGD`` unrolling;
``higher`` ``innerloop_ctx`` + SGD; Betty 0.2.1 through its ``Engine`` with the lower node solved by
K_fwd Betty steps (``unroll_steps``) and ``darts`` / ``sama`` (defaults) / ``neumann`` / ``cg``
(iterations as the knob, step ``alpha`` = s); BOAT 1.1.1 ``NGD`` lower loop with ``CG`` (``k`` the
knob) or ``RAD`` (K the knob), ``return_grad=True``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import time
import warnings
from typing import Any, Callable, Optional

import torch

import hodl_plugin as hp

from . import report
from .hypergrad import saved_tensor_counter
from .peers import available, betty_peer, boat_peer, higher_peer, hodl, plain_torch, torchopt_peer
from .problems import FWD, HyperCleaning, Quadratic

TARGETS = (1e-3, 1e-6, 1e-9)


# ---------------------------------------------------------------------------- measurement
def time_to(points: list[dict[str, Any]], target: float) -> Optional[float]:
    ok = [p["time_s"] for p in points if p["rel_error"] <= target]
    return min(ok) if ok else None


# ---------------------------------------------------------------------------- the problems
def problem_a(quick: bool, repeats: int, symmetric: bool = True) -> dict[str, Any]:
    n = 300 if quick else 1000
    P = Quadratic(n, 100.0, skew=0.0 if symmetric else 0.3, seed=1)
    K_fwd = P.forward_steps(1e-12)
    adj = [5, 10, 20, 40, 80, 160] if symmetric else [10, 20, 40, 80, 160, 320]
    unroll = sorted({K_fwd // 8, K_fwd // 4, K_fwd // 2, K_fwd, 2 * K_fwd} - {0})
    few = unroll[1::2] if quick else unroll
    methods: list[tuple[str, str, Callable[[], Callable[[int], torch.Tensor]], list[int], Optional[str]]] = [
        ("hodl_plugin implicit (" + ("cg" if symmetric else "gmres") + ")", "adjoint iterations",
         lambda: hodl.implicit(P, K_fwd, "cg" if symmetric else "gmres"), adj, None),
        ("hodl_plugin implicit (" + ("cg" if symmetric else "gmres") + ") + Anderson(20)", "adjoint iterations",
         lambda: hodl.implicit(P, K_fwd, "cg" if symmetric else "gmres", anderson=20), adj, None),
        ("hodl_plugin implicit (" + ("cg" if symmetric else "gmres") + "), forward='" + ("cg" if symmetric else "gmres")
         + "'", "adjoint iterations", lambda: hodl.implicit(P, K_fwd, "cg" if symmetric else "gmres", krylov=True),
         adj, None),
        ("hodl_plugin unrolled", "K", lambda: hodl.unrolled(P), few, None),
        ("TorchOpt custom_root + " + ("solve_cg" if symmetric else "solve_normal_cg"), "CG iterations",
         lambda: torchopt_peer.root(P, K_fwd), adj, available("torchopt")),
    ]
    if symmetric:  # the peers below take the lower level as a loss: no non-symmetric fixed-point map
        methods += [
            ("TorchOpt MetaSGD unrolled", "K", lambda: torchopt_peer.unrolled(P), few, available("torchopt")),
            ("higher innerloop_ctx unrolled", "K", lambda: higher_peer.unrolled(P), few, available("higher")),
        ]
        b_knobs = [5, 20, 80] if quick else [5, 20, 80, 320]
        methods += [
            ("hodl_plugin gkm_implicit in a Betty Engine", "adjoint iterations", lambda: hodl.in_betty(P, K_fwd), adj,
             available("betty")),
            ("Betty cg (Engine, K_fwd Betty steps)", "cg_iterations", lambda: betty_peer.method(P, K_fwd, "cg"),
             b_knobs, available("betty")),
            ("Betty neumann (Engine, K_fwd Betty steps)", "neumann_iterations",
             lambda: betty_peer.method(P, K_fwd, "neumann"), b_knobs, available("betty")),
            ("Betty darts (Engine, K_fwd Betty steps)", "-", lambda: betty_peer.method(P, K_fwd, "darts"), [0],
             available("betty")),
            ("Betty sama (Engine, K_fwd Betty steps)", "-", lambda: betty_peer.method(P, K_fwd, "sama"), [0],
             available("betty")),
            ("BOAT NGD + CG", "CG k", lambda: boat_peer.method(P, K_fwd, "CG"), adj, available("boat_torch")),
            ("BOAT NGD + RAD (unrolled)", "K", lambda: boat_peer.method(P, K_fwd, "RAD"), few,
             available("boat_torch")),
        ]
    out: dict[str, Any] = {"n": n, "cond": 100.0, "symmetric": symmetric, "K_fwd": K_fwd, "methods": {}}
    runs: dict[str, tuple[Callable[[int], torch.Tensor], list[int], int]] = {}
    for label, knob_name, make, knobs, missing in methods:  # each method's errors (and its warm-up)
        if missing:
            out["methods"][label] = {"status": missing}
            print(f"  {label}: {missing}", flush=True)
            continue
        t0 = time.perf_counter()
        try:
            run = make()
            errors = [P.rel_err(run(k)) for k in knobs]
        except Exception as e:  # noqa: BLE001 - a peer failing is a result, reported in the table
            out["methods"][label] = {"status": f"failed: {type(e).__name__}: {e}"[:200]}
            print(f"  {label}: failed: {e}", flush=True)
            continue
        out["methods"][label] = {"knob": knob_name, "points": [{"knob": k, "rel_error": e, "times": []}
                                                               for k, e in zip(knobs, errors)]}
        runs[label] = (run, knobs, 1 if label.startswith(("Betty", "BOAT")) else repeats)
        print(f"  {label}: best rel. error {min(errors):.2e}, {time.perf_counter() - t0:.1f} s", flush=True)
    for r in range(max((n for _, _, n in runs.values()), default=0)):  # timed rounds, interleaved over methods
        for label, (run, knobs, n) in runs.items():
            if r < n:
                for point, k in zip(out["methods"][label]["points"], knobs):
                    t0 = time.perf_counter()
                    run(k)
                    point["times"].append(time.perf_counter() - t0)
    for label in runs:
        for point in out["methods"][label]["points"]:
            point["time_s"] = statistics.median(point.pop("times"))
    return out


def head_to_head(quick: bool, repeats: int = 9) -> dict[str, Any]:
    """(a) ours implicit vs TorchOpt custom_root, interleaved call by call (machine noise hits both
    alike), at a fixed iteration count (80 CG / 160 GMRES; the errors are printed next to the times)."""
    n = 300 if quick else 1000
    out: dict[str, Any] = {"n": n, "repeats": repeats, "rows": []}
    for symmetric in (True, False):
        P = Quadratic(n, 100.0, skew=0.0 if symmetric else 0.3, seed=1)
        K_fwd = P.forward_steps(1e-12)
        its = 80 if symmetric else 160
        ours = hodl.implicit(P, K_fwd, "cg" if symmetric else "gmres")
        peer = torchopt_peer.root(P, K_fwd)
        errs = (P.rel_err(ours(its)), P.rel_err(peer(its)))
        ratios, t_o, t_p = [], [], []
        for _ in range(repeats):
            t0 = time.perf_counter()
            ours(its)
            t1 = time.perf_counter()
            peer(its)
            t2 = time.perf_counter()
            t_o.append(t1 - t0)
            t_p.append(t2 - t1)
            ratios.append((t1 - t0) / (t2 - t1))
        out["rows"].append({"jacobian": "symmetric" if symmetric else "non-symmetric", "iterations": its,
                            "ours_err": errs[0], "torchopt_err": errs[1], "ours_s": statistics.median(t_o),
                            "torchopt_s": statistics.median(t_p), "median_ratio": statistics.median(ratios),
                            "min_ratio": min(ratios), "max_ratio": max(ratios)})
    return out


def summary_rows(res: dict[str, Any], ours: str) -> list[dict[str, Any]]:
    rows = []
    ref = {t: time_to(res["methods"][ours]["points"], t) for t in TARGETS}
    for label, m in res["methods"].items():
        row: dict[str, Any] = {"method": label}
        if "points" not in m:
            row["note"] = m["status"]
            rows.append(row)
            continue
        best = min(m["points"], key=lambda p: p["rel_error"])
        row["best_rel_error"] = best["rel_error"]
        row["t_best (s)"] = best["time_s"]
        for t in TARGETS:
            tt = time_to(m["points"], t)
            row[f"t@{t:g} (s)"] = tt
            row[f"ratio@{t:g}"] = (tt / ref[t]) if tt is not None and ref[t] else None
        rows.append(row)
    return rows


def memory(quick: bool) -> list[dict[str, Any]]:
    """Bytes autograd saves in the forward of one hypergradient (kept until the backward), per library
    and method, K = 10 → 1000, on the quadratic plus c·Σ log cosh u (a linear step saves nothing per
    step, so the lower level is made nonlinear). BOAT's single call records its backward too."""
    P = Quadratic(200 if quick else 1000, 100.0, seed=1, nonlinear=1.0)
    Ks = [10, 100, 1000]
    cases: list[tuple[str, Callable[[int], Callable[[int], torch.Tensor]], int, Optional[str]]] = [
        ("hodl_plugin implicit (cg)", lambda K: hodl.implicit(P, K, "cg"), 50, None),
        ("hodl_plugin unrolled", lambda K: hodl.unrolled(P), -1, None),
        ("TorchOpt custom_root + solve_cg", lambda K: torchopt_peer.root(P, K), 50, available("torchopt")),
        ("TorchOpt MetaSGD unrolled", lambda K: torchopt_peer.unrolled(P), -1, available("torchopt")),
        ("higher unrolled", lambda K: higher_peer.unrolled(P), -1, available("higher")),
        ("BOAT NGD + CG", lambda K: boat_peer.method(P, K, "CG"), 50, available("boat_torch")),
        ("BOAT NGD + RAD", lambda K: boat_peer.method(P, K, "RAD"), -1, available("boat_torch")),
    ]
    rows = []
    for label, make, knob, missing in cases:
        row: dict[str, Any] = {"method": label}
        if missing:
            row["note"] = missing
        else:
            for K in Ks:
                run = make(K)
                bytes_ = [0]
                FWD[0] = lambda bytes_=bytes_: saved_tensor_counter(bytes_)
                try:
                    run(K if knob < 0 else knob)
                    row[f"K={K} (MB)"] = bytes_[0] / 2**20
                except Exception as e:  # noqa: BLE001
                    row["note"] = f"failed: {e}"[:120]
                finally:
                    FWD[0] = contextlib.nullcontext
        rows.append(row)
    return rows


def hyper_cleaning(quick: bool) -> dict[str, Any]:
    """(b) data hyper-cleaning on digits (recipes/hyper_cleaning.py's problem): every library runs
    Adam(lr 0.3) on the per-sample weight logits for the same number of outer steps, with K lower
    gradient steps (step 1/L) per outer step continuing from the previous lower solution."""
    H = HyperCleaning(quick)
    n_train, K, iters = H.n_train, H.K, H.iters
    methods = [("hodl_plugin implicit (cg)", hodl.hyper_cleaning(H, "implicit"), None),
               ("hodl_plugin inexact", hodl.hyper_cleaning(H, "inexact"), None),
               ("hodl_plugin inexact + Anderson(10)", hodl.hyper_cleaning(H, "inexact_anderson"), None),
               ("hodl_plugin unrolled", hodl.hyper_cleaning(H, "unrolled"), None),
               ("TorchOpt custom_root + solve_cg", torchopt_peer.hyper_cleaning(H), available("torchopt")),
               ("higher unrolled", higher_peer.hyper_cleaning(H), available("higher")),
               ("Betty darts", betty_peer.hyper_cleaning(H, "darts"), available("betty")),
               ("Betty sama", betty_peer.hyper_cleaning(H, "sama"), available("betty")),
               ("Betty neumann (20)", betty_peer.hyper_cleaning(H, "neumann"), available("betty")),
               ("BOAT NGD + CG (k=10)", boat_peer.hyper_cleaning(H, "CG"), available("boat_torch")),
               ("BOAT NGD + RAD", boat_peer.hyper_cleaning(H, "RAD"), available("boat_torch"))]
    out: dict[str, Any] = {"n_train": n_train, "K": K, "outer_steps": iters, "methods": {}}
    for label, run, missing in methods:
        if missing:
            out["methods"][label] = {"status": missing}
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ts, vs, W = run()
        except Exception as e:  # noqa: BLE001 - reported in the table
            out["methods"][label] = {"status": f"failed: {type(e).__name__}: {e}"[:200]}
            print(f"  {label}: failed: {e}", flush=True)
            continue
        out["methods"][label] = {"times": ts, "val_loss": vs, "test_acc": H.test_acc(W)}
        print(f"  {label}: final val. loss {vs[-1]:.4f}, {ts[-1]:.1f} s", flush=True)
    finals = [m["val_loss"][-1] for m in out["methods"].values() if "val_loss" in m]
    out["target_val_loss"] = target = 1.02 * min(finals)
    rows = []
    ours_t = None
    for label, m in out["methods"].items():
        if "val_loss" not in m:
            rows.append({"method": label, "note": m["status"]})
            continue
        hit = next((t for t, v in zip(m["times"], m["val_loss"]) if v <= target), None)
        if label == "hodl_plugin implicit (cg)":
            ours_t = hit
        rows.append({"method": label, "final_val_loss": m["val_loss"][-1], "test_acc": m["test_acc"],
                     "total_s": m["times"][-1], "t_to_target_s": hit})
    for r in rows:
        if r.get("t_to_target_s") is not None and ours_t:
            r["ratio_to_ours"] = r["t_to_target_s"] / ours_t
    out["rows"] = rows
    return out


def sparse_coding(quick: bool) -> dict[str, Any]:
    """(c) LISTA setting (recipes/sparse_coding.py): learning the HODL/BMO model (K = 16 GKM steps with
    the learned layer aggregated) and unrolled-only LISTA, by hodl_plugin and by the same loop written
    in plain torch; wall time per upper step and NMSE after a fixed wall-clock budget. The proximal
    layer is not an optimizer step or a loss, so TorchOpt's meta-optimizers, higher, Betty's and
    BOAT's lower-level solvers cannot express it; they would run this same autograd loop."""
    from recipes import sparse_coding as sc

    # the recipe's models with its default schedule α_k = α0/(k+1)^γ, α0 = 1, γ = 0.5 (--alpha0, --gamma)
    recipe_args = argparse.Namespace(alpha0=1.0, gamma=0.5, ratio=0.9)
    K, batch, budget = 16, 64, (8.0 if quick else 40.0)
    g = torch.Generator().manual_seed(0)
    A = sc.make_dictionary(250, 500, g)
    s = 1.0 / float(torch.linalg.matrix_norm(A, 2)) ** 2
    u_test = sc.sample_codes(1000, 500, 0.1, g)
    b_test = sc.observe(A, u_test, None, g)
    alpha = hp.Polynomial(1.0, 0.5)

    out: dict[str, Any] = {"K": K, "batch": batch, "budget_s": budget, "rows": []}
    for kind in ("hodl", "lista"):
        for impl in ("hodl_plugin", "plain torch"):
            torch.manual_seed(0)
            model = sc.LearnedModel(sc.Method.parse(kind), A, s, 0.1, K, recipe_args)
            mods = torch.nn.ModuleList([model.layer] if kind == "lista" else [model.T, model.layer])
            fwd = ((lambda b, model=model: model(b, K)) if impl == "hodl_plugin"
                   else (lambda b, kind=kind, mods=mods: plain_torch.forward(kind, mods, b, K, alpha)))
            opt = torch.optim.Adam([p for p in mods.parameters() if p.requires_grad], lr=1e-3)
            gg = torch.Generator().manual_seed(1)
            steps, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < budget:
                u_gt = sc.sample_codes(batch, 500, 0.1, gg)
                loss = ((fwd(sc.observe(A, u_gt, None, gg)) - u_gt) ** 2).sum(1).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
                steps += 1
            dt = time.perf_counter() - t0
            with torch.no_grad():
                nmse = sc.nmse_db(fwd(b_test), u_test)
            out["rows"].append({"model": "HODL/BMO" if kind == "hodl" else "LISTA", "implementation": impl,
                                "upper_steps": steps, "ms_per_step": 1e3 * dt / steps, f"NMSE@{K} (dB)": nmse})
            print(f"  {out['rows'][-1]}", flush=True)
    for r in out["rows"]:
        base = next(x for x in out["rows"] if x["model"] == r["model"] and x["implementation"] == "plain torch")
        r["time_ratio_to_plain"] = r["ms_per_step"] / base["ms_per_step"]
    return out


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.compare", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="n = 300, fewer points (about 2 minutes)")
    ap.add_argument("--repeats", type=int, default=None, help="timing repeats (median; default 1 quick / 3)")
    ap.add_argument("--only", default="a,a2,h,b,c,d,deq",
                    help="comma list of problems: a, a2, h (ours vs TorchOpt interleaved), b, c, d, deq (vs TorchDEQ)")
    ap.add_argument("--out", default="out/benchmarks", help="folder for compare.json and compare.png")
    args = ap.parse_args(argv)
    repeats = args.repeats or (1 if args.quick else 3)
    os.makedirs(args.out, exist_ok=True)
    warnings.filterwarnings("ignore", category=FutureWarning)  # torchopt's functorch deprecation notices
    only = set(args.only.split(","))
    results: dict[str, Any] = {"torch": torch.__version__, "threads": torch.get_num_threads(), "quick": args.quick}
    for mod in ("torchopt", "betty", "higher", "boat_torch"):
        try:
            from importlib.metadata import version

            results[f"version_{mod}"] = version({"betty": "betty-ml", "boat_torch": "boat-torch"}.get(mod, mod))
        except Exception:  # noqa: BLE001
            results[f"version_{mod}"] = None
    if "a" in only:
        print("(a) quadratic, symmetric Jacobian", flush=True)
        results["a"] = problem_a(args.quick, repeats, symmetric=True)
        report.table(summary_rows(results["a"], "hodl_plugin implicit (cg)"),
               f"# (a) time to a relative error (s) and ratio to hodl_plugin implicit (n={results['a']['n']}, "
               f"K_fwd={results['a']['K_fwd']})")
    if "a2" in only:
        print("(a2) quadratic, non-symmetric Jacobian", flush=True)
        results["a2"] = problem_a(args.quick, repeats, symmetric=False)
        report.table(summary_rows(results["a2"], "hodl_plugin implicit (gmres)"),
               f"# (a2) non-symmetric: time to a relative error (s) and ratio to hodl_plugin implicit "
               f"(n={results['a2']['n']}, K_fwd={results['a2']['K_fwd']})")
    if "h" in only:
        print("(a, a2) head to head with TorchOpt, interleaved", flush=True)
        results["h"] = head_to_head(args.quick)
        report.table(results["h"]["rows"],
                     "# ours implicit / TorchOpt custom_root, interleaved (ratio < 1: ours faster)")
    if "b" in only:
        print("(b) hyper-cleaning on digits", flush=True)
        results["b"] = hyper_cleaning(args.quick)
        b = results["b"]
        report.table(b["rows"], f"# (b) hyper-cleaning: time to validation loss {b['target_val_loss']:.4f} "
               f"(1.02 × the best final), {b['outer_steps']} outer steps, K={b['K']}")
    if "c" in only:
        print("(c) sparse coding (LISTA setting)", flush=True)
        results["c"] = sparse_coding(args.quick)
        report.table(results["c"]["rows"], f"# (c) sparse coding, K={results['c']['K']}: time per upper step and NMSE "
               f"after {results['c']['budget_s']:g} s of training")
    if "d" in only:
        print("(d) memory", flush=True)
        results["d"] = memory(args.quick)
        report.table(results["d"], "# (d) bytes saved for the backward (MB) as K grows")
    if "deq" in only:
        print("(deq) DEQ batches against TorchDEQ (benchmarks.deq)", flush=True)
        from . import deq

        threads = torch.get_num_threads()
        try:
            res = deq.main(["--quick"] if args.quick else [])  # (prints its tables; one thread)
        finally:
            torch.set_num_threads(threads)
        results["deq"] = {k: res[k] for k in ("forward", "backward", "costs")}
    if {"a", "a2"} & only:
        results["plot"] = report.plot(os.path.join(args.out, "compare.png"), results)
    path = os.path.join(args.out, "compare.json")
    with open(path, "w") as f:
        json.dump(results, f, indent=1, default=float)
    print(f"\nwrote {path}" + (f" and {results['plot']}" if "plot" in results else ""))
    return results


if __name__ == "__main__":
    main()
