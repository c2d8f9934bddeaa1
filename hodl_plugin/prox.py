r"""Proximal maps used by :class:`~hodl_plugin.operators.ProximalGradient`.

A proximal map for the operator library is a callable ``prox(v, step, *params) -> tensor``
computing :math:`\mathrm{prox}_{s g}(v)`; the factories below build the common ones. All are
differentiable (almost everywhere) w.r.t. ``v`` and their weights.

>>> import torch
>>> soft_threshold(torch.tensor([-2.0, 0.5, 3.0]), 1.0)
tensor([-1.,  0.,  2.])
"""

from __future__ import annotations

from typing import Callable, Union

import torch
from torch import Tensor

__all__ = ["soft_threshold", "l1", "l1_param", "nonnegative", "box", "identity"]

Prox = Callable[..., Tensor]


def soft_threshold(v: Tensor, tau: Union[Tensor, float]) -> Tensor:
    r""":math:`S_\tau(v) = \mathrm{sign}(v)\max(|v| - \tau, 0)`, the prox of :math:`\tau\|\cdot\|_1`."""
    return torch.sign(v) * torch.relu(v.abs() - tau)


def l1(weight: float) -> Prox:
    r"""Prox of :math:`\lambda\|u\|_1` with a fixed :math:`\lambda`: :math:`S_{s\lambda}(v)`.

    >>> import torch
    >>> l1(0.5)(torch.tensor([1.0, -0.2]), 1.0)
    tensor([0.5000, -0.0000])
    """
    if weight < 0:
        raise ValueError(f"the l1 weight must be >= 0, got {weight}")
    return lambda v, step, *params: soft_threshold(v, step * weight)


def l1_param(index: int = 0) -> Prox:
    r"""Prox of :math:`\lambda\|u\|_1` with a *learned* :math:`\lambda` = ``params[index]``.

    >>> import torch
    >>> l1_param(0)(torch.tensor([1.0, -0.2]), 1.0, torch.tensor(0.5))
    tensor([0.5000, -0.0000])
    """
    return lambda v, step, *params: soft_threshold(v, step * params[index])


def nonnegative() -> Prox:
    """Projection onto the non-negative orthant, the prox of its indicator.

    >>> import torch
    >>> nonnegative()(torch.tensor([-1.0, 2.0]), 0.1)
    tensor([0., 2.])
    """
    return lambda v, step, *params: torch.relu(v)


def box(lo: float, hi: float) -> Prox:
    """Projection onto the box ``[lo, hi]``.

    >>> import torch
    >>> box(0.0, 1.0)(torch.tensor([-1.0, 0.5, 2.0]), 0.1)
    tensor([0.0000, 0.5000, 1.0000])
    """
    if lo > hi:
        raise ValueError(f"box needs lo <= hi, got [{lo}, {hi}]")
    return lambda v, step, *params: torch.clamp(v, lo, hi)


def identity() -> Prox:
    """The prox of the zero function."""
    return lambda v, step, *params: v
