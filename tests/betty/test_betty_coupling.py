"""Coupled GKM/upper nodes: HODL's aggregation with the upper node's own ``training_step`` as F.

The same graph in three spellings — coupled (F is the upper's training_step, no second copy), the
``upper_objective`` hook written by hand, and an independent plain-torch loop (the K aggregated GKM
steps unrolled by autograd, Adam from torch) — gives the same iterates; the aggregation leaves the
upper's state alone; wrong wirings are named errors.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from _oracles import DT, nonsingleton, rel_err

pytest.importorskip("betty")
from betty.configs import EngineConfig  # noqa: E402
from betty.engine import Engine  # noqa: E402
from betty.problems import ImplicitProblem  # noqa: E402

import hodl_plugin as hp  # noqa: E402
import hodl_plugin.betty as hb  # noqa: E402

hb.set_log_level("WARNING")

N, M, K, ITERS, LR = 6, 2, 12, 4, 0.05
_g = torch.Generator().manual_seed(3)
_R = torch.randn(N, N, generator=_g, dtype=DT)
Q = _R @ _R.T / N + torch.eye(N, dtype=DT)
B = torch.randn(N, M, generator=_g, dtype=DT)
E = torch.randn(N, M, generator=_g, dtype=DT)
Y = torch.randn(N, generator=_g, dtype=DT)
S = 1.0 / float(torch.linalg.eigvalsh(Q).max())
DATA = [torch.randn(N, generator=_g, dtype=DT) for _ in range(ITERS + 2)]
X0 = torch.tensor([0.4, -0.9], dtype=DT)
ALPHA = hp.Harmonic(0.5)  # α_k = 0.5/(k+1)
STEP = 0.7  # s


def T(u, x, c):
    """The lower operator: a gradient step on ½uᵀQu - (Bx + 0.3c)ᵀu."""
    return u - S * (Q @ u - B @ x - 0.3 * c)


def F(u, x, c):
    """The upper objective: ½||u - y - c - Ex||² (∇_u F depends on x: unrolled differentiates through it)."""
    return 0.5 * ((u - Y - c - E @ x) ** 2).sum()


class Loader:
    """The batches (c,) in a fixed order, counting how many were drawn."""

    def __init__(self):
        self.drawn = 0

    def __iter__(self):
        for c in DATA:
            self.drawn += 1
            yield (c,)


class Upper(ImplicitProblem):
    """Trains x on F at the lower solution; a buffer counts training_step calls (a side effect)."""

    def training_step(self, batch):
        self.module.calls += 1
        return F(self.lower.u, self.module.x, batch[0])

    def grad_callback(self):
        self.seen.append(self.cur_batch[0].clone())

    def param_callback(self):
        self.xs.append(self.module.x.detach().clone())


class CoupledLower(hb.GKMProblem):
    def operator(self, u, batch):
        return T(u, self.upper.module.x, batch[0])

    def initial_state(self, batch):
        return torch.zeros(N, dtype=DT)

    def one_step_descent(self, batch=None):
        before = snapshot(self.upper)
        out = super().one_step_descent(batch)
        self.state_diffs.append(compare(before, snapshot(self.upper)))
        self.us.append(self.u.detach().clone())
        return out


class HandLower(CoupledLower):
    def upper_objective(self, u, batch):  # F written a second time, on the lower's own batch
        return F(u, self.upper.module.x, batch[0])


def snapshot(up):
    return {
        "opt": copy.deepcopy(up.optimizer.state_dict()),
        "x": up.module.x.detach().clone(),
        "grad": None if up.module.x.grad is None else up.module.x.grad.clone(),
        "calls": up.module.calls.clone(),
        "count": up._count,
        "cur_batch": up.cur_batch,
        "drawn": up.loader.drawn,
    }


def compare(a, b):
    """The upper-state differences the lower step made (empty: none), besides batches drawn ahead."""
    diffs = []
    if str(a["opt"]) != str(b["opt"]):
        diffs.append("optimizer state")
    for k in ("x", "calls"):
        if not torch.equal(a[k], b[k]):
            diffs.append(k)
    if (a["grad"] is None) != (b["grad"] is None) or (a["grad"] is not None and not torch.equal(a["grad"], b["grad"])):
        diffs.append("grad")
    if a["count"] != b["count"] or a["cur_batch"] is not b["cur_batch"]:
        diffs.append("count/cur_batch")
    if b["drawn"] - a["drawn"] > 1:
        diffs.append("drew more than the one batch of the upper's coming step")
    return diffs


def make_upper(upper_cls=Upper):
    """The upper node: x trained by Adam on F, a call-counting buffer, a counting loader."""
    xm = torch.nn.Module()
    xm.x = torch.nn.Parameter(X0.clone())
    xm.register_buffer("calls", torch.zeros((), dtype=torch.long))
    loader = Loader()
    up = upper_cls("upper", hb.HODLConfig(type="darts", retain_graph=True), module=xm,
                   optimizer=torch.optim.Adam(xm.parameters(), lr=LR), train_data_loader=loader)
    up.loader, up.seen, up.xs = loader, [], []
    return up


def build(lower_cls, kind="gkm_unrolled", config=None, upper_cls=Upper, iters=ITERS):
    up = make_upper(upper_cls)
    cfg = config or hb.HODLConfig(type=kind, alpha=ALPHA, upper_step=STEP, tol=0.0, max_steps=K)
    low = lower_cls("lower", cfg, train_data_loader=[(c,) for c in DATA])
    low.us, low.state_diffs = [], []
    eng = Engine([up, low], EngineConfig(train_iters=iters, strategy="cpu"),
                 dependencies={"u2l": {up: [low]}, "l2u": {low: [up]}})
    return eng, up, low


def run(lower_cls, **kw):
    eng, up, low = build(lower_cls, **kw)
    eng.run()
    return up, low


def reference():
    """The graph by hand: warm-started K aggregated GKM steps, autograd through them, torch's Adam."""
    x = torch.nn.Parameter(X0.clone())
    opt = torch.optim.Adam([x], lr=LR)
    u_prev, us, xs = torch.zeros(N, dtype=DT), [], []
    for t in range(ITERS):
        c = DATA[t]
        u = u_prev
        for k in range(K):
            a = 0.5 / (k + 1)
            u = T(u - a * STEP * (u - Y - c - E @ x), x, c)  # ∇_u F(u) = u - y - c - Ex
        opt.zero_grad()
        F(u, x, c).backward()
        opt.step()
        u_prev = u.detach()
        us.append(u_prev.clone())
        xs.append(x.detach().clone())
    return us, xs


