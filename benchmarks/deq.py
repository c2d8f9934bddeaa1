"""DEQ-style batches: per-sample Anderson and Broyden against the plain iteration, whole-batch Anderson
and TorchDEQ — forward time to the same residual, implicit backward, gradient errors — side by side::

    python -m benchmarks.deq                 # B = 64 samples of n = 32, two spectra, c = 0.9 and 0.99, 5 rounds
    python -m benchmarks.deq --quick         # 2 rounds, well under a minute
    python -m benchmarks.deq --write-readme  # also replace the README block between
                                             # <!-- deq:start --> and <!-- deq:end -->

The problem: a batch of equilibria :math:`z_b = \\tanh(W z_b + x_b)`, :math:`x_b \\sim 0.3\\,N(0, I)`,
float64, one thread, with two kinds of :math:`W` (both converge at the rate :math:`\\approx c` without
acceleration): ``radius``, :math:`W = c\\,G/\\rho(G)` for a Gaussian :math:`G` (spectral radius :math:`c`,
the Jacobian's eigenvalues spread over a disk, where Anderson and Broyden pay), and ``orthogonal``,
:math:`W = c\\,Q` with :math:`Q` a random orthogonal matrix (:math:`\\|W\\|_2 = c`, a contraction; the
eigenvalues on a circle of radius :math:`c`, the hard case for any Krylov-like acceleration). Every
solver stops at the relative residual :math:`10^{-9}` of each sample
(ours: ``tol=1e-9`` with ``batch_dims=1``; TorchDEQ: ``stop_mode="rel"``, ``tol=1e-9``); the whole-batch
column (``batch_dims=0``) stops on the norm of the whole batch, so its samples' residuals differ — the
residual column shows what each reached — and the row "whole batch, same residual" runs it with the
largest tolerance :math:`10^{-9}\\cdot 2^{-k}` at which every sample reaches :math:`10^{-9}` (found before
timing): the time the whole batch takes to deliver what the per-sample solves deliver. On the CPU our
accelerated steps are compiled loops (numba, the ``fast`` extra); the ``numpy`` row runs per-sample
Anderson's steps without numba. TorchDEQ runs with ``max_iter = 300`` (on an early stop it
appends ``max_iter − k`` entries to a trace: a huge ``max_iter`` would time that loop, not the solver).

Tables: (1) forward — steps (the most over the samples), median wall time of interleaved rounds, its
ratio to our plain per-sample iteration, to the whole-batch Anderson (at the same tolerance, and to the
same residual) and to TorchDEQ's solver of the same method (full-memory Broyden for every Broyden row),
the CPU-time ratio, the
largest relative residual reached; (2) forward + implicit backward of ``L = Σ_b v_b·z_b`` w.r.t. ``x``
and ``W`` — times and the gradient's error against a dense reference (Newton's equilibrium,
:math:`\\nabla_{x_b}L = D_b(I - W^\\top D_b)^{-1}v_b`, :math:`D_b = \\mathrm{sech}^2(Wz_b + x_b)`) and
against central finite differences of Newton's equilibrium; (3) where a per-sample step's time goes
(the accelerator vs the solver loop) and the torch operations per step.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import math
import os
import platform
import statistics
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import hodl_plugin as hp

from .anderson import write_readme
from .peers import available

DT = torch.float64
TOL = 1e-9
MAX_ITER = 300  # TorchDEQ's max_iter (forward and backward)
BEGIN, END = "<!-- deq:start -->", "<!-- deq:end -->"
SAME = "Anderson(6), whole batch, same residual"  # the whole batch run until every sample reaches TOL


@dataclass
class Problem:
    c: float
    W: torch.Tensor  # (n, n): ρ(W) = c ("radius") or ‖W‖₂ = c ("orthogonal")
    x: torch.Tensor  # (B, n)
    v: torch.Tensor  # (B, n): the loss Σ v·z
    spectrum: str = "radius"


SPECTRA = ("radius", "orthogonal")


def problem(c: float, B: int = 64, n: int = 32, seed: int = 0, spectrum: str = "radius") -> Problem:
    g = torch.Generator().manual_seed(seed)
    G = torch.randn(n, n, generator=g, dtype=DT)
    if spectrum == "radius":
        W = c * G / torch.linalg.eigvals(G).abs().max()
    elif spectrum == "orthogonal":
        W = c * torch.linalg.qr(G)[0]
    else:
        raise ValueError(f"spectrum must be one of {SPECTRA}, got {spectrum!r}")
    x = 0.3 * torch.randn(B, n, generator=g, dtype=DT)
    v = torch.randn(B, n, generator=g, dtype=DT)
    return Problem(c, W, x, v, spectrum)


def T(z: torch.Tensor, x: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """One DEQ layer, z ↦ tanh(W z + x), on a batch of rows."""
    return torch.tanh(z @ W.T + x)


def newton(x: torch.Tensor, W: torch.Tensor, iters: int = 40) -> torch.Tensor:
    """The equilibria by Newton's method on z − tanh(Wz + x) = 0, every sample (the reference)."""
    z = torch.zeros_like(x)
    eye = torch.eye(W.shape[0], dtype=DT)
    for _ in range(iters):
        t = T(z, x, W)
        J = eye - (1 - t**2)[:, :, None] * W  # ∂(z − tanh(Wz + x)) per sample
        z = z - torch.linalg.solve(J, z - t)
    return z


