"""First-order bilevel baselines (hodl_plugin.baselines): closed forms, the papers' equations, BOAT.

References, none of them the code itself:

- closed forms on a toy whose value function is exact (f = ½‖y − Bx‖², Hessian I in y): PGDO's and
  MESO's fixed points are minimisers of quadratics, ALTO's is x = c, BOME approaches x*;
- benchmarks.fo_reference: each paper's update written with hand-derived gradients (no autograd);
- BOAT 1.1.1's own operations (skipped without boat_torch), and benchmarks.boat_explained, which
  rebuilds BOAT's VFO/MESO steps from the papers' pieces plus each named difference.
"""

from __future__ import annotations

import math

import pytest
import torch

import hodl_plugin as hp
from benchmarks import boat_explained, fo_reference
from benchmarks.baselines import cases, run_ours
from benchmarks.fo_problems import HyperCleaningBLO, QuadraticBLO

DT = torch.float64


class Toy:
    r"""x, y ∈ R³; f = ½‖y − Bx‖² (so y*(x) = Bx, v(x) = 0), F = ½‖y − b‖² + (ρ/2)‖x − c‖²."""

    def __init__(self, rho: float = 1.0) -> None:
        g = torch.Generator().manual_seed(3)
        self.B = torch.eye(3, dtype=DT) + 0.3 * torch.randn(3, 3, generator=g, dtype=DT)
        self.b = torch.randn(3, generator=g, dtype=DT)
        self.c = torch.randn(3, generator=g, dtype=DT)
        self.rho = rho

    def upper(self, x, y):
        return 0.5 * ((y - self.b) ** 2).sum() + 0.5 * self.rho * ((x - self.c) ** 2).sum()

    def lower(self, x, y):
        return 0.5 * ((y - self.B @ x) ** 2).sum()

    def penalised(self, w: float) -> tuple[torch.Tensor, torch.Tensor]:
        """argmin F + (w/2)‖y − Bx‖² (a linear system in (x, y))."""
        B, I3 = self.B, torch.eye(3, dtype=DT)
        H = torch.cat([torch.cat([self.rho * I3 + w * B.T @ B, -w * B.T], 1),
                       torch.cat([-w * B, (1 + w) * I3], 1)])
        z = torch.linalg.solve(H, torch.cat([self.rho * self.c, self.b]))
        return z[:3], z[3:]

    def x_star(self) -> torch.Tensor:
        B = self.B
        return torch.linalg.solve(B.T @ B + self.rho * torch.eye(3, dtype=DT), B.T @ self.b + self.rho * self.c)


def start():
    return torch.zeros(3, dtype=DT, requires_grad=True), torch.zeros(3, dtype=DT, requires_grad=True)


def run(method, P, steps, **kw):
    x, y = start()
    m = method(x, y, P.upper, P.lower, **kw)
    for _ in range(steps):
        info = m.step()
    return x.detach(), y.detach(), m, info


# ------------------------------------------------------------------ closed forms / fixed points
def test_pgdo_converges_to_the_penalised_closed_form():
    P = Toy()
    gamma = 10.0
    x, y, _, info = run(hp.PGDO, P, 400, gamma=gamma, inner_steps=1, inner_lr=1.0, x_lr=0.05, y_lr=0.05)
    xg, yg = P.penalised(gamma)  # exact ŷ (one step of size 1 on f), so v(x) = f(x, ŷ) = 0 exactly
    assert torch.allclose(x, xg, atol=1e-10) and torch.allclose(y, yg, atol=1e-10)
    assert info.multiplier == gamma
    assert (xg - P.x_star()).norm() < 0.2 and (P.penalised(1e4)[0] - P.x_star()).norm() < 1e-3  # O(1/γ)


def test_meso_with_constant_c_converges_to_its_closed_form():
    # f − v_γ = ½ γ/(1+γ) ‖y − Bx‖² for this f, so with c_k ≡ c the fixed point minimises F + c γ/(1+γ) (...)
    P, gamma, c = Toy(), 1.0, 8.0
    x, y, _, _ = run(hp.MESO, P, 2500, gamma=gamma, eta=0.5, c0=c, p=0.0, x_lr=0.1, y_lr=0.1)
    xc, yc = P.penalised(c * gamma / (1 + gamma))
    assert torch.allclose(x, xc, atol=1e-9) and torch.allclose(y, yc, atol=1e-9)


