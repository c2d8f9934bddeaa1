r"""MESO: the Moreau-envelope method, single loop and Hessian-free (MEHA).

Liu, Liu, Yao, Zeng and Zhang (ICML 2024, "Moreau envelope for nonconvex bi-level optimization")
replace the value function by the Moreau envelope of the lower level,

.. math::

    v_\gamma(x, y) = \min_\theta\ f(x, \theta) + \tfrac{1}{2\gamma}\|\theta - y\|^2
    \quad(\text{so } f(x, y) - v_\gamma(x, y) \ge 0,\ = 0 \text{ at lower-level solutions}),

and descend :math:`\tfrac{1}{c_k}F + f - v_\gamma` with a growing :math:`c_k = c_0 (k+1)^p`, one step
of each variable per iteration (Gauss-Seidel, x before y):

.. math::

    \theta_{k+1} &= \theta_k - \eta\big(\nabla_y f(x_k, \theta_k) + (\theta_k - y_k)/\gamma\big),\\
    x_{k+1} &= x_k - \xi_x\big(\tfrac{1}{c_k}\nabla_x F(x_k, y_k) + \nabla_x f(x_k, y_k)
               - \nabla_x f(x_k, \theta_{k+1})\big),\\
    y_{k+1} &= y_k - \xi_y\big(\tfrac{1}{c_k}\nabla_y F(x_{k+1}, y_k) + \nabla_y f(x_{k+1}, y_k)
               - (y_k - \theta_{k+1})/\gamma\big).

:math:`\theta` tracks the proximal point :math:`\theta^*_\gamma(x, y)` (one step per iteration,
warm-started: the method is single-loop); Danskin's theorem gives
:math:`\nabla_x v_\gamma = \nabla_x f(x, \theta^*)` and :math:`\nabla_y v_\gamma = (y - \theta^*)/\gamma`.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from ._vars import Var, Variable, check_finite, grads
from .base import FirstOrderMethod, StepInfo, positive

__all__ = ["MESO", "moreau_theta_step"]


def moreau_theta_step(lower: Callable[..., Tensor], x: Var, y: Var, theta: Var, eta: float, gamma: float,
                      args: tuple = (), kwargs: Optional[dict] = None) -> None:
    r"""One gradient step on :math:`\theta \mapsto f(x, \theta) + \|\theta - y\|^2/(2\gamma)`, in place.

    The :math:`\theta_{k+1}` update of the module docstring: :math:`\theta` tracks the proximal point
    :math:`\theta^*_\gamma(x, y)` of the Moreau envelope :math:`v_\gamma`.

    Args:
        lower: :math:`f`, called ``lower(x, theta, *args, **kwargs)``.
        x: the upper variable.
        y: the lower variable (the prox centre).
        theta: :math:`\theta`, moved in place.
        eta: :math:`\eta`, the step size.
        gamma: :math:`\gamma` of the envelope.
        args, kwargs: passed on to ``lower``.

    Returns:
        ``None``; ``theta`` is updated in place.

    Example — :math:`f = \tfrac12(\theta - x)^2`, :math:`x = 2`, :math:`y = 0`, :math:`\gamma = 1`: the
    proximal point is :math:`\theta^* = (x + y)/2 = 1`, reached in one step of size :math:`\eta = 1/2`:

    >>> import torch
    >>> from hodl_plugin.baselines._vars import Var
    >>> x = Var(torch.tensor([2.0], requires_grad=True), "x")
    >>> y, theta = Var(torch.zeros(1, requires_grad=True), "y"), Var(torch.zeros(1, requires_grad=True), "theta")
    >>> moreau_theta_step(lambda x, t: 0.5 * ((t - x) ** 2).sum(), x, y, theta, eta=0.5, gamma=1.0)
    >>> theta.params[0].tolist()
    [1.0]
    """
    from ._vars import call_scalar

    g = grads(call_scalar(lower, "lower", x.obj, theta.obj, *args, **(kwargs or {})), theta.params)
    with torch.no_grad():
        for t, gt, yv in zip(theta.params, g, y.params):
            t.sub_(eta * (gt + (t - yv) / gamma))


class MESO(FirstOrderMethod):
    r"""MESO (MEHA): the Moreau-envelope penalty, one step of :math:`\theta`, x and y per iteration.

    Cost per step: 4 gradient computations (f at θ in θ; F/c + f in x; f at θ in x; F/c + f in y at the
    new x); memory: one copy of y (θ, kept across steps).

    Args:
        x, y, upper, lower, x_lr, y_lr, x_optimizer, y_optimizer: see
            :class:`~hodl_plugin.baselines.base.FirstOrderMethod`.
        gamma: γ > 0 of the Moreau envelope (:math:`\gamma < 1/\rho` for a ρ-weakly convex lower level).
        eta: η, the step of θ (≤ 1/(L_f + 1/γ)).
        c0, p: the penalty schedule :math:`c_k = c_0 (k+1)^p` (the paper takes p in (0, 1/2)).

    Example: :math:`y^*(x) = x`, :math:`F = \|y - 1\|^2 + \|x\|^2`, :math:`x^* = 1/2`:

    >>> import torch, hodl_plugin as hp
    >>> x = torch.zeros(2, requires_grad=True); y = torch.zeros(2, requires_grad=True)
    >>> meso = hp.MESO(x, y, upper=lambda x, y: ((y - 1) ** 2).sum() + (x ** 2).sum(),
    ...                lower=lambda x, y: 0.5 * ((y - x) ** 2).sum(), gamma=1.0, eta=0.5, c0=50.0, p=0.25,
    ...                x_lr=0.8, y_lr=0.8)
    >>> for _ in range(2000):
    ...     info = meso.step()
    >>> torch.allclose(x, torch.full((2,), 0.5), atol=0.02)
    True
    """

    name = "MESO"

    def __init__(self, x: Variable, y: Variable, upper: Callable[..., Tensor], lower: Callable[..., Tensor], *,
                 gamma: float, eta: float, c0: float = 1.0, p: float = 0.25,
                 x_lr: Optional[float] = None, y_lr: Optional[float] = None,
                 x_optimizer: Optional[torch.optim.Optimizer] = None,
                 y_optimizer: Optional[torch.optim.Optimizer] = None) -> None:
        super().__init__(x, y, upper, lower, x_lr=x_lr, y_lr=y_lr, x_optimizer=x_optimizer, y_optimizer=y_optimizer)
        self.gamma = positive(gamma, "gamma")
        self.eta = positive(eta, "eta")
        self.c0 = positive(c0, "c0")
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p < 1:
            raise ValueError(f"p must be a number in [0, 1) (the paper takes it in (0, 1/2)), got {p!r}")
        self.p = float(p)

    def c_at(self, k: int) -> float:
        """:math:`c_k = c_0 (k+1)^p`."""
        return self.c0 * (k + 1) ** self.p

    def _step(self, args: tuple, kwargs: dict) -> StepInfo:
        x, y = self.x, self.y
        theta = self.aux("theta", warm=True)
        c = self.c_at(self.k)
        moreau_theta_step(self.lower, x, y, theta, self.eta, self.gamma, args, kwargs)
        # x-step at (x_k, y_k)
        F = self.F(x, y, args, kwargs)
        f = self.f(x, y, args, kwargs)
        d_x = grads(F / c + f, x.params)
        f_theta = self.f(x, theta, args, kwargs)
        d_x = [a - b for a, b in zip(d_x, grads(f_theta, x.params))]
        with torch.no_grad():  # f - v_γ at (x_k, y_k), v_γ evaluated at the current θ
            gap = float(f - f_theta) - sum(float(((yv - t) ** 2).sum()) for yv, t in zip(y.params, theta.params)) / (
                2 * self.gamma)
        check_finite(self.name, self.k, x_direction=d_x)
        self._move_x.move(d_x)
        # y-step at (x_{k+1}, y_k)
        d_y = grads(self.F(x, y, args, kwargs) / c + self.f(x, y, args, kwargs), y.params)
        with torch.no_grad():
            d_y = [a - (yv - t) / self.gamma for a, yv, t in zip(d_y, y.params, theta.params)]
        check_finite(self.name, self.k, y_direction=d_y)
        self._move_y.move(d_y)
        return StepInfo(self.k, float(F.detach()), float(f.detach()), gap, c)

    def __repr__(self) -> str:
        return f"MESO(gamma={self.gamma}, eta={self.eta}, c0={self.c0}, p={self.p})"
