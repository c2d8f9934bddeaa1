"""The two variables of a first-order bilevel method: a tensor, a module or a tuple of tensors.

A :class:`Var` wraps what the user passes as ``x`` or ``y`` and gives the methods one view of it:
the object handed to the objectives (``obj``), the list of leaf tensors updated in place
(``params``), detached copies (the auxiliary lower variables :math:`\\hat y`, :math:`\\theta`, ...)
and gradients as lists of tensors (zeros where an objective does not read a parameter).
"""

from __future__ import annotations

import copy
import math
from typing import Any, Callable, Sequence, Union

import torch
from torch import Tensor, nn

from ..errors import ConfigurationError, DivergenceError

#: what ``x`` and ``y`` may be: a leaf tensor, an ``nn.Module`` (its trainable parameters), or a
#: tuple/list of leaf tensors (handed to the objectives as a tuple)
Variable = Union[Tensor, nn.Module, Sequence[Tensor]]

Tensors = list[Tensor]

__all__ = ["Variable", "Var", "grads", "dot", "sqnorm", "axpy", "call_scalar", "check_finite"]


class Var:
    """One level's variable: ``obj`` (what the objectives receive) and ``params`` (its leaf tensors).

    >>> v = Var(torch.zeros(3, requires_grad=True), "y")
    >>> [tuple(p.shape) for p in v.params], v.copy().params[0].requires_grad
    ([(3,)], True)
    """

    def __init__(self, obj: Any, name: str) -> None:
        self.name = name
        if isinstance(obj, Tensor):
            params, self.kind = [obj], "tensor"
        elif isinstance(obj, nn.Module):
            params, self.kind = [p for p in obj.parameters() if p.requires_grad], "module"
            if not params:
                raise ConfigurationError(f"{name}: the module has no parameter with requires_grad=True")
        elif isinstance(obj, (list, tuple)) and obj and all(isinstance(t, Tensor) for t in obj):
            params, self.kind = list(obj), "tuple"
            obj = tuple(obj)
        else:
            raise TypeError(f"{name} must be a tensor, an nn.Module or a tuple of tensors, got {type(obj).__name__}")
        for i, p in enumerate(params):
            what = name if len(params) == 1 and self.kind == "tensor" else f"{name} (tensor #{i})"
            if not p.is_floating_point():
                raise TypeError(f"{what} must have a floating dtype, got {p.dtype}")
            if not p.requires_grad or not p.is_leaf:
                raise ConfigurationError(
                    f"{what} must be a leaf tensor with requires_grad=True: the method updates it in place "
                    "from gradients (create it with torch.zeros(..., requires_grad=True) or call .requires_grad_())"
                )
            if not bool(torch.isfinite(p.detach()).all()):
                raise ValueError(f"{what} has non-finite values (NaN or Inf)")
        self.obj, self.params = obj, params

    def copy(self) -> Var:
        """A detached copy with its own leaf tensors (an auxiliary variable such as :math:`\\hat y`)."""
        if self.kind == "tensor":
            return Var(self.obj.detach().clone().requires_grad_(True), self.name + "_copy")
        if self.kind == "tuple":
            return Var(tuple(p.detach().clone().requires_grad_(True) for p in self.obj), self.name + "_copy")
        mod = copy.deepcopy(self.obj)
        for p in mod.parameters():
            p.grad = None
        return Var(mod, self.name + "_copy")

    def values(self) -> Tensors:
        """Detached clones of the current values."""
        return [p.detach().clone() for p in self.params]

    def assign_(self, values: Sequence[Tensor]) -> None:
        """Copy ``values`` into the parameters, in place."""
        with torch.no_grad():
            for p, v in zip(self.params, values):
                p.copy_(v)

    def add_(self, direction: Sequence[Tensor], scale: float) -> None:
        """``params += scale * direction``, in place."""
        with torch.no_grad():
            for p, d in zip(self.params, direction):
                p.add_(d, alpha=scale)


def call_scalar(fn: Callable[..., Tensor], role: str, *args: Any, **kwargs: Any) -> Tensor:
    """``fn(*args)``, checked to be a real scalar tensor (``role`` names the objective in errors)."""
    out = fn(*args, **kwargs)
    if not isinstance(out, Tensor) or out.numel() != 1 or not out.is_floating_point():
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(f"the {role} objective must return a real scalar tensor, got {shape}")
    return out.reshape(())


def grads(value: Tensor, params: Sequence[Tensor], retain_graph: bool = False) -> Tensors:
    """:math:`\\nabla` of a scalar w.r.t. ``params``; zeros for parameters it does not depend on."""
    gs = torch.autograd.grad(value, list(params), allow_unused=True, retain_graph=retain_graph)
    return [torch.zeros_like(p) if g is None else g.detach() for g, p in zip(gs, params)]


def dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
    """:math:`\\sum_i \\langle a_i, b_i\\rangle` of two lists of tensors."""
    return sum((torch.sum(u * v) for u, v in zip(a, b)), torch.zeros((), dtype=a[0].dtype, device=a[0].device))


def sqnorm(a: Sequence[Tensor]) -> Tensor:
    """:math:`\\sum_i \\|a_i\\|^2`."""
    return dot(a, a)


def axpy(alpha: Union[float, Tensor], x: Sequence[Tensor], y: Sequence[Tensor]) -> Tensors:
    """``alpha * x + y`` elementwise over two lists of tensors."""
    return [alpha * u + v for u, v in zip(x, y)]


def check_finite(method: str, step: int, **quantities: Union[Tensor, Sequence[Tensor], float]) -> None:
    """Raise :class:`~hodl_plugin.errors.DivergenceError` naming the first non-finite quantity."""
    for name, q in quantities.items():
        if isinstance(q, float):
            ok = math.isfinite(q)
        elif isinstance(q, Tensor):
            ok = bool(torch.isfinite(q).all())
        else:
            ok = all(bool(torch.isfinite(t).all()) for t in q)
        if not ok:
            raise DivergenceError(
                f"{method}: non-finite {name} at step {step}; lower the step sizes (x_lr, y_lr, inner_lr) or "
                "check the objectives for NaN"
            )
