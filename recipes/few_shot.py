r"""Few-shot classification in a Betty Engine: a HODL-aggregated inner loop vs a plain unrolled inner loop.

HODL's "other learning tasks" (Liu et al., TPAMI 2023) at CPU scale: 5-way 1-shot / 5-shot episodes built from
scikit-learn's digits, meta-tested on the unseen classes 5–9 (15 queries per class), or from
``--data-dir`` (``X.npy``, ``y.npy``; the first half of the classes as the base classes).

Protocol. Digits 0–4 are the base classes; every (digit, symmetry of the square) pair is a class of
its own (``--classes d4``: 4 rotations, each with and without a mirror flip; ``rotations``: the 4
rotations only — the Omniglot convention). Meta-validation classes are held out of meta-training
(``--val digit``: digit 4 with all its symmetries, so 32 meta-training and 8 validation classes with
``d4``; ``--val symmetries``: the 270° turns of digits 0–4, with ``d4`` also their mirror images).
Every ``--eval-every`` episodes the same ``--val-episodes`` validation episodes are scored, and the
meta-learner of the best validation accuracy is the one tested (early stopping; ``--no-early-stop``
tests the last one). The meta-test classes 5–9 are never used for a choice (their curve in the plot
is for reading).

A two-node Betty graph (the way we want users to write bilevel code):

- **lower** (:class:`~hodl_plugin.betty.GKMProblem`): the episode's linear head W on the support
  features φ_ω(x), the fixed point of the gradient step of the ridge-regularised cross-entropy,
  T(W) = W − η ∇_W [CE(φ_ω(X_s)W, y_s) + (μ/2)||W||²], η = 1/L; K steps from W₀ = 0;
- **upper** (Betty ``ImplicitProblem``): the meta-learner ω = (feature network φ, prototype scale
  ρ), loss = cross-entropy of the queries under the lower's head, Adam, hypergradient
  ``gkm_unrolled`` through the K steps.

The HODL inner loop aggregates a learned criterion F(W; ω) = ½||W − P_ω(S)||² whose minimiser
P_ω(S) is the prototype head (rows ρ·mean of the class's normalised support features, bias
−ρ/2·||mean||²): w_k = W_k − α_k (W_k − P_ω), α_k = (k+1)^-½ → 0, so the head starts at the
prototypes and still converges to the task's fixed point. The plain inner loop is the same node
without ``upper_objective``. Both meta-learn φ with the same budget (``--iters`` episodes, the
same validation points); the table gives the mean meta-test accuracy over the same episodes with
its 95 % confidence interval, after K inner steps and after 4K, the accuracy of the meta-learned
features under the prototype head alone, next to the prototype classifier on raw pixels (no
meta-training).
"""

from __future__ import annotations

import copy
import time
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as Fnn
from torch import nn

from ._common import load_xy, parse_list, parser, plot_curves, positive_int, print_table, progress, save_json, setup

NAME = "few_shot"
DT = torch.float64
HIDDEN = 16


class Episodes:
    """N-way k-shot episodes from a set of classes; labels are permuted in every episode."""

    def __init__(self, X: np.ndarray, y: np.ndarray, classes: list[int], ways: int, shots: int, queries: int,
                 seed: int) -> None:
        if len(classes) < ways:
            raise ValueError(f"{ways}-way episodes need at least {ways} classes, got {len(classes)}")
        self.by_class = [torch.as_tensor(X[y == c], dtype=DT) for c in classes]
        short = [c for c, xs in zip(classes, self.by_class) if len(xs) < shots + queries]
        if short:
            raise ValueError(f"classes {short} have fewer than shots + queries = {shots + queries} samples")
        self.ways, self.shots, self.queries = ways, shots, queries
        self.seed = seed
        self.g = torch.Generator().manual_seed(seed)
        self.current: Optional[dict[str, torch.Tensor]] = None

    def reset(self) -> Episodes:
        """Restart the episode stream (the same validation episodes at every point)."""
        self.g.manual_seed(self.seed)
        return self

    def sample(self) -> dict[str, torch.Tensor]:
        cls = torch.randperm(len(self.by_class), generator=self.g)[: self.ways]
        xs, ys, xq, yq = [], [], [], []
        for label, c in enumerate(cls.tolist()):
            pool = self.by_class[c]
            idx = torch.randperm(len(pool), generator=self.g)[: self.shots + self.queries]
            xs.append(pool[idx[: self.shots]])
            xq.append(pool[idx[self.shots:]])
            ys += [label] * self.shots
            yq += [label] * self.queries
        self.current = {"Xs": torch.cat(xs), "ys": torch.tensor(ys), "Xq": torch.cat(xq), "yq": torch.tensor(yq)}
        return self.current


