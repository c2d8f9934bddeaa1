r"""The implicit gradient approximation of "Learning with constraint learning" (BOAT's ``IGA``).

The implicit hypergradient :math:`\nabla_x F - \nabla^2_{xu} f\,(\nabla^2_{uu} f)^{-1}\nabla_u F` needs the
Hessian blocks of the lower objective. IGA (Liu, Gao, Liu et al., TPAMI 2024; BOAT 1.1.1's ``IGA``)
replaces both by their Gauss–Newton rank-one models :math:`\nabla_x f\,\nabla_u f^\top` and
:math:`\nabla_u f\,\nabla_u f^\top` (a pseudo-inverse for the second), evaluated at the last iterate
:math:`u_K`; what remains is first-order:

.. math::

    \nabla_x F(u_K) - \lambda\,\nabla_x f(u_K; x),\qquad
    \lambda = \frac{\langle\nabla_u F(u_K), \nabla_u f(u_K)\rangle}{\|\nabla_u f(u_K)\|^2}.

Equivalently, the lower solution is taken to respond to x along :math:`-\nabla_u f` just enough to keep
:math:`f(x, u)` level: :math:`\partial u/\partial x = -\nabla_u f\,\nabla_x f^\top/\|\nabla_u f\|^2`, the
smallest Jacobian with :math:`\tfrac{d}{dx}f(x, u(x)) = 0`. For an upstream gradient :math:`\bar u` the
rule is :math:`\bar x = -\langle d, \bar u\rangle\,\nabla_x f(u_K; x)`, :math:`d = \nabla_u f/\|\nabla_u f\|^2`.

The multiplier is a ratio of gradients that both vanish at the lower optimum: IGA is a method for a
*few* lower steps (BOAT's use), where :math:`\nabla_u f(u_K)` is far from 0. At an iterate with
:math:`\nabla_u f(u_K) = 0` exactly it is 0/0, and :class:`~hodl_plugin.errors.HypergradientError` is
raised (BOAT's ``grad_unused_zero`` turns the NaN into a zero gradient instead).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Hashable, Optional, Sequence

import torch
from torch import Tensor

from . import _gradient_step
from ._autodiff import grad_u
from ._capture import BoundOperator, flatten
from ._rule import attach
from ._torch_compat import transforms_active
from .errors import HypergradientError
from .gkm import GKMIteration, SolverInfo
from .hypergrad import HypergradMethod, _detached
from .implicit import grad_wanted

__all__ = ["IGA"]

_NAME = "IGA (hypergrad='iga')"
_INSTEAD = "hypergrad='implicit' (exact at the fixed point) or 'first_order' (no implicit term)"


@dataclass(frozen=True)
class _Rule:
    r""":math:`\bar\theta = -\langle d, \bar u\rangle\,\nabla_\theta f(u_K; \theta)`."""

    op: BoundOperator
    objective: Callable[..., Tensor]
    u: Tensor
    d: Tensor
    method: str = "IGA"

    def vjp(self, g: Tensor, tensors: Sequence[Tensor], needs: Sequence[bool]) -> list[Optional[Tensor]]:
        idx = [i for i, n in enumerate(needs) if n]
        out: list[Optional[Tensor]] = [None] * len(tensors)
        if not idx:
            return out
        c = (self.d * g.detach()).sum()

        def phi(*sub: Tensor) -> Tensor:
            ts = list(tensors)
            for i, t in zip(idx, sub):
                ts[i] = t
            with self.op.context(ts):
                return -c * self.objective(self.u, *self.op.params(ts))

        grads = torch.func.grad(phi, argnums=tuple(range(len(idx))))(*(tensors[i] for i in idx))
        for i, gr in zip(idx, grads):
            out[i] = gr
        return out


class IGA(HypergradMethod):
    r"""Implicit gradient approximation (BOAT's ``IGA``): the Gauss–Newton multiplier
    :math:`\lambda = \langle\nabla_u F, \nabla_u f\rangle/\|\nabla_u f\|^2` at the last iterate (module
    docstring), :math:`\bar x = -\langle d, \bar u\rangle\nabla_x f(u_K; x)`.

    The forward runs without autograd (memory flat in K; its stopping rule is the solver's — give a small
    ``max_steps`` with ``tol=0``, the regime the method is made for); the backward evaluates
    :math:`\nabla_x f` once. Needs a lower level given as a loss: ``T = hp.GradientStep(objective=f, step=s)``
    (any other operator is refused by name, :class:`~hodl_plugin.errors.ConfigurationError`). With HODL
    aggregation the forward aggregates and the multiplier is the lower objective's (BOAT's ``GDA`` + ``IGA``
    uses its ``gda_loss`` there instead, at a weight it never decays; see :doc:`/baselines`). Reverse mode and
    first order only (:mod:`hodl_plugin._rule`); ``u0`` gets no gradient.

    Raises:
        HypergradientError: :math:`\nabla_u f(u_K) = 0` exactly (the multiplier is 0/0).

    >>> import torch, hodl_plugin as hp
    >>> f = lambda u, x: 0.5 * ((u - x) ** 2).sum()           # ∇_u f = u - x, ∇_x f = x - u
    >>> solver = hp.GKMSolver(hp.GradientStep(objective=f, step=0.5), max_steps=1, tol=0.0, hypergrad="iga")
    >>> x = torch.ones(2, dtype=torch.float64, requires_grad=True)
    >>> u = solver(torch.zeros(2, dtype=torch.float64), x)     # u_1 = x/2: d = (u - x)/‖u - x‖² = -(1, 1)
    >>> u.sum().backward()                                    # x̄ = -⟨d, 1⟩ (x - u) = 2 · (0.5, 0.5)
    >>> x.grad
    tensor([1., 1.], dtype=torch.float64)
    """

    name = "iga"
    needs_gkm_iterates = True  # its multiplier at a solved lower level is 0/0

    def validate(self, it: GKMIteration) -> None:
        _gradient_step.parts(it.T, _NAME, _INSTEAD)

    def run(self, it: GKMIteration, u0: Tensor, params: Sequence[Any], info: SolverInfo,
            key: Optional[Hashable] = None) -> Tensor:
        f, step = _gradient_step.parts(it.T, _NAME, _INSTEAD)
        detached = _detached(params)
        with torch.no_grad():
            u = it.run(u0.detach(), detached, info).detach()
        if not grad_wanted():
            return u
        op = _gradient_step.bind_loss(it, f, step, u, params)
        with torch.no_grad():
            gf = grad_u(f, u, detached)
            n2 = (gf * gf).sum()
        if not transforms_active() and not bool(n2 > 0):
            raise HypergradientError(
                f"IGA: the lower gradient ∇_u f is exactly 0 at the returned iterate (step {info.steps}), where IGA's "
                "multiplier <∇_u F, ∇_u f>/||∇_u f||² is 0/0: IGA is made for a few lower steps (max_steps=K small, "
                "tol=0); at a solved lower level use hypergrad='implicit'"
            )
        rule = _Rule(op, f, u, gf / n2)
        return attach(rule, u, [*flatten(params)[0], *op.captured])
