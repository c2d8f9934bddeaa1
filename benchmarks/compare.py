"""hodl_plugin against the libraries users would otherwise pick, on the same problems, in one process.

``python -m benchmarks.compare [--quick] [--only a,a2,h,b,c,d] [--out DIR]``. The peers are
optional extras of the benchmark, not dependencies of the package; ``make install`` adds them
(``higher`` and ``boat-torch``, the latter with ``--no-deps`` after the pinned CPU torch; TorchOpt
and Betty are installed anyway). A peer that is not installed is reported as such in the table.

Problems (float64, CPU):

- **(a)** the quadratic bilevel problem with a closed form — lower T(u; x) = u − s(Qu − x), the
  gradient step of ½uᵀQu − xᵀu (n = 1000, condition number 100, s = 1/λ_max), upper
  F(u) = ½||u − y||², ∇f(x) = Q⁻¹(Q⁻¹x − y). Each method has one accuracy knob (adjoint
  iterations for implicit methods after a converged forward of K_fwd steps; K for unrolled ones);
  every (knob, time, relative error) is one curve point. Summary: the time each method needs to
  reach a relative error of 1e-3 / 1e-6 / 1e-9, and its ratio to ours.
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
import math
import os
import statistics
import tempfile
import time
import warnings
from typing import Any, Callable, Optional

import torch

import hodl_plugin as hp

from .hypergrad import saved_tensor_counter

DT = torch.float64
TARGETS = (1e-3, 1e-6, 1e-9)


# ---------------------------------------------------------------------------- the problem
class Quadratic:
    """Lower ½uᵀQu − xᵀu (+ optional skew S in the fixed-point map), upper ½||u − y||²."""

    def __init__(self, n: int, cond: float, skew: float = 0.0, seed: int = 0, nonlinear: float = 0.0) -> None:
        g = torch.Generator().manual_seed(seed)
        U, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=DT))
        eig = torch.logspace(0, math.log10(cond), n, dtype=DT)
        self.Q = (U * eig) @ U.T
        self.Q = 0.5 * (self.Q + self.Q.T)
        R = torch.randn(n, n, generator=g, dtype=DT)
        self.S = skew * cond * (R - R.T) / float(torch.linalg.matrix_norm(R - R.T, 2))
        self.M = self.Q + self.S  # the fixed-point map's linear part
        self.s = 1.0 / float(torch.linalg.matrix_norm(self.M, 2)) if skew else 1.0 / cond
        self.y = torch.randn(n, generator=g, dtype=DT)
        self.x0 = torch.randn(n, generator=g, dtype=DT)
        u_star = torch.linalg.solve(self.M, self.x0)
        self.ref = torch.linalg.solve(self.M.T, u_star - self.y)  # ∇f = M⁻ᵀ(u* − y)
        self.n, self.cond, self.symmetric, self.c = n, cond, skew == 0.0, nonlinear
        if nonlinear:  # + c Σ log cosh u in the lower loss (memory runs only: ``ref`` is then not ∇f)
            self.s = 1.0 / (cond + nonlinear)

    def step(self, u: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        g = self.M @ u - x
        return u - self.s * (g + self.c * torch.tanh(u) if self.c else g)

    def lower_loss(self, u: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        f = 0.5 * u @ (self.Q @ u) - x @ u
        return f + self.c * torch.log(torch.cosh(u)).sum() if self.c else f

    def upper(self, u: torch.Tensor) -> torch.Tensor:
        return 0.5 * ((u - self.y) ** 2).sum()

    def rel_err(self, g: torch.Tensor) -> float:
        return float((g.detach().reshape(-1) - self.ref).norm() / self.ref.norm())

    def forward_steps(self, tol: float = 1e-12) -> int:
        """K_fwd: steps after which the contraction has reduced the error by ``tol``."""
        rho = float(torch.linalg.eigvals(torch.eye(self.n, dtype=DT) - self.s * self.M).abs().max())
        return int(math.ceil(math.log(tol) / math.log(rho)))


# ---------------------------------------------------------------------------- methods
#: context entered around each method's forward (the memory problem records saved tensors there)
_FWD: list[Callable[[], Any]] = [contextlib.nullcontext]

# each factory returns run(knob) -> hypergradient (a fresh forward + backward each call)
def ours_implicit(P: Quadratic, K_fwd: int, solver: str) -> Callable[[int], torch.Tensor]:
    def run(maxiter: int) -> torch.Tensor:
        s = hp.GKMSolver(P.step, max_steps=K_fwd, tol=0.0, check_every=K_fwd, hypergrad="implicit",
                         solver=solver, adjoint_rtol=0.0, adjoint_atol=1e-300, adjoint_maxiter=maxiter,
                         on_fail="warn")
        x = P.x0.clone().requires_grad_(True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with _FWD[0]():
                loss = P.upper(s(torch.zeros(P.n, dtype=DT), x))
            loss.backward()
        return x.grad
    return run


def ours_unrolled(P: Quadratic) -> Callable[[int], torch.Tensor]:
    def run(K: int) -> torch.Tensor:
        s = hp.GKMSolver(P.step, max_steps=K, tol=0.0, check_every=K, hypergrad="unrolled")
        x = P.x0.clone().requires_grad_(True)
        with _FWD[0]():
            loss = P.upper(s(torch.zeros(P.n, dtype=DT), x))
        loss.backward()
        return x.grad
    return run


def torchopt_root(P: Quadratic, K_fwd: int) -> Callable[[int], torch.Tensor]:
    import torchopt

    def optimality(u: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return (u - P.step(u, x)) / P.s

    def run(maxiter: int) -> torch.Tensor:
        lin = (torchopt.linear_solve.solve_cg(rtol=0.0, atol=0.0, maxiter=maxiter) if P.symmetric
               else torchopt.linear_solve.solve_normal_cg(rtol=0.0, atol=0.0, maxiter=maxiter))

        @torchopt.diff.implicit.custom_root(optimality, argnums=1, solve=lin)
        def solve(u: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                for _ in range(K_fwd):
                    u = P.step(u, x)
            return u

        x = P.x0.clone().requires_grad_(True)
        with _FWD[0]():
            loss = P.upper(solve(torch.zeros(P.n, dtype=DT), x))
        loss.backward()
        return x.grad
    return run


class _U(torch.nn.Module):
    def __init__(self, n: int) -> None:
        super().__init__()
        self.u = torch.nn.Parameter(torch.zeros(n, dtype=DT))


def torchopt_unrolled(P: Quadratic) -> Callable[[int], torch.Tensor]:
    import torchopt

    def run(K: int) -> torch.Tensor:
        net = _U(P.n)
        opt = torchopt.MetaSGD(net, lr=P.s)
        x = P.x0.clone().requires_grad_(True)
        with _FWD[0]():
            for _ in range(K):
                opt.step(P.lower_loss(net.u, x))
            loss = P.upper(net.u)
        loss.backward()
        return x.grad
    return run


def higher_unrolled(P: Quadratic) -> Callable[[int], torch.Tensor]:
    import higher

    def run(K: int) -> torch.Tensor:
        net = _U(P.n)
        x = P.x0.clone().requires_grad_(True)
        with higher.innerloop_ctx(net, torch.optim.SGD(net.parameters(), lr=P.s),
                                  copy_initial_weights=True) as (fnet, dopt):
            with _FWD[0]():
                for _ in range(K):
                    dopt.step(P.lower_loss(fnet.u, x))
                loss = P.upper(fnet.u)
            loss.backward()
        return x.grad
    return run


def betty_method(P: Quadratic, K_fwd: int, kind: str) -> Callable[[int], torch.Tensor]:
    """Betty's own path: the lower node takes K_fwd SGD steps as Betty steps, then the upper steps."""
    from betty.configs import Config, EngineConfig
    from betty.engine import Engine
    from betty.problems import ImplicitProblem

    import hodl_plugin.betty as hb

    hb.set_log_level("WARNING")

    def run(iters: int) -> torch.Tensor:
        got: dict[str, torch.Tensor] = {}

        class Lower(ImplicitProblem):
            def get_batch(self):
                return None

            def training_step(self, batch):
                return P.lower_loss(self.module.u, self.upper.module.u)

        class Upper(ImplicitProblem):
            def get_batch(self):
                return None

            def training_step(self, batch):
                return P.upper(self.lower.module.u)

            def grad_callback(self):
                got["g"] = self.module.u.grad.detach().clone()

        um, xm = _U(P.n), _U(P.n)
        with torch.no_grad():
            xm.u.copy_(P.x0)
        opts = {"neumann": {"neumann_iterations": iters, "neumann_alpha": P.s},
                "cg": {"cg_iterations": iters, "cg_alpha": P.s}, "darts": {}, "sama": {}}[kind]
        low = Lower("lower", Config(type=kind, unroll_steps=K_fwd, **opts), module=um,
                    optimizer=torch.optim.SGD(um.parameters(), lr=P.s))
        up = Upper("upper", Config(), module=xm, optimizer=torch.optim.SGD(xm.parameters(), lr=0.0))
        eng = Engine([up, low], EngineConfig(train_iters=K_fwd, strategy="cpu"),
                     dependencies={"u2l": {up: [low]}, "l2u": {low: [up]}})
        eng.run()
        return got["g"]
    return run


