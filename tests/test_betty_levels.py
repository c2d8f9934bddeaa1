"""Second order through a GKM node: a three-level Betty graph with ``gkm_implicit`` on the node the middle
level differentiates through, and a Hessian-vector product of an upper objective — closed forms.

top:  θ, w = e^θ;  f_top(θ) = ½||G x*(w) - y_val||²
mid:  x*(w) = argmin_x ½||u*(x) - y||² + (w/2)||x||² = (GᵀG + wI)⁻¹Gᵀy
low:  u*(x) = Q⁻¹Bx = Gx, the fixed point of T(u; x) = u - s(Qu - Bx)   (the GKM node)

dx*/dθ = -w (GᵀG + wI)⁻¹ x*,  df_top/dθ = (G dx*/dθ)ᵀ(G x* - y_val).
"""

from __future__ import annotations

import pytest
import torch

from conftest import DT, rel_err

pytest.importorskip("betty")
from betty.configs import EngineConfig  # noqa: E402
from betty.engine import Engine  # noqa: E402
from betty.problems import ImplicitProblem  # noqa: E402

import hodl_plugin.betty as hb  # noqa: E402

hb.set_log_level("WARNING")

g = torch.Generator().manual_seed(7)
n, m = 6, 3
R = torch.randn(n, n, generator=g, dtype=DT)
Q = 0.2 * R @ R.T / n + torch.eye(n, dtype=DT)  # well conditioned: each cold solve is ~40 GKM steps
L = float(torch.linalg.eigvalsh(Q).max())
B = torch.randn(n, m, generator=g, dtype=DT)
G = torch.linalg.solve(Q, B)
x_true = torch.randn(m, generator=g, dtype=DT)
y = G @ x_true + 0.5 * torch.randn(n, generator=g, dtype=DT)
y_val = G @ x_true + 0.5 * torch.randn(n, generator=g, dtype=DT)
I_m = torch.eye(m, dtype=DT)


def x_of(w):
    return torch.linalg.solve(G.T @ G + w * I_m, G.T @ y)


def dtop_dtheta(th):
    w = float(torch.tensor(th, dtype=DT).exp())
    x = x_of(w)
    dx = -w * torch.linalg.solve(G.T @ G + w * I_m, x)
    return float((G @ dx) @ (G @ x - y_val))


class Low(hb.GKMProblem):
    def operator(self, u, batch):
        return u - (1 / L) * (Q @ u - B @ self.mid.module.x)

    def initial_state(self, batch):
        return torch.zeros(n, dtype=DT)


class Mid(ImplicitProblem):
    def get_batch(self):
        return None

    def training_step(self, batch):  # differentiates through the GKM solve: low.solve(), second order
        x = self.module.x
        return 0.5 * ((self.low.solve() - y) ** 2).sum() + 0.5 * self.top.module.th.exp() * (x**2).sum()


class Top(ImplicitProblem):
    def get_batch(self):
        return None

    def training_step(self, batch):
        return 0.5 * ((self.low.solve() - y_val) ** 2).sum()

    def grad_callback(self):
        self.grads.append(float(self.module.th.grad))


def graph(kind, x0, th0, iters, unroll, mid_lr=None, top_lr=0.0):
    xm = torch.nn.Module()
    xm.x = torch.nn.Parameter(x0.clone())
    tm = torch.nn.Module()
    tm.th = torch.nn.Parameter(torch.tensor([th0], dtype=DT))
    opts = {"eps": 1e-13} if kind == "gkm_inexact" else {"tol": 1e-13}  # the inexact forward stops at eps
    # unrolled: the derivative of the K steps actually run, so cold starts (a warm start would leave few)
    low = Low("low", hb.HODLConfig(type=kind, max_steps=2000, warm_start=kind != "gkm_unrolled", **opts))
    h_mid = float(torch.linalg.eigvalsh(G.T @ G).max()) + float(torch.tensor(th0).exp())
    mid = Mid("mid", hb.HODLConfig(type="implicit_cg", unroll_steps=unroll, adjoint_rtol=1e-12),
              module=xm, optimizer=torch.optim.SGD(xm.parameters(), lr=mid_lr or 1.0 / h_mid))
    top = Top("top", hb.HODLConfig(type="darts"), module=tm, optimizer=torch.optim.Adam(tm.parameters(), lr=top_lr))
    top.grads = []
    eng = Engine([top, mid, low], EngineConfig(train_iters=iters, strategy="cpu"),
                 dependencies={"u2l": {mid: [low], top: [mid]}, "l2u": {low: [mid], mid: [top]}})
    eng.run()
    return top, xm, tm, low


@pytest.mark.parametrize("kind", ["gkm_implicit", "gkm_inexact", "gkm_unrolled"])
def test_top_hypergradient_at_a_fixed_point_of_the_graph(kind):
    """x = x*(w) exactly: one global step; the top's hypergradient (Betty's path top <- mid <- GKM node, with
    second derivatives through the GKM solve) equals the closed form to 1e-8."""
    th0 = -0.3
    top, xm, _, _ = graph(kind, x_of(float(torch.tensor(th0).exp())), th0, iters=1, unroll=1)
    assert len(top.grads) == 1
    assert abs(top.grads[0] - dtop_dtheta(th0)) < 1e-8 * abs(dtop_dtheta(th0))
    assert abs(dtop_dtheta(th0)) > 1e-2  # not a trivial zero


@pytest.mark.slow
def test_three_level_graph_reaches_closed_form_optimum():
    """Trained from x = 0, θ = 0 (mid: 10 SGD steps per top step): θ reaches the closed-form θ*."""
    import scipy.optimize

    def f_top(th):
        return float(0.5 * ((G @ x_of(float(torch.tensor(th).exp())) - y_val) ** 2).sum())

    th_star = scipy.optimize.minimize_scalar(f_top, bounds=(-6, 4), method="bounded", options={"xatol": 1e-10}).x
    top, xm, tm, _ = graph("gkm_implicit", torch.zeros(m, dtype=DT), 0.0, iters=10 * 150, unroll=10, top_lr=0.05)
    th = float(tm.th.detach())
    assert abs(th - th_star) < 1e-2
    assert rel_err(xm.x.detach(), x_of(float(torch.tensor(th).exp()))) < 1e-3
    assert abs(top.grads[-1]) < 0.05 * abs(top.grads[0])


@pytest.mark.parametrize("kind", ["gkm_implicit", "gkm_inexact", "gkm_unrolled"])
def test_hessian_vector_product_through_the_gkm_node(kind):
    """For a Newton-type upper optimizer: f(x) = ½||u*(x) - y||², ∇²f = GᵀG; Hv by double backward through
    ``low.solve()`` equals GᵀG v."""
    _, xm, _, node = graph(kind, torch.zeros(m, dtype=DT), 0.0, iters=1, unroll=1)
    x = xm.x
    v = torch.tensor([0.3, -1.0, 2.0], dtype=DT)
    f = 0.5 * ((node.solve() - y) ** 2).sum()
    (gx,) = torch.autograd.grad(f, x, create_graph=True)
    (hv,) = torch.autograd.grad(gx, x, v)
    assert rel_err(gx.detach(), G.T @ (G @ x.detach() - y)) < 1e-8
    assert rel_err(hv, G.T @ G @ v) < 1e-8
