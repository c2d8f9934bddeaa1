r"""ALTO: alternating gradient steps, the baseline that ignores how :math:`y^*` depends on x.

.. math::

    y_{k+1} = y_k - \xi_y\nabla_y f(x_k, y_k)\ \ (\text{``lower_steps`` times}),\qquad
    x_{k+1} = x_k - \xi_x\nabla_x F(x_k, y_{k+1}).

Its x-direction is the partial gradient :math:`\nabla_x F`, the hypergradient without its
implicit term :math:`-\nabla^2_{xy} f\,[\nabla^2_{yy} f]^{-1}\nabla_y F`: right only when F reads x
directly and y only weakly (and useless when F reads x through y alone, as in hyper-cleaning, where
:math:`\nabla_x F = 0`). It is what BOAT calls ``ALTO`` and what ``hypergrad="first_order"`` gives
the GKM solver.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from ._vars import Variable, check_finite, grads
from .base import FirstOrderMethod, StepInfo, count

__all__ = ["ALTO"]


class ALTO(FirstOrderMethod):
    r"""Alternating descent: ``lower_steps`` steps of y on f, then one step of x on F at the new y.

    Cost per step: ``lower_steps`` + 1 gradient evaluations; no extra memory.

    Args:
        x, y, upper, lower, x_lr, y_lr, x_optimizer, y_optimizer: see
            :class:`~hodl_plugin.baselines.base.FirstOrderMethod`.
        lower_steps: gradient steps of y on :math:`f(x_k, \cdot)` per step (an integer >= 1).

    Raises:
        ConfigurationError: both or neither of ``x_lr`` / ``x_optimizer`` (likewise for y), an
            optimizer over other tensors than the variable's, or x and y sharing a tensor.
        TypeError: an objective that is not callable, or an optimizer that is not a ``torch.optim.Optimizer``.
        ValueError: an option out of range (named in the message).
        DivergenceError: (at a :meth:`step`) a non-finite direction or iterate.

    >>> import torch, hodl_plugin as hp
    >>> x = torch.zeros(1, requires_grad=True); y = torch.zeros(1, requires_grad=True)
    >>> alto = hp.ALTO(x, y, upper=lambda x, y: ((x - 1) ** 2).sum() + (y ** 2).sum(),
    ...                lower=lambda x, y: 0.5 * ((y - x) ** 2).sum(), x_lr=0.1, y_lr=0.5)
    >>> for _ in range(200):
    ...     info = alto.step()
    >>> round(x.item(), 4)                 # ∇_x F = 0 at x = 1; the bilevel optimum is x* = 1/2
    1.0
    """

    name = "ALTO"

    def __init__(self, x: Variable, y: Variable, upper: Callable[..., Tensor], lower: Callable[..., Tensor], *,
                 lower_steps: int = 1, x_lr: Optional[float] = None, y_lr: Optional[float] = None,
                 x_optimizer: Optional[torch.optim.Optimizer] = None,
                 y_optimizer: Optional[torch.optim.Optimizer] = None) -> None:
        super().__init__(x, y, upper, lower, x_lr=x_lr, y_lr=y_lr, x_optimizer=x_optimizer, y_optimizer=y_optimizer)
        self.lower_steps = count(lower_steps, "lower_steps")

    def _step(self, args: tuple, kwargs: dict) -> StepInfo:
        x, y = self.x, self.y
        f0 = None
        for _ in range(self.lower_steps):
            f = self.f(x, y, args, kwargs)
            f0 = f if f0 is None else f0
            g = grads(f, y.params)
            check_finite(self.name, self.k, lower_gradient=g)
            self._move_y.move(g)
        F = self.F(x, y, args, kwargs)
        g = grads(F, x.params)
        check_finite(self.name, self.k, upper_gradient=g)
        self._move_x.move(g)
        return StepInfo(self.k, float(F.detach()), float(f0.detach()))

    def __repr__(self) -> str:
        return f"ALTO(lower_steps={self.lower_steps})"
