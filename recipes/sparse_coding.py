"""Sparse coding (LISTA setting): ISTA, FISTA, unrolled-only LISTA and HODL/BMO learning, NMSE per layer.

Protocol (Chen et al. 2018, the usual one for learned ISTA): A ∈ R^{250×500} with
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

Variants (``--methods``, ``Method``): the learned layer with per-layer steps and thresholds or
untied weights, HODL's aggregation inside T or outside it (BDA's form), the schedule α_k, and T with
per-layer step and λ (ALISTA's layer). Every learned model gets the same budget: ``--iters`` Adam
iterations of ``--batch`` fresh codes.

``--data-dir`` reads ``A.npy`` (m×n), ``train_codes.npy`` and ``test_codes.npy`` (N×n) if given.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.nn.functional as Fnn

import hodl_plugin as hp

from ._common import parse_list, parser, plot_curves, positive_int, print_table, progress, save_json, setup

NAME = "sparse_coding"
DT = torch.float32
LAYERS = ("tied", "layerwise", "untied")
SCHEDULES = ("poly", "harmonic", "geometric", "zero")


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


def inv_softplus(x: float) -> float:
    return math.log(math.expm1(x))


class Clock:
    """The index k of the GKM step being computed, for per-layer parameters (LISTA-CP / ALISTA's
    K-vectors of steps and thresholds, untied weights) inside an ``hp.GKMSolver``.

    hodl_plugin's loop evaluates ∇F (the learned layer, with aggregation) and then T exactly once per
    step, so the operator advances the clock (:class:`Ticking`) and a solve starts with
    :meth:`reset`. ``layer`` is k capped at the last trained layer: run past its depth, a per-layer
    model repeats its last layer.

    >>> c = Clock(layers=2); c.k = 5; c.layer
    1
    """

    def __init__(self, layers: int) -> None:
        self.layers, self.k = layers, 0

    def reset(self) -> None:
        self.k = 0

    @property
    def layer(self) -> int:
        return min(self.k, self.layers - 1)


class Ticking(torch.nn.Module):
    """T, advancing ``clock`` after each evaluation; ``trace(u_{k+1})`` sees every output (with
    β ≡ 1 the output of T is the next iterate, so one solve of L steps gives the NMSE of every layer)."""

    def __init__(self, T: torch.nn.Module, clock: Clock) -> None:
        super().__init__()
        self.T, self.clock = T, clock
        self.trace: Optional[Callable[[torch.Tensor], None]] = None

    def forward(self, u: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        out = self.T(u, b)
        self.clock.k += 1
        if self.trace is not None:
            self.trace(out)
        return out


class LearnedLayer(torch.nn.Module):
    """N_ω(u; b) = S_{θ_k}(u - γ_k W_k (Au - b)), θ_k = softplus(ρ_k), in three parametrisations:

    - ``"tied"``: one W (init sAᵀ), one θ, γ ≡ 1 (LISTA with tied weights);
    - ``"layerwise"``: one W, a K-vector of steps γ_k = 2σ(g_k) ∈ (0, 2) (init 1) and of thresholds
      θ_k (tied-weight LISTA-CP / ALISTA's per-layer step and threshold);
    - ``"untied"``: K matrices W_k and thresholds θ_k (LISTA as first published), γ ≡ 1.
    """

    def __init__(self, A: torch.Tensor, s: float, theta0: float, layer: str = "tied",
                 clock: Optional[Clock] = None) -> None:
        super().__init__()
        if layer not in LAYERS:
            raise ValueError(f"layer must be one of {LAYERS}, got {layer!r}")
        if layer != "tied" and clock is None:
            raise ValueError(f"layer={layer!r} needs the solve's Clock (per-layer parameters)")
        self.register_buffer("A", A)
        self.layer, self.clock = layer, clock
        K = 1 if layer == "tied" else clock.layers  # type: ignore[union-attr]
        W0 = s * A.T.clone()
        self.W = torch.nn.Parameter(W0.repeat(K, 1, 1) if layer == "untied" else W0)
        self.g = torch.nn.Parameter(torch.zeros(K, dtype=A.dtype)) if layer == "layerwise" else None
        rho = torch.full((K,), inv_softplus(theta0), dtype=A.dtype)
        self.rho = torch.nn.Parameter(rho[0] if layer == "tied" else rho)

    def forward(self, u: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if self.layer == "tied":
            return soft(u - (u @ self.A.T - b) @ self.W.T, Fnn.softplus(self.rho))
        i = self.clock.layer  # type: ignore[union-attr]
        W = self.W[i] if self.layer == "untied" else self.W
        step = 2 * torch.sigmoid(self.g[i]) if self.g is not None else 1.0
        return soft(u - step * (u @ self.A.T - b) @ W.T, Fnn.softplus(self.rho[i]))


class ISTAOperator(torch.nn.Module):
    """T_λ(u; b) = S_{γsλ}(u - γsAᵀ(Au - b)), the forward-backward step of the LASSO; λ = softplus(ρ)
    learned when ``learn=True``, γ ≡ 1. With a ``clock``, a K-vector of steps γ_k = 2σ(g_k) ∈ (0, 2)
    and of weights λ_k (ALISTA's layer, analytic weight Aᵀ): every T_k is still averaged, hence
    nonexpansive, and past layer K the iteration is ISTA on the LASSO of (γ_K, λ_K)."""

    def __init__(self, A: torch.Tensor, s: float, lam: float, learn: bool = False,
                 clock: Optional[Clock] = None) -> None:
        super().__init__()
        self.register_buffer("A", A)
        self.s, self.clock = s, clock
        K = 1 if clock is None else clock.layers
        rho = torch.full((K,), inv_softplus(lam), dtype=A.dtype)
        self.rho = torch.nn.Parameter(rho[0] if clock is None else rho, requires_grad=learn)
        self.g = None if clock is None else torch.nn.Parameter(torch.zeros(K, dtype=A.dtype), requires_grad=learn)

    def forward(self, u: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if self.clock is None:
            t, lam = self.s, Fnn.softplus(self.rho)
        else:
            i = self.clock.layer
            t, lam = 2 * torch.sigmoid(self.g[i]) * self.s, Fnn.softplus(self.rho[i])  # type: ignore[index]
        return soft(u - t * (u @ self.A.T - b) @ self.A, t * lam)


class OutsideStep(torch.nn.Module):
    """BDA's aggregation *outside* the operator (``vis-opt-group/BDA``, ``boml/lower_iter/aggr.py``):
    u_{k+1} = (1 - α_k) T(u_k) + α_k (u_k - s∇F(u_k)) = (1 - α_k) T(u_k) + α_k N_ω(u_k) with
    ∇F(u) = u - N_ω(u) and s = 1 — the iteration of ``hp.GKMSolver(T, aggregation="outside",
    upper_grad=..., upper_step=1)`` (tested equal), written as one operator of step k (α read off the
    clock) so that per-layer parameters see k whatever order the solver evaluates T and ∇F in;
    ``inside`` is the core's default w_k = (1 - α_k)u_k + α_k N_ω(u_k), u_{k+1} = T(w_k)."""

    def __init__(self, T: torch.nn.Module, layer: torch.nn.Module, alpha: hp.schedules.Schedule,
                 clock: Clock) -> None:
        super().__init__()
        self.T, self.N, self.alpha, self.clock = T, layer, alpha, clock

    def forward(self, u: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        a = float(self.alpha(self.clock.k))
        return (1 - a) * self.T(u, b) + a * self.N(u, b) if a else self.T(u, b)


def ista_per_layer(A, s, lam, b, u_gt, K) -> list[float]:
    """NMSE after each of K ISTA steps from 0, one traced solve (one T per step: the unrolled mode;
    ``first_order`` would add one differentiable step T(u_K) to every call)."""
    us: list[torch.Tensor] = []
    T = Ticking(ISTAOperator(A, s, lam), Clock(1))
    T.trace = us.append
    with torch.no_grad():
        hp.GKMSolver(T, max_steps=K, tol=0.0, hypergrad="unrolled", check_every=K)(
            torch.zeros(b.shape[0], A.shape[1], dtype=b.dtype), b)
    return [nmse_db(u, u_gt) for u in us]


def fista_per_layer(A, s, lam, b, u_gt, K) -> list[float]:
    out = []
    u = y = torch.zeros(b.shape[0], A.shape[1], dtype=b.dtype)
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


@dataclass(frozen=True)
class Method:
    """A learned model, named ``base[+token...]`` on the command line (``--methods``).

    ``base``: ``lista`` (the learned layer iterated, α ≡ 0) or ``hodl`` (ISTA's T_λ aggregated with the
    learned layer). Tokens: the learned layer's parametrisation ``tied`` (default) / ``layerwise`` /
    ``untied`` (:class:`LearnedLayer`); for HODL the aggregation ``inside`` (default, the core's GKM
    step) / ``outside`` (BDA's, :class:`OutsideStep`); the schedule ``poly`` (default,
    α_k = α0/(k+1)^γ with ``--gamma``; ``poly0.1``: γ = 0.1) / ``harmonic`` (α0/(k+1)) /
    ``geometric`` (α0·ratio^k) / ``zero`` (α ≡ 0: ISTA with a learned λ); and ``alista`` (T with
    per-layer step and λ, :class:`ISTAOperator`).

    >>> Method.parse("hodl+outside+geometric").name
    'hodl+outside+geometric'
    >>> Method.parse("hodl+poly0.1").gamma(0.5)
    0.1
    >>> Method.parse("lista+inside")
    Traceback (most recent call last):
    ...
    ValueError: --methods: 'lista+inside': unknown token 'inside' (lista takes tied, layerwise, untied)
    """

    base: str
    layer: str = "tied"
    aggregation: str = "inside"
    schedule: str = "poly"
    alista: bool = False

    @classmethod
    def parse(cls, text: str) -> Method:
        base, *tokens = text.strip().lower().split("+")
        if base not in ("lista", "hodl"):
            raise ValueError(f"--methods: {text!r}: a learned model is lista or hodl, then +tokens")
        allowed = LAYERS if base == "lista" else LAYERS + ("inside", "outside", "alista") + SCHEDULES
        kw: dict[str, Any] = {}
        for t in tokens:
            if t.startswith("poly") and t != "poly":
                try:
                    gamma = float(t[4:])
                except ValueError:
                    gamma = math.nan
                if not 0 < gamma <= 1:
                    raise ValueError(f"--methods: {text!r}: {t!r} needs an exponent γ in (0, 1] (non-summable)")
                allowed += (t,)
            if t not in allowed:
                raise ValueError(f"--methods: {text!r}: unknown token {t!r} ({base} takes {', '.join(allowed)})")
            key = ("layer" if t in LAYERS else "aggregation" if t in ("inside", "outside")
                   else "alista" if t == "alista" else "schedule")
            if key in kw:
                raise ValueError(f"--methods: {text!r}: two {key} tokens")
            kw[key] = True if t == "alista" else t
        return cls(base, **kw)

    def gamma(self, default: float) -> float:
        """The exponent γ of a ``poly`` schedule (``default``: ``--gamma``, for plain ``poly``)."""
        return float(self.schedule[4:]) if self.schedule[4:] else default

    @property
    def name(self) -> str:
        default = Method(self.base)
        tokens = [getattr(self, f) for f in ("layer", "aggregation", "schedule")
                  if getattr(self, f) != getattr(default, f)]
        return "+".join([self.base, *tokens] + (["alista"] if self.alista else []))

    def label(self, args: Any) -> str:
        if self.base == "lista":
            return {"tied": "LISTA (unrolled-only)", "layerwise": "LISTA layerwise γ_k, θ_k (tied W)",
                    "untied": "LISTA untied W_k, θ_k"}[self.layer]
        if self.name == "hodl":
            return "HODL (GKM aggregation)"
        alpha = {"harmonic": "α0/(k+1)", "geometric": f"α0·{args.ratio:g}^k", "zero": "0"}.get(
            self.schedule, f"α0/(k+1)^{self.gamma(args.gamma):g}")
        T = "ALISTA T_k" if self.alista else "T_λ"
        return f"HODL {self.aggregation}, {self.layer} N, {T}, α={alpha}"


DEFAULT_METHODS = "lista,lista+layerwise,hodl,hodl+layerwise+poly0.1+alista"
ALL_METHODS = ("lista,lista+layerwise,lista+untied,hodl,hodl+layerwise,hodl+untied,hodl+outside,"
               "hodl+harmonic,hodl+geometric,hodl+zero,hodl+outside+geometric,hodl+alista,"
               "hodl+layerwise+alista,hodl+zero+alista,hodl+layerwise+geometric,hodl+layerwise+geometric+alista,"
               "hodl+poly0.1,hodl+layerwise+poly0.1+alista")


class LearnedModel(torch.nn.Module):
    """One learned method as an ``hp.GKMSolver`` (unrolled, tol = 0: exactly the asked layers from u_0 = 0)."""

    def __init__(self, method: Method, A: torch.Tensor, s: float, lam0: float, K: int, args: Any) -> None:
        super().__init__()
        self.method, self.clock = method, Clock(K)
        self.layer = LearnedLayer(A, s, theta0=s * lam0, layer=method.layer, clock=self.clock)
        opts = dict(max_steps=K, tol=0.0, hypergrad="unrolled", check_every=K)
        if method.base == "lista":
            self.tick = Ticking(self.layer, self.clock)
            self.solver = hp.GKMSolver(self.tick, **opts)
            return
        self.T = ISTAOperator(A, s, lam0, learn=True, clock=self.clock if method.alista else None)
        alpha = {"harmonic": hp.Harmonic(args.alpha0), "geometric": hp.Geometric(args.alpha0, args.ratio),
                 "zero": hp.schedules.Constant(0.0)}.get(method.schedule) or hp.Polynomial(
                     args.alpha0, method.gamma(args.gamma))
        if method.aggregation == "outside":  # the core's checks of α, as GKMSolver(aggregation="outside")
            problems = hp.schedules.check_aggregation(alpha)
            if problems:
                raise hp.errors.ScheduleError("HODL outside: " + "; ".join(problems))
            if hp.schedules.summable_aggregation(alpha):
                warnings.warn(hp.schedules.summable_aggregation(alpha), hp.SummableScheduleWarning, stacklevel=2)
            self.tick = Ticking(OutsideStep(self.T, self.layer, alpha, self.clock), self.clock)
            self.solver = hp.GKMSolver(self.tick, **opts)
        else:
            self.tick = Ticking(self.T, self.clock)
            # a summable (geometric) schedule is accepted with a SummableScheduleWarning
            self.solver = hp.GKMSolver(self.tick, **opts, alpha=alpha, upper_step=1.0,
                                       upper_grad=lambda u, b: u - self.layer(u, b))

    def forward(self, b: torch.Tensor, layers: int,
                trace: Optional[Callable[[torch.Tensor], None]] = None) -> torch.Tensor:
        """û after ``layers`` steps from 0 (``trace`` sees every iterate)."""
        self.clock.reset()
        self.solver.max_steps, self.tick.trace = layers, trace
        try:
            return self.solver(torch.zeros(b.shape[0], self.layer.A.shape[1], dtype=b.dtype), b)
        finally:
            self.tick.trace = None


def per_layer_learned(model: LearnedModel, b, u_gt, L) -> list[float]:
    """NMSE after k = 1..L layers of a model trained with K (beyond K: the same iteration, continued
    with the last layer's parameters and, for HODL, the continuing schedule α_k), from one solve.
    A model whose iteration diverges past K (the solver's test: residual 1e4× its first value) gets
    NMSE = +inf after the layer where the divergence was detected."""
    us: list[torch.Tensor] = []
    it = model.solver.iteration
    model.solver.iteration = it.replace(on_divergence="warn")
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", hp.ConvergenceWarning)
            u = model(b, L, trace=us.append)
    finally:
        model.solver.iteration = it
    info = model.solver.info
    if info is not None and info.diverged:
        return [nmse_db(v, u_gt) for v in us] + [math.inf] * (L - len(us))
    if len(us) != L or not torch.equal(us[-1], u):  # the trace is the iteration (β ≡ 1)
        raise RuntimeError(f"traced {len(us)} iterates for {L} layers: the solver is not plain T steps")
    return [nmse_db(v, u_gt) for v in us]


def train(model: LearnedModel, A, snr, K, iters, batch, lr, g, args, label) -> list[float]:
    """Adam (cosine-annealed) on the mean squared error after K layers, fresh codes every iteration."""
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, iters)
    losses = []
    for _ in progress(range(iters), args, desc=label):
        u_gt = sample_codes(batch, A.shape[1], 0.1, g)
        b = observe(A, u_gt, snr, g)
        loss = ((model(b, K) - u_gt) ** 2).sum(1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
    return losses


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    ap = parser(NAME, __doc__.split("\n")[0])
    ap.add_argument("--K", type=positive_int, default=16, help="layers / GKM steps")
    ap.add_argument("--iters", type=positive_int, default=None, help="training iterations (default 250 quick / 600)")
    ap.add_argument("--batch", type=int, default=64, help="codes per training batch")
    ap.add_argument("--lr", type=float, default=None, help="Adam step (default 5e-3)")
    ap.add_argument("--alpha0", type=float, default=1.0, help="HODL aggregation weight α_0 of every schedule")
    ap.add_argument("--gamma", type=float, default=0.5, help="exponent γ of the 'poly' schedule α_k = α0/(k+1)^γ")
    ap.add_argument("--ratio", type=float, default=0.9, help="ratio of the 'geometric' schedule α_k = α0·ratio^k")
    ap.add_argument("--methods", default=None,
                    help="comma list of learned models, base[+token...] (see recipes.sparse_coding.Method), "
                         "or 'all'; ISTA and FISTA always run (default lista,hodl quick / " + DEFAULT_METHODS + ")")
    ap.add_argument("--settings", default=None,
                    help="comma list: noiseless and/or SNRs in dB (default noiseless quick / noiseless,40)")
    ap.add_argument("--test-layers", type=int, default=None,
                    help="evaluate up to this many layers (default 2K quick / 4K): trained for K, run longer")
    args = ap.parse_args(argv)
    names = args.methods or ("lista,hodl" if args.quick else DEFAULT_METHODS)
    methods = parse_list(ap, "--methods", ALL_METHODS if names == "all" else names, Method.parse)

    def setting(item: str) -> Optional[float]:
        if item == "noiseless":
            return None
        try:
            return float(item)
        except ValueError:
            raise ValueError("noiseless or an SNR in dB") from None

    snrs = parse_list(ap, "--settings", args.settings or ("noiseless" if args.quick else "noiseless,40"), setting)
    setup(args)
    torch.set_default_dtype(DT)
    g = torch.Generator().manual_seed(args.seed)
    K = args.K
    L = args.test_layers or (2 * K if args.quick else 4 * K)
    iters = args.iters or (250 if args.quick else 600)
    lr = args.lr or 5e-3
    n_test = 500 if args.quick else 2000
    if args.data_dir:
        A = torch.from_numpy(np.load(os.path.join(args.data_dir, "A.npy"))).to(DT)
    else:
        m, n = (250, 500)
        A = make_dictionary(m, n, g)
    s = 1.0 / float(torch.linalg.matrix_norm(A, 2)) ** 2
    rows: list[dict[str, Any]] = []
    curves: dict[str, dict[str, tuple[list[int], list[float]]]] = {}
    for snr in snrs:
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
        keys = {label: label.split(" (")[0].lower() for label in per}
        train_s: dict[str, float] = {}
        for method in methods:
            torch.manual_seed(args.seed)
            label = method.label(args)
            model = LearnedModel(method, A, s, lam_ista, K, args)
            t0 = time.perf_counter()
            train(model, A, snr, K, iters, args.batch, lr, g, args, f"{tag}: {label}")
            train_s[label] = time.perf_counter() - t0
            per[label], keys[label] = per_layer_learned(model, b_test, u_test, L), method.name
        for method, vals in per.items():
            rows.append({"setting": tag, "method": method, "key": keys[method], "NMSE@4 (dB)": vals[3],
                         f"NMSE@{K} (dB)": vals[K - 1], f"NMSE@{L} (dB)": vals[L - 1],
                         "train_s": train_s.get(method, 0.0), "per_layer": vals})
        curves[tag] = {mth: (list(range(1, L + 1)), v) for mth, v in per.items()}
    png = plot_curves(f"{args.out}/{NAME}.png", {}, "layer k", "", logy=False,
                      title=f"sparse coding 250×500: trained with K={K} layers ({iters} its), run to {L}",
                      ax_pairs=[(f"NMSE (dB), {tag}", c) for tag, c in curves.items()])
    print_table(rows, ["setting", "method", "NMSE@4 (dB)", f"NMSE@{K} (dB)", f"NMSE@{L} (dB)", "train_s"],
                title=f"# {NAME}: test NMSE (dB), lower is better ({iters} iterations × batch {args.batch} each)")
    results = {"K": K, "test_layers": L, "iters": iters, "rows": rows, "plot": png}
    print(f"wrote {save_json(args, NAME, results)} and {png}")
    return results


if __name__ == "__main__":
    main()
