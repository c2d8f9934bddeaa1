"""Data hyper-cleaning on scikit-learn's digits: learn per-sample weights with every hypergradient mode.

Half of the training labels are replaced by random wrong labels. The lower level fits a weighted
multinomial logistic regression, u*(x) = argmin_W (1/N) Σ σ(x_i) CE(W; z_i, y_i) + (μ/2)||W||²,
as the fixed point of the gradient step T(W; x) = W - s ∇_W (strongly convex: a contraction); the
upper level minimises the cross-entropy on a clean validation set over the weight logits x
(Adam). A sample is flagged as corrupted when σ(x_i) < 0.5. Every hypergradient mode of
``GKMSolver`` runs side by side from the same start: test accuracy of the final lower model, F1 of
the flags, and wall time; the baselines are the unweighted fit on the noisy data and the fit on the
clean half only (an oracle).

``--modes ptt,iaptt,fd,iga`` adds the hypergradient baselines of ``GKMSolver`` that the IAPTT-GM, DARTS and
LwCL papers (and BOAT) run on hyper-cleaning: ``ptt`` truncates the warm-started trajectory of K steps at
the iterate with the largest validation loss; ``iaptt`` is IAPTT-GM itself, PTT from a learned start
(:class:`~hodl_plugin.LearnedInit`, Adam with the same ``--lr``) instead of a warm start; ``fd`` is DARTS's
one-step finite-difference hypergradient (warm-started, as DARTS keeps its weights); ``iga`` LwCL's
Gauss–Newton multiplier (warm-started). All run K steps exactly (``tol=0``). What they show here: IGA's
hypergradient of a weight is its sample's loss times one multiplier (a rank-one Jacobian), so it cannot
single out the corrupted samples; the learned start of ``iaptt`` is fitted to the validation loss itself.

``--modes bome,pgdo,meso,alto`` adds the first-order bilevel baselines of :mod:`hodl_plugin.baselines`
(the methods the BOME, PBGD and MEHA papers compare on hyper-cleaning): they move the weight logits
(Adam, the same ``--lr``) and the classifier together, one method step per outer step — BOME and PGDO
with T = K inner steps for their value-function estimate, ALTO with K lower steps, MESO single-loop.

The implicit mode runs a second time as a two-node Betty graph (``run_betty``: a ``GKMProblem``
for the weighted fit under an ``ImplicitProblem`` for the weights), the way a Betty user writes it;
it gives the core run's results.

``--anderson M`` accelerates the lower forward solves (the baselines' fits, and the training solves of
the implicit, inexact and first-order modes; unrolled and truncated differentiate the plain steps).

``--data-dir`` reads ``X.npy`` (N×d features) and ``y.npy`` (N labels) instead of sklearn's digits.
"""

from __future__ import annotations

import time
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as Fnn

import hodl_plugin as hp

from ._common import (
    acceleration,
    add_anderson,
    fraction,
    load_xy,
    parser,
    plot_curves,
    positive_int,
    print_table,
    progress,
    save_json,
    setup,
)

NAME = "hyper_cleaning"
DT = torch.float64



def split(X: np.ndarray, y: np.ndarray, n_train: int, n_val: int, frac: float, seed: int) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(y))
    tr, va, te = perm[:n_train], perm[n_train:n_train + n_val], perm[n_train + n_val:]
    classes = int(y.max()) + 1
    y_tr = y[tr].copy()
    corrupted = rng.random(n_train) < frac
    shift = rng.integers(1, classes, size=n_train)  # a wrong label, uniformly among the others
    y_tr[corrupted] = (y_tr[corrupted] + shift[corrupted]) % classes

    def t(a, dtype=DT):
        return torch.as_tensor(a, dtype=dtype)

    def feats(a):  # features with a bias column
        return torch.cat([t(a), torch.ones(len(a), 1, dtype=DT)], 1)

    return {"Xtr": feats(X[tr]), "ytr": t(y_tr, torch.long), "Xva": feats(X[va]), "yva": t(y[va], torch.long),
            "Xte": feats(X[te]), "yte": t(y[te], torch.long), "corrupted": torch.as_tensor(corrupted),
            "classes": classes}