def test_alto_converges_to_its_own_fixed_point_not_the_bilevel_solution():
    P = Toy()
    x, y, _, _ = run(hp.ALTO, P, 300, x_lr=0.5, y_lr=1.0)
    assert torch.allclose(x, P.c, atol=1e-12) and torch.allclose(y, P.B @ P.c, atol=1e-12)  # ∇_x F = 0, y = y*(x)
    assert (x - P.x_star()).norm() > 0.1


def test_bome_approaches_the_bilevel_solution_as_the_step_shrinks():
    # BOME has no exact fixed point at x* with a constant step: it settles O(ξ) away (exact ŷ here)
    P = Toy()
    dist = []
    for lr in (0.02, 0.005):
        x, y, _, info = run(hp.BOME, P, 1500, inner_steps=1, inner_lr=1.0, eta=0.5, x_lr=lr, y_lr=lr)
        dist.append(float((x - P.x_star()).norm() / P.x_star().norm()))
        assert float((y - P.B @ x).norm()) < 1.5 * lr and info.multiplier > 0
    assert dist[0] < 0.015 and dist[1] < 0.35 * dist[0]


def test_bome_direction_is_the_papers_formula():
    gF, gq = [torch.tensor([1.0, 2.0], dtype=DT)], [torch.tensor([3.0, -1.0], dtype=DT)]
    n2, dot = 10.0, 1.0
    d, lam = hp.baselines.bome_direction(gF, gq, torch.tensor(0.3, dtype=DT), eta=0.5)
    assert math.isclose(float(lam), (0.5 * n2 - dot) / n2) and torch.allclose(d[0], gF[0] + 0.4 * gq[0])
    _, lam = hp.baselines.bome_direction(gF, gq, torch.tensor(30.0, dtype=DT), eta=0.5, barrier="value")
    assert math.isclose(float(lam), (0.5 * 30.0 - dot) / n2)
    _, lam = hp.baselines.bome_direction(gF, gq, torch.tensor(0.3, dtype=DT), eta=0.5, barrier="value")
    assert float(lam) == 0.0  # φ − ⟨∇F, ∇q⟩ < 0: the upper gradient already decreases q fast enough
    _, lam = hp.baselines.bome_direction(gF, gq, torch.tensor(0.3, dtype=DT), eta=0.5, eps=10.0)
    assert math.isclose(float(lam), (0.5 * n2 - dot) / (n2 + 10.0))
    d, lam = hp.baselines.bome_direction(gF, [torch.zeros(2, dtype=DT)], torch.tensor(0.0, dtype=DT), eta=0.5)
    assert float(lam) == 0.0 and torch.equal(d[0], gF[0])  # ∇q = 0: the upper gradient alone


# ------------------------------------------------------------------ the papers' equations (no autograd)
@pytest.mark.parametrize("problem", ["quadratic", "hyper-cleaning"])
def test_each_method_equals_its_papers_equations(problem):
    P = QuadraticBLO() if problem == "quadratic" else HyperCleaningBLO(n_train=60, n_val=60)
    for case in cases(P, problem == "quadratic"):
        ours = run_ours(P, case.method, case.ours, 12)
        ref = fo_reference.REFERENCES[case.method](P, 12, **case.ours)
        assert max(float((a - b).abs().max()) for a, b in zip(ours, ref)) < 1e-12, case.method


def test_bome_value_barrier_and_momentum_follow_the_reference():
    P = QuadraticBLO()
    kw = dict(inner_steps=5, inner_lr=1 / P.L_lower, eta=0.5, x_lr=0.02, y_lr=0.02, barrier="value",
              inner_momentum=0.5)
    ours = run_ours(P, "BOME", kw, 10)
    assert max(float((a - b).abs().max()) for a, b in zip(ours, fo_reference.bome(P, 10, **kw))) < 1e-12


# ------------------------------------------------------------------ BOAT
@pytest.fixture
def boat():
    pytest.importorskip("boat_torch")
    from benchmarks.peers import boat_fo

    return boat_fo