# ---------------------------------------------------------------------------------------------- iterates
@pytest.mark.parametrize("kind", ["gkm_unrolled", "gkm_implicit"])
def test_coupled_equals_hand_written_upper_objective(kind):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", hp.ConvergenceWarning)  # implicit mode, exactly K steps
        up_c, low_c = run(CoupledLower, kind=kind)
        up_h, low_h = run(HandLower, kind=kind)
    assert len(low_c.us) == len(up_c.xs) == ITERS
    for a, b in zip(low_c.us, low_h.us):
        assert float((a - b).abs().max()) <= 1e-12
    for a, b in zip(up_c.xs, up_h.xs):
        assert float((a - b).abs().max()) <= 1e-12
    assert float((up_c.xs[-1] - X0).abs().max()) > 1e-2  # x moved: the comparison is not of constants


def test_coupled_unrolled_equals_an_independent_loop():
    up, low = run(CoupledLower)
    us, xs = reference()
    for a, b in zip(low.us, us):
        assert rel_err(a, b) < 1e-12
    for a, b in zip(up.xs, xs):
        assert rel_err(a, b) < 1e-12


def test_aggregation_leaves_the_upper_state_alone():
    """Each lower step (K evaluations of the upper's training_step) changes nothing of the upper: optimizer
    state, x, x.grad, its buffers, its counter and batch; it draws at most the batch of the upper's coming
    step, which the upper then trains on — the upper sees the loader's batches in order, none skipped."""
    up, low = run(CoupledLower)
    assert low.state_diffs == [[] for _ in range(ITERS)]
    assert len(up.seen) == ITERS and all(torch.equal(a, b) for a, b in zip(up.seen, DATA))
    assert up.loader.drawn == ITERS
    assert int(up.module.calls) == ITERS  # only the upper's own steps count (K·ITERS evaluations undone)


def test_without_alpha_there_is_no_aggregation():
    cfg = hb.HODLConfig(type="gkm_unrolled", tol=0.0, max_steps=K)
    up, low = run(CoupledLower, config=cfg)
    u = torch.zeros(N, dtype=DT)
    for _ in range(K):
        u = T(u, X0, DATA[0])  # plain KM from 0 with x0, batch 0
    assert rel_err(low.us[0], u) < 1e-12


