"""HODL's synthetic study: a lower level whose fixed-point set is not a singleton.

Lower level: T(u) = u - s Aᵀ(Au - b), A ∈ R^{p×n}, p < n, so Fix T = {u : Au = b} is an affine set.
Upper level (HODL's hierarchical model): the learned variable x is the target of the selection
criterion F(u; x) = ½||u - x||², so the lower solution is u*(x) = argmin{F(u; x) : u ∈ Fix T}
= P(x), the projection of x onto {Au = b}, and the learning objective is

    min_x  ½||P(x) - u_gt||² + (μ/2)||x||²   ⇒   x* = (N + μI)⁻¹ N (u_gt - c),  u* = P(x*),

with N = I - Aᵀ(AAᵀ)⁻¹A and c = Aᵀ(AAᵀ)⁻¹b (closed form). Compared, with the same outer gradient
descent and K unrolled lower steps (hypergradient ``"unrolled"``):

- plain KM / unrolled-only ODL (α ≡ 0): u_K is the fixed point nearest to u0, whatever x — the
  learning signal through the lower level is zero, x and u never reach the solution;
- HODL aggregation with several schedules α_k = α0/(k+1)^γ: u_K → P(x) and x → x*.

``--methods`` picks among these (``km``, ``hodl1``, ``hodl075``, ``hodl05``; all four by default) and
the first-order bilevel baselines of :mod:`hodl_plugin.baselines` (``bome``, ``pgdo``, ``meso``,
``alto``), methods made for lower levels without a unique solution. They take the lower level as a
loss and solve min_{x,u} L(x, u) s.t. u ∈ argmin f, which cannot express HODL's selection
"the point of Fix T nearest to x"; they get it through the Tikhonov loss
f_ε(x, u) = ½||Au - b||² + (ε/2)||u - x||², whose minimiser tends to P(x) as ε → 0 (ε = ``--fo-eps``
× ||A||², default 0.01; the row "Tikhonov closed form" is the exact solution of that regularised
problem, i.e. the bias ε adds). Each outer iteration is one method step (BOME and PGDO with K inner
steps for their value-function estimate, ALTO with K lower steps, MESO single-loop).

``--methods iaptt`` adds IAPTT-GM (the method its paper made for lower levels without convexity or a unique
solution): K gradient steps on the same Tikhonov loss f_ε from a learned start z, back-propagated to the
iterate with the largest upper objective (``hypergrad="ptt"``, :class:`~hodl_plugin.LearnedInit`), x and z
moved by the outer step.

Prints the final relative distances ||u - u*||/||u*||, ||x - x*||/||x*||, plots them against the
outer iteration (nonsingleton.png) and writes nonsingleton.json.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

import hodl_plugin as hp

from ._common import choice, parse_list, parser, plot_curves, positive_int, print_table, progress, save_json, setup

NAME = "nonsingleton"


def problem(p: int, n: int, mu: float, seed: int, device: torch.device) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    dt = torch.float64
    A = torch.randn(p, n, generator=g, dtype=dt)
    b = A @ torch.randn(n, generator=g, dtype=dt)
    s = 1.0 / torch.linalg.matrix_norm(A, 2).item() ** 2
    AAt_inv = torch.linalg.inv(A @ A.T)
    N = torch.eye(n, dtype=dt) - A.T @ AAt_inv @ A
    c = A.T @ AAt_inv @ b
    u_gt = N @ torch.randn(n, generator=g, dtype=dt) + c  # a fixed point (Au_gt = b)
    x_star = torch.linalg.solve(N + mu * torch.eye(n, dtype=dt), N @ (u_gt - c))
    u_star = N @ x_star + c
    to = {"device": device}
    return {"A": A.to(**to), "b": b.to(**to), "s": s, "u_gt": u_gt.to(**to), "x_star": x_star.to(**to),
            "u_star": u_star.to(**to), "mu": mu, "n": n}


def run_method(P: dict[str, Any], alpha: Optional[hp.schedules.Schedule], K: int, iters: int, lr: float,
               args: Any, label: str) -> dict[str, Any]:
    A, b, s, mu = P["A"], P["b"], P["s"], P["mu"]

    def T(u, x):
        return u - s * A.T @ (A @ u - b)

    if alpha is None:  # plain KM: the aggregation is off
        solver = hp.GKMSolver(T, max_steps=K, tol=0.0, hypergrad="unrolled")
    else:  # HODL: w_k = u_k - α_k s_F ∇_u F(u_k; x), ∇_u F = u - x (given directly: no autograd per step)
        solver = hp.GKMSolver(T, max_steps=K, tol=0.0, hypergrad="unrolled", alpha=alpha,
                              upper_grad=lambda u, x: u - x, upper_step=1.0)
    x = torch.zeros(P["n"], dtype=torch.float64, device=A.device, requires_grad=True)
    opt = torch.optim.SGD([x], lr=lr)
    u0 = torch.zeros_like(x)
    du, dx, loss_curve = [], [], []
    for _ in progress(range(iters), args, desc=label):
        opt.zero_grad()
        u = solver(u0, x)
        loss = 0.5 * ((u - P["u_gt"]) ** 2).sum() + 0.5 * mu * (x**2).sum()
        loss.backward()
        opt.step()
        with torch.no_grad():
            du.append(float((u - P["u_star"]).norm() / P["u_star"].norm()))
            dx.append(float((x - P["x_star"]).norm() / P["x_star"].norm()))
            loss_curve.append(float(loss))
    return {"method": label, "dist_u": du[-1], "dist_x": dx[-1], "loss": loss_curve[-1],
            "curve_u": du, "curve_x": dx}


HODL_METHODS: dict[str, tuple[str, Optional[hp.schedules.Schedule]]] = {
    "km": ("plain KM (α≡0)", None),
    "hodl1": ("HODL α=1/(k+1)", hp.Harmonic(1.0)),
    "hodl075": ("HODL α=1/(k+1)^0.75", hp.Polynomial(1.0, 0.75)),
    "hodl05": ("HODL α=0.5/(k+1)^0.5", hp.Polynomial(0.5, 0.5)),
}
FIRST_ORDER = ("bome", "pgdo", "meso", "alto")
HYPERGRAD_BASELINES = ("iaptt",)


def tikhonov(P: dict[str, Any], eps: float) -> torch.Tensor:
    """x_ε: the exact solution of min_x ½||u_ε(x) - u_gt||² + (μ/2)||x||², u_ε(x) = (AᵀA + εI)⁻¹(Aᵀb + εx)."""
    A, n = P["A"], P["n"]
    H = A.T @ A + eps * torch.eye(n, dtype=A.dtype, device=A.device)
    M, c = eps * torch.linalg.inv(H), torch.linalg.solve(H, A.T @ P["b"])
    return torch.linalg.solve(M.T @ M + P["mu"] * torch.eye(n, dtype=A.dtype, device=A.device), M.T @ (P["u_gt"] - c))


def run_first_order(P: dict[str, Any], name: str, K: int, iters: int, eps_rel: float, args: Any) -> dict[str, Any]:
    """A first-order baseline on the Tikhonov loss f_ε; x and u start at 0 like the GKM runs."""
    A, b, mu = P["A"], P["b"], P["mu"]
    L = 1.0 / P["s"] + eps_rel / P["s"]  # smoothness of f_ε in u
    eps = eps_rel / P["s"]
    options = {
        "bome": (hp.BOME, dict(inner_steps=K, inner_lr=1 / L, eta=0.5, x_lr=0.5, y_lr=0.5 / L)),
        "pgdo": (hp.PGDO, dict(gamma=10.0, inner_steps=K, inner_lr=1 / L, x_lr=0.05 / L, y_lr=0.05 / L)),
        "meso": (hp.MESO, dict(gamma=1 / L, eta=0.5 / L, c0=1.0, p=0.25, x_lr=0.5 / L, y_lr=0.5 / L)),
        "alto": (hp.ALTO, dict(lower_steps=K, x_lr=0.5, y_lr=1 / L)),
    }
    cls, kw = options[name]
    x = torch.zeros(P["n"], dtype=torch.float64, device=A.device, requires_grad=True)
    u = torch.zeros_like(x, requires_grad=True)
    method = cls(x, u, upper=lambda x, u: 0.5 * ((u - P["u_gt"]) ** 2).sum() + 0.5 * mu * (x**2).sum(),
                 lower=lambda x, u: 0.5 * ((A @ u - b) ** 2).sum() + 0.5 * eps * ((u - x) ** 2).sum(), **kw)
    du, dx, loss = [], [], []
    for _ in progress(range(iters), args, desc=name):
        loss.append(method.step().upper)
        with torch.no_grad():
            du.append(float((u - P["u_star"]).norm() / P["u_star"].norm()))
            dx.append(float((x - P["x_star"]).norm() / P["x_star"].norm()))
    return {"method": f"{name.upper()} (Tikhonov ε={eps_rel:g}·L)", "dist_u": du[-1], "dist_x": dx[-1],
            "loss": loss[-1], "curve_u": du, "curve_x": dx}


def run_iaptt(P: dict[str, Any], K: int, iters: int, lr: float, eps_rel: float, args: Any) -> dict[str, Any]:
    """IAPTT-GM on the Tikhonov loss f_ε: PTT on the upper objective, from a learned start z (SGD on x and z)."""
    A, b, mu = P["A"], P["b"], P["mu"]
    eps = eps_rel / P["s"]
    L = 1.0 / P["s"] + eps  # smoothness of f_ε in u
    upper = lambda u, x: 0.5 * ((u - P["u_gt"]) ** 2).sum() + 0.5 * mu * (x**2).sum()  # noqa: E731
    T = hp.GradientStep(objective=lambda u, x: 0.5 * ((A @ u - b) ** 2).sum() + 0.5 * eps * ((u - x) ** 2).sum(),
                        step=1.0 / L)
    x = torch.zeros(P["n"], dtype=torch.float64, device=A.device, requires_grad=True)
    model = hp.LearnedInit(hp.GKMSolver(T, upper=upper, alpha=0, max_steps=K, hypergrad="ptt"), torch.zeros_like(x))
    opt = torch.optim.SGD([x, *model.parameters()], lr=lr)
    du, dx, loss_curve = [], [], []
    for _ in progress(range(iters), args, desc="iaptt"):
        opt.zero_grad()
        u = model(x)
        loss = upper(u, x)
        loss.backward()
        opt.step()
        with torch.no_grad():
            du.append(float((u - P["u_star"]).norm() / P["u_star"].norm()))
            dx.append(float((x - P["x_star"]).norm() / P["x_star"].norm()))
            loss_curve.append(float(loss))
    return {"method": f"IAPTT-GM (PTT + learned start, Tikhonov ε={eps_rel:g}·L)", "dist_u": du[-1], "dist_x": dx[-1],
            "loss": loss_curve[-1], "curve_u": du, "curve_x": dx}


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    ap = parser(NAME, __doc__.split("\n")[0])
    ap.add_argument("--p", type=int, default=10, help="rows of A (constraints)")
    ap.add_argument("--n", type=int, default=30, help="dimension of u")
    ap.add_argument("--K", type=positive_int, default=None, help="lower GKM steps (default 300 quick / 1000)")
    ap.add_argument("--iters", type=positive_int, default=None, help="outer iterations (default 150 quick / 400)")
    ap.add_argument("--mu", type=float, default=0.1, help="weight of (μ/2)||x||²")
    ap.add_argument("--lr", type=float, default=0.5, help="outer step size")
    ap.add_argument("--methods", default=",".join(HODL_METHODS),
                    help="comma list of methods (default %(default)s); baselines on request: "
                         f"{', '.join([*FIRST_ORDER, *HYPERGRAD_BASELINES])}")
    ap.add_argument("--fo-eps", type=float, default=0.01,
                    help="ε of the first-order baselines' Tikhonov lower loss, relative to ||A||² (default 0.01)")
    args = ap.parse_args(argv)
    names = parse_list(ap, "--methods", args.methods, choice([*HODL_METHODS, *FIRST_ORDER, *HYPERGRAD_BASELINES]))
    device = setup(args)
    K = args.K or (300 if args.quick else 1000)
    iters = args.iters or (150 if args.quick else 400)
    P = problem(args.p, args.n, args.mu, args.seed, device)
    rows = []
    for name in names:
        if name in HODL_METHODS:
            label, alpha = HODL_METHODS[name]
            rows.append(run_method(P, alpha, K, iters, args.lr, args, label))
        elif name == "iaptt":
            rows.append(run_iaptt(P, K, iters, args.lr, args.fo_eps, args))
        else:
            rows.append(run_first_order(P, name, K, iters, args.fo_eps, args))
    if any(n in FIRST_ORDER or n in HYPERGRAD_BASELINES for n in names):
        x_eps = tikhonov(P, args.fo_eps / P["s"])
        rows.append({"method": f"Tikhonov closed form (ε={args.fo_eps:g}·L)",
                     "dist_x": float((x_eps - P["x_star"]).norm() / P["x_star"].norm())})
    its = list(range(1, iters + 1))
    png = plot_curves(
        f"{args.out}/{NAME}.png", {}, "outer iteration", "",
        title=f"non-singleton lower level (p={args.p}, n={args.n}, K={K})",
        ax_pairs=[("||u - u*|| / ||u*||", {r["method"]: (its, r["curve_u"]) for r in rows if "curve_u" in r}),
                  ("||x - x*|| / ||x*||", {r["method"]: (its, r["curve_x"]) for r in rows if "curve_x" in r})],
    )
    print_table(rows, ["method", "dist_u", "dist_x", "loss"],
                title=f"# {NAME}: final relative distances to the closed-form solution (K={K}, {iters} outer its)")
    results = {"K": K, "iters": iters, "rows": rows, "plot": png}
    print(f"wrote {save_json(args, NAME, results)} and {png}")
    return results


if __name__ == "__main__":
    main()