#: the 8 symmetries of the square as (quarter turns, mirror first)
D4 = [(r, f) for f in (False, True) for r in range(4)]


def transform(imgs: np.ndarray, turns: int, mirror: bool) -> np.ndarray:
    """Square images ``(N, side, side)`` mirrored left-right (if ``mirror``), then turned ``turns``×90°.

    >>> transform(np.arange(4).reshape(1, 2, 2), 1, True)[0].tolist()
    [[0, 2], [1, 3]]
    """
    return np.rot90(imgs[:, :, ::-1] if mirror else imgs, turns, axes=(1, 2))


def transformed_classes(X: np.ndarray, y: np.ndarray, base: list[int], train_tf: list[tuple[int, bool]],
                        val_tf: list[tuple[int, bool]], val_base: Optional[list[int]] = None
                        ) -> tuple[np.ndarray, np.ndarray, list[int], list[int]]:
    """New classes from the images of the ``base`` classes: every (class, symmetry) pair is a class
    (the Omniglot convention for rotations). Returns ``(X, y, train classes, validation classes)``:
    the symmetries ``train_tf`` of ``base`` make the meta-training classes, the held-out ``val_tf``
    of ``val_base`` (default ``base``) the meta-validation ones (disjoint from them and from the
    meta-test classes, which are in neither).

    >>> X = np.arange(8.0).reshape(2, 4); y = np.array([0, 1])
    >>> X2, y2, tr, va = transformed_classes(X, y, [0], [(0, False), (2, False)], [(1, False)])
    >>> tr, va, X2[y2 == va[0]].tolist()
    ([2, 3], [4], [[1.0, 3.0, 0.0, 2.0]])
    """
    side = int(round(np.sqrt(X.shape[1])))
    if side * side != X.shape[1]:
        raise ValueError(f"class transformations need square images, got {X.shape[1]} features")
    Xs, ys, out = [X], [y], ([], [])
    nxt = int(y.max()) + 1
    for which, (cls, tfs) in enumerate(((base, train_tf), (base if val_base is None else val_base, val_tf))):
        for c in cls:
            imgs = X[y == c].reshape(-1, side, side)
            for turns, mirror in tfs:
                Xs.append(transform(imgs, turns, mirror).reshape(len(imgs), -1))
                ys.append(np.full(len(imgs), nxt))
                out[which].append(nxt)
                nxt += 1
    return np.concatenate(Xs), np.concatenate(ys), out[0], out[1]


#: --classes: the symmetries that make meta-training / meta-validation classes from digits 0–4
CLASS_SETS = {
    # the 4 rotations, 270° held out: 15 meta-training, 5 validation classes
    "rotations": ([(r, False) for r in range(3)], [(3, False)]),
    # the 8 symmetries of the square, two held out: 30 meta-training, 10 validation classes
    "d4": ([(r, f) for (r, f) in D4 if r < 3], [(3, False), (3, True)]),
}


class MetaLearner(nn.Module):
    """ω: the residual feature map φ(x) = x + g(x) (g: d → hidden → d, ReLU, last layer zero at the
    start, so meta-training starts from the raw pixels) and the prototype scale ρ = exp(log_rho)."""

    def __init__(self, d_in: int, hidden: int = 64) -> None:
        super().__init__()
        self.g = nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, d_in)).to(DT)
        with torch.no_grad():
            self.g[-1].weight.zero_()
            self.g[-1].bias.zero_()
        self.log_rho = nn.Parameter(torch.tensor([2.0], dtype=DT))  # shape (1,), not 0-d

    def features(self, X: torch.Tensor) -> torch.Tensor:
        f = X + self.g(X)
        f = f / (f.norm(dim=1, keepdim=True) + 1e-8)
        return torch.cat([f, torch.ones(len(f), 1, dtype=DT)], 1)  # bias column

    def prototypes(self, Fs: torch.Tensor, ys: torch.Tensor, ways: int) -> torch.Tensor:
        """P_ω(S): the prototype head (a nearest-mean classifier written as a linear head)."""
        m = torch.stack([Fs[ys == c, :-1].mean(0) for c in range(ways)])
        rho = torch.exp(self.log_rho)
        return rho * torch.cat([m, -0.5 * (m * m).sum(1, keepdim=True)], 1)


