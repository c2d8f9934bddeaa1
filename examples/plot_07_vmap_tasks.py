r"""
torch.func: per-task hypergradients with vmap
=============================================

The implicit and inexact modes are PyTorch primitives that compose with :mod:`torch.func`:
``grad``, ``vmap``, ``jacrev``, ``jacfwd``, ``hessian`` — at any order. Under ``vmap`` a batch of
problems is one batched solve, each sample stopping at its own tolerance.

The example meta-learns the prior mean :math:`w_0` of a family of regression tasks (an implicit-MAML
set-up). Task :math:`t` fits its few support points with a ridge pull towards :math:`w_0`,

.. math::

   u_t^*(w_0) = \arg\min_u \tfrac12\|X_t u - y_t\|^2 + \tfrac\lambda2\|u - w_0\|^2,

and :math:`w_0` is trained on the tasks' query points, :math:`\min_{w_0} \sum_t \tfrac12\|X'_t
u_t^*(w_0) - y'_t\|^2`. One function computes a task's query loss; ``vmap(grad(...))`` gives every
task's hypergradient in one batched solve, checked against the closed form
:math:`\nabla_{w_0} = \lambda (X_t^\top X_t + \lambda I)^{-1} X'^\top_t(X'_t u_t^* - y'_t)`.

Here every tensor the solve depends on is passed as an argument (``solver(u0, w0, X, y, s)``); tensors
that the operator read from its closure would be differentiated the same way.
"""

import time

import matplotlib.pyplot as plt
import torch
from torch.func import grad, vmap

import hodl_plugin as hp

torch.manual_seed(0)
dt = torch.float64
d, n_support, n_query, n_tasks, lam = 10, 5, 20, 32, 0.5
w_mean = torch.randn(d, dtype=dt)  # the tasks share this mean: w_t = w_mean + 0.3 noise


def make_tasks(n):
    w = w_mean + 0.3 * torch.randn(n, d, dtype=dt)
    Xs, Xq = (
        torch.randn(n, n_support, d, dtype=dt),
        torch.randn(n, n_query, d, dtype=dt),
    )
    ys = torch.einsum("tnd,td->tn", Xs, w) + 0.1 * torch.randn(n, n_support, dtype=dt)
    yq = torch.einsum("tnd,td->tn", Xq, w) + 0.1 * torch.randn(n, n_query, dtype=dt)
    return Xs, ys, Xq, yq


def step(X):  # a step size 1/L of the task's ridge objective
    return 1 / (torch.linalg.matrix_norm(X, 2) ** 2 + lam)


# T(u; w0, X, y): a gradient step on ½‖Xu − y‖² + λ/2‖u − w0‖² (X's norm bound passed in, computed outside)
solver = hp.GKMSolver(
    lambda u, w0, X, y, s: u - s * (X.T @ (X @ u - y) + lam * (u - w0)),
    tol=1e-12,
    max_steps=5000,
)


def query_loss(w0, Xs, ys, Xq, yq, s):  # one task
    u = solver(torch.zeros(d, dtype=dt), w0, Xs, ys, s)
    return 0.5 * ((Xq @ u - yq) ** 2).sum()


Xs, ys, Xq, yq = make_tasks(n_tasks)
S = vmap(step)(Xs)
w0 = torch.zeros(d, dtype=dt)
per_task = vmap(grad(query_loss), in_dims=(None, 0, 0, 0, 0, 0))(
    w0, Xs, ys, Xq, yq, S
)  # (n_tasks, d)
print("steps per task:", solver.info.steps_per_sample.tolist())

# closed form, task by task
H = Xs.transpose(1, 2) @ Xs + lam * torch.eye(d, dtype=dt)
u_star = torch.linalg.solve(H, (Xs.transpose(1, 2) @ ys[..., None])[..., 0] + lam * w0)
r = torch.einsum("tqd,td->tq", Xq, u_star) - yq
exact = lam * torch.linalg.solve(H, torch.einsum("tqd,tq->td", Xq, r))
rel_err = ((per_task - exact).norm(dim=1) / exact.norm(dim=1)).max()
print(f"max relative error of the per-task hypergradients: {rel_err:.1e}")

# %%
# One batched solve against a Python loop over the tasks (same results):

t0 = time.perf_counter()
vmap(grad(query_loss), in_dims=(None, 0, 0, 0, 0, 0))(w0, Xs, ys, Xq, yq, S)
t_vmap = time.perf_counter() - t0
t0 = time.perf_counter()
looped = torch.stack(
    [grad(query_loss)(w0, *(a[t] for a in (Xs, ys, Xq, yq, S))) for t in range(n_tasks)]
)
t_loop = time.perf_counter() - t0
print(
    f"vmap: {t_vmap * 1e3:.0f} ms, loop over {n_tasks} tasks: {t_loop * 1e3:.0f} ms, "
    f"max difference {(looped - per_task).abs().max():.1e}"
)

# %%
# Meta-training :math:`w_0` with Adam on fresh batches of tasks; the meta-test loss on 200 unseen
# tasks falls as :math:`w_0` approaches the tasks' common mean.

test_tasks = make_tasks(200)
test_S = vmap(step)(test_tasks[0])
meta_loss = lambda w0, tasks, S: vmap(query_loss, in_dims=(None, 0, 0, 0, 0, 0))(
    w0, *tasks, S
).mean()
w0 = torch.zeros(d, dtype=dt)
opt_state = torch.optim.Adam([w0.requires_grad_()], lr=0.1)
curve = []
for it in range(41):
    tasks = make_tasks(16)
    g = grad(meta_loss)(w0.detach(), tasks, vmap(step)(tasks[0]))
    opt_state.zero_grad()
    w0.grad = g
    opt_state.step()
    if it % 5 == 0:
        with torch.no_grad():
            curve.append(
                (
                    it,
                    meta_loss(w0.detach(), test_tasks, test_S).item(),
                    (w0 - w_mean).norm().item(),
                )
            )
(_, loss0, dist0), (_, loss1, dist1) = curve[0], curve[-1]
print(f"meta-test query loss {loss0:.2f} -> {loss1:.2f};  ‖w0 − mean‖ {dist0:.2f} -> {dist1:.2f}")

fig, ax = plt.subplots(figsize=(6.4, 3.4), layout="constrained")
it, loss, dist = zip(*curve)
ax.plot(it, loss, "o-", label="meta-test query loss")
ax.plot(it, dist, "s-", label="‖w₀ − task mean‖")
ax.set_xlabel("meta-training step (16 tasks each, vmap∘grad)")
ax.set_yscale("log")
ax.legend()
ax.grid(alpha=0.3)
# sphinx_gallery_alt = "Log scale against the meta-training step: the meta-test query loss falls from 57 to 5"
# sphinx_gallery_alt = "and the distance of w0 to the tasks' mean from 3.2 to 0.3."
plt.show()
