"""Sparse coding (LISTA setting): ISTA, FISTA, unrolled-only LISTA and HODL/BMO learning, NMSE per layer.

Protocol (Chen et al. 2018, the usual one for learned ISTA, SPEC §2.4): A ∈ R^{250×500} with
N(0, 1/250) entries and unit-norm columns; codes with Bernoulli(0.1) support and N(0, 1) values;
observations b = A u_gt (noiseless) or with Gaussian noise at 40 dB SNR; K = 16 layers.
Metric: NMSE(dB) = 10 log10(Σ||û - u_gt||² / Σ||u_gt||²) on a held-out test set, per layer k ≤ K.

Methods (all written with ``hodl_plugin.GKMSolver``):

- ISTA: T(u) = S_{sλ}(u - sAᵀ(Au - b)), λ tuned on a validation set;
- FISTA: ISTA with Nesterov momentum, same λ tuning (not a GKM iteration: a plain loop);
- LISTA (unrolled-only ODL): the learned layer N_ω(u) = S_θ(u - W(Au - b)) with tied learned W
  (init sAᵀ) and threshold θ, iterated K times (α ≡ 0, the operator itself is learned), trained by
  back-propagation through the K steps (hypergradient "unrolled");
- HODL/BMO: the convergent ISTA operator T_λ (λ learned) aggregated with the same learned layer as
  the upper-level direction, w_k = (1 - α_k) u_k + α_k N_ω(u_k), u_{k+1} = T_λ(w_k),
  α_k = α0/(k+1)^γ (GKM with ``upper_grad = u - N_ω(u)``), trained the same way.

``--data-dir`` reads ``A.npy`` (m×n), ``train_codes.npy`` and ``test_codes.npy`` (N×n) if given.
"""

from __future__ import annotations

import math
import os
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.nn.functional as Fnn

import hodl_plugin as hp

from ._common import parser, plot_curves, print_table, progress, save_json, setup

NAME = "sparse_coding"
DT = torch.float32


# ------------------------------------------------------------------------------------------ data
def make_dictionary(m: int, n: int, g: torch.Generator) -> torch.Tensor:
    A = torch.randn(m, n, generator=g, dtype=DT) / math.sqrt(m)
    return A / A.norm(dim=0, keepdim=True)


def sample_codes(N: int, n: int, p: float, g: torch.Generator) -> torch.Tensor:
    support = torch.rand(N, n, generator=g) < p
    return torch.randn(N, n, generator=g, dtype=DT) * support


def observe(A: torch.Tensor, u: torch.Tensor, snr_db: Optional[float], g: torch.Generator) -> torch.Tensor:
    b = u @ A.T
    if snr_db is None:
        return b
    sigma = b.pow(2).mean().sqrt() / 10 ** (snr_db / 20)
    return b + sigma * torch.randn(b.shape, generator=g, dtype=DT)


def nmse_db(u: torch.Tensor, u_gt: torch.Tensor) -> float:
    return 10 * math.log10(float(((u - u_gt) ** 2).sum() / (u_gt**2).sum()))


# ------------------------------------------------------------------------------------------ models
def soft(v: torch.Tensor, tau: torch.Tensor | float) -> torch.Tensor:
    return hp.prox.soft_threshold(v, tau)