def ours_betty(P: Quadratic, K_fwd: int) -> Callable[[int], torch.Tensor]:
    """Ours inside a Betty Engine: one GKM node (gkm_implicit), one Betty step."""
    from betty.configs import EngineConfig
    from betty.engine import Engine
    from betty.problems import ImplicitProblem

    import hodl_plugin.betty as hb

    hb.set_log_level("WARNING")

    def run(maxiter: int) -> torch.Tensor:
        got: dict[str, torch.Tensor] = {}

        class Lower(hb.GKMProblem):
            symmetric_jacobian = True

            def operator(self, u, batch):
                return P.step(u, self.upper.module.u)

            def initial_state(self, batch):
                return torch.zeros(P.n, dtype=DT)

        class Upper(ImplicitProblem):
            def get_batch(self):
                return None

            def training_step(self, batch):
                return P.upper(self.lower.u)

            def grad_callback(self):
                got["g"] = self.module.u.grad.detach().clone()

        xm = _U(P.n)
        with torch.no_grad():
            xm.u.copy_(P.x0)
        low = Lower("lower", hb.HODLConfig(type="gkm_implicit", max_steps=K_fwd, tol=0.0, check_every=K_fwd,
                                           adjoint_rtol=0.0, adjoint_atol=1e-300, adjoint_maxiter=maxiter,
                                           on_fail="warn"))
        up = Upper("upper", hb.HODLConfig(), module=xm, optimizer=torch.optim.SGD(xm.parameters(), lr=0.0))
        eng = Engine([up, low], EngineConfig(train_iters=1, strategy="cpu"),
                     dependencies={"u2l": {up: [low]}, "l2u": {low: [up]}})
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            eng.run()
        return got["g"]
    return run


