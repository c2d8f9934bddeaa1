r"""Independent references of the hypergradient baselines (PTT, FD, IGA, a learned start): the papers'
formulas with the problems' hand-written gradients (:mod:`benchmarks.fo_problems`: ``P.gf``, ``P.gF``), no
autograd, no hodl_plugin, no BOAT.

The lower trajectory is gradient descent :math:`y_{k+1} = y_k - s\nabla_y f(x, y_k)` from ``y0`` or, with
``gda=(a0, decay)``, BOAT's ``GDA``: :math:`y_{k+1} = y_k - s[(1-\alpha_k)\nabla_y f + \alpha_k\nabla_y F]`,
:math:`\alpha_k = a_0\,\mathrm{decay}^k`.

- :func:`ptt`: :math:`k^* = \min\arg\max_{1\le k\le K} F(x, y_k)`, and the derivative of
  :math:`(x, y_0) \mapsto F(x, y_{k^*})` (:math:`k^*` held) by central differences of the trajectory, every
  coordinate (fourth order, float64, step ``h``): a check that shares nothing with back-propagation;
- :func:`darts`: DARTS's formula :math:`\nabla_x F(y_K) - s[\nabla_x f(y^+) - \nabla_x f(y^-)]/(2\epsilon)`,
  :math:`y^\pm = y_{K-1} \pm \epsilon v`, :math:`v = \nabla_y F(y_K)`, :math:`\epsilon = r/\|v\|` (``at=0``:
  the differences at :math:`y_0` instead, BOAT's ``FD``);
- :func:`iga`: :math:`\nabla_x F(y_K) - \lambda\nabla_x f(x, y_K)`,
  :math:`\lambda = \langle\nabla_y F, \nabla_y f\rangle/\|\nabla_y f\|^2` at :math:`y_K`.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

Tensor = torch.Tensor


Gda = Optional[tuple[float, float]]


def trajectory(P: Any, x: Tensor, y0: Tensor, K: int, s: float, gda: Gda = None) -> list[Tensor]:
    """``[y_0, y_1, ..., y_K]`` of gradient descent on f(x, ·) (on the GDA mixture with ``gda``)."""
    ys = [y0]
    for k in range(K):
        y = ys[-1]
        d = P.gf(x, y)[1]
        if gda is not None:
            a = gda[0] * gda[1] ** k
            d = (1 - a) * d + a * P.gF(x, y)[1]
        ys.append(y - s * d)
    return ys


def worst_step(P: Any, x: Tensor, y0: Tensor, K: int, s: float, gda: Gda = None) -> int:
    """IAPTT-GM's :math:`k^*`: the first k in 1..K with the largest F(x, y_k)."""
    values = [float(P.upper(x, y)) for y in trajectory(P, x, y0, K, s, gda)[1:]]
    return values.index(max(values)) + 1


def _central(fn: Any, v: Tensor, h: float) -> Tensor:
    r"""The gradient of the scalar ``fn`` at ``v`` by the fourth-order central difference
    :math:`[-\phi(2h) + 8\phi(h) - 8\phi(-h) + \phi(-2h)]/(12h)`, coordinate by coordinate."""
    g = torch.zeros_like(v)
    flat, gflat = v.reshape(-1), g.view(-1)
    for i in range(flat.numel()):
        e = torch.zeros_like(flat)
        e[i] = h

        def at(t: float) -> float:
            return fn((flat + t * e).view_as(v))

        gflat[i] = (-at(2) + 8 * at(1) - 8 * at(-1) + at(-2)) / (12 * h)
    return g


def ptt(P: Any, x: Tensor, y0: Tensor, K: int, s: float, h: float = 1e-3, start: bool = False,
        gda: Gda = None) -> tuple[Tensor, Optional[Tensor], int]:
    r"""``(∇_x, ∇_{y0} or None, k*)`` of :math:`F(x, y_{k^*}(x, y_0))` with :math:`k^*` held, by central
    differences (``start``: the gradient in the start too)."""
    k = worst_step(P, x, y0, K, s, gda)

    def phi(xx: Tensor, yy: Tensor) -> float:
        return float(P.upper(xx, trajectory(P, xx, yy, k, s, gda)[-1]))

    gx = _central(lambda xx: phi(xx, y0), x, h)
    gz = _central(lambda yy: phi(x, yy), y0, h) if start else None
    return gx, gz, k


def darts(P: Any, x: Tensor, y0: Tensor, K: int, s: float, r: float = 0.01, at: Optional[int] = None) -> Tensor:
    """DARTS's finite-difference hypergradient after K steps, the differences at :math:`y_{K-1}` (``at``: at
    :math:`y_{at}`)."""
    ys = trajectory(P, x, y0, K, s)
    Fx, v = P.gF(x, ys[-1])
    eps = r / float(v.norm())
    base = ys[K - 1 if at is None else at]
    hvp = (P.gf(x, base + eps * v)[0] - P.gf(x, base - eps * v)[0]) / (2 * eps)
    return Fx - s * hvp


def iga(P: Any, x: Tensor, y0: Tensor, K: int, s: float, gda: Gda = None, mixture: Optional[float] = None) -> Tensor:
    r""":math:`\nabla_x F - \lambda\nabla_x f` at :math:`y_K`; ``mixture=a``: with f replaced by
    :math:`(1-a)f + aF` in the multiplier and :math:`\nabla_x f` (what BOAT's ``GDA`` + ``IGA`` does, with
    :math:`a = a_0/\mathrm{decay}`)."""
    y = trajectory(P, x, y0, K, s, gda)[-1]
    Fx, Fy = P.gF(x, y)
    fx, fy = P.gf(x, y)
    if mixture is not None:
        fx, fy = (1 - mixture) * fx + mixture * Fx, (1 - mixture) * fy + mixture * Fy
    return Fx - (Fy * fy).sum() / (fy * fy).sum() * fx


def unrolled_start(P: Any, x: Tensor, z: Tensor, K: int, s: float, h: float = 1e-3) -> Tensor:
    """∇_z F(x, y_K(z)) (MAML, BOAT's ``IAD``: the start is the upper variable), by central differences."""
    return _central(lambda zz: float(P.upper(x, trajectory(P, x, zz, K, s)[-1])), z, h)
