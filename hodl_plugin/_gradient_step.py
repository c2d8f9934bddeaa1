r"""The lower objective of a gradient-step operator, for the methods that need its values.

The finite-difference (:class:`~hodl_plugin.FiniteDifference`) and implicit-gradient-approximation
(:class:`~hodl_plugin.IGA`) hypergradients are defined for a lower level given as a loss,
:math:`T(u; x) = u - s\,\nabla_u f(u; x)`: they evaluate :math:`f` (and :math:`\nabla_x f`) at chosen
points, which a general operator does not expose. An operator qualifies when it carries
``objective(u, *params) -> scalar`` (not ``None``) and ``step_size(*params)`` —
:class:`~hodl_plugin.operators.GradientStep` built with ``objective=f``, or a Betty GKM node that
defines ``lower_objective`` — and every other operator is refused by name.

>>> import torch, hodl_plugin as hp
>>> f = lambda u, x: 0.5 * ((u - x) ** 2).sum()
>>> parts(hp.GradientStep(objective=f, step=0.5), "FiniteDifference")[0] is f
True
>>> parts(lambda u, x: 0.5 * u + x, "FiniteDifference")  # doctest: +ELLIPSIS
Traceback (most recent call last):
...
hodl_plugin.errors.ConfigurationError: FiniteDifference needs T to be a gradient step of an objective, ...
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Sequence

from torch import Tensor

from ._capture import BoundOperator, bind
from .errors import ConfigurationError

if TYPE_CHECKING:  # pragma: no cover
    from .gkm import GKMIteration

__all__ = ["parts", "describe", "bind_loss"]


def describe(T: Any) -> str:
    """How an operator is named in an error message (its class, or a function's name)."""
    if type(T).__name__ == "GradientStep" and getattr(T, "objective", 0) is None:
        return "hp.GradientStep(grad=...), which gives ∇f but not f: build it with objective=f instead of grad="
    name = getattr(T, "__qualname__", None) or getattr(T, "__name__", None)
    if name is not None and callable(T) and not hasattr(T, "forward"):
        return f"the function {name}"
    return f"an operator of type {type(T).__name__}"


def parts(T: Any, method: str, instead: str = "hypergrad='truncated' (steps=1: the same one-step derivative, "
          "by autograd)") -> tuple[Callable[..., Tensor], Callable[..., Any]]:
    """``(f, s)``: the objective ``f(u, *params)`` and the step ``s(*params)`` of a gradient-step
    operator, or a :class:`~hodl_plugin.errors.ConfigurationError` naming the operator it got and what
    to use ``instead``."""
    objective, step = getattr(T, "objective", None), getattr(T, "step_size", None)
    if callable(objective) and callable(step):
        return objective, step
    raise ConfigurationError(
        f"{method} needs T to be a gradient step of an objective, T(u; x) = u - s ∇_u f(u; x), given as "
        f"hp.GradientStep(objective=f, step=s) (it evaluates f itself); got {describe(T)}. For any other "
        f"operator use {instead}"
    )


def bind_loss(it: GKMIteration, f: Callable[..., Tensor], step: Callable[..., Any], u: Tensor,
              params: Sequence[Any]) -> BoundOperator:
    """The tensors that f, the step (and, when the iteration aggregates, F) read, bound by
    :func:`~hodl_plugin._capture.bind` from one evaluation of their values (no gradient of f: cheaper
    than a pass through T, which differentiates f)."""
    def probe(v: Tensor, *ps: Any) -> Tensor:
        step(*ps)
        return f(v, *ps)

    u = u.detach().clone()
    extra: list[Callable[[], Any]] = []
    if it.aggregates:
        if it.upper_grad is not None:
            extra.append(lambda: it.upper_grad(u, *params))  # type: ignore[misc]
        if it.upper is not None:
            extra.append(lambda: it.upper(u, *params))  # type: ignore[misc]
    return bind(probe, u, params, extra)