_BOAT_P: dict[str, Any] = {}


def boat_ll_loss(ll_feed_dict: dict, ul_model: torch.nn.Module, ll_model: torch.nn.Module,
                 params: Optional[list[torch.Tensor]] = None) -> torch.Tensor:
    """BOAT's lower loss (BOAT loads it from its dotted path; ``params`` = the lower model's weights)."""
    return _BOAT_P["P"].lower_loss(ll_model.u if params is None else params[0], ul_model.u)


def boat_ul_loss(ul_feed_dict: dict, ul_model: torch.nn.Module, ll_model: torch.nn.Module,
                 params: Optional[list[torch.Tensor]] = None) -> torch.Tensor:
    return _BOAT_P["P"].upper(ll_model.u if params is None else params[0])


def boat_method(P: Quadratic, K_fwd: int, na_op: str) -> Callable[[int], torch.Tensor]:
    """BOAT: NGD lower loop (K_fwd steps for CG; K = knob for RAD), ``return_grad=True``."""
    import boat_torch

    _BOAT_P["P"] = P
    log = os.path.join(tempfile.mkdtemp(), "boat_loss.json")

    def run(knob: int) -> torch.Tensor:
        ll, ul = _U(P.n), _U(P.n)
        with torch.no_grad():
            ul.u.copy_(P.x0)
        cfg = {"fo_op": None, "gm_op": ["NGD"], "na_op": [na_op], "lower_level_model": ll,
               "upper_level_model": ul, "lower_level_var": list(ll.parameters()),
               "upper_level_var": list(ul.parameters()),
               "lower_level_opt": torch.optim.SGD(ll.parameters(), lr=P.s),
               "upper_level_opt": torch.optim.SGD(ul.parameters(), lr=0.0),
               "lower_iters": K_fwd if na_op == "CG" else knob, "device": "cpu", "return_grad": True,
               "accumulate_grad": False, "copy_last_param": False, "loss_log_path": log,
               "GDA": {"alpha_init": 0.0, "alpha_decay": 1.0}, "RGT": {"truncate_iter": 0},
               "CG": {"k": knob, "tolerance": 0.0}, "DI": {"lr": 0.0}}
        loss_cfg = {"lower_level_loss": {"function": f"{__name__}.boat_ll_loss"},
                    "upper_level_loss": {"function": f"{__name__}.boat_ul_loss"}}
        prob = boat_torch.Problem(cfg, loss_cfg)
        prob.build_ll_solver()
        prob.build_ul_solver()
        with _FWD[0]():  # BOAT runs forward and backward in one call: both are recorded
            grads, _ = prob.run_iter({}, {}, current_iter=0)
        return grads[0]
    return run