def residual(P: Problem, z: torch.Tensor) -> float:
    """The largest relative residual ‖T(z_b) − z_b‖ / ‖z_b‖ over the samples."""
    return float(((T(z, P.x, P.W) - z).norm(dim=1) / z.norm(dim=1)).max())


# -------------------------------------------------------------------------------------- forward
Forward = Callable[[Problem], tuple[torch.Tensor, int]]


def ours(make: Callable[[], Optional[hp.acceleration.Accelerator]], batch_dims: int, tol: float = TOL) -> Forward:
    def run(P: Problem) -> tuple[torch.Tensor, int]:
        solver = hp.GKMSolver(T, max_steps=20000, tol=tol, batch_dims=batch_dims, acceleration=make())
        with torch.no_grad():
            z, info = solver.solve(torch.zeros_like(P.x), P.x, P.W)
        return z, info.steps
    return run


def _numpy(acc: hp.acceleration.Accelerator) -> hp.acceleration.Accelerator:
    """``acc`` with its per-sample host steps in numpy (without numba's compiled loop: the ``fast`` extra
    not installed)."""
    acc._compiled = False  # type: ignore[attr-defined]
    return acc


def torchdeq(kind: str) -> Forward:
    def run(P: Problem) -> tuple[torch.Tensor, int]:
        from .peers import torchdeq_peer

        return torchdeq_peer.forward(kind, lambda z: T(z, P.x, P.W), torch.zeros_like(P.x), max_iter=MAX_ITER,
                                     tol=TOL)
    return run


def same_residual_tol(P: Problem, make: Callable[[], hp.acceleration.Accelerator], most: int = 20) -> float:
    """The largest tolerance ``TOL·2^-k`` at which a whole-batch solve brings every sample to ``TOL``."""
    for k in range(most):
        z, _ = ours(make, 0, TOL * 2.0**-k)(P)
        if residual(P, z) <= TOL:
            return TOL * 2.0**-k
    raise RuntimeError(f"the whole batch did not bring every sample to {TOL:g} within tol = {TOL * 2.0**-most:g}")


def forward_methods(peer: bool, P: Optional[Problem] = None) -> dict[str, Forward]:
    """The forward rows; with ``P``, the whole batch to the same residual too (its tolerance found on ``P``)."""
    methods: dict[str, Forward] = {
        "plain, per sample": ours(lambda: None, 1),
        "Anderson(6), per sample": ours(lambda: hp.Anderson(6), 1),
        "Anderson(6), per sample, numpy": ours(lambda: _numpy(hp.Anderson(6)), 1),
        "Anderson(6), whole batch": ours(lambda: hp.Anderson(6), 0),
        "Broyden(6), per sample": ours(lambda: hp.Broyden(6), 1),
        "Broyden(20), per sample": ours(lambda: hp.Broyden(20), 1),
        "Broyden(50), per sample": ours(lambda: hp.Broyden(50), 1),
    }
    if P is not None:
        methods[SAME] = ours(lambda: hp.Anderson(6), 0, same_residual_tol(P, lambda: hp.Anderson(6)))
    if peer:
        methods["TorchDEQ anderson (m = 6)"] = torchdeq("anderson")
        methods["TorchDEQ broyden"] = torchdeq("broyden")
    return methods