@pytest.mark.parametrize("problem", ["quadratic", "hyper-cleaning"])
def test_boat_agrees_where_the_algorithms_coincide_and_is_explained_where_not(boat, problem):
    quad = problem == "quadratic"
    P = QuadraticBLO() if quad else HyperCleaningBLO(n_train=60, n_val=60)
    K = 15
    for case in cases(P, quad):
        b64 = boat.run(P, case.boat_op, case.boat_cfg, case.boat_lower_iters, *case.boat_lr, K, dtype=DT)[:2]
        ours = run_ours(P, case.method, case.ours, K)
        gap = max(float((a - b).abs().max()) for a, b in zip(ours, b64))
        if case.rebuilt is None:  # PGDO, ALTO: the same algorithm
            assert gap < 1e-12, case.method
            continue
        rebuilt = case.rebuilt(P, K, **case.rebuilt_kw)  # BOAT = the paper's step + the named differences
        assert max(float((a - b).abs().max()) for a, b in zip(rebuilt, b64)) < 1e-11, case.method
        assert gap > 1e-3, case.method  # and ours does not copy them


def test_boat_vfo_builds_its_direction_in_float32(boat):
    P = QuadraticBLO()
    case = cases(P, True)[0]
    b32 = boat.run(P, "VFO", case.boat_cfg, case.boat_lower_iters, *case.boat_lr, 10)[:2]
    b64 = boat.run(P, "VFO", case.boat_cfg, case.boat_lower_iters, *case.boat_lr, 10, dtype=DT)[:2]
    diff = max(float((a - b).abs().max()) for a, b in zip(b32, b64))
    assert 1e-12 < diff < 1e-5  # float32 rounding of a float64 problem's steps


def test_boat_rebuilds_reduce_to_ours_without_the_differences():
    P = QuadraticBLO()
    a = 1 / P.L_lower
    paper = boat_explained.vfo(P, 20, T=10, y_hat_lr=a, u1=0.5, x_lr=0.02, y_lr=0.02, advance=False,
                               heavy_ball=False, value_barrier=False, stale_gradient=False)
    ours = run_ours(P, "BOME", dict(inner_steps=10, inner_lr=a, eta=0.5, x_lr=0.02, y_lr=0.02), 20)
    assert max(float((u - v).abs().max()) for u, v in zip(paper, ours)) < 1e-12
    paper = boat_explained.meso(P, 20, eta=0.5 * a, gamma_1=2.0, c0=1.0, x_lr=0.02, y_lr=0.02, y_first=False,
                                c_first=False, prox_scale=False)
    ours = run_ours(P, "MESO", dict(gamma=0.5, eta=0.5 * a, c0=1.0, p=0.25, x_lr=0.02, y_lr=0.02), 20)
    assert max(float((u - v).abs().max()) for u, v in zip(paper, ours)) < 1e-12


