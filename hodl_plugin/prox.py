r"""Proximal maps used by :class:`~hodl_plugin.operators.ProximalGradient`.

A proximal map for the operator library is a callable ``prox(v, step, *params) -> tensor``
computing :math:`\mathrm{prox}_{s g}(v)`; the factories below build the common ones as small
objects (picklable, so a module holding one can be saved with ``torch.save``). All are
differentiable (almost everywhere) w.r.t. ``v`` and their weights.

>>> import torch
>>> soft_threshold(torch.tensor([-2.0, 0.5, 3.0]), 1.0)
tensor([-1.,  0.,  2.])
"""

from __future__ import annotations

import math
import weakref
from typing import Callable, Optional, Union

import torch
from torch import Tensor

from ._torch_compat import is_functorch_wrapped, transforms_active, version

__all__ = ["soft_threshold", "l1", "l1_param", "nonnegative", "box", "identity"]

Prox = Callable[..., Tensor]


def soft_threshold(v: Tensor, tau: Union[Tensor, float]) -> Tensor:
    r""":math:`S_\tau(v) = \mathrm{sign}(v)\max(|v| - \tau, 0)`, the prox of :math:`\tau\|\cdot\|_1`.

    Args:
        v: the point.
        tau: the threshold, a number or a tensor broadcastable to ``v`` (>= 0).

    Returns:
        Tensor: shaped like ``v``; differentiable almost everywhere in ``v`` and ``tau``. Nothing is
        checked or raised (the factories below check their weights).

    Example:
        >>> import torch
        >>> soft_threshold(torch.tensor([-2.0, 0.5, 3.0]), 1.0)
        tensor([-1.,  0.,  2.])
    """
    return torch.sign(v) * torch.relu(v.abs() - tau)


def l1(weight: float) -> Prox:
    r"""Prox of :math:`\lambda\|u\|_1` with a fixed :math:`\lambda`: :math:`S_{s\lambda}(v)`.

    Args:
        weight: :math:`\lambda`, a finite number >= 0 (or a one-element tensor, read once).

    Returns:
        Callable: ``prox(v, step, *params)`` for :class:`~hodl_plugin.operators.ProximalGradient`.

    Raises:
        ValueError: ``weight`` is negative, not finite, or a tensor with more than one element.

    >>> import torch
    >>> l1(0.5)(torch.tensor([1.0, -0.2]), 1.0)
    tensor([0.5000, -0.0000])
    """
    if isinstance(weight, Tensor):
        if weight.numel() != 1:
            raise ValueError("l1(weight) takes a number; use l1_param for a (learned) weight tensor")
        weight = float(weight)
    if not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
        raise ValueError(f"the l1 weight must be a finite number >= 0, got {weight!r}")
    return _L1(float(weight))


class _L1:
    def __init__(self, weight: float) -> None:
        self.weight = weight

    def __call__(self, v: Tensor, step, *params: Tensor) -> Tensor:
        return soft_threshold(v, step * self.weight)

    def __repr__(self) -> str:
        return f"l1({self.weight!r})"


class _WeightCheck:
    """Checks that a learned weight is finite and ``>= 0``, once per tensor and version.

    The test reads the values (one host sync on a GPU), so it is not repeated while the same tensor,
    unchanged (same ``_version``: in-place optimizer updates bump it), is passed again — i.e. once
    per lower-level solve or optimizer step, not at every inner iteration. Writes through
    ``w.data`` bypass the version counter (as they bypass autograd's own checks): update learned
    weights in place under ``torch.no_grad()`` as ``torch.optim`` does.
    """

    def __init__(self, what: str) -> None:
        self.what = what
        self.ref: Optional[weakref.ref] = None
        self.version = -1

    def __call__(self, w: Union[Tensor, float]) -> Union[Tensor, float]:
        """``w`` itself, after the check; under ``torch.func`` transforms (``vmap``, ...) values
        cannot be read, so invalid entries become NaN instead (the GKM iteration then stops with a
        DivergenceError: non-finite)."""
        if not isinstance(w, Tensor):
            if not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
                raise ValueError(f"{self.what} must be finite and >= 0, got {w!r}")
            return w
        if _wrapped(w):
            return torch.where(torch.isfinite(w) & (w >= 0), w, torch.full_like(w, math.nan))
        if self.ref is not None and self.ref() is w and version(w) == self.version:
            return w
        with torch.no_grad():
            finite = bool(torch.isfinite(w).all())
            nonneg = bool((w >= 0).all()) if finite else False
        if not (finite and nonneg):
            bad = "non-finite (NaN/Inf)" if not finite else f"negative (min {float(w.detach().min()):.4g})"
            raise ValueError(
                f"{self.what} is {bad}: the prox of λ‖u‖₁ needs λ >= 0 (a negative λ is not a prox of a "
                "convex function and the iteration 'converges' to a wrong point). Keep the learned "
                "weight non-negative, e.g. pass softplus(θ) or exp(θ) as the parameter, or project "
                "it after each optimizer step (with torch.no_grad(): w.clamp_(min=0))"
            )
        try:
            self.ref = weakref.ref(w)
            self.version = version(w)
        except TypeError:  # tensors that cannot be weakly referenced: check every call
            self.ref = None
        return w

    def __getstate__(self) -> dict:  # pickling / deepcopy: the last checked tensor is not state
        return {"what": self.what, "ref": None, "version": -1}