def interleaved(P: Problem, methods: dict[str, Callable[[Problem], Any]], rounds: int
                ) -> tuple[dict[str, list[float]], dict[str, list[float]], dict[str, Any]]:
    """Wall and CPU seconds of every method in every round (one warm-up round first), and its results
    (the last round's first; ``results[key]``: every timed round's, under the key ``(key, "all")``)."""
    wall: dict[str, list[float]] = {k: [] for k in methods}
    cpu: dict[str, list[float]] = {k: [] for k in methods}
    last: dict[Any, Any] = {(k, "all"): [] for k in methods}
    for r in range(rounds + 1):
        for key, fn in methods.items():
            t, c = time.perf_counter(), time.process_time()
            last[key] = fn(P)
            if r:  # round 0 warms up
                wall[key].append(time.perf_counter() - t)
                cpu[key].append(time.process_time() - c)
                last[(key, "all")].append(last[key])
    return wall, cpu, last


def forward_table(P: Problem, methods: dict[str, Forward], rounds: int) -> list[dict[str, Any]]:
    wall, cpu, last = interleaved(P, methods, rounds)
    med = {k: statistics.median(v) for k, v in wall.items()}
    cmed = {k: statistics.median(v) for k, v in cpu.items()}
    base, batch = "plain, per sample", "Anderson(6), whole batch"
    rows = []
    for k in methods:
        z, steps = last[k]
        peer = _peer_of(k)
        rows.append(dict(W=P.spectrum, c=P.c, method=k, steps=steps, time_ms=1e3 * med[k], vs_plain=med[k] / med[base],
                         vs_batch=med[k] / med[batch], vs_same=med[k] / med[SAME] if SAME in med else None,
                         vs_peer=med[k] / med[peer] if peer in med else None,
                         cpu_vs_plain=cmed[k] / cmed[base], residual=residual(P, z)))
    return rows


def _peer_of(method: str) -> Optional[str]:
    """The TorchDEQ row of the same method (our Anderson / Broyden rows), else ``None``."""
    if method.startswith("Anderson") and method != SAME:
        return "TorchDEQ anderson (m = 6)"
    if method.startswith("Broyden"):
        return "TorchDEQ broyden"
    return None


# -------------------------------------------------------------------------------------- backward
Backward = Callable[[Problem], tuple[float, float, tuple[torch.Tensor, torch.Tensor]]]


def ours_implicit(make: Callable[[], hp.acceleration.Accelerator], **options: Any) -> Backward:
    def run(P: Problem) -> tuple[float, float, tuple[torch.Tensor, torch.Tensor]]:
        solver = hp.GKMSolver(T, max_steps=20000, tol=TOL, batch_dims=1, acceleration=make(), adjoint_rtol=TOL,
                              **options)
        x, W = P.x.clone().requires_grad_(True), P.W.clone().requires_grad_(True)
        t0 = time.perf_counter()
        loss = (P.v * solver(torch.zeros_like(P.x), x, W)).sum()
        t1 = time.perf_counter()
        loss.backward()
        return t1 - t0, time.perf_counter() - t1, (x.grad, W.grad)  # type: ignore[return-value]
    return run


def torchdeq_implicit(kind: str) -> Backward:
    def run(P: Problem) -> tuple[float, float, tuple[torch.Tensor, torch.Tensor]]:
        from .peers import torchdeq_peer

        f, b, g = torchdeq_peer.implicit(kind, T, torch.zeros_like(P.x), (P.x, P.W), P.v, max_iter=MAX_ITER, tol=TOL)
        return f, b, (g[0], g[1])
    return run


def backward_methods(peer: bool) -> dict[str, Backward]:
    methods: dict[str, Backward] = {
        "ours: Anderson(6) + implicit (gmres)": ours_implicit(lambda: hp.Anderson(6)),
        "ours: Anderson(6) + implicit (anderson)": ours_implicit(lambda: hp.Anderson(6), solver="anderson"),
        "ours: Broyden(20) + implicit (gmres)": ours_implicit(lambda: hp.Broyden(20)),
    }
    if peer:
        methods["TorchDEQ anderson + IFT anderson"] = torchdeq_implicit("anderson")
        methods["TorchDEQ broyden + IFT broyden"] = torchdeq_implicit("broyden")
    return methods


