r"""PGDO: penalty-based bilevel gradient descent with the value-function penalty (V-PBGD).

Shen and Chen (ICML 2023, "On penalty-based bilevel gradient descent method") penalise the
value-function gap and descend the penalised objective in both variables:

.. math::

    \min_{x, y}\ F(x, y) + \gamma\,\big(f(x, y) - v(x)\big),\qquad v(x) = \min_{y'} f(x, y'),

with :math:`v(x) \approx f(x, \hat y)`, :math:`\hat y` from T gradient steps on :math:`f(x_k, \cdot)`
(Danskin: :math:`\nabla v(x) = \nabla_x f(x, \hat y)`, no derivative of :math:`\hat y`). One step:

.. math::

    (x, y) \leftarrow (x, y) - \big(\xi_x d_x, \xi_y d_y\big),\qquad
    d = \nabla F(x_k, y_k) + \gamma_k\big(\nabla f(x_k, y_k) - (\nabla_x f(x_k, \hat y), 0)\big).

A solution with penalty γ is :math:`O(1/\gamma)`-close to the bilevel one; the penalised objective
is :math:`(L_F + \gamma L_f)`-smooth, so the steps must shrink like :math:`1/\gamma`.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Union

import torch
from torch import Tensor

from ._vars import Variable, check_finite, grads
from .base import FirstOrderMethod, StepInfo, count, inner_descent, nonnegative, positive

__all__ = ["PGDO"]


class PGDO(FirstOrderMethod):
    r"""PGDO (V-PBGD): gradient descent on :math:`F + \gamma(f - v)` in both variables.

    Cost per step: T + 2 gradient evaluations (T of :math:`f` in y, one of :math:`F + \gamma f` in
    (x, y), one of :math:`f(x, \hat y)` in x); memory: one copy of y.

    Args:
        x, y, upper, lower, x_lr, y_lr, x_optimizer, y_optimizer: see
            :class:`~hodl_plugin.baselines.base.FirstOrderMethod`.
        gamma: the penalty γ > 0, or a function ``gamma(k) -> float`` of the step index (an
            increasing schedule).
        inner_steps: T, gradient steps of :math:`\hat y` per step.
        inner_lr: their step size (≤ 1/L of :math:`f(x, \cdot)`).
        inner_momentum: heavy-ball momentum of the inner descent (0: plain).
        warm_start: continue :math:`\hat y` from its previous value (default) instead of from
            :math:`y_k`.

    Example: :math:`y^*(x) = x`, :math:`F = \|y - 1\|^2 + \|x\|^2`, :math:`x^* = 1/2`; with γ = 100 the
    penalised solution is :math:`O(1/\gamma)` away:

    >>> import torch, hodl_plugin as hp
    >>> x = torch.zeros(2, requires_grad=True); y = torch.zeros(2, requires_grad=True)
    >>> pgdo = hp.PGDO(x, y, upper=lambda x, y: ((y - 1) ** 2).sum() + (x ** 2).sum(),
    ...                lower=lambda x, y: 0.5 * ((y - x) ** 2).sum(), gamma=100.0,
    ...                x_lr=0.005, y_lr=0.005, inner_steps=20, inner_lr=0.5)
    >>> for _ in range(2000):
    ...     info = pgdo.step()
    >>> torch.allclose(x, torch.full((2,), 0.5), atol=0.02)
    True
    """

    name = "PGDO"

    def __init__(self, x: Variable, y: Variable, upper: Callable[..., Tensor], lower: Callable[..., Tensor], *,
                 gamma: Union[float, Callable[[int], float]], inner_steps: int = 10, inner_lr: float,
                 inner_momentum: float = 0.0, warm_start: bool = True,
                 x_lr: Optional[float] = None, y_lr: Optional[float] = None,
                 x_optimizer: Optional[torch.optim.Optimizer] = None,
                 y_optimizer: Optional[torch.optim.Optimizer] = None) -> None:
        super().__init__(x, y, upper, lower, x_lr=x_lr, y_lr=y_lr, x_optimizer=x_optimizer, y_optimizer=y_optimizer)
        self.gamma = gamma if callable(gamma) else positive(gamma, "gamma")
        self.inner_steps = count(inner_steps, "inner_steps", minimum=0)
        self.inner_lr = positive(inner_lr, "inner_lr")
        self.inner_momentum = nonnegative(inner_momentum, "inner_momentum")
        self.warm_start = bool(warm_start)

    def gamma_at(self, k: int) -> float:
        """γ_k (checked: a schedule that returns a non-positive or non-finite value raises)."""
        if not callable(self.gamma):
            return self.gamma
        g = self.gamma(k)
        if isinstance(g, Tensor):
            g = float(g)
        if not (isinstance(g, (int, float)) and math.isfinite(g) and g > 0):
            raise ValueError(f"PGDO: gamma({k}) must be a positive finite number, got {g!r}")
        return float(g)

    def _step(self, args: tuple, kwargs: dict) -> StepInfo:
        x, y = self.x, self.y
        gamma = self.gamma_at(self.k)
        y_hat = self.aux("y_hat", self.warm_start)
        inner_descent(self.lower, x, y_hat, self.inner_steps, self.inner_lr, self.inner_momentum, args, kwargs)
        F = self.F(x, y, args, kwargs)
        f = self.f(x, y, args, kwargs)
        d_x, d_y = self.both_grads(F + gamma * f)
        f_hat = self.f(x, y_hat, args, kwargs)
        d_x = [a - gamma * b for a, b in zip(d_x, grads(f_hat, x.params))]
        check_finite(self.name, self.k, direction=d_x + d_y)
        self._move_x.move(d_x)
        self._move_y.move(d_y)
        return StepInfo(self.k, float(F.detach()), float(f.detach()), float((f - f_hat).detach()), gamma)

    def __repr__(self) -> str:
        g = "schedule" if callable(self.gamma) else self.gamma
        return f"PGDO(gamma={g}, inner_steps={self.inner_steps}, inner_lr={self.inner_lr})"