def lower_objective(D: dict[str, Any], mu: float):
    Xtr, ytr = D["Xtr"], D["ytr"]

    def f(W: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        ce = Fnn.cross_entropy(Xtr @ W, ytr, reduction="none")
        return (torch.sigmoid(x) * ce).mean() + 0.5 * mu * (W**2).sum()

    # ∇²f ≤ (1/2)||X||²/N + μ (softmax CE curvature ≤ ½, weights ≤ 1)
    L = 0.5 * float(torch.linalg.matrix_norm(Xtr, 2)) ** 2 / len(ytr) + mu
    return f, L


def fit_plain(D: dict[str, Any], mu: float, mask: Optional[torch.Tensor] = None, steps: int = 3000,
              acc: Optional[hp.Anderson] = None) -> torch.Tensor:
    """Weighted fit with fixed 0/1 weights (baselines), by the same GKM solver (no hypergradient)."""
    f, L = lower_objective(D, mu)
    x = torch.full((len(D["ytr"]),), 30.0, dtype=DT) if mask is None else (mask.to(DT) * 60 - 30)
    solver = hp.GKMSolver(hp.GradientStep(objective=f, step=1.0 / L), max_steps=steps, tol=1e-10, acceleration=acc)
    with torch.no_grad():
        return solver(torch.zeros(D["Xtr"].shape[1], D["classes"], dtype=DT), x)


def accuracy(W: torch.Tensor, X: torch.Tensor, y: torch.Tensor) -> float:
    return float(((X @ W).argmax(1) == y).to(DT).mean())


def f1_flags(x: torch.Tensor, corrupted: torch.Tensor) -> float:
    flag = torch.sigmoid(x) < 0.5
    tp = float((flag & corrupted).sum())
    prec = tp / max(float(flag.sum()), 1.0)
    rec = tp / max(float(corrupted.sum()), 1.0)
    return 0.0 if tp == 0 else 2 * prec * rec / (prec + rec)


MODES: dict[str, dict[str, Any]] = {
    "implicit (cg)": {"hypergrad": "implicit", "solver": "cg", "adjoint_rtol": 1e-6, "on_fail": "warn"},
    "inexact (ε_k δ_k)": {"hypergrad": "inexact", "eps": hp.Polynomial(1e-3, 0.5),
                           "delta": hp.Polynomial(1e-3, 0.5), "solver": "cg", "constants": None,
                           "relative": False},  # ISGD's absolute accuracies
    "unrolled": {"hypergrad": "unrolled"},
    "truncated (10)": {"hypergrad": "truncated", "steps": 10},
    "first_order": {"hypergrad": "first_order"},
}

#: the hypergradient baselines, run by --modes only (GKMSolver options; "upper": F is the validation loss,
#: "learned_init": IAPTT-GM's learned start instead of the warm start)
BASELINES: dict[str, dict[str, Any]] = {
    "ptt (K, warm)": {"hypergrad": "ptt", "upper": True, "tol": 0.0},
    "iaptt (PTT, learned start)": {"hypergrad": "ptt", "upper": True, "learned_init": True, "tol": 0.0},
    "fd (DARTS, warm)": {"hypergrad": "fd", "tol": 0.0},
    "iga (K, warm)": {"hypergrad": "iga", "tol": 0.0},
}


#: the first-order baselines (hodl_plugin.baselines), run by --modes only: (class, options from (K, L))
FIRST_ORDER: dict[str, tuple[Any, Any]] = {
    "bome (T=K)": (hp.BOME, lambda K, L: dict(inner_steps=K, inner_lr=1.0 / L, eta=1.0, y_lr=1.0 / L)),
    "pgdo (γ=10, T=K)": (hp.PGDO, lambda K, L: dict(gamma=10.0, inner_steps=K, inner_lr=1.0 / L, y_lr=0.1 / L)),
    "meso (single loop)": (hp.MESO, lambda K, L: dict(gamma=1.0 / L, eta=0.5 / L, c0=1.0, p=0.25, y_lr=0.5 / L)),
    "alto (K lower steps)": (hp.ALTO, lambda K, L: dict(lower_steps=K, y_lr=1.0 / L)),
}

ACCELERATED = ("implicit", "inexact", "first_order")  # modes whose backward does not see the forward steps


def run_mode(name: str, opts: dict[str, Any], D: dict[str, Any], mu: float, K: int, iters: int, lr: float,
             args: Any) -> dict[str, Any]:
    f, L = lower_objective(D, mu)
    opts = dict(opts)
    if opts["hypergrad"] in ACCELERATED:
        opts["acceleration"] = acceleration(args)
    F = lambda W, x: Fnn.cross_entropy(D["Xva"] @ W, D["yva"])  # noqa: E731 - the validation loss
    if opts.pop("upper", False):  # PTT compares F along the trajectory (no aggregation)
        opts.update(upper=F, alpha=0)
    learned = opts.pop("learned_init", False)
    if opts["hypergrad"] != "inexact":  # (inexact stops at its own accuracies eps_k, delta_k)
        opts.setdefault("tol", 1e-6)
    solver = hp.GKMSolver(hp.GradientStep(objective=f, step=1.0 / L), max_steps=K,
                          hypergrad=opts.pop("hypergrad"), **opts)
    x = torch.zeros(len(D["ytr"]), dtype=DT, requires_grad=True)
    W0 = torch.zeros(D["Xtr"].shape[1], D["classes"], dtype=DT)
    model = hp.LearnedInit(solver, W0) if learned else None
    opt = torch.optim.Adam([x, *(model.parameters() if model is not None else [])], lr=lr)
    W = W0
    val_curve = []
    t0 = time.perf_counter()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", hp.ConvergenceWarning)  # fixed budget K per outer step
        for _ in progress(range(iters), args, desc=name):
            opt.zero_grad()
            if model is not None:
                Wx = model(x)  # IAPTT-GM: from the learned start z
            else:
                Wx = solver(W, x, key="train")  # warm start: the previous solution
            val = F(Wx, x)
            val.backward()
            opt.step()
            W = Wx.detach()
            val_curve.append(float(val.detach()))
    dt = time.perf_counter() - t0
    return {"method": name, "test_acc": accuracy(W, D["Xte"], D["yte"]),
            "F1_flags": f1_flags(x.detach(), D["corrupted"]), "val_loss": val_curve[-1], "time_s": dt,
            "curve": val_curve}


def run_first_order(name: str, D: dict[str, Any], mu: float, K: int, iters: int, lr: float,
                    args: Any) -> dict[str, Any]:
    """A first-order baseline of FIRST_ORDER: one method step per outer step, Adam(lr) on the logits x."""
    cls, options = FIRST_ORDER[name]
    f, L = lower_objective(D, mu)
    x = torch.zeros(len(D["ytr"]), dtype=DT, requires_grad=True)
    W = torch.zeros(D["Xtr"].shape[1], D["classes"], dtype=DT, requires_grad=True)
    method = cls(x, W, upper=lambda x, W: Fnn.cross_entropy(D["Xva"] @ W, D["yva"]), lower=lambda x, W: f(W, x),
                 x_optimizer=torch.optim.Adam([x], lr=lr), **options(K, L))
    val_curve = []
    t0 = time.perf_counter()
    for _ in progress(range(iters), args, desc=name):
        val_curve.append(method.step().upper)  # F at the step's starting point
    dt = time.perf_counter() - t0
    Wd = W.detach()
    return {"method": name, "test_acc": accuracy(Wd, D["Xte"], D["yte"]),
            "F1_flags": f1_flags(x.detach(), D["corrupted"]),
            "val_loss": float(Fnn.cross_entropy(D["Xva"] @ Wd, D["yva"])), "time_s": dt, "curve": val_curve}


def run_betty(D: dict[str, Any], mu: float, K: int, iters: int, lr: float, args: Any) -> dict[str, Any]:
    """The implicit mode as a two-node Betty graph: a GKMProblem (the weighted fit) under an
    ImplicitProblem holding the weight logits — what a Betty user writes; same math as the core run."""
    import warnings

    from betty.configs import EngineConfig
    from betty.engine import Engine
    from betty.problems import ImplicitProblem

    import hodl_plugin.betty as hb

    hb.set_log_level("WARNING")
    f, L = lower_objective(D, mu)
    T = hp.GradientStep(objective=f, step=1.0 / L)
    shape = (D["Xtr"].shape[1], D["classes"])
    val_curve: list[float] = []
    bar = iter(progress(range(iters), args, desc="implicit (cg), Betty Engine"))

    class Fit(hb.GKMProblem):
        symmetric_jacobian = True  # T is a gradient step: the adjoint system is solved by CG

        def initial_state(self, batch):
            return torch.zeros(shape, dtype=DT)

        def operator(self, W, batch):
            return T(W, self.weights.module.x)

    class Weights(ImplicitProblem):
        def get_batch(self):
            return None

        def training_step(self, batch):
            val = Fnn.cross_entropy(D["Xva"] @ self.fit.u, D["yva"])
            val_curve.append(float(val.detach()))
            next(bar, None)
            return val

    xm = torch.nn.Module()
    xm.x = torch.nn.Parameter(torch.zeros(len(D["ytr"]), dtype=DT))
    fit = Fit("fit", hb.HODLConfig(type="gkm_implicit", max_steps=K, tol=1e-6, adjoint_rtol=1e-6, on_fail="warn",
                                   acceleration=acceleration(args)))
    weights = Weights("weights", hb.HODLConfig(), module=xm, optimizer=torch.optim.Adam(xm.parameters(), lr=lr))
    engine = Engine([weights, fit], EngineConfig(train_iters=iters),
                    dependencies={"u2l": {weights: [fit]}, "l2u": {fit: [weights]}})
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", hp.ConvergenceWarning)
        engine.run()
    dt = time.perf_counter() - t0
    W = fit.u.detach()
    return {"method": "implicit (cg), Betty Engine", "test_acc": accuracy(W, D["Xte"], D["yte"]),
            "F1_flags": f1_flags(xm.x.detach(), D["corrupted"]), "val_loss": val_curve[-1], "time_s": dt,
            "curve": val_curve}


def select_modes(text: str, ap: Any) -> list[str]:
    """The MODES, BASELINES or FIRST_ORDER labels named by ``--modes``: each by its first word (``implicit``,
    ``truncated``, ``ptt``, ``bome``) or full label.

    >>> select_modes("implicit,truncated,ptt,bome", None)
    ['implicit (cg)', 'truncated (10)', 'ptt (K, warm)', 'bome (T=K)']
    """
    every = [*MODES, *BASELINES, *FIRST_ORDER]
    short = {m.split(" ")[0]: m for m in every}
    chosen = []
    for word in (w.strip() for w in text.split(",") if w.strip()):
        label = short.get(word, word if word in every else None)
        if label is None:
            msg = f"--modes: unknown mode {word!r}; choose from {', '.join(short)}"
            if ap is None:
                raise ValueError(msg)
            ap.error(msg)
        chosen.append(label)
    return chosen


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    ap = parser(NAME, __doc__.split("\n")[0])
    ap.add_argument("--n-train", type=int, default=None, help="training samples (default 400 quick / 800)")
    ap.add_argument("--n-val", type=int, default=300, help="clean validation samples (the upper loss)")
    ap.add_argument("--corrupt", type=fraction, default=0.5, help="fraction of training labels corrupted")
    ap.add_argument("--mu", type=float, default=1e-2, help="ridge weight of the lower level")
    ap.add_argument("--K", type=positive_int, default=None,
                    help="lower GKM steps per outer step (default 30 quick / 60)")
    ap.add_argument("--iters", type=positive_int, default=None, help="outer steps (default 50 quick / 300)")
    ap.add_argument("--lr", type=float, default=0.3, help="Adam step on the weight logits")
    ap.add_argument("--modes", default=",".join(m.split(" ")[0] for m in MODES),
                    help="comma list of modes to run (default the GKM modes: %(default)s; the baselines "
                         f"{', '.join(m.split(' ')[0] for m in [*BASELINES, *FIRST_ORDER])} on request)")
    ap.add_argument("--no-betty", action="store_true", help="skip the run of the implicit mode in a Betty Engine")
    add_anderson(ap, default=10)
    args = ap.parse_args(argv)
    modes = select_modes(args.modes, ap)
    setup(args)
    n_train = args.n_train or (400 if args.quick else 800)
    K = args.K or (30 if args.quick else 60)
    iters = args.iters or (50 if args.quick else 300)
    X, y = load_xy(args)
    D = split(X, y, n_train, args.n_val, args.corrupt, args.seed)
    rows = [
        {"method": "no cleaning (noisy labels)",
         "test_acc": accuracy(fit_plain(D, args.mu, acc=acceleration(args)), D["Xte"], D["yte"])},
        {"method": "oracle (clean half only)",
         "test_acc": accuracy(fit_plain(D, args.mu, ~D["corrupted"], acc=acceleration(args)), D["Xte"], D["yte"])},
    ]
    for name in modes:
        if name in FIRST_ORDER:
            rows.append(run_first_order(name, D, args.mu, K, iters, args.lr, args))
        else:
            rows.append(run_mode(name, {**MODES, **BASELINES}[name], D, args.mu, K, iters, args.lr, args))
    if not args.no_betty:
        rows.append(run_betty(D, args.mu, K, iters, args.lr, args))
    its = list(range(1, iters + 1))
    png = plot_curves(f"{args.out}/{NAME}.png", {r["method"]: (its, r["curve"]) for r in rows if "curve" in r},
                      "outer step", "validation cross-entropy", logy=False,
                      title=f"hyper-cleaning, digits, {int(100 * args.corrupt)}% corrupted, K={K}")
    print_table(rows, ["method", "test_acc", "F1_flags", "val_loss", "time_s"],
                title=f"# {NAME}: digits, {n_train} training samples ({int(100 * args.corrupt)}% corrupted)")
    results = {"K": K, "iters": iters, "n_train": n_train, "rows": rows, "plot": png}
    print(f"wrote {save_json(args, NAME, results)} and {png}")
    return results


if __name__ == "__main__":
    main()
