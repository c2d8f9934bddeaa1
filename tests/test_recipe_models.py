"""Fast checks of the recipes' model options (sparse_coding's learned models, few_shot's classes)
against independent references: hand-written loops of the published iterations, finite differences,
image transformations written out by hand."""

from __future__ import annotations

import math
import types
import warnings

import numpy as np
import pytest
import torch

import hodl_plugin as hp
from recipes import few_shot as fs
from recipes import sparse_coding as sc

D = torch.float64
# geometric schedules are summable: the solver warns (checked once, in its own test)
pytestmark = pytest.mark.filterwarnings("ignore::hodl_plugin.errors.SummableScheduleWarning")


def args(**kw):
    base = dict(alpha0=1.0, gamma=0.5, ratio=0.9)
    return types.SimpleNamespace(**{**base, **kw})


def tiny(seed=0, m=6, n=10, N=3):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(m, n, generator=g, dtype=D) / math.sqrt(m)
    A = A / A.norm(dim=0, keepdim=True)
    u = torch.randn(N, n, generator=g, dtype=D) * (torch.rand(N, n, generator=g) < 0.3)
    s = 1.0 / float(torch.linalg.matrix_norm(A, 2)) ** 2
    return A, u @ A.T, u, s


def np_soft(v, t):
    return np.sign(v) * np.maximum(np.abs(v) - t, 0.0)


def softplus(x):
    return math.log1p(math.exp(x))


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