def build(args: Any, episodes: Episodes, val: Episodes, d_in: int, aggregate: bool, seed: int,
          unseen: Optional[Episodes] = None):
    """The Betty Engine of one inner-loop variant; returns (engine, meta module, head node).

    Every ``--eval-every`` episodes the engine's ``validation`` (Betty's hook) records in
    ``engine.curve`` the meta-training accuracy (queries of the episodes trained on since the last
    point), the accuracy on the same ``--val-episodes`` episodes of the held-out validation classes,
    and, for reading only, on episodes of the unseen meta-test classes (``unseen``); it keeps the
    meta-learner's state of the best validation accuracy in ``engine.best`` (early stopping).
    """
    from betty.configs import EngineConfig
    from betty.engine import Engine
    from betty.problems import ImplicitProblem

    import hodl_plugin as hp
    import hodl_plugin.betty as hb

    hb.set_log_level("WARNING")
    ways, mu = args.ways, args.mu
    seen: list[float] = []  # query accuracy of the meta-training episodes since the last point

    class Head(hb.GKMProblem):
        def get_batch(self):  # each Betty step: a new episode, shared with the upper node
            return episodes.sample()

        def initial_state(self, batch):
            # once per solve (ω is fixed during it): η = 1/L, L = ½||φ(X_s)||²/n + μ, and the one-hot labels
            with torch.no_grad():
                Fs = hb.unwrap(self.meta.module).features(batch["Xs"])
            n = len(batch["ys"])
            batch["step"] = 1.0 / (0.5 * float(torch.linalg.matrix_norm(Fs, 2)) ** 2 / n + mu)
            batch["Ys"] = Fnn.one_hot(batch["ys"], ways).to(DT)
            return torch.zeros(ways, d_in + 1, dtype=DT)

        def operator(self, W, batch):
            Fs = hb.unwrap(self.meta.module).features(batch["Xs"])
            g = (torch.softmax(Fs @ W.T, 1) - batch["Ys"]).T @ Fs / len(batch["ys"]) + mu * W
            return W - batch["step"] * g

        if aggregate:
            def upper_objective(self, W, batch):
                meta = hb.unwrap(self.meta.module)
                P = meta.prototypes(meta.features(batch["Xs"]), batch["ys"], ways)
                return 0.5 * ((W - P) ** 2).sum()

    class Meta(ImplicitProblem):
        def get_batch(self):
            return episodes.current

        def training_step(self, batch):
            logits = self.module.features(batch["Xq"]) @ self.head.u.T
            seen.append(float((logits.argmax(1) == batch["yq"]).to(DT).mean()))
            return Fnn.cross_entropy(logits, batch["yq"])

    torch.manual_seed(seed)
    meta_module = MetaLearner(d_in, args.hidden)
    opt = torch.optim.Adam(meta_module.parameters(), lr=args.lr)
    cfg = dict(type="gkm_unrolled", max_steps=args.K, tol=0.0, check_every=args.K, warm_start=False)
    if aggregate:
        cfg.update(alpha=hp.Polynomial(1.0, 0.5), upper_step=1.0)
    head = Head("head", hb.HODLConfig(**cfg))
    # the query loss depends on ω directly and through W: Betty must keep its graph for the second pass
    meta = Meta("meta", hb.HODLConfig(retain_graph=True), module=meta_module, optimizer=opt)
    bar = progress(range(args.iters // args.eval_every), args, desc=label_of(aggregate, episodes.shots))
    ticks = iter(bar)

    class FewShotEngine(Engine):
        curve: dict[str, list[float]] = {}
        best: tuple[float, int, dict[str, torch.Tensor]] = (-1.0, 0, {})

        def record(self, step: int) -> float:
            acc = evaluate(head, meta_module, val.reset(), args.val_episodes)[0]
            c = self.curve
            c["episode"].append(step)
            c["train"].append(float(np.mean(seen)) if seen else float("nan"))
            c["val"].append(acc)
            if unseen is not None:
                c["unseen"].append(evaluate(head, meta_module, unseen.reset(), args.val_episodes)[0])
            seen.clear()
            if acc > self.best[0]:
                self.best = (acc, step, copy.deepcopy(meta_module.state_dict()))
            return acc

        def validation(self):
            acc = self.record(self.global_step)
            next(ticks, None)
            return {"val_acc": acc}

    engine = FewShotEngine([meta, head], EngineConfig(train_iters=args.iters, valid_step=args.eval_every),
                           dependencies={"u2l": {meta: [head]}, "l2u": {head: [meta]}})
    engine.curve = {"episode": [], "train": [], "val": [], "unseen": []}
    return engine, meta_module, head


def label_of(aggregate: bool, shots: int) -> str:
    return f"{shots}-shot, " + ("HODL-aggregated inner loop" if aggregate else "plain unrolled inner loop")


def mean_ci(acc: list[float]) -> tuple[float, float]:
    """Mean and 95 % confidence half-width 1.96·sd/√n.

    >>> mean_ci([0.5, 0.7])
    (0.6, 0.196)
    """
    a = np.array(acc)
    return round(float(a.mean()), 12), round(float(1.96 * a.std(ddof=1) / np.sqrt(len(a))), 12)


@torch.no_grad()
def evaluate(head: Any, meta_module: MetaLearner, episodes: Episodes, n: int, K: Optional[int] = None
             ) -> tuple[float, float]:
    """Mean query accuracy over ``n`` episodes and its 95 % confidence half-width."""
    solver = head._solver
    if K is not None:
        old, solver.max_steps = solver.max_steps, K
    acc = []
    for _ in range(n):
        ep = episodes.sample()
        W = head.solve(ep)
        pred = (meta_module.features(ep["Xq"]) @ W.T).argmax(1)
        acc.append(float((pred == ep["yq"]).to(DT).mean()))
    if K is not None:
        solver.max_steps = old
    return mean_ci(acc)


@torch.no_grad()
def evaluate_prototypes(meta_module: MetaLearner, episodes: Episodes, n: int) -> tuple[float, float]:
    """Accuracy of the prototype head P_ω(S) alone (no inner loop)."""
    acc = []
    for _ in range(n):
        ep = episodes.sample()
        P = meta_module.prototypes(meta_module.features(ep["Xs"]), ep["ys"], episodes.ways)
        pred = (meta_module.features(ep["Xq"]) @ P.T).argmax(1)
        acc.append(float((pred == ep["yq"]).to(DT).mean()))
    return mean_ci(acc)


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    ap = parser(NAME, __doc__.split("\n")[0])
    ap.add_argument("--shots", default=None, help="comma list of k-shot settings (default 1 quick / 1,5)")
    ap.add_argument("--ways", type=int, default=5, help="classes per episode (N-way)")
    ap.add_argument("--queries", type=int, default=15, help="query samples per class in each episode")
    ap.add_argument("--K", type=positive_int, default=10, help="inner GKM steps (unrolled)")
    ap.add_argument("--mu", type=float, default=0.05, help="ridge weight of the inner problem")
    ap.add_argument("--iters", type=positive_int, default=None, help="meta-training episodes (default 100 quick / 300)")
    ap.add_argument("--test-episodes", type=int, default=None, help="meta-test episodes (default 200 / 600)")
    ap.add_argument("--eval-every", type=int, default=None,
                    help="episodes between validation points (default iters/5 quick / iters/12)")
    ap.add_argument("--val-episodes", type=int, default=None,
                    help="meta-validation episodes at each point (default 30 quick / 50)")
    ap.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate of the meta-learner")
    ap.add_argument("--hidden", type=int, default=HIDDEN, help="hidden width of the residual feature map")
    ap.add_argument("--classes", default="d4", choices=sorted(CLASS_SETS),
                    help="classes made from digits 0–4: 'd4' (each digit under the 8 symmetries of the square) "
                         "or 'rotations' (under the 4 rotations)")
    ap.add_argument("--val", default="digit", choices=["digit", "symmetries"],
                    help="meta-validation classes: 'digit' (digit 4 and its symmetries, held out of "
                         "meta-training) or 'symmetries' (held-out symmetries of digits 0–4)")
    ap.add_argument("--no-early-stop", action="store_true",
                    help="test the meta-learner after the last episode, not the one of best validation accuracy")
    args = ap.parse_args(argv)
    setup(args)
    args.iters = args.iters or (100 if args.quick else 300)
    args.test_episodes = args.test_episodes or (200 if args.quick else 600)
    args.val_episodes = args.val_episodes or (30 if args.quick else 50)
    args.eval_every = args.eval_every or max(1, args.iters // (5 if args.quick else 12))
    def positive(item: str) -> int:
        k = int(item)
        if k < 1:
            raise ValueError("shots must be >= 1")
        return k

    shots = parse_list(ap, "--shots", args.shots or ("1" if args.quick else "1,5"), positive)
    X, y = load_xy(args)
    classes = sorted(set(y.tolist()))
    half = len(classes) // 2
    base_cls, test_cls = classes[:half], classes[half:]
    train_tf, val_tf = CLASS_SETS[args.classes]
    if args.val == "symmetries":  # held-out symmetries of the meta-training digits
        X, y, train_cls, val_cls = transformed_classes(X, y, base_cls, train_tf, val_tf)
    else:  # the last base digit (4) with all its symmetries held out
        X, y, train_cls, val_cls = transformed_classes(X, y, base_cls[:-1], train_tf + val_tf, train_tf + val_tf,
                                                       val_base=base_cls[-1:])
    for what, cls in (("meta-training", train_cls), ("validation", val_cls), ("meta-test", test_cls)):
        if len(cls) < args.ways:
            raise ValueError(f"--classes {args.classes} --val {args.val} gives {len(cls)} {what} classes, fewer "
                             f"than --ways {args.ways}: use --classes d4, --val symmetries or fewer --ways")
    rows, panels = [], []
    for k in shots:
        curves = {}
        setting = f"{args.ways}-way {k}-shot"

        def test_set() -> Episodes:  # the same meta-test episodes for every method
            return Episodes(X, y, test_cls, args.ways, k, args.queries, args.seed + 2)

        acc, ci = evaluate_prototypes(MetaLearner(X.shape[1], args.hidden), test_set(), args.test_episodes)
        rows.append({"setting": setting, "method": "raw-pixel prototypes (no meta-training)",
                     "test_acc": acc, "ci95": ci})
        for aggregate in (False, True):
            label = label_of(aggregate, k).split(", ")[1]
            tr = Episodes(X, y, train_cls, args.ways, k, args.queries, args.seed)
            val = Episodes(X, y, val_cls, args.ways, k, args.queries, args.seed + 1)
            unseen = Episodes(X, y, test_cls, args.ways, k, args.queries, args.seed + 3)
            engine, meta_module, head = build(args, tr, val, X.shape[1], aggregate, args.seed, unseen)
            engine.record(0)  # before meta-training
            t0 = time.perf_counter()
            engine.run()
            train_s = time.perf_counter() - t0
            best_acc, best_step, state = engine.best
            if not args.no_early_stop:
                meta_module.load_state_dict(state)
                again = evaluate(head, meta_module, val.reset(), args.val_episodes)[0]
                if again != best_acc:  # the same episodes, the same weights: the same accuracy
                    raise RuntimeError(f"early stopping restored a state scoring {again} on validation, "
                                       f"not the recorded best {best_acc}")
            acc, ci = evaluate(head, meta_module, test_set(), args.test_episodes)
            acc4, _ = evaluate(head, meta_module, test_set(), args.test_episodes, K=4 * args.K)
            pacc, pci = evaluate_prototypes(meta_module, test_set(), args.test_episodes)
            used = engine.curve["episode"][-1] if args.no_early_stop else best_step
            rows.append({"setting": setting, "method": label, "test_acc": acc, "ci95": ci,
                         f"acc_{4 * args.K}_steps": acc4, "proto_head_acc": pacc, "proto_head_ci95": pci,
                         "val_acc": best_acc, "episode": used, "train_s": train_s})
            curves[label] = engine.curve
        panels.append((setting, curves))
    png = plot(f"{args.out}/{NAME}.png", panels, args)
    print_table(rows, ["setting", "method", "test_acc", "ci95", f"acc_{4 * args.K}_steps", "proto_head_acc",
                       "val_acc", "episode", "train_s"],
                title=f"# {NAME}: meta-test accuracy on unseen classes ({args.test_episodes} episodes)")
    results = {"rows": rows, "plot": png, "curves": {title: c for title, c in panels}}
    print(f"wrote {save_json(args, NAME, results)} and {png}")
    return results


def plot(path: str, panels: list[tuple[str, dict[str, dict[str, list[float]]]]], args: Any) -> str:
    """Accuracy vs meta-training episodes: meta-training queries, held-out validation classes and the
    unseen meta-test classes, one panel per inner loop and setting."""
    ax_pairs = []
    val = "held-out digit 4" if getattr(args, "val", "digit") == "digit" else "held-out symmetries"
    for setting, curves in panels:
        for label, c in curves.items():
            lines = {name: (c["episode"], c[key]) for name, key in
                     (("meta-train queries", "train"), (f"meta-val ({val})", "val"),
                      ("unseen digits 5–9", "unseen")) if c[key]}
            ax_pairs.append((f"{setting}: {label.split(' inner')[0]}", lines))
    return plot_curves(path, {}, "meta-training episodes", "", logy=False, ax_pairs=ax_pairs,
                       title=f"few-shot digits, K={args.K} inner steps, classes '{args.classes}', "
                             f"hidden {args.hidden}: accuracy")


if __name__ == "__main__":
    main()
