r"""BOAT 1.1.1's ``VFO`` and ``MESO`` steps written as equations, with hodl_plugin's BOME direction.

Where BOAT's first-order operations differ from the papers' algorithms, these functions rebuild BOAT's
step from the paper's pieces plus each difference, named; the tests and ``benchmarks.baselines`` check
that they reproduce BOAT's iterates to rounding (run with float64 as torch's default dtype, see
below), which proves the list of differences complete. ``PGDO`` and ``ALTO`` need no rebuilding: they
coincide with :class:`hodl_plugin.PGDO` / :class:`hodl_plugin.ALTO` (PGDO with the step scaled by
BOAT's :math:`\min(1/(\gamma + 10^{-8}), 1)`).

BOAT's ``VFO`` step k (BOME in the paper) differs from :class:`hodl_plugin.BOME` in five ways:

1. y is first advanced by T lower steps of its optimizer (:math:`y' = y_k - \xi_y\sum\nabla_y f`), and
   the BOME direction is taken at :math:`(x_k, y')`;
2. :math:`\hat y` runs T heavy-ball steps (momentum 0.5) from :math:`y_k`, not from :math:`y'`;
3. the barrier is :math:`\phi = u_1\hat q` (the "value" choice) and :math:`10^{-8}` is added to
   :math:`\|\nabla\hat q\|^2`;
4. the gradient of the last advance step stays in ``y.grad`` and is added to the BOME direction of y
   (``update_tensor_grads`` accumulates into a ``.grad`` nobody cleared);
5. the direction is assembled in buffers made by ``torch.zeros(n)``, i.e. in torch's default dtype
   (float32), whatever the models' dtype: float64 problems get float32-rounded steps.

BOAT's ``MESO`` step k (MEHA in the paper) differs from :class:`hodl_plugin.MESO` in three ways:

1. y moves first (at :math:`x_k`) and x's gradient is taken at the new :math:`y_{k+1}`; the paper's
   order is x first, then y at :math:`x_{k+1}`;
2. :math:`c_0 = 0.2` whatever ``c0`` says (``if current_iter == 0: ck = 0.2``);
3. the proximal term of y's direction is scaled by :math:`1 - \eta\gamma_1` (:math:`\gamma_1 = 1/\gamma`):
   BOAT differentiates :math:`\|y - \theta_{k+1}\|^2` through :math:`\theta_{k+1}`, which it built from
   :math:`y` without detaching it.
"""

from __future__ import annotations

from typing import Any

import torch

from hodl_plugin.baselines import bome_direction

Tensor = torch.Tensor


def _g(fn: Any, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    xv, yv = x.detach().clone().requires_grad_(), y.detach().clone().requires_grad_()
    gx, gy = torch.autograd.grad(fn(xv, yv), [xv, yv], allow_unused=True)
    return (torch.zeros_like(x) if gx is None else gx), gy


def vfo(P: Any, iters: int, *, T: int, y_hat_lr: float, u1: float, x_lr: float, y_lr: float,
        advance: bool = True, heavy_ball: bool = True, value_barrier: bool = True, stale_gradient: bool = True
        ) -> tuple[Tensor, Tensor]:
    """BOAT's ``VFO`` iterates: BOME's direction (:func:`hodl_plugin.baselines.bome_direction`) with
    differences 1-4 (BOAT matches them when float64 is torch's default dtype, which removes 5). With every
    flag False it is the paper's BOME, η = u1 (:class:`hodl_plugin.BOME`)."""
    x, y = P.x0.clone(), P.y0.clone()
    for _ in range(iters):
        yk, g_last = y.clone(), None
        for _ in range(T if advance else 0):  # 1. advance y by its own optimizer
            g_last = _g(P.lower, x, y)[1]
            y = y - y_lr * g_last
        yh, buf = yk.clone(), None
        for _ in range(T):  # 2. heavy ball from y_k
            gh = _g(P.lower, x, yh)[1]
            buf = gh if buf is None or not heavy_ball else 0.5 * buf + gh
            yh = yh - y_hat_lr * buf
        Fx, Fy = _g(P.upper, x, y)
        fx, fy = _g(P.lower, x, y)
        q = P.lower(x, y) - P.lower(x, yh)
        gq = [fx - _g(P.lower, x, yh)[0], fy]
        d, _ = bome_direction([Fx, Fy], gq, q, u1, barrier="value" if value_barrier else "gradient",
                              eps=1e-8 if value_barrier else 0.0)  # 3.
        x = x - x_lr * d[0]
        y = y - y_lr * (d[1] + (g_last if stale_gradient and g_last is not None else 0.0))  # 4. the stale gradient
    return x, y


def meso(P: Any, iters: int, *, eta: float, gamma_1: float, c0: float, x_lr: float, y_lr: float,
         y_first: bool = True, c_first: bool = True, prox_scale: bool = True) -> tuple[Tensor, Tensor]:
    """BOAT's ``MESO`` iterates: the MEHA step with differences 1-3. With every flag False it is the
    paper's step, γ = 1/gamma_1, p = 1/4 (:class:`hodl_plugin.MESO`)."""
    x, y = P.x0.clone(), P.y0.clone()
    th = y.clone()
    scale = 1 - eta * gamma_1 if prox_scale else 1.0  # 3.
    for k in range(iters):
        c = 0.2 if k == 0 and c_first else c0 * (k + 1) ** 0.25  # 2.
        th = th - eta * (_g(P.lower, x, th)[1] + gamma_1 * (th - y))

        def y_step(x: Tensor, y: Tensor) -> Tensor:
            return y - y_lr * (_g(P.upper, x, y)[1] / c + _g(P.lower, x, y)[1] - gamma_1 * scale * (y - th))

        def x_step(x: Tensor, y: Tensor) -> Tensor:
            return x - x_lr * (_g(P.upper, x, y)[0] / c + _g(P.lower, x, y)[0] - _g(P.lower, x, th)[0])

        if y_first:  # 1. y first, x's gradient at y_{k+1}
            y = y_step(x, y)
            x = x_step(x, y)
        else:
            x = x_step(x, y)
            y = y_step(x, y)
    return x, y