def perturb(model, seed=1):
    """Move every learned parameter off its initial value (so per-layer entries differ)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype) * (p.abs().mean() + 0.1))


def reference(model, A, b, steps):
    """The method's iteration written out with numpy from the parameters' values (no clock, no solver)."""
    A, b = A.numpy(), b.numpy()
    Nl = model.layer
    W = Nl.W.detach().numpy()
    rho = np.atleast_1d(Nl.rho.detach().numpy())
    g = None if Nl.g is None else Nl.g.detach().numpy()
    K = model.clock.layers

    def N(u, k):
        i = min(k, K - 1) if Nl.layer != "tied" else 0
        Wi = W[i] if Nl.layer == "untied" else W
        step = 2 * sigmoid(g[i]) if g is not None else 1.0
        return np_soft(u - step * (u @ A.T - b) @ Wi.T, softplus(rho[i]))

    def T(u, k):
        T_ = model.T
        r = np.atleast_1d(T_.rho.detach().numpy())
        i = min(k, K - 1) if T_.clock is not None else 0
        t = T_.s * (2 * sigmoid(T_.g.detach().numpy()[i]) if T_.g is not None else 1.0)
        return np_soft(u - t * (u @ A.T - b) @ A, t * softplus(r[i]))

    meth, a = model.method, args()
    alpha = {"poly": lambda k: 1.0 / math.sqrt(k + 1), "harmonic": lambda k: 1.0 / (k + 1),
             "geometric": lambda k: 0.9**k, "zero": lambda k: 0.0}[meth.schedule]
    assert a.alpha0 == 1.0 and a.gamma == 0.5
    u = np.zeros((b.shape[0], A.shape[1]))
    for k in range(steps):
        if meth.base == "lista":
            u = N(u, k)
        elif meth.aggregation == "inside":
            u = T((1 - alpha(k)) * u + alpha(k) * N(u, k), k)
        else:
            u = (1 - alpha(k)) * T(u, k) + alpha(k) * N(u, k)
    return u


METHODS = ["lista", "lista+layerwise", "lista+untied", "hodl", "hodl+layerwise", "hodl+untied",
           "hodl+outside", "hodl+outside+geometric", "hodl+harmonic", "hodl+zero", "hodl+layerwise+alista",
           "hodl+outside+untied+alista"]


@pytest.mark.parametrize("name", METHODS)
def test_learned_model_is_the_published_iteration(name):
    A, b, _, s = tiny()
    K = 4
    model = sc.LearnedModel(sc.Method.parse(name), A, s, lam0=0.1, K=K, args=args())
    perturb(model)
    for steps in (K, 2 * K + 1):  # at the trained depth, and continued past it (last layer repeated)
        with torch.no_grad():
            u = model(b, steps)
        np.testing.assert_allclose(u.numpy(), reference(model, A, b, steps), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", ["lista+layerwise", "hodl+untied", "hodl+outside+alista", "hodl+layerwise"])
def test_learned_model_gradient_matches_finite_differences(name):
    A, b, u_gt, s = tiny(seed=2)
    model = sc.LearnedModel(sc.Method.parse(name), A, s, lam0=0.05, K=3, args=args())
    perturb(model, seed=3)
    params = [p for p in model.parameters() if p.requires_grad]

    def loss():
        return ((model(b, 3) - u_gt) ** 2).sum()

    grads = torch.autograd.grad(loss(), params, allow_unused=True)
    g = torch.Generator().manual_seed(4)
    for p, gp in zip(params, grads):
        d = torch.randn(p.shape, generator=g, dtype=D)
        h = 1e-6
        with torch.no_grad():
            p.add_(h * d)
            lp = float(loss())
            p.sub_(2 * h * d)
            lm = float(loss())
            p.add_(h * d)
        fd = (lp - lm) / (2 * h)
        ad = 0.0 if gp is None else float((gp * d).sum())
        assert abs(ad - fd) <= 1e-6 * max(1.0, abs(fd)), (p.shape, ad, fd)
    assert any(gp is not None and float(gp.abs().sum()) > 0 for gp in grads)


def test_per_layer_nmse_from_one_solve_equals_separate_solves():
    A, b, u_gt, s = tiny(seed=5)
    model = sc.LearnedModel(sc.Method.parse("hodl+layerwise+alista"), A, s, lam0=0.1, K=3, args=args())
    perturb(model)
    per = sc.per_layer_learned(model, b, u_gt, 7)
    with torch.no_grad():
        sep = [sc.nmse_db(model(b, k), u_gt) for k in range(1, 8)]
    assert per == pytest.approx(sep, abs=1e-9)


def test_method_names_and_errors():
    assert sc.Method.parse("HODL+untied+outside").name == "hodl+untied+outside"
    assert sc.Method.parse("hodl+tied+inside+poly").name == "hodl"
    assert [sc.Method.parse(m).name for m in sc.ALL_METHODS.split(",")] == sc.ALL_METHODS.split(",")
    with pytest.raises(ValueError, match="two layer tokens"):
        sc.Method.parse("lista+untied+tied")
    with pytest.raises(ValueError, match="lista or hodl"):
        sc.Method.parse("alista")
    with pytest.raises(ValueError, match="needs the solve's Clock"):
        sc.LearnedLayer(torch.eye(2, dtype=D), 1.0, 0.1, layer="untied")
    with pytest.raises(ValueError, match="layer must be one of"):
        sc.LearnedLayer(torch.eye(2, dtype=D), 1.0, 0.1, layer="shared")


@pytest.mark.parametrize("name", ["hodl+geometric", "hodl+outside+geometric"])
def test_geometric_schedule_warns_and_bad_alpha0_raises(name):
    A, b, _, s = tiny()
    with pytest.warns(hp.SummableScheduleWarning):
        sc.LearnedModel(sc.Method.parse(name), A, s, 0.1, 3, args())
    with pytest.raises(hp.errors.ScheduleError, match=r"\[0, 1\]"):
        sc.LearnedModel(sc.Method.parse(name), A, s, 0.1, 3, args(alpha0=1.5))


@pytest.mark.parametrize("schedule", ["poly", "geometric"])
def test_outside_step_is_the_core_outside_aggregation(schedule):
    """The recipe's one-operator form of BDA's step against GKMSolver(aggregation="outside"):
    iterates and unrolled gradients (tied layer: no per-layer clock involved)."""
    A, b, u_gt, s = tiny(seed=7)
    model = sc.LearnedModel(sc.Method.parse(f"hodl+outside+{schedule}"), A, s, lam0=0.1, K=5, args=args())
    perturb(model)
    alpha = hp.Polynomial(1.0, 0.5) if schedule == "poly" else hp.Geometric(1.0, 0.9)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", hp.SummableScheduleWarning)
        core = hp.GKMSolver(model.T, max_steps=5, tol=0.0, hypergrad="unrolled", aggregation="outside",
                            alpha=alpha, upper_step=1.0, upper_grad=lambda u, b: u - model.layer(u, b))
    params = [p for p in model.parameters() if p.requires_grad]
    u1, u2 = model(b, 5), core(torch.zeros_like(u_gt), b)
    torch.testing.assert_close(u1, u2, rtol=1e-12, atol=1e-12)
    g1 = torch.autograd.grad(((u1 - u_gt) ** 2).sum(), params)
    g2 = torch.autograd.grad(((u2 - u_gt) ** 2).sum(), params)
    for a, c in zip(g1, g2):
        torch.testing.assert_close(a, c, rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------------------- few_shot
def test_transformed_classes_are_the_symmetries():
    img = np.arange(64.0).reshape(8, 8)
    X = np.stack([img.ravel(), img.ravel() + 100, img.ravel() + 200])
    y = np.array([0, 1, 2])
    train_tf, val_tf = fs.CLASS_SETS["d4"]
    X2, y2, tr, va = fs.transformed_classes(X, y, [0, 1], train_tf, val_tf)
    assert len(tr) == 12 and len(va) == 4 and not set(tr) & set(va) and not set(tr + va) & {0, 1, 2}
    by = {c: X2[y2 == c][0].reshape(8, 8) for c in tr + va}
    # digit 0's validation classes: a 270° turn (= 90° clockwise) and its mirror image, by hand
    cw = np.array([[img[7 - j, i] for j in range(8)] for i in range(8)])
    assert np.array_equal(by[va[0]], cw)
    assert np.array_equal(by[va[1]], np.array([[img[7 - j, 7 - i] for j in range(8)] for i in range(8)]))
    # all 16 images of the two digits differ (8 symmetries of an asymmetric image), originals kept
    flat = {tuple(v.ravel()) for v in by.values()}
    assert len(flat) == 16 and np.array_equal(X2[y2 == 2], X[2:3])
    with pytest.raises(ValueError, match="square images"):
        fs.transformed_classes(np.zeros((2, 6)), np.array([0, 1]), [0], train_tf, val_tf)


def test_episodes_reset_replays_the_same_episodes():
    X = np.random.default_rng(0).random((60, 4))
    y = np.repeat(np.arange(6), 10)
    ep = fs.Episodes(X, y, list(range(6)), ways=3, shots=1, queries=2, seed=7)
    a = [ep.sample()["Xs"] for _ in range(3)]
    b = [ep.reset().sample()["Xs"] for _ in range(1)] + [ep.sample()["Xs"] for _ in range(2)]
    assert all(torch.equal(x, z) for x, z in zip(a, b))


def test_ista_and_fista_baselines_are_k_steps():
    A, b, u_gt, s = tiny(seed=6)
    An, bn, un = A.numpy(), b.numpy(), u_gt.numpy()
    u = np.zeros_like(un)
    y, t, ista, fista = u.copy(), 1.0, [], []
    v = u.copy()
    for _ in range(6):
        u = np_soft(u - s * (u @ An.T - bn) @ An, s * 0.1)
        ista.append(10 * math.log10(((u - un) ** 2).sum() / (un**2).sum()))
        v_new = np_soft(y - s * (y @ An.T - bn) @ An, s * 0.1)
        t_new = (1 + math.sqrt(1 + 4 * t * t)) / 2
        y, v, t = v_new + (t - 1) / t_new * (v_new - v), v_new, t_new
        fista.append(10 * math.log10(((v - un) ** 2).sum() / (un**2).sum()))
    assert sc.ista_per_layer(A, s, 0.1, b, u_gt, 6) == pytest.approx(ista, abs=1e-9)
    assert sc.fista_per_layer(A, s, 0.1, b, u_gt, 6) == pytest.approx(fista, abs=1e-9)


def test_held_out_digit_validation_classes():
    X = np.random.default_rng(1).random((3, 64))
    y = np.array([0, 1, 2])
    tfs = fs.D4
    X2, y2, tr, va = fs.transformed_classes(X, y, [0, 1], tfs, tfs, val_base=[2])
    assert len(tr) == 16 and len(va) == 8 and not set(tr) & set(va)
    src = {c: X2[y2 == c][0] for c in tr + va}
    img2 = X[2].reshape(8, 8)
    # every validation class is a symmetry of digit 2's image, none of digits 0 or 1
    assert all(any(np.array_equal(src[c].reshape(8, 8), np.rot90(m, r)) for m in (img2, img2[:, ::-1])
                   for r in range(4)) for c in va)
    assert all(not any(np.array_equal(src[c].reshape(8, 8), np.rot90(m, r)) for m in (img2, img2[:, ::-1])
                       for r in range(4)) for c in tr)


def test_a_model_diverging_past_its_depth_reports_inf_from_there():
    A, b, u_gt, s = tiny(seed=8)
    model = sc.LearnedModel(sc.Method.parse("lista+untied"), A, s, lam0=0.01, K=2, args=args())
    with torch.no_grad():
        model.layer.W[1].mul_(25.0)  # the last layer expands: repeated past K it blows up
        ok = [sc.nmse_db(model(b, k), u_gt) for k in (1, 2)]
    per = sc.per_layer_learned(model, b, u_gt, 40)
    assert per[:2] == pytest.approx(ok, abs=1e-9)
    first_inf = per.index(math.inf)
    assert 2 < first_inf < 40 and all(v == math.inf for v in per[first_inf:])
    # up to the detection, the NMSE of the iteration's true (growing) iterates, by hand
    un = u_gt.numpy()
    ref = [10 * math.log10(((reference(model, A, b, k) - un) ** 2).sum() / (un**2).sum())
           for k in range(1, first_inf + 1)]
    assert per[:first_inf] == pytest.approx(ref, rel=1e-9) and ref[-1] > ref[1] + 20
    assert model.solver.iteration.on_divergence == "raise"


def test_poly_token_sets_the_exponent():
    A, b, _, s = tiny()
    m = sc.LearnedModel(sc.Method.parse("hodl+poly0.25"), A, s, 0.1, 3, args())
    assert m.solver.iteration.alpha(3) == pytest.approx(4**-0.25)
    assert sc.Method.parse("hodl+poly0.25").name == "hodl+poly0.25"
    for bad in ("hodl+poly1.5", "hodl+polyx", "hodl+poly0"):
        with pytest.raises(ValueError, match="exponent"):
            sc.Method.parse(bad)


def test_few_shot_tiny_run_early_stops_on_the_best_validation_point(tmp_path):
    pytest.importorskip("betty")
    # a far too large step spoils the meta-learner: the best validation point is an early one
    res = fs.main(["--shots", "1", "--iters", "6", "--eval-every", "2", "--val-episodes", "4", "--lr", "0.3",
                   "--test-episodes", "4", "--out", str(tmp_path)])
    assert any(r["episode"] < 6 for r in res["rows"][1:])
    for r in res["rows"][1:]:
        c = res["curves"]["5-way 1-shot"][r["method"]]
        assert c["episode"] == [0, 2, 4, 6] and len(c["val"]) == len(c["unseen"]) == 4
        best = max(range(4), key=lambda i: (c["val"][i], -i))
        assert (r["val_acc"], r["episode"]) == (c["val"][best], c["episode"][best])
    assert (tmp_path / "few_shot.png").exists()


def test_few_shot_too_few_validation_classes_is_a_named_error_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="4 validation classes, fewer than --ways 5"):
        fs.main(["--classes", "rotations", "--val", "digit", "--out", str(tmp_path)])
    assert not (tmp_path / "few_shot.json").exists()
