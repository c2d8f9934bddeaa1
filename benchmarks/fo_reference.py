r"""Independent references of the first-order methods: their equations with hand-written gradients.

Each function iterates one method as its paper writes it, with the problem's analytic gradients
``P.gF(x, y)``, ``P.gf(x, y)`` and values ``P.lower(x, y)`` (no autograd, no hodl_plugin, no BOAT), and
returns the final ``(x, y)``. :mod:`benchmarks.baselines` and the tests compare hodl_plugin's classes
with them; the closed-form bilevel solution (``P.x_star``) is the other reference.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

Tensor = torch.Tensor


def _descent(P: Any, x: Tensor, y: Tensor, steps: int, lr: float, momentum: float = 0.0) -> Tensor:
    buf = None
    for _ in range(steps):
        g = P.gf(x, y)[1]
        if momentum:
            buf = g if buf is None else momentum * buf + g
            g = buf
        y = y - lr * g
    return y


def bome(P: Any, iters: int, *, inner_steps: int, inner_lr: float, eta: float, x_lr: float, y_lr: float,
         barrier: str = "gradient", inner_momentum: float = 0.0) -> tuple[Tensor, Tensor]:
    r""":math:`d = \nabla F + \lambda\nabla\hat q`,
    :math:`\lambda = \max(\phi - \langle\nabla F,\nabla\hat q\rangle, 0)/\|\nabla\hat q\|^2`."""
    x, y = P.x0.clone(), P.y0.clone()
    for _ in range(iters):
        yh = _descent(P, x, y, inner_steps, inner_lr, inner_momentum)
        Fx, Fy = P.gF(x, y)
        fx, fy = P.gf(x, y)
        qx, qy = fx - P.gf(x, yh)[0], fy
        q = P.lower(x, y) - P.lower(x, yh)
        n2 = (qx * qx).sum() + (qy * qy).sum()
        phi = eta * (n2 if barrier == "gradient" else q)
        lam = torch.clamp(phi - (Fx * qx).sum() - (Fy * qy).sum(), min=0) / n2 if n2 > 0 else 0.0
        x, y = x - x_lr * (Fx + lam * qx), y - y_lr * (Fy + lam * qy)
    return x, y


def pgdo(P: Any, iters: int, *, gamma: float, inner_steps: int, inner_lr: float, x_lr: float, y_lr: float,
         warm_start: bool = True) -> tuple[Tensor, Tensor]:
    r""":math:`d = \nabla F + \gamma(\nabla f(x, y) - (\nabla_x f(x, \hat y), 0))`."""
    x, y = P.x0.clone(), P.y0.clone()
    yh = y.clone()
    for _ in range(iters):
        yh = _descent(P, x, yh if warm_start else y, inner_steps, inner_lr)
        Fx, Fy = P.gF(x, y)
        fx, fy = P.gf(x, y)
        x, y = x - x_lr * (Fx + gamma * (fx - P.gf(x, yh)[0])), y - y_lr * (Fy + gamma * fy)
    return x, y


def meso(P: Any, iters: int, *, gamma: float, eta: float, c0: float, p: float, x_lr: float,
         y_lr: float) -> tuple[Tensor, Tensor]:
    r"""θ step on :math:`f + \|\theta - y\|^2/2\gamma`, then x, then y at the new x, :math:`c_k = c_0(k+1)^p`."""
    x, y = P.x0.clone(), P.y0.clone()
    th = y.clone()
    for k in range(iters):
        c = c0 * (k + 1) ** p
        th = th - eta * (P.gf(x, th)[1] + (th - y) / gamma)
        x = x - x_lr * (P.gF(x, y)[0] / c + P.gf(x, y)[0] - P.gf(x, th)[0])
        y = y - y_lr * (P.gF(x, y)[1] / c + P.gf(x, y)[1] - (y - th) / gamma)
    return x, y


def alto(P: Any, iters: int, *, x_lr: float, y_lr: float, lower_steps: int = 1) -> tuple[Tensor, Tensor]:
    r""":math:`y \leftarrow y - \xi_y\nabla_y f` (``lower_steps`` times), then
    :math:`x \leftarrow x - \xi_x\nabla_x F`."""
    x, y = P.x0.clone(), P.y0.clone()
    for _ in range(iters):
        y = _descent(P, x, y, lower_steps, y_lr)
        x = x - x_lr * P.gF(x, y)[0]
    return x, y


REFERENCES: dict[str, Callable[..., tuple[Tensor, Tensor]]] = {"BOME": bome, "PGDO": pgdo, "MESO": meso,
                                                                 "ALTO": alto}
