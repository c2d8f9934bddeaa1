r"""BOME: the value-function method with a dynamic barrier (BOAT's ``VFO``).

Bilevel Optimization Made Easy (Ye, Liu, Wright, Stone and Liu, NeurIPS 2022) writes the lower level
as the constraint :math:`q(x, y) = f(x, y) - \min_{y'} f(x, y') \le 0` and approximates the value
function by T gradient steps from :math:`y_k`:

.. math::

    \hat y_0 = y_k,\qquad \hat y_{t+1} = \hat y_t - \alpha\nabla_y f(x_k, \hat y_t),\qquad
    \hat q(x, y) = f(x, y) - f(x, \hat y_T)\ \ (\hat y_T \text{ held fixed}).

One step moves both variables along

.. math::

    d_k = \nabla F + \lambda_k \nabla\hat q,\qquad
    \lambda_k = \frac{\max\big(\phi_k - \langle\nabla F, \nabla\hat q\rangle,\ 0\big)}{\|\nabla\hat q\|^2},
    \qquad \phi_k = \eta\,\|\nabla\hat q\|^2,

all gradients over :math:`(x, y)` at :math:`(x_k, y_k)`: :math:`\lambda_k` is the smallest weight
for which :math:`d_k` decreases :math:`\hat q` at the rate :math:`\phi_k` (:math:`\lambda_k = 0` when
:math:`\nabla\hat q = 0`). ``barrier="value"`` takes :math:`\phi_k = \eta\,\hat q` instead, the other
choice of the dynamic-barrier method (and BOAT's).
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from ._vars import Variable, axpy, check_finite, dot, grads, sqnorm
from .base import FirstOrderMethod, StepInfo, count, inner_descent, nonnegative, positive

__all__ = ["BOME", "bome_direction"]

BARRIERS = ("gradient", "value")


def bome_direction(grad_F: Sequence[Tensor], grad_q: Sequence[Tensor], q: Tensor, eta: float,
                   barrier: str = "gradient", eps: float = 0.0) -> tuple[list[Tensor], Tensor]:
    r"""BOME's direction :math:`d = \nabla F + \lambda\nabla\hat q` and :math:`\lambda` from the gradients.

    ``grad_F`` and ``grad_q`` are lists of tensors over all variables (x's then y's, in one order);
    ``eps`` is added to :math:`\|\nabla\hat q\|^2` in the denominator (0: the paper's formula; the
    authors' code adds 1e-4, BOAT 1e-8).

    Args:
        grad_F: :math:`\nabla F` over (x, y), a list of tensors.
        grad_q: :math:`\nabla\hat q` over (x, y), in the same order.
        q: :math:`\hat q`, the value gap (used by ``barrier="value"``).
        eta: :math:`\eta` of the barrier :math:`\phi`.
        barrier: ``"gradient"`` (:math:`\phi = \eta\|\nabla\hat q\|^2`) or ``"value"`` (:math:`\phi = \eta\hat q`).
        eps: added to :math:`\|\nabla\hat q\|^2` in the denominator.

    Returns:
        ``(d, lam)``: the direction (a list shaped like ``grad_F``) and :math:`\lambda` (a 0-d tensor).

    Raises:
        ValueError: an unknown ``barrier``.

    >>> import torch
    >>> d, lam = bome_direction([torch.tensor([1.0, 0.0])], [torch.tensor([0.0, 2.0])], torch.tensor(1.0), 0.5)
    >>> d, lam                        # ⟨∇F, ∇q⟩ = 0, so λ = η
    ([tensor([1., 1.])], tensor(0.5000))
    """
    if barrier not in BARRIERS:
        raise ValueError(f"barrier must be one of {BARRIERS}, got {barrier!r}")
    n2 = sqnorm(grad_q)
    phi = eta * (n2 if barrier == "gradient" else q)
    denom = n2 + eps
    if float(denom) == 0.0:  # ∇q = 0: y minimises f(x, ·) to the inner loop's accuracy; d = ∇F
        lam = torch.zeros_like(n2)
    else:
        lam = torch.clamp(phi - dot(grad_F, grad_q), min=0.0) / denom
    return axpy(lam, list(grad_q), list(grad_F)), lam


class BOME(FirstOrderMethod):
    r"""BOME (BOAT's ``VFO``): value-function constraint, T inner steps, dynamic barrier.

    Each :meth:`step` runs T gradient steps of size ``inner_lr`` on :math:`f(x_k, \cdot)` from
    :math:`y_k` (from the previous :math:`\hat y` with ``warm_start=True``), then moves
    :math:`(x, y) \leftarrow (x, y) - (\xi_x d_x, \xi_y d_y)` with the direction of
    :func:`bome_direction`. Cost per step: T + 3 gradient evaluations (T of :math:`f` in y, one each of
    :math:`F` and :math:`f` in (x, y), one of :math:`f(x, \hat y_T)` in x); memory: one copy of y.

    Args:
        x, y, upper, lower, x_lr, y_lr, x_optimizer, y_optimizer: see
            :class:`~hodl_plugin.baselines.base.FirstOrderMethod`.
        inner_steps: T (the paper uses 1 to 100; 10 by default there).
        inner_lr: α, the step of the inner gradient descent (≤ 1/L of :math:`f(x, \cdot)`).
        eta: η > 0 of the barrier :math:`\phi_k`.
        barrier: ``"gradient"`` (:math:`\phi = \eta\|\nabla\hat q\|^2`, the paper's) or ``"value"``
            (:math:`\phi = \eta\hat q`).
        inner_momentum: heavy-ball momentum of the inner descent (0: plain gradient descent).
        warm_start: start :math:`\hat y` from its previous value instead of :math:`y_k`.
        eps: added to :math:`\|\nabla\hat q\|^2` in :math:`\lambda`'s denominator (0: the paper's).

    Example: a quadratic with :math:`y^*(x) = x`, :math:`F = \|y - 1\|^2 + \|x\|^2`, so :math:`x^* = 1/2`:

    >>> import torch, hodl_plugin as hp
    >>> x = torch.zeros(2, requires_grad=True); y = torch.zeros(2, requires_grad=True)
    >>> bome = hp.BOME(x, y, upper=lambda x, y: ((y - 1) ** 2).sum() + (x ** 2).sum(),
    ...                lower=lambda x, y: 0.5 * ((y - x) ** 2).sum(), x_lr=0.05, y_lr=0.05,
    ...                inner_steps=20, inner_lr=0.5, eta=0.5)
    >>> for _ in range(500):
    ...     info = bome.step()
    >>> torch.allclose(x, torch.full((2,), 0.5), atol=0.02), torch.allclose(y, x, atol=0.02)
    (True, True)
    """

    name = "BOME"

    def __init__(self, x: Variable, y: Variable, upper: Callable[..., Tensor], lower: Callable[..., Tensor], *,
                 inner_steps: int = 10, inner_lr: float, eta: float = 0.5, barrier: str = "gradient",
                 inner_momentum: float = 0.0, warm_start: bool = False, eps: float = 0.0,
                 x_lr: Optional[float] = None, y_lr: Optional[float] = None,
                 x_optimizer: Optional[torch.optim.Optimizer] = None,
                 y_optimizer: Optional[torch.optim.Optimizer] = None) -> None:
        super().__init__(x, y, upper, lower, x_lr=x_lr, y_lr=y_lr, x_optimizer=x_optimizer, y_optimizer=y_optimizer)
        if barrier not in BARRIERS:
            raise ValueError(f"barrier must be one of {BARRIERS}, got {barrier!r}")
        self.inner_steps = count(inner_steps, "inner_steps", minimum=0)
        self.inner_lr = positive(inner_lr, "inner_lr")
        self.eta = positive(eta, "eta")
        self.barrier = barrier
        self.inner_momentum = nonnegative(inner_momentum, "inner_momentum")
        self.warm_start = bool(warm_start)
        self.eps = nonnegative(eps, "eps")

    def _step(self, args: tuple, kwargs: dict) -> StepInfo:
        x, y = self.x, self.y
        y_hat = self.aux("y_hat", self.warm_start)
        inner_descent(self.lower, x, y_hat, self.inner_steps, self.inner_lr, self.inner_momentum, args, kwargs)
        F = self.F(x, y, args, kwargs)
        gF_x, gF_y = self.both_grads(F)
        f = self.f(x, y, args, kwargs)
        gf_x, gf_y = self.both_grads(f)
        f_hat = self.f(x, y_hat, args, kwargs)
        gq_x = [a - b for a, b in zip(gf_x, grads(f_hat, x.params))]
        q = (f - f_hat).detach()
        d, lam = bome_direction(gF_x + gF_y, gq_x + gf_y, q, self.eta, self.barrier, self.eps)
        check_finite(self.name, self.k, direction=d, multiplier=lam)
        n = len(x.params)
        self._move_x.move(d[:n])
        self._move_y.move(d[n:])
        return StepInfo(self.k, float(F.detach()), float(f.detach()), float(q), float(lam))

    def __repr__(self) -> str:
        return (f"BOME(inner_steps={self.inner_steps}, inner_lr={self.inner_lr}, eta={self.eta}, "
                f"barrier={self.barrier!r})")
