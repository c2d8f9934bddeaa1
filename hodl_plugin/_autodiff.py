"""Gradient of a scalar function w.r.t. its first argument, usable inside and outside no_grad."""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor


def grad_u(fn: Callable[..., Tensor], u: Tensor, params: Sequence[Tensor]) -> Tensor:
    r""":math:`\nabla_u f(u, *params)`.

    With grad mode on, the result stays differentiable w.r.t. ``u`` and ``params``
    (``create_graph=True``, needed by unrolled differentiation and the adjoint products); with grad
    mode off it is a plain value and ``params`` are detached.
    """
    create = torch.is_grad_enabled()
    with torch.enable_grad():
        u_ = u if (create and u.requires_grad) else u.detach().requires_grad_(True)
        args = params if create else [p.detach() for p in params]
        val = fn(u_, *args)
        if not isinstance(val, Tensor) or val.numel() != 1:
            raise ValueError("the objective must return a scalar tensor")
        (g,) = torch.autograd.grad(val.sum(), u_, create_graph=create)
    return g