class LearnedLayer(torch.nn.Module):
    """N_ω(u; b) = S_θ(u - W(Au - b)), W tied across layers (init sAᵀ), θ = softplus(ρ)."""

    def __init__(self, A: torch.Tensor, s: float, theta0: float) -> None:
        super().__init__()
        self.register_buffer("A", A)
        self.W = torch.nn.Parameter(s * A.T.clone())
        self.rho = torch.nn.Parameter(torch.tensor(math.log(math.expm1(theta0)), dtype=DT))

    def forward(self, u: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return soft(u - (u @ self.A.T - b) @ self.W.T, Fnn.softplus(self.rho))


class ISTAOperator(torch.nn.Module):
    """T_λ(u; b) = S_{sλ}(u - sAᵀ(Au - b)); λ = softplus(ρ) learned when ``learn=True``."""

    def __init__(self, A: torch.Tensor, s: float, lam: float, learn: bool = False) -> None:
        super().__init__()
        self.register_buffer("A", A)
        self.s = s
        rho = torch.tensor(math.log(math.expm1(lam)), dtype=DT)
        self.rho = torch.nn.Parameter(rho) if learn else torch.nn.Parameter(rho, requires_grad=False)

    def forward(self, u: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return soft(u - self.s * (u @ self.A.T - b) @ self.A, self.s * Fnn.softplus(self.rho))


def ista_per_layer(A, s, lam, b, u_gt, K) -> list[float]:
    T = ISTAOperator(A, s, lam)
    out, u = [], torch.zeros(b.shape[0], A.shape[1], dtype=DT)
    solver = hp.GKMSolver(T, max_steps=1, tol=0.0, hypergrad="first_order", check_every=1)
    with torch.no_grad():
        for _ in range(K):
            u = solver(u, b)
            out.append(nmse_db(u, u_gt))
    return out


def fista_per_layer(A, s, lam, b, u_gt, K) -> list[float]:
    out = []
    u = y = torch.zeros(b.shape[0], A.shape[1], dtype=DT)
    t = 1.0
    for _ in range(K):
        u_new = soft(y - s * (y @ A.T - b) @ A, s * lam)
        t_new = (1 + math.sqrt(1 + 4 * t * t)) / 2
        y = u_new + (t - 1) / t_new * (u_new - u)
        u, t = u_new, t_new
        out.append(nmse_db(u, u_gt))
    return out


def tune_lambda(fn: Callable, A, s, b, u_gt, K, grid=(0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.8)) -> float:
    return min(grid, key=lambda lam: fn(A, s, lam, b, u_gt, K)[-1])


def learned_solver(kind: str, A: torch.Tensor, s: float, lam0: float, K: int, alpha: hp.schedules.Schedule):
    """(solver, modules) for 'lista' (unrolled-only) or 'hodl' (GKM aggregation)."""
    layer = LearnedLayer(A, s, theta0=s * lam0)
    if kind == "lista":
        solver = hp.GKMSolver(layer, max_steps=K, tol=0.0, hypergrad="unrolled", check_every=K)
        return solver, torch.nn.ModuleList([layer])
    T = ISTAOperator(A, s, lam0, learn=True)
    solver = hp.GKMSolver(T, max_steps=K, tol=0.0, hypergrad="unrolled", check_every=K, alpha=alpha,
                          upper_grad=lambda u, b: u - layer(u, b), upper_step=1.0)
    return solver, torch.nn.ModuleList([T, layer])


def per_layer_learned(solver: hp.GKMSolver, b, u_gt, L, K) -> list[float]:
    """NMSE after k = 1..L layers of a model trained with K (layers beyond K: the same iteration,
    continued with the learned parameters and, for HODL, the continuing schedule α_k)."""
    out = []
    with torch.no_grad():
        for k in range(1, L + 1):
            solver.max_steps = k
            out.append(nmse_db(solver(torch.zeros_like(u_gt), b), u_gt))
    solver.max_steps = K
    return out


def train(solver, modules, A, snr, K, iters, batch, lr, g, args, label) -> list[float]:
    opt = torch.optim.Adam([p for p in modules.parameters() if p.requires_grad], lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, iters)
    losses = []
    for _ in progress(range(iters), args, desc=label):
        u_gt = sample_codes(batch, A.shape[1], 0.1, g)
        b = observe(A, u_gt, snr, g)
        u = solver(torch.zeros_like(u_gt), b)
        loss = ((u - u_gt) ** 2).sum(1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
    return losses


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    ap = parser(NAME, __doc__.split("\n")[0])
    ap.add_argument("--K", type=int, default=16, help="layers / GKM steps")
    ap.add_argument("--iters", type=int, default=None, help="training iterations (default 250 quick / 4000)")
    ap.add_argument("--batch", type=int, default=64, help="codes per training batch")
    ap.add_argument("--lr", type=float, default=None, help="Adam step (default 5e-3 quick / 1e-3)")
    ap.add_argument("--alpha0", type=float, default=1.0, help="HODL aggregation α_k = α0/(k+1)^γ")
    ap.add_argument("--gamma", type=float, default=0.5, help="exponent γ of the aggregation weight α_k = α0/(k+1)^γ")
    ap.add_argument("--settings", default=None,
                    help="comma list: noiseless and/or SNRs in dB (default noiseless quick / noiseless,40)")
    ap.add_argument("--test-layers", type=int, default=None,
                    help="evaluate up to this many layers (default 2K quick / 4K): trained for K, run longer")
    args = ap.parse_args(argv)
    setup(args)
    torch.set_default_dtype(DT)
    g = torch.Generator().manual_seed(args.seed)
    K = args.K
    L = args.test_layers or (2 * K if args.quick else 4 * K)
    iters = args.iters or (250 if args.quick else 4000)
    lr = args.lr or (5e-3 if args.quick else 1e-3)
    n_test = 500 if args.quick else 2000
    if args.data_dir:
        A = torch.from_numpy(np.load(os.path.join(args.data_dir, "A.npy"))).to(DT)
    else:
        m, n = (250, 500)
        A = make_dictionary(m, n, g)
    s = 1.0 / float(torch.linalg.matrix_norm(A, 2)) ** 2
    alpha = hp.Polynomial(args.alpha0, args.gamma)
    rows: list[dict[str, Any]] = []
    curves: dict[str, dict[str, tuple[list[int], list[float]]]] = {}
    for setting in (args.settings or ("noiseless" if args.quick else "noiseless,40")).split(","):
        snr = None if setting == "noiseless" else float(setting)
        tag = "noiseless" if snr is None else f"SNR {snr:g} dB"
        u_val = sample_codes(n_test, A.shape[1], 0.1, g)
        b_val = observe(A, u_val, snr, g)
        if args.data_dir and os.path.exists(os.path.join(args.data_dir, "test_codes.npy")):
            u_test = torch.from_numpy(np.load(os.path.join(args.data_dir, "test_codes.npy"))).to(DT)
        else:
            u_test = sample_codes(n_test, A.shape[1], 0.1, g)
        b_test = observe(A, u_test, snr, g)
        lam_ista = tune_lambda(ista_per_layer, A, s, b_val, u_val, K)
        lam_fista = tune_lambda(fista_per_layer, A, s, b_val, u_val, K)
        per: dict[str, list[float]] = {
            f"ISTA (λ={lam_ista:g})": ista_per_layer(A, s, lam_ista, b_test, u_test, L),
            f"FISTA (λ={lam_fista:g})": fista_per_layer(A, s, lam_fista, b_test, u_test, L),
        }
        for kind, label in (("lista", "LISTA (unrolled-only)"), ("hodl", "HODL (GKM aggregation)")):
            torch.manual_seed(args.seed)
            solver, modules = learned_solver(kind, A, s, lam_ista, K, alpha)
            train(solver, modules, A, snr, K, iters, args.batch, lr, g, args, f"{tag}: {label}")
            per[label] = per_layer_learned(solver, b_test, u_test, L, K)
        for method, vals in per.items():
            rows.append({"setting": tag, "method": method, "NMSE@4 (dB)": vals[3],
                         f"NMSE@{K} (dB)": vals[K - 1], f"NMSE@{L} (dB)": vals[L - 1], "per_layer": vals})
        curves[tag] = {mth: (list(range(1, L + 1)), v) for mth, v in per.items()}
    png = plot_curves(f"{args.out}/{NAME}.png", {}, "layer k", "", logy=False,
                      title=f"sparse coding 250×500: trained with K={K} layers ({iters} its), run to {L}",
                      ax_pairs=[(f"NMSE (dB), {tag}", c) for tag, c in curves.items()])
    print_table(rows, ["setting", "method", "NMSE@4 (dB)", f"NMSE@{K} (dB)", f"NMSE@{L} (dB)"],
                title=f"# {NAME}: test NMSE (dB), lower is better")
    results = {"K": K, "test_layers": L, "iters": iters, "rows": rows, "plot": png}
    print(f"wrote {save_json(args, NAME, results)} and {png}")
    return results


if __name__ == "__main__":
    main()