def test_coupled_aggregation_selects_the_upper_optimal_fixed_point():
    """Fix T = {Au = b}; F(u) = ½||u - z||² in the upper's training_step selects proj(z) (closed form)."""
    A, b, s, z0, proj = nonsingleton()
    n = A.shape[1]

    class Low(hb.GKMProblem):
        def operator(self, u, batch):
            return u - s * A.T @ (A @ u - b) + 0 * self.upper.module.x.sum()

        def initial_state(self, batch):
            return torch.zeros(n, dtype=DT)

    class Up(ImplicitProblem):
        def get_batch(self):
            return None

        def training_step(self, batch):
            return 0.5 * ((self.lower.u - self.module.x) ** 2).sum()

    xm = torch.nn.Module()
    xm.x = torch.nn.Parameter(z0.clone())
    up = Up("upper", hb.HODLConfig(type="darts", retain_graph=True), module=xm,
            optimizer=torch.optim.SGD(xm.parameters(), lr=0.0))
    low = Low("lower", hb.HODLConfig(type="gkm_unrolled", max_steps=4000, tol=0.0, alpha=hp.Harmonic(1.0)))
    Engine([up, low], EngineConfig(train_iters=1, strategy="cpu"),
           dependencies={"u2l": {up: [low]}, "l2u": {low: [up]}}).run()
    assert rel_err(low.u.detach(), proj(z0)) < 2e-3
    assert rel_err(proj(torch.zeros(n, dtype=DT)), proj(z0)) > 0.1  # plain KM would not get there


# ---------------------------------------------------------------------------------------------- several uppers
class Other(ImplicitProblem):
    def get_batch(self):
        return None

    def training_step(self, batch):
        return 0.5 * ((self.lower.u - 2.0 * Y) ** 2).sum() + 0.0 * self.module.w.sum()


def two_uppers(lower_cls, cfg):
    up = make_upper()
    wm = torch.nn.Module()
    wm.w = torch.nn.Parameter(torch.zeros(1, dtype=DT))
    other = Other("other", hb.HODLConfig(type="darts"), module=wm, optimizer=torch.optim.SGD(wm.parameters(), lr=0.0))
    low = lower_cls("lower", cfg, train_data_loader=[(c,) for c in DATA])
    low.us, low.state_diffs = [], []
    return Engine([up, other, low], EngineConfig(train_iters=ITERS, strategy="cpu"),
                  dependencies={"u2l": {up: [low]}, "l2u": {low: [up, other]}}), up, low


def test_several_uppers_need_a_name():
    cfg = hb.HODLConfig(type="gkm_unrolled", alpha=ALPHA, upper_step=STEP, tol=0.0, max_steps=K)
    with pytest.raises(hp.HODLError, match=r"several upper nodes \['upper', 'other'\].*aggregate_upper"):
        two_uppers(CoupledLower, cfg)
    with pytest.raises(hp.HODLError, match=r"aggregate_upper='uper'\) is not one of its upper nodes"):
        two_uppers(CoupledLower, hb.HODLConfig(type="gkm_unrolled", alpha=ALPHA, aggregate_upper="uper"))
    with pytest.raises(TypeError, match="aggregate_upper"):
        hb.HODLConfig(aggregate_upper=3)


def test_the_named_upper_is_aggregated():
    """With aggregate_upper='upper' the iterates are those of one upper with F hand-written (1e-12)."""
    cfg = hb.HODLConfig(type="gkm_unrolled", alpha=ALPHA, upper_step=STEP, tol=0.0, max_steps=K,
                        aggregate_upper="upper")
    eng, up, low = two_uppers(CoupledLower, cfg)
    eng.run()
    us, xs = reference()
    for a, b in zip(low.us, us):
        assert rel_err(a, b) < 1e-12


# ---------------------------------------------------------------------------------------------- named errors
def test_an_upper_that_does_not_read_u_is_refused():
    class ReadsModule(Upper):  # the parameter behind .u, not the property
        def training_step(self, batch):
            u = self.lower.module.u
            return F(u if u.numel() else torch.zeros(N, dtype=DT), self.module.x, batch[0])

    class ReadsDetached(Upper):
        def training_step(self, batch):
            return F(self.lower.u.detach(), self.module.x, batch[0])

    with pytest.raises(hp.HODLError, match=r"does not read self.lower.u .*upper_objective"):
        run(CoupledLower, upper_cls=ReadsModule)
    with pytest.raises(hp.HODLError, match=r"does not depend on self.lower.u .*upper_objective"):
        run(CoupledLower, upper_cls=ReadsDetached)