def reference_gradients(P: Problem) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Dense implicit differentiation at Newton's equilibrium: :math:`g_b = D_b(I - W^\top D_b)^{-1}v_b`,
    :math:`\nabla_x L = g`, :math:`\nabla_W L = g^\top z`."""
    z = newton(P.x, P.W)
    d = 1 - T(z, P.x, P.W) ** 2
    M = torch.eye(P.W.shape[0], dtype=DT) - P.W.T[None] * d[:, None, :]  # I − Wᵀ diag(d_b)
    g = d * torch.linalg.solve(M, P.v)
    return g, g.T @ z


def fd_error(P: Problem, grads: tuple[torch.Tensor, torch.Tensor], directions: int = 2, h: float = 1e-3) -> float:
    """The largest relative difference between ⟨∇L, d⟩ and the fourth-order central difference
    (−L(2h) + 8L(h) − 8L(−h) + L(−2h)) / 12h of L at Newton's equilibrium along random unit
    directions d of (x, W)."""
    g = torch.Generator().manual_seed(7)
    worst = 0.0
    for _ in range(directions):
        dx, dW = torch.randn(P.x.shape, generator=g, dtype=DT), torch.randn(P.W.shape, generator=g, dtype=DT)
        scale = math.sqrt(float(dx.square().sum() + dW.square().sum()))
        dx, dW = dx / scale, dW / scale

        def L(t: float) -> float:
            return float((P.v * newton(P.x + t * dx, P.W + t * dW)).sum())

        fd = (-L(2 * h) + 8 * L(h) - 8 * L(-h) + L(-2 * h)) / (12 * h)
        dot = float((grads[0] * dx).sum() + (grads[1] * dW).sum())
        worst = max(worst, abs(dot - fd) / abs(fd))
    return worst


def backward_table(P: Problem, methods: dict[str, Backward], rounds: int) -> list[dict[str, Any]]:
    wall, _, last = interleaved(P, methods, rounds)
    ref = reference_gradients(P)
    ref_norm = math.sqrt(float(ref[0].square().sum() + ref[1].square().sum()))
    first = next(iter(methods))
    total = {k: statistics.median(v) for k, v in wall.items()}
    rows = []
    for k in methods:
        runs = last[(k, "all")]  # forward and backward: medians over the rounds, like the total
        fwd, bwd, grads = statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs), last[k][2]
        err = math.sqrt(float((grads[0] - ref[0]).square().sum() + (grads[1] - ref[1]).square().sum())) / ref_norm
        rows.append(dict(c=P.c, method=k, forward_ms=1e3 * fwd, backward_ms=1e3 * bwd, total_ms=1e3 * total[k],
                         vs_first=total[k] / total[first], grad_error=err, fd_error=fd_error(P, grads)))
    rows.append(dict(c=P.c, method="dense reference (Newton)", forward_ms=None, backward_ms=None, total_ms=None,
                     vs_first=None, grad_error=0.0, fd_error=fd_error(P, ref)))
    return rows


# ------------------------------------------------------------------------ where a step's time goes
class _Count(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))


def _timed(acc: hp.acceleration.Accelerator) -> tuple[hp.acceleration.Accelerator, list[float]]:
    """``acc`` with its ``step`` timed (CPU seconds appended to the returned list)."""
    spent: list[float] = []
    step = acc.step

    def timed_step(*a: Any) -> torch.Tensor:
        t = time.process_time()
        out = step(*a)
        spent.append(time.process_time() - t)
        return out

    acc.step = timed_step  # type: ignore[method-assign]
    return acc, spent


@contextlib.contextmanager
def _torch_checks(on: bool) -> Iterator[None]:
    """With ``on``, the per-sample stop checks run on torch tensors (what a GPU batch runs) instead of
    the numpy views of an eager CPU batch."""
    from hodl_plugin import _stopping

    saved = _stopping.np
    if on:
        _stopping.np = None
    try:
        yield
    finally:
        _stopping.np = saved


def step_costs(P: Problem, rounds: int) -> list[dict[str, Any]]:
    """Per-sample runs on ``P``: CPU µs per step, the accelerator's share; aten operations and host
    syncs per step (counted over steps 40–140 of runs with ``tol=0``, on the host path and, forced,
    on the masked path that GPUs and ``torch.func`` take — with the stop checks on torch tensors, as on
    a GPU)."""
    makers: dict[str, Callable[[], Optional[hp.acceleration.Accelerator]]] = {
        "plain": lambda: None, "Anderson(6)": lambda: hp.Anderson(6), "Broyden(6)": lambda: hp.Broyden(6)}
    rows = []
    for name, make in makers.items():
        for path in (("host", "numpy", "masked") if name != "plain" else ("-",)):
            per_step, share = [], []
            for _ in range(rounds):
                acc = make()
                spent: list[float] = []
                if acc is not None:
                    acc._host_decisions = path != "masked"  # type: ignore[attr-defined]
                    acc._compiled = path != "numpy"  # type: ignore[attr-defined]
                    acc, spent = _timed(acc)
                solver = hp.GKMSolver(T, max_steps=20000, tol=TOL, batch_dims=1, acceleration=acc)
                c = time.process_time()
                with torch.no_grad(), _torch_checks(path == "masked"):
                    _, info = solver.solve(torch.zeros_like(P.x), P.x, P.W)
                total = time.process_time() - c
                per_step.append(total / info.steps)
                share.append(sum(spent) / total if spent else 0.0)
            ops = []
            for steps in (40, 140):
                acc = make()
                if acc is not None:
                    acc._host_decisions = path != "masked"  # type: ignore[attr-defined]
                    acc._compiled = path != "numpy"  # type: ignore[attr-defined]
                solver = hp.GKMSolver(T, max_steps=steps, tol=0, batch_dims=1, acceleration=acc)
                with torch.no_grad(), _torch_checks(path == "masked"), _Count() as cnt:
                    solver.solve(torch.zeros_like(P.x), P.x, P.W)
                ops.append(cnt.ops)
            diff = ops[1].copy()
            diff.subtract(ops[0])
            rows.append(dict(method=name, path=path, us_per_step=1e6 * statistics.median(per_step),
                             accelerator_share=statistics.median(share), aten_ops_per_step=sum(diff.values()) / 100,
                             syncs_per_step=diff["aten._local_scalar_dense.default"] / 100))
    return rows


# -------------------------------------------------------------------------------------- output
def _fmt(v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.2g}" if abs(v) < 1e-3 and v != 0 else f"{v:.3g}"
    return str(v)


def show(rows: list[dict[str, Any]], title: str) -> None:
    cols = list(rows[0])
    cells = [[_fmt(r[c]) for c in cols] for r in rows]
    w = [max(len(c), *(len(x[i]) for x in cells)) for i, c in enumerate(cols)]
    print(f"\n{title}")
    print("  ".join(c.ljust(x) for c, x in zip(cols, w)))
    for x in cells:
        print("  ".join(v.ljust(y) for v, y in zip(x, w)))


def machine() -> str:
    """``on <date> on <arch> (<cpu model>, <cores> cores), torch <version>, 1 thread``."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            cpu = next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"on {datetime.date.today().isoformat()} on {platform.machine()} ({cpu}, {os.cpu_count()} cores), "
            f"torch {torch.__version__}, 1 thread")