def _wrapped(w: Tensor) -> bool:
    """Whether ``w`` is a torch.func (functorch) wrapper whose values cannot be read."""
    return transforms_active() and is_functorch_wrapped(w)


def l1_param(index: int = 0) -> Prox:
    r"""Prox of :math:`\lambda\|u\|_1` with a *learned* :math:`\lambda` = ``params[index]``.

    :math:`\lambda` (a scalar or a per-coordinate tensor) must stay finite and non-negative; a
    violation raises ``ValueError`` at call time (checked once per tensor version, see above).

    Args:
        index: which of the operator's ``params`` holds :math:`\lambda`.

    Returns:
        Callable: ``prox(v, step, *params)``, differentiable w.r.t. :math:`\lambda`.

    Raises:
        ValueError: (when called) :math:`\lambda` negative or not finite.

    >>> import torch
    >>> l1_param(0)(torch.tensor([1.0, -0.2]), 1.0, torch.tensor(0.5))
    tensor([0.5000, -0.0000])
    >>> l1_param(0)(torch.tensor([1.0]), 1.0, torch.tensor(-0.5))
    Traceback (most recent call last):
    ...
    ValueError: l1_param weight params[0] is negative (min -0.5): the prox ...
    """
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        raise ValueError(f"l1_param index must be an int >= 0, got {index!r}")
    return _L1Param(index)


class _L1Param:
    def __init__(self, index: int) -> None:
        self.index = index
        self.check = _WeightCheck(f"l1_param weight params[{index}]")

    def __call__(self, v: Tensor, step, *params: Tensor) -> Tensor:
        if self.index >= len(params):
            raise ValueError(
                f"l1_param({self.index}) reads params[{self.index}] but the operator got {len(params)} parameter(s)"
            )
        return soft_threshold(v, step * self.check(params[self.index]))

    def __repr__(self) -> str:
        return f"l1_param({self.index})"


def nonnegative() -> Prox:
    """Projection onto the non-negative orthant, the prox of its indicator.

    Returns:
        Callable: ``prox(v, step, *params) = max(v, 0)``. Nothing is raised.

    >>> import torch
    >>> nonnegative()(torch.tensor([-1.0, 2.0]), 0.1)
    tensor([0., 2.])
    """
    return _NonNegative()


class _NonNegative:
    def __call__(self, v: Tensor, step, *params: Tensor) -> Tensor:
        return torch.relu(v)

    def __repr__(self) -> str:
        return "nonnegative()"


def box(lo: float, hi: float) -> Prox:
    """Projection onto the box ``[lo, hi]``.

    Args:
        lo: the lower bound.
        hi: the upper bound, >= ``lo``.

    Returns:
        Callable: ``prox(v, step, *params) = clamp(v, lo, hi)``.

    Raises:
        ValueError: ``lo > hi`` or a bound that is NaN.

    >>> import torch
    >>> box(0.0, 1.0)(torch.tensor([-1.0, 0.5, 2.0]), 0.1)
    tensor([0.0000, 0.5000, 1.0000])
    """
    if math.isnan(lo) or math.isnan(hi) or lo > hi:
        raise ValueError(f"box needs lo <= hi (not NaN), got [{lo}, {hi}]")
    return _Box(float(lo), float(hi))


class _Box:
    def __init__(self, lo: float, hi: float) -> None:
        self.lo, self.hi = lo, hi

    def __call__(self, v: Tensor, step, *params: Tensor) -> Tensor:
        return torch.clamp(v, self.lo, self.hi)

    def __repr__(self) -> str:
        return f"box({self.lo!r}, {self.hi!r})"


def identity() -> Prox:
    """The prox of the zero function: ``prox(v, step, *params) = v``.

    Returns:
        Callable: the identity prox (a :class:`~hodl_plugin.operators.ProximalGradient` with it is a
        plain gradient step). Nothing is raised.

    Example:
        >>> import torch
        >>> identity()(torch.tensor([1.0, -2.0]), 0.5)
        tensor([ 1., -2.])
    """
    return _Identity()


class _Identity:
    def __call__(self, v: Tensor, step, *params: Tensor) -> Tensor:
        return v

    def __repr__(self) -> str:
        return "identity()"