def test_an_upper_that_solves_inside_its_objective_is_refused():
    class Solves(Upper):
        def training_step(self, batch):
            return F(self.lower((DATA[-1],)), self.module.x, batch[0])

    with pytest.raises(hp.HODLError, match=r"calls a fresh solve .* would recurse"):
        run(CoupledLower, upper_cls=Solves)


def test_the_hook_still_wins():
    """An upper_objective on the node is F even when the upper's training_step is another function."""
    class Different(Upper):
        def training_step(self, batch):
            self.module.calls += 1
            return F(self.lower.u, self.module.x, batch[0]) + 0.5 * (self.lower.u ** 2).sum()

    _, low_h = run(HandLower, upper_cls=Different)
    _, low_c = run(CoupledLower, upper_cls=Different)
    u = torch.zeros(N, dtype=DT)
    for k in range(K):  # the first solve with F = the hook's, x = x0, batch 0
        u = T(u - 0.5 / (k + 1) * STEP * (u - Y - DATA[0] - E @ X0), X0, DATA[0])
    assert rel_err(low_h.us[0], u) < 1e-12
    assert rel_err(low_c.us[0], u) > 1e-3  # the coupled one aggregates the other objective


def test_the_docs_example_selects_the_solution_closest_to_y():
    """tests/compat/betty_coupled_example.py (docs/betty.rst): {u1 + u2 = 2} closest to y = (3, 0) is (2.5, -0.5);
    plain KM from 0 gives the minimum-norm (1, 1)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parents[1] / "compat" / "betty_coupled_example.py"
    spec = importlib.util.spec_from_file_location("betty_coupled_example", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert float((mod.main() - torch.tensor([2.5, -0.5], dtype=DT)).abs().max()) < 5e-3
    assert torch.allclose(mod.main(alpha=None), torch.tensor([1.0, 1.0], dtype=DT), atol=1e-12)


def test_aggregation_leaves_the_global_rng_alone():
    """An upper whose training_step draws random numbers (dropout, noise): the K evaluations of F per solve
    draw the numbers of the upper's coming step and put the generator back, so the upper's real steps draw
    what they would without aggregation — the coupled run equals the hand-written one to 1e-12."""
    class Noisy(Upper):
        def training_step(self, batch):
            noise = 1e-2 * torch.randn((), dtype=DT)
            return F(self.lower.u, self.module.x, batch[0]) * (1 + noise)

    class NoisyHand(CoupledLower):
        def upper_objective(self, u, batch):  # F with the noise the upper's coming step will draw
            state = torch.get_rng_state()
            noise = 1e-2 * torch.randn((), dtype=DT)
            torch.set_rng_state(state)
            return F(u, self.upper.module.x, batch[0]) * (1 + noise)

    torch.manual_seed(7)
    up_c, low_c = run(CoupledLower, upper_cls=Noisy)
    after_c = torch.randn(())
    torch.manual_seed(7)
    up_h, low_h = run(NoisyHand, upper_cls=Noisy)
    after_h = torch.randn(())
    for a, b in zip(low_c.us + up_c.xs, low_h.us + up_h.xs):
        assert float((a - b).abs().max()) <= 1e-12
    assert torch.equal(after_c, after_h)


def test_a_checkpoint_of_a_coupled_graph_resumes_bit_for_bit(tmp_path):
    """Run 2 of 4 steps, save, load into a fresh engine, run the rest: the upper's batches (drawn ahead by
    the aggregation and handed over) and the iterates equal the uninterrupted run's."""
    straight, up0, low0 = build(CoupledLower)
    straight.run()
    first, _, _ = build(CoupledLower)
    first.train_iters = 2
    first.run()
    path = tmp_path / "coupled.pt"
    hb.save_checkpoint(first, path)
    resumed, up1, low1 = build(CoupledLower)
    hb.load_checkpoint(resumed, path)
    resumed.run()
    assert torch.equal(up1.module.x, up0.module.x)
    assert [torch.equal(a, b) for a, b in zip(up1.seen, DATA[2:])] == [True, True]
    assert len(low1.us) == 2 and all(torch.equal(a, b) for a, b in zip(low1.us, low0.us[2:]))