def markdown(fwd: list[dict[str, Any]], bwd: list[dict[str, Any]], costs: list[dict[str, Any]], rounds: int,
             B: int, n: int) -> str:
    """The README block."""
    lines = [
        f"`python -m benchmarks.deq`, measured {machine()}; medians of {rounds} interleaved rounds. DEQ-style "
        f"batches, per-sample Anderson and Broyden: {B} equilibria z = tanh(Wz + x) in R^{n}, float64, each solved "
        f"to the relative residual {TOL:g}. W: `radius`, W = c·G/ρ(G) for a Gaussian G (spectral radius c, "
        "eigenvalues spread over a disk); `orthogonal`, W = c·Q, Q orthogonal (‖W‖₂ = c, eigenvalues on a circle, "
        "the hard case for acceleration).",
        "",
        "| W | c | method | steps | time | / plain per sample | / Anderson whole batch (same tol) "
        "| / Anderson whole batch (same residual) | / TorchDEQ (same method) | CPU / plain | residual reached |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in fwd:
        peer = "—" if r.get("vs_peer") is None else f"{r['vs_peer']:.2f}"
        same = "—" if r.get("vs_same") is None else f"{r['vs_same']:.2f}"
        lines.append(f"| {r['W']} | {r['c']} | {r['method']} | {r['steps']} | {r['time_ms']:.1f} ms "
                     f"| {r['vs_plain']:.2f} | {r['vs_batch']:.2f} | {same} | {peer} | {r['cpu_vs_plain']:.2f} "
                     f"| {r['residual']:.1e} |")
    lines += [
        "",
        f"Forward + implicit backward of L = Σ v·z w.r.t. x and W ({SPECTRA[0]}; gradient error against dense implicit "
        "differentiation at Newton's equilibrium, and against central differences):",
        "",
        "| c | method | forward | backward | total / first row | gradient error | vs finite differences |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in bwd:
        if r["forward_ms"] is None:
            lines.append(f"| {r['c']} | {r['method']} | — | — | — | 0 | {r['fd_error']:.1e} |")
            continue
        lines.append(f"| {r['c']} | {r['method']} | {r['forward_ms']:.1f} ms | {r['backward_ms']:.1f} ms "
                     f"| {r['vs_first']:.2f} | {r['grad_error']:.1e} | {r['fd_error']:.1e} |")
    lines += ["", f"Where a per-sample step's time goes (c = 0.99, {SPECTRA[0]}; aten operations counted with a "
              "`TorchDispatchMode`, the host path's numpy work not included; host: the eager CPU path, numpy "
              "accelerator state and stop checks, each step one compiled loop (numba, the `fast` extra); numpy: "
              "the same without numba; masked: what a GPU or `torch.func` runs, torch tensors only, "
              "forced here on the CPU):", "",
              "| method | path | CPU µs / step | accelerator's share | aten ops / step | host syncs / step |",
              "|---|---|---|---|---|---|"]
    for r in costs:
        lines.append(f"| {r['method']} | {r['path']} | {r['us_per_step']:.0f} | {r['accelerator_share']:.0%} "
                     f"| {r['aten_ops_per_step']:.1f} | {r['syncs_per_step']:.2f} |")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="2 rounds (well under a minute)")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--write-readme", action="store_true",
                    help=f"replace the block between {BEGIN} and {END} of --readme by the tables")
    ap.add_argument("--readme", default="README.md", help="the file --write-readme edits (default README.md)")
    args = ap.parse_args(argv)
    rounds = args.rounds or (2 if args.quick else 5)
    torch.set_num_threads(1)
    missing = available("torchdeq")
    if missing:
        print(f"TorchDEQ {missing}: its rows are left out (pip install --no-deps torchdeq==0.1.0)")
    B, n = 64, 32
    fwd: list[dict[str, Any]] = []
    bwd: list[dict[str, Any]] = []
    for spectrum in SPECTRA:
        for c in (0.9, 0.99):
            P = problem(c, B, n, spectrum=spectrum)
            fwd += forward_table(P, forward_methods(missing is None, P), rounds)
            if spectrum == SPECTRA[0]:
                bwd += backward_table(P, backward_methods(missing is None), rounds)
    show(fwd, f"(1) forward to the relative residual {TOL:g} per sample (medians of {rounds} interleaved rounds)")
    show(bwd, "(2) forward + implicit backward of L = Σ v·z w.r.t. (x, W)")
    costs = step_costs(problem(0.99, B, n), rounds)
    show(costs, f"(3) per-sample step at c = 0.99 ({SPECTRA[0]}): CPU time, the accelerator's share, aten operations, "
         "host syncs")
    block = markdown(fwd, bwd, costs, rounds, B, n)
    if args.write_readme:
        write_readme(args.readme, block, BEGIN, END)
        print(f"\nwritten to {args.readme}")
    return dict(forward=fwd, backward=bwd, costs=costs, markdown=block)


if __name__ == "__main__":
    main()
