r"""
Quick start: a differentiable fixed point
=========================================

A lower-level problem whose solution is a fixed point :math:`u^*(x) = T(u^*(x); x)`, an upper
objective :math:`F(u^*(x))`, and the gradient :math:`\mathrm{d}F/\mathrm{d}x` — here for the
quadratic lower level :math:`T(u; x) = u - s(Au - x)`, whose fixed point is :math:`u^* = A^{-1}x`,
so that the exact hypergradient :math:`A^{-1}(u^* - y)` is known in closed form.
"""

import matplotlib.pyplot as plt
import torch

import hodl_plugin as hp

torch.manual_seed(0)
n, dt = 50, torch.float64
A = torch.randn(n, n, dtype=dt)
A = A @ A.T / n + torch.eye(n, dtype=dt)  # symmetric positive definite
y = torch.randn(n, dtype=dt)
s = 1 / torch.linalg.eigvalsh(A).max().item()  # step 1/L: T is nonexpansive

T = hp.GradientStep(grad=lambda u, x: A @ u - x, step=s)  # T(u; x) = u - s(Au - x)
F = lambda u: 0.5 * ((u - y) ** 2).sum()  # upper objective

solver = hp.GKMSolver(T, max_steps=5000, tol=1e-12, hypergrad="implicit")
x = torch.randn(n, dtype=dt, requires_grad=True)
u = solver(torch.zeros(n, dtype=dt), x)  # the forward runs without autograd
F(
    u
).backward()  # one adjoint linear solve (CG: the Jacobian of a gradient step is symmetric)

exact = torch.linalg.solve(A, torch.linalg.solve(A, x.detach()) - y)
print(
    "steps:",
    solver.info.steps,
    "converged:",
    solver.info.converged,
    "adjoint:",
    solver.info.adjoint.method,
)
print(
    f"relative error of x.grad: {((x.grad - exact).norm() / exact.norm()).item():.1e}"
)

# %%
# Other ways to differentiate
# ---------------------------
# ``hypergrad=`` picks how the gradient is taken; nothing else changes. ``"unrolled"`` back-propagates
# through every step (memory grows with the steps), ``hp.Truncated(k)`` through the last ``k``,
# ``"first_order"`` drops the Jacobian of :math:`T` (cheap, biased), and ``hp.Anderson`` accelerates
# the forward of the implicit mode.

methods = {
    "implicit": dict(hypergrad="implicit"),
    "implicit + Anderson(5)": dict(
        hypergrad="implicit", acceleration=hp.Anderson(history_size=5)
    ),
    "unrolled": dict(hypergrad="unrolled"),
    "truncated(20)": dict(hypergrad=hp.Truncated(20)),
    "first_order": dict(hypergrad="first_order"),
}
histories = {}
for name, options in methods.items():
    x = x.detach().clone().requires_grad_(True)
    solver = hp.GKMSolver(T, max_steps=5000, tol=1e-12, **options)
    F(solver(torch.zeros(n, dtype=dt), x)).backward()
    err = ((x.grad - exact).norm() / exact.norm()).item()
    histories[name] = (solver.info.residual_steps, solver.info.residuals)
    print(f"{name:24s} steps {solver.info.steps:5d}   relative error {err:.1e}")

# %%
# The forward's residual :math:`\|T(u_k) - u_k\|` along the iterations, plain and with Anderson
# acceleration (the implicit and unrolled forwards are the same iteration):

fig, ax = plt.subplots(figsize=(6.4, 3.6), layout="constrained")
for name in ("implicit", "implicit + Anderson(5)"):
    k, r = histories[name]
    ax.semilogy(k, r, label=name)
ax.set_xlabel("GKM step k")
ax.set_ylabel("residual ‖T(u) − u‖")
ax.set_title("Forward solve of the quadratic lower level (n = 50)")
ax.grid(alpha=0.3)
ax.legend()
# sphinx_gallery_alt = "Residual of the forward solve against the GKM step, log scale: the plain iteration falls"
# sphinx_gallery_alt = "linearly to 1e-12 in 110 steps, the Anderson-accelerated one in 40."
plt.show()