def test_a_fresh_solve_aggregates_on_the_uppers_current_batch():
    """After training, ``low.solve()`` (outside the node's own step) aggregates F on the upper's last batch,
    as the hand-written hook does on the node's last batch (the same index); before any step: named error."""
    _, low_c = run(CoupledLower)
    _, low_h = run(HandLower)
    a, b = low_c.solve().detach(), low_h.solve().detach()
    assert float((a - b).abs().max()) <= 1e-12
    _, _, fresh = build(CoupledLower)
    with pytest.raises(hp.HODLError, match=r"has none yet .*run the Engine first"):
        fresh.solve((DATA[0],))


# ---------------------------------------------------------------------------------------------- two GKM children
def current(node):
    """A child's solution, zeros before its first solve (u is empty until then)."""
    u = node.u
    return u if u.numel() else torch.zeros(N, dtype=DT)


class TwoChildrenUpper(Upper):
    def training_step(self, batch):  # reads both children: each one's F sees the other's current solution
        self.module.calls += 1
        return F(current(self.l1) + current(self.l2), self.module.x, batch[0])


def two_children(hand):
    class L(CoupledLower):
        def operator(self, u, batch):
            return T(u, self.upper.module.x, batch[0])

    class L1(L):
        def upper_objective(self, u, batch):
            return F(u + current(self.l2), self.upper.module.x, batch[0])

    class L2(L):
        def upper_objective(self, u, batch):
            return F(current(self.l1) + u, self.upper.module.x, batch[0])

    xm = torch.nn.Module()
    xm.x = torch.nn.Parameter(X0.clone())
    xm.register_buffer("calls", torch.zeros((), dtype=torch.long))
    loader = Loader()
    up = TwoChildrenUpper("upper", hb.HODLConfig(type="darts", retain_graph=True), module=xm,
                          optimizer=torch.optim.Adam(xm.parameters(), lr=LR), train_data_loader=loader)
    up.loader, up.seen, up.xs = loader, [], []
    cfg = hb.HODLConfig(type="gkm_unrolled", alpha=ALPHA, upper_step=STEP, tol=0.0, max_steps=K)
    lows = [(L1 if hand else L)("l1", cfg, train_data_loader=[(c,) for c in DATA]),
            (L2 if hand else L)("l2", cfg, train_data_loader=[(c,) for c in DATA])]
    for low in lows:
        low.us, low.state_diffs = [], []
    Engine([up, *lows], EngineConfig(train_iters=ITERS, strategy="cpu"),
           dependencies={"u2l": {up: lows}, "l2u": {lows[0]: [up], lows[1]: [up]}}).run()
    return up, lows


def test_two_coupled_children_share_the_uppers_batch():
    """Two GKM children of one upper, both coupled: one batch drawn ahead per upper step (shared), the
    iterates of both children and x equal the hand-written spelling's to 1e-12."""
    up_c, lows_c = two_children(hand=False)
    up_h, lows_h = two_children(hand=True)
    for a, b in zip(up_c.xs + lows_c[0].us + lows_c[1].us, up_h.xs + lows_h[0].us + lows_h[1].us):
        assert float((a - b).abs().max()) <= 1e-12
    assert len(up_c.xs) == ITERS and float((up_c.xs[-1] - X0).abs().max()) > 1e-2
    assert up_c.loader.drawn == ITERS and all(torch.equal(a, b) for a, b in zip(up_c.seen, DATA))
    assert lows_c[0].state_diffs == lows_c[1].state_diffs == [[] for _ in range(ITERS)]


def test_outside_aggregation_in_a_betty_node_equals_an_independent_loop():
    """HODLConfig(aggregation="outside"): u+ = (1-α)T(u) + α(u - s∇F(u)), written by hand (BOAT's GDA form)."""
    cfg = hb.HODLConfig(type="gkm_unrolled", alpha=ALPHA, upper_step=STEP, tol=0.0, max_steps=K,
                        aggregation="outside")
    up, low = run(CoupledLower, config=cfg)
    x = torch.nn.Parameter(X0.clone())
    opt = torch.optim.Adam([x], lr=LR)
    u_prev = torch.zeros(N, dtype=DT)
    for t in range(ITERS):
        c, u = DATA[t], u_prev
        for k in range(K):
            a = 0.5 / (k + 1)
            u = (1 - a) * T(u, x, c) + a * (u - STEP * (u - Y - c - E @ x))
        opt.zero_grad()
        F(u, x, c).backward()
        opt.step()
        u_prev = u.detach()
        assert rel_err(low.us[t], u_prev) < 1e-12
        assert rel_err(up.xs[t], x.detach()) < 1e-12
    with pytest.raises(ValueError, match="aggregation"):
        hb.HODLConfig(aggregation="outsid")