# ---------------------------------------------------------------------------- measurement
def _peer_available(module: str) -> Optional[str]:
    try:
        __import__(module)
        return None
    except Exception as e:  # noqa: BLE001 - any import failure means "not available"
        return f"not installed ({type(e).__name__}: {e})"[:120]


def curve(run: Callable[[int], torch.Tensor], knobs: list[int], P: Quadratic, repeats: int) -> list[dict[str, Any]]:
    """(knob, median wall time of forward + hypergradient, relative error) for each knob."""
    pts = []
    for k in knobs:
        g = run(k)  # warm-up and the error
        ts = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            run(k)
            ts.append(time.perf_counter() - t0)
        pts.append({"knob": k, "time_s": statistics.median(ts), "rel_error": P.rel_err(g)})
    return pts


def time_to(points: list[dict[str, Any]], target: float) -> Optional[float]:
    ok = [p["time_s"] for p in points if p["rel_error"] <= target]
    return min(ok) if ok else None


def problem_a(quick: bool, repeats: int, symmetric: bool = True) -> dict[str, Any]:
    n = 300 if quick else 1000
    P = Quadratic(n, 100.0, skew=0.0 if symmetric else 0.3, seed=1)
    K_fwd = P.forward_steps(1e-12)
    adj = [5, 10, 20, 40, 80, 160] if symmetric else [10, 20, 40, 80, 160, 320]
    unroll = sorted({K_fwd // 8, K_fwd // 4, K_fwd // 2, K_fwd, 2 * K_fwd} - {0})
    few = unroll[1::2] if quick else unroll
    methods: list[tuple[str, str, Callable[[], Callable[[int], torch.Tensor]], list[int], Optional[str]]] = [
        ("hodl_plugin implicit (" + ("cg" if symmetric else "gmres") + ")", "adjoint iterations",
         lambda: ours_implicit(P, K_fwd, "cg" if symmetric else "gmres"), adj, None),
        ("hodl_plugin unrolled", "K", lambda: ours_unrolled(P), few, None),
        ("TorchOpt custom_root + " + ("solve_cg" if symmetric else "solve_normal_cg"), "CG iterations",
         lambda: torchopt_root(P, K_fwd), adj, _peer_available("torchopt")),
    ]
    if symmetric:  # the peers below take the lower level as a loss: no non-symmetric fixed-point map
        methods += [
            ("TorchOpt MetaSGD unrolled", "K", lambda: torchopt_unrolled(P), few, _peer_available("torchopt")),
            ("higher innerloop_ctx unrolled", "K", lambda: higher_unrolled(P), few, _peer_available("higher")),
        ]
        b_knobs = [5, 20, 80] if quick else [5, 20, 80, 320]
        methods += [
            ("hodl_plugin gkm_implicit in a Betty Engine", "adjoint iterations", lambda: ours_betty(P, K_fwd), adj,
             _peer_available("betty")),
            ("Betty cg (Engine, K_fwd Betty steps)", "cg_iterations", lambda: betty_method(P, K_fwd, "cg"),
             b_knobs, _peer_available("betty")),
            ("Betty neumann (Engine, K_fwd Betty steps)", "neumann_iterations",
             lambda: betty_method(P, K_fwd, "neumann"), b_knobs, _peer_available("betty")),
            ("Betty darts (Engine, K_fwd Betty steps)", "-", lambda: betty_method(P, K_fwd, "darts"), [0],
             _peer_available("betty")),
            ("Betty sama (Engine, K_fwd Betty steps)", "-", lambda: betty_method(P, K_fwd, "sama"), [0],
             _peer_available("betty")),
            ("BOAT NGD + CG", "CG k", lambda: boat_method(P, K_fwd, "CG"), adj, _peer_available("boat_torch")),
            ("BOAT NGD + RAD (unrolled)", "K", lambda: boat_method(P, K_fwd, "RAD"), few,
             _peer_available("boat_torch")),
        ]
    out: dict[str, Any] = {"n": n, "cond": 100.0, "symmetric": symmetric, "K_fwd": K_fwd, "methods": {}}
    for label, knob_name, make, knobs, missing in methods:
        if missing:
            out["methods"][label] = {"status": missing}
            print(f"  {label}: {missing}", flush=True)
            continue
        t0 = time.perf_counter()
        try:
            pts = curve(make(), knobs, P, 1 if label.startswith(("Betty", "BOAT")) else repeats)
        except Exception as e:  # noqa: BLE001 - a peer failing is a result, reported in the table
            out["methods"][label] = {"status": f"failed: {type(e).__name__}: {e}"[:200]}
            print(f"  {label}: failed: {e}", flush=True)
            continue
        out["methods"][label] = {"knob": knob_name, "points": pts}
        best = min(p["rel_error"] for p in pts)
        print(f"  {label}: best rel. error {best:.2e}, {time.perf_counter() - t0:.1f} s", flush=True)
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
        ours = ours_implicit(P, K_fwd, "cg" if symmetric else "gmres")
        peer = torchopt_root(P, K_fwd)
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
        ("hodl_plugin implicit (cg)", lambda K: ours_implicit(P, K, "cg"), 50, None),
        ("hodl_plugin unrolled", lambda K: ours_unrolled(P), -1, None),
        ("TorchOpt custom_root + solve_cg", lambda K: torchopt_root(P, K), 50, _peer_available("torchopt")),
        ("TorchOpt MetaSGD unrolled", lambda K: torchopt_unrolled(P), -1, _peer_available("torchopt")),
        ("higher unrolled", lambda K: higher_unrolled(P), -1, _peer_available("higher")),
        ("BOAT NGD + CG", lambda K: boat_method(P, K, "CG"), 50, _peer_available("boat_torch")),
        ("BOAT NGD + RAD", lambda K: boat_method(P, K, "RAD"), -1, _peer_available("boat_torch")),
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
                _FWD[0] = lambda bytes_=bytes_: saved_tensor_counter(bytes_)
                try:
                    run(K if knob < 0 else knob)
                    row[f"K={K} (MB)"] = bytes_[0] / 2**20
                except Exception as e:  # noqa: BLE001
                    row["note"] = f"failed: {e}"[:120]
                finally:
                    _FWD[0] = contextlib.nullcontext
        rows.append(row)
    return rows


class _W(torch.nn.Module):
    def __init__(self, d: int, c: int) -> None:
        super().__init__()
        self.W = torch.nn.Parameter(torch.zeros(d, c, dtype=DT))


class _Logits(torch.nn.Module):
    def __init__(self, n: int) -> None:
        super().__init__()
        self.x = torch.nn.Parameter(torch.zeros(n, dtype=DT))


def hyper_cleaning(quick: bool) -> dict[str, Any]:
    """(b) data hyper-cleaning on digits (recipes/hyper_cleaning.py's problem): every library runs
    Adam(lr 0.3) on the per-sample weight logits for the same number of outer steps, with K lower
    gradient steps (step 1/L) per outer step continuing from the previous lower solution."""
    import torch.nn.functional as Fnn

    from recipes._common import load_xy
    from recipes.hyper_cleaning import accuracy, lower_objective, split

    n_train, K, iters, mu = (400, 30, 60, 1e-2) if quick else (800, 60, 300, 1e-2)
    X, y = load_xy(argparse.Namespace(data_dir=None))
    D = split(X, y, n_train, 300, 0.5, 0)
    f, L = lower_objective(D, mu)
    s = 1.0 / L
    d, c = D["Xtr"].shape[1], D["classes"]

    def val_loss(W: torch.Tensor) -> torch.Tensor:
        return Fnn.cross_entropy(D["Xva"] @ W, D["yva"])

    def ours(method: str) -> Callable[[], tuple[list[float], list[float], torch.Tensor]]:
        opts = {"implicit": {"solver": "cg", "adjoint_rtol": 1e-6, "on_fail": "warn"},
                "inexact": {"eps": hp.Polynomial(1e-3, 0.5), "delta": hp.Polynomial(1e-3, 0.5), "solver": "cg",
                            "constants": None},
                "unrolled": {}}[method]

        def run():
            solver = hp.GKMSolver(hp.GradientStep(objective=f, step=s), max_steps=K, tol=1e-6, hypergrad=method,
                                  **opts)
            x = torch.zeros(n_train, dtype=DT, requires_grad=True)
            opt = torch.optim.Adam([x], lr=0.3)
            W, ts, vs = torch.zeros(d, c, dtype=DT), [], []
            t0 = time.perf_counter()
            for _ in range(iters):
                opt.zero_grad()
                Wx = solver(W, x, key="train")
                v = val_loss(Wx)
                v.backward()
                opt.step()
                W = Wx.detach()
                ts.append(time.perf_counter() - t0)
                vs.append(float(v.detach()))
            return ts, vs, W
        return run

    def torchopt_root() -> tuple[list[float], list[float], torch.Tensor]:
        import torchopt

        def optimality(W: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
            return torch.func.grad(f)(W, x)

        @torchopt.diff.implicit.custom_root(optimality, argnums=1,
                                            solve=torchopt.linear_solve.solve_cg(rtol=1e-6, maxiter=1000))
        def solve(W: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
            with torch.enable_grad():
                for _ in range(K):
                    W = W.detach().requires_grad_(True)
                    W = W - s * torch.autograd.grad(f(W, x.detach()), W)[0]
            return W.detach()

        x = torch.zeros(n_train, dtype=DT, requires_grad=True)
        opt = torch.optim.Adam([x], lr=0.3)
        W, ts, vs = torch.zeros(d, c, dtype=DT), [], []
        t0 = time.perf_counter()
        for _ in range(iters):
            opt.zero_grad()
            Wx = solve(W, x)
            v = val_loss(Wx)
            v.backward()
            opt.step()
            W = Wx.detach()
            ts.append(time.perf_counter() - t0)
            vs.append(float(v.detach()))
        return ts, vs, W

    def higher_unrolled() -> tuple[list[float], list[float], torch.Tensor]:
        import higher

        x = torch.zeros(n_train, dtype=DT, requires_grad=True)
        opt = torch.optim.Adam([x], lr=0.3)
        net = _W(d, c)
        inner = torch.optim.SGD(net.parameters(), lr=s)
        ts, vs = [], []
        t0 = time.perf_counter()
        for _ in range(iters):
            opt.zero_grad()
            with higher.innerloop_ctx(net, inner, copy_initial_weights=True) as (fnet, dopt):
                for _ in range(K):
                    dopt.step(f(fnet.W, x))
                v = val_loss(fnet.W)
                v.backward()
                with torch.no_grad():
                    net.W.copy_(fnet.W)
            opt.step()
            ts.append(time.perf_counter() - t0)
            vs.append(float(v.detach()))
        return ts, vs, net.W.detach()

    def betty(kind: str) -> Callable[[], tuple[list[float], list[float], torch.Tensor]]:
        def run():
            from betty.configs import Config, EngineConfig
            from betty.engine import Engine
            from betty.problems import ImplicitProblem

            import hodl_plugin.betty as hb

            hb.set_log_level("WARNING")
            ts, vs = [], []

            class Lower(ImplicitProblem):
                def get_batch(self):
                    return None

                def training_step(self, batch):
                    return f(self.module.W, self.upper.module.x)

            class Upper(ImplicitProblem):
                def get_batch(self):
                    return None

                def training_step(self, batch):
                    v = val_loss(self.lower.module.W)
                    vs.append(float(v.detach()))
                    ts.append(time.perf_counter() - t0)
                    return v

            wm, xm = _W(d, c), _Logits(n_train)
            opts = {"neumann": {"neumann_iterations": 20, "neumann_alpha": s}, "darts": {}, "sama": {},
                    "cg": {"cg_iterations": 20, "cg_alpha": s}}[kind]
            low = Lower("lower", Config(type=kind, unroll_steps=K, **opts), module=wm,
                        optimizer=torch.optim.SGD(wm.parameters(), lr=s))
            up = Upper("upper", Config(), module=xm, optimizer=torch.optim.Adam(xm.parameters(), lr=0.3))
            eng = Engine([up, low], EngineConfig(train_iters=K * iters, strategy="cpu"),
                         dependencies={"u2l": {up: [low]}, "l2u": {low: [up]}})
            t0 = time.perf_counter()
            eng.run()
            return ts, vs, wm.W.detach()
        return run

    def boat(na_op: str) -> Callable[[], tuple[list[float], list[float], torch.Tensor]]:
        def run():
            import boat_torch

            wm, xm = _W(d, c), _Logits(n_train)
            _BOAT_P["hc"] = (f, val_loss)
            cfg = {"fo_op": None, "gm_op": ["NGD"], "na_op": [na_op], "lower_level_model": wm,
                   "upper_level_model": xm, "lower_level_var": list(wm.parameters()),
                   "upper_level_var": list(xm.parameters()),
                   "lower_level_opt": torch.optim.SGD(wm.parameters(), lr=s),
                   "upper_level_opt": torch.optim.Adam(xm.parameters(), lr=0.3),
                   "lower_iters": K, "device": "cpu", "return_grad": False,
                   "accumulate_grad": False, "copy_last_param": True,
                   "loss_log_path": os.path.join(tempfile.mkdtemp(), "boat_loss.json"),
                   "GDA": {"alpha_init": 0.0, "alpha_decay": 1.0}, "RGT": {"truncate_iter": 0},
                   "CG": {"k": 10, "tolerance": 1e-10}, "DI": {"lr": 0.0}}
            loss_cfg = {"lower_level_loss": {"function": f"{__name__}.boat_hc_ll"},
                        "upper_level_loss": {"function": f"{__name__}.boat_hc_ul"}}
            prob = boat_torch.Problem(cfg, loss_cfg)
            prob.build_ll_solver()
            prob.build_ul_solver()
            ts, vs = [], []
            t0 = time.perf_counter()
            for it in range(iters):
                prob.run_iter({}, {}, current_iter=it)
                ts.append(time.perf_counter() - t0)
                vs.append(prob.loss_history[-1]["ul_loss"])
            return ts, vs, wm.W.detach()
        return run

    methods = [("hodl_plugin implicit (cg)", ours("implicit"), None),
               ("hodl_plugin inexact", ours("inexact"), None),
               ("hodl_plugin unrolled", ours("unrolled"), None),
               ("TorchOpt custom_root + solve_cg", torchopt_root, _peer_available("torchopt")),
               ("higher unrolled", higher_unrolled, _peer_available("higher")),
               ("Betty darts", betty("darts"), _peer_available("betty")),
               ("Betty sama", betty("sama"), _peer_available("betty")),
               ("Betty neumann (20)", betty("neumann"), _peer_available("betty")),
               ("BOAT NGD + CG (k=10)", boat("CG"), _peer_available("boat_torch")),
               ("BOAT NGD + RAD", boat("RAD"), _peer_available("boat_torch"))]
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
        out["methods"][label] = {"times": ts, "val_loss": vs, "test_acc": accuracy(W, D["Xte"], D["yte"])}
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


def boat_hc_ll(ll_feed_dict: dict, ul_model: torch.nn.Module, ll_model: torch.nn.Module,
               params: Optional[list[torch.Tensor]] = None) -> torch.Tensor:
    f, _ = _BOAT_P["hc"]
    return f(ll_model.W if params is None else params[0], ul_model.x)


def boat_hc_ul(ul_feed_dict: dict, ul_model: torch.nn.Module, ll_model: torch.nn.Module,
               params: Optional[list[torch.Tensor]] = None) -> torch.Tensor:
    _, val_loss = _BOAT_P["hc"]
    return val_loss(ll_model.W if params is None else params[0])


def sparse_coding(quick: bool) -> dict[str, Any]:
    """(c) LISTA setting (recipes/sparse_coding.py): learning the HODL/BMO model (K = 16 GKM steps with
    the learned layer aggregated) and unrolled-only LISTA, by hodl_plugin and by the same loop written
    in plain torch; wall time per upper step and NMSE after a fixed wall-clock budget. The proximal
    layer is not an optimizer step or a loss, so TorchOpt's meta-optimizers, higher, Betty's and
    BOAT's lower-level solvers cannot express it; they would run this same autograd loop."""
    from recipes import sparse_coding as sc

    K, batch, budget = 16, 64, (8.0 if quick else 40.0)
    g = torch.Generator().manual_seed(0)
    A = sc.make_dictionary(250, 500, g)
    s = 1.0 / float(torch.linalg.matrix_norm(A, 2)) ** 2
    u_test = sc.sample_codes(1000, 500, 0.1, g)
    b_test = sc.observe(A, u_test, None, g)
    alpha = hp.Polynomial(1.0, 0.5)

    def plain_forward(kind: str, mods: torch.nn.ModuleList, b: torch.Tensor) -> torch.Tensor:
        u = torch.zeros(b.shape[0], 500, dtype=sc.DT)
        if kind == "lista":
            layer = mods[0]
            for _ in range(K):
                u = layer(u, b)
            return u
        T, layer = mods[0], mods[1]
        for k in range(K):
            a = alpha(k)
            u = T(u - a * (u - layer(u, b)), b)
        return u

    out: dict[str, Any] = {"K": K, "batch": batch, "budget_s": budget, "rows": []}
    for kind in ("hodl", "lista"):
        for impl in ("hodl_plugin", "plain torch"):
            torch.manual_seed(0)
            solver, mods = sc.learned_solver(kind, A, s, 0.1, K, alpha)
            fwd = ((lambda b, solver=solver: solver(torch.zeros(b.shape[0], 500, dtype=sc.DT), b))
                   if impl == "hodl_plugin" else (lambda b, kind=kind, mods=mods: plain_forward(kind, mods, b)))
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


def plot(path: str, results: dict[str, Any]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in ("a", "a2") if k in results]
    fig, axes = plt.subplots(1, len(keys), figsize=(6.2 * len(keys), 4.4), squeeze=False)
    for ax, k in zip(axes[0], keys):
        for label, m in results[k]["methods"].items():
            if "points" not in m:
                continue
            pts = sorted(m["points"], key=lambda p: p["time_s"])
            ax.plot([p["time_s"] for p in pts], [max(p["rel_error"], 1e-16) for p in pts], "o-", ms=3, lw=1.3,
                    label=label, color="black" if label.startswith("hodl_plugin implicit") else None)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("wall time of forward + hypergradient (s)")
        ax.set_ylabel("relative error of the hypergradient")
        sym = "symmetric" if results[k]["symmetric"] else "non-symmetric"
        ax.set_title(f"({k}) quadratic n={results[k]['n']}, cond 100, {sym} Jacobian", fontsize=9)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _table(rows: list[dict[str, Any]], title: str) -> None:
    cols: list[str] = []
    for r in rows:
        cols += [c for c in r if c not in cols]

    def f(v: Any) -> str:
        if v is None:
            return "—"
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.1e}"
        return str(v)

    cells = [[f(r.get(c)) for c in cols] for r in rows]
    w = [max(len(c), *(len(x[i]) for x in cells)) for i, c in enumerate(cols)]
    print(f"\n{title}")
    print("  ".join(c.ljust(x) for c, x in zip(cols, w)))
    print("  ".join("-" * x for x in w))
    for x in cells:
        print("  ".join(v.ljust(y) for v, y in zip(x, w)))


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.compare", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="n = 300, fewer points (about 2 minutes)")
    ap.add_argument("--repeats", type=int, default=None, help="timing repeats (median; default 1 quick / 3)")
    ap.add_argument("--only", default="a,a2,h,b,c,d",
                    help="comma list of problems: a, a2, h (ours vs TorchOpt interleaved), b, c, d")
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
        _table(summary_rows(results["a"], "hodl_plugin implicit (cg)"),
               f"# (a) time to a relative error (s) and ratio to hodl_plugin implicit (n={results['a']['n']}, "
               f"K_fwd={results['a']['K_fwd']})")
    if "a2" in only:
        print("(a2) quadratic, non-symmetric Jacobian", flush=True)
        results["a2"] = problem_a(args.quick, repeats, symmetric=False)
        _table(summary_rows(results["a2"], "hodl_plugin implicit (gmres)"),
               f"# (a2) non-symmetric: time to a relative error (s) and ratio to hodl_plugin implicit "
               f"(n={results['a2']['n']}, K_fwd={results['a2']['K_fwd']})")
    if "h" in only:
        print("(a, a2) head to head with TorchOpt, interleaved", flush=True)
        results["h"] = head_to_head(args.quick)
        _table(results["h"]["rows"], "# ours implicit / TorchOpt custom_root, interleaved (ratio < 1: ours faster)")
    if "b" in only:
        print("(b) hyper-cleaning on digits", flush=True)
        results["b"] = hyper_cleaning(args.quick)
        b = results["b"]
        _table(b["rows"], f"# (b) hyper-cleaning: time to validation loss {b['target_val_loss']:.4f} "
               f"(1.02 × the best final), {b['outer_steps']} outer steps, K={b['K']}")
    if "c" in only:
        print("(c) sparse coding (LISTA setting)", flush=True)
        results["c"] = sparse_coding(args.quick)
        _table(results["c"]["rows"], f"# (c) sparse coding, K={results['c']['K']}: time per upper step and NMSE "
               f"after {results['c']['budget_s']:g} s of training")
    if "d" in only:
        print("(d) memory", flush=True)
        results["d"] = memory(args.quick)
        _table(results["d"], "# (d) bytes saved for the backward (MB) as K grows")
    if {"a", "a2"} & only:
        results["plot"] = plot(os.path.join(args.out, "compare.png"), results)
    path = os.path.join(args.out, "compare.json")
    with open(path, "w") as f:
        json.dump(results, f, indent=1, default=float)
    print(f"\nwrote {path}" + (f" and {results['plot']}" if "plot" in results else ""))
    return results


if __name__ == "__main__":
    main()