# ------------------------------------------------------------------ variables, optimizers, state
def test_modules_and_optimizers_give_the_same_iterates_as_tensors():
    P = Toy()
    kw = dict(gamma=5.0, inner_steps=2, inner_lr=0.5)
    x, y, _, _ = run(hp.PGDO, P, 20, x_lr=0.05, y_lr=0.05, **kw)

    class V(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.v = torch.nn.Parameter(torch.zeros(3, dtype=DT))

    xm, ym = V(), V()
    m = hp.PGDO(xm, ym, lambda a, b: P.upper(a.v, b.v), lambda a, b: P.lower(a.v, b.v),
                x_optimizer=torch.optim.SGD(xm.parameters(), lr=0.05), y_lr=0.05, **kw)
    for _ in range(20):
        m.step()
    assert torch.allclose(xm.v.detach(), x, atol=1e-14) and torch.allclose(ym.v.detach(), y, atol=1e-14)
    assert xm.v.grad is None  # the direction is not left in .grad
    xt, yt = (torch.zeros(3, dtype=DT, requires_grad=True),), (torch.zeros(3, dtype=DT, requires_grad=True),)
    m = hp.PGDO(xt, yt, lambda a, b: P.upper(a[0], b[0]), lambda a, b: P.lower(a[0], b[0]), x_lr=0.05, y_lr=0.05,
                **kw)
    for _ in range(20):
        m.step()
    assert torch.allclose(xt[0].detach(), x, atol=1e-14)


def test_step_passes_its_arguments_to_both_objectives():
    P = Toy()
    seen = []
    x, y = start()
    m = hp.ALTO(x, y, lambda x, y, batch: seen.append(("F", batch)) or P.upper(x, y),
                lambda x, y, batch: seen.append(("f", batch)) or P.lower(x, y), x_lr=0.1, y_lr=0.1)
    m.step("b0")
    assert seen == [("f", "b0"), ("F", "b0")]


def test_state_dict_resumes_a_warm_started_method():
    P = Toy()
    kw = dict(gamma=5.0, inner_steps=1, inner_lr=0.3, x_lr=0.05, y_lr=0.05)
    x, y, _, _ = run(hp.PGDO, P, 10, **kw)
    x1, y1 = start()
    m1 = hp.PGDO(x1, y1, P.upper, P.lower, **kw)
    for _ in range(5):
        m1.step()
    state = m1.state_dict()
    x2, y2 = x1.detach().clone().requires_grad_(), y1.detach().clone().requires_grad_()
    m2 = hp.PGDO(x2, y2, P.upper, P.lower, **kw)
    m2.load_state_dict(state)
    for _ in range(5):
        m2.step()
    assert m2.k == 10 and torch.allclose(x2.detach(), x, atol=1e-14) and torch.allclose(y2.detach(), y, atol=1e-14)
    m2.reset()
    assert m2.k == 0 and m2.state_dict()["aux"] == {}


# ------------------------------------------------------------------ errors
def test_bad_inputs_raise_named_errors():
    P = Toy()
    x, y = start()
    F, f = P.upper, P.lower
    with pytest.raises(hp.ConfigurationError, match="requires_grad"):
        hp.ALTO(torch.zeros(3), y, F, f, x_lr=0.1, y_lr=0.1)
    with pytest.raises(hp.ConfigurationError, match="exactly one of x_lr"):
        hp.ALTO(x, y, F, f, x_lr=0.1, x_optimizer=torch.optim.SGD([x], lr=0.1), y_lr=0.1)
    with pytest.raises(hp.ConfigurationError, match="exactly one of y_lr"):
        hp.ALTO(x, y, F, f, x_lr=0.1)
    with pytest.raises(hp.ConfigurationError, match="exactly the parameters of x"):
        hp.ALTO(x, y, F, f, x_optimizer=torch.optim.SGD([y], lr=0.1), y_lr=0.1)
    with pytest.raises(hp.ConfigurationError, match="share a tensor"):
        hp.ALTO(x, (y, x), F, f, x_lr=0.1, y_lr=0.1)
    with pytest.raises(TypeError, match="tensor, an nn.Module"):
        hp.ALTO([1.0], y, F, f, x_lr=0.1, y_lr=0.1)
    with pytest.raises(ValueError, match="x_lr must be a positive"):
        hp.ALTO(x, y, F, f, x_lr=-0.1, y_lr=0.1)
    with pytest.raises(ValueError, match="inner_lr must be a positive"):
        hp.BOME(x, y, F, f, inner_lr=0.0, x_lr=0.1, y_lr=0.1)
    with pytest.raises(ValueError, match="barrier must be one of"):
        hp.BOME(x, y, F, f, inner_lr=0.1, barrier="log", x_lr=0.1, y_lr=0.1)
    with pytest.raises(ValueError, match="p must be a number in"):
        hp.MESO(x, y, F, f, gamma=1.0, eta=0.1, p=1.5, x_lr=0.1, y_lr=0.1)
    with pytest.raises(ValueError, match=r"gamma\(0\) must be a positive"):
        hp.PGDO(x, y, F, f, gamma=lambda k: -1.0, inner_lr=0.1, x_lr=0.1, y_lr=0.1).step()
    with pytest.raises(ValueError, match="upper objective must return a real scalar"):
        hp.ALTO(x, y, lambda x, y: y, f, x_lr=0.1, y_lr=0.1).step()
    with pytest.raises(ValueError, match="non-finite"):
        hp.ALTO(torch.full((3,), math.nan, requires_grad=True), y, F, f, x_lr=0.1, y_lr=0.1)


def test_an_update_that_overflows_raises():
    P = Toy()
    x, y = torch.full((3,), 100.0, dtype=DT, requires_grad=True), torch.zeros(3, dtype=DT, requires_grad=True)
    m = hp.ALTO(x, y, P.upper, P.lower, x_lr=1e307, y_lr=0.1)  # finite direction ≈ 100, the update overflows
    with pytest.raises(hp.DivergenceError, match="ALTO: non-finite x at step 0"):
        m.step()


def test_divergence_raises_instead_of_returning_nan():
    P = Toy()
    x, y = start()
    m = hp.PGDO(x, y, P.upper, P.lower, gamma=10.0, inner_steps=1, inner_lr=0.5, x_lr=10.0, y_lr=10.0)
    with pytest.raises(hp.DivergenceError, match="PGDO: non-finite"):
        for _ in range(400):
            m.step()


def test_boat_pgdo_gradient_penalty_is_a_constant(boat):
    # BOAT builds ‖∇_y f‖² without create_graph: its "gradient" penalty adds nothing, the step descends F alone
    P = QuadraticBLO()
    g, lr = 10.0, 0.02
    cfg = dict(y_hat_lr=1 / P.L_lower, gamma_init=g, gamma_max=g, gamma_argmax_step=1, update_y_ahead=False,
               penalty="gradient")
    xb, yb, _ = boat.run(P, "PGDO", cfg, 5, lr, lr, 10, dtype=DT)
    x, y, s = P.x0.clone(), P.y0.clone(), lr / (g + 1e-8)
    for _ in range(10):
        gx, gy = P.gF(x, y)
        x, y = x - s * gx, y - s * gy
    assert torch.allclose(x, xb, atol=1e-14) and torch.allclose(y, yb, atol=1e-14)


# ------------------------------------------------------------------ recipes
def test_recipes_run_the_first_order_baselines(tmp_path):
    from recipes import hyper_cleaning, nonsingleton

    res = hyper_cleaning.main(["--quick", "--modes", "implicit,bome,pgdo,meso,alto", "--no-betty", "--n-train", "100",
                               "--n-val", "100", "--iters", "3", "--K", "5", "--out", str(tmp_path)])
    rows = {r["method"].split(" ")[0]: r for r in res["rows"]}
    assert {"bome", "pgdo", "meso", "alto"} <= set(rows) and len(rows["bome"]["curve"]) == 3
    assert rows["alto"]["F1_flags"] == 0.0  # ALTO never moves the weights: ∂_x F = 0 in hyper-cleaning
    res = nonsingleton.main(["--methods", "hodl1,bome,alto", "--K", "5", "--iters", "3", "--p", "3", "--n", "6",
                             "--out", str(tmp_path)])
    labels = [r["method"] for r in res["rows"]]
    assert labels[0] == "HODL α=1/(k+1)" and labels[1].startswith("BOME") and labels[-1].startswith("Tikhonov")
    P = nonsingleton.problem(3, 6, 0.1, 0, torch.device("cpu"))
    x_eps = nonsingleton.tikhonov(P, 1e-6 / P["s"])  # ε → 0: the Tikhonov solution tends to HODL's x*
    assert float((x_eps - P["x_star"]).norm() / P["x_star"].norm()) < 1e-4


@pytest.mark.slow  # about a minute: `make test-slow`
def test_baselines_benchmark_quick():
    pytest.importorskip("boat_torch")
    from benchmarks.baselines import main

    rows = [r for r in main(["--quick"]) if r["method"] in ("BOME", "PGDO", "MESO", "ALTO")]  # (then the hypergradient
    assert len(rows) == 8  # baselines' rows, checked in test_hypergrad_baselines)
    for r in rows:
        assert r["ours vs reference"] < 1e-12 and r["BOAT vs rebuilt"] < 1e-11, r
        assert (r["ours vs BOAT"] < 1e-12) == (r["method"] in ("PGDO", "ALTO")), r
        assert r["time ours/BOAT"] > 0
    assert all(r["x dist"] < 0.3 for r in rows if r["problem"] == "quadratic" and r["method"] != "ALTO")
