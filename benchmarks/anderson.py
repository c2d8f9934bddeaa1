"""Anderson acceleration vs the plain KM iteration: steps and wall time, side by side.

    python -m benchmarks.anderson            # n = 500 quadratic + n = 200 tanh equilibrium, 5 repeats
    python -m benchmarks.anderson --quick    # n = 200 / 100, 1 repeat, well under 30 s

Problems (float64, forward to the same relative tolerance 1e-9, then the implicit backward):

- ``quadratic``: T(u; x) = u - (Qu - x)/L, Q SPD of condition 1e3; F = ½‖u - y‖², CG adjoint;
- ``tanh``: u = tanh(Au + x), A nonsymmetric (I - Q/L + 0.01 K, K skew, ‖A‖₂ = 1); F = ½‖u‖²,
  GMRES adjoint.

For each method (plain KM, ``Anderson(m)`` for several m) it prints the forward steps, the step
ratio to plain, the median wall time of forward + implicit backward and its ratio to plain (the runs
are interleaved: plain, Anderson(5), ..., plain, ...), and the relative hypergradient error against
the closed form (quadratic) / dense implicit differentiation at a Newton solution (tanh).
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from typing import Any, Callable, Optional

import torch

import hodl_plugin as hp

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


def run_once(P: dict[str, Any], acc: Optional[hp.Anderson]) -> tuple[float, int, float]:
    """Forward + implicit backward: (seconds, forward steps, relative hypergradient error)."""
    solver = hp.GKMSolver(P["T"], max_steps=200000, tol=TOL, solver=P["solver"], acceleration=acc,
                          check_every=10)
    x = P["x"].clone().requires_grad_(True)
    t = time.perf_counter()
    u = solver(torch.zeros_like(x), x)
    P["F"](u).backward()
    dt = time.perf_counter() - t
    assert solver.info is not None and solver.info.converged
    err = float((x.grad - P["ref"]).norm() / P["ref"].norm())
    return dt, solver.info.steps, err


def bench(name: str, P: dict[str, Any], methods: dict[str, Callable[[], Optional[hp.Anderson]]],
          repeats: int) -> None:
    times: dict[str, list[float]] = {k: [] for k in methods}
    steps: dict[str, int] = {}
    errs: dict[str, float] = {}
    for _ in range(repeats):  # interleaved: every method once per round
        for key, make in methods.items():
            dt, k, e = run_once(P, make())
            times[key].append(dt)
            steps[key], errs[key] = k, e
    base_t, base_k = statistics.median(times["plain"]), steps["plain"]
    print(f"\n{name}  (forward to relative residual {TOL:g} + implicit backward, median of {repeats})")
    print(f"{'method':<16}{'steps':>8}{'steps/plain':>13}{'time [s]':>11}{'time/plain':>12}{'hypergrad err':>15}")
    for key in methods:
        t = statistics.median(times[key])
        print(f"{key:<16}{steps[key]:>8}{steps[key] / base_k:>13.3f}{t:>11.3f}{t / base_t:>12.3f}{errs[key]:>15.2e}")


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes, one repeat (< 30 s)")
    ap.add_argument("--repeats", type=int, default=None)
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
    bench(f"quadratic n={n_q}, condition 1e3", quadratic(n_q), methods, repeats)
    bench(f"tanh equilibrium n={n_t}, nonsymmetric", tanh_equilibrium(n_t), methods, repeats)


if __name__ == "__main__":
    main()
