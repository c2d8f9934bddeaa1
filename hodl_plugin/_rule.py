r"""The autograd primitive of the first-order rules (finite differences, IGA).

:class:`~hodl_plugin.FiniteDifference` and :class:`~hodl_plugin.IGA` return an iterate :math:`u` whose
derivative is not that of any graph autograd could record: it is a *rule*, a function of the upstream
gradient :math:`\bar u` that returns :math:`\bar\theta` for every tensor :math:`\theta` the operator reads
(the solver's ``params`` and the tensors :mod:`hodl_plugin._capture` finds). :class:`RuleStep` is the
identity on :math:`u` whose backward is that rule.

Reverse mode only, first order only: ``backward()``, ``torch.autograd.grad``, ``torch.func.grad`` /
``vjp`` / ``jacrev`` and ``vmap`` over them. A second derivative (``create_graph=True``, ``grad`` of
``grad``, ``hessian``) or forward mode raises :class:`~hodl_plugin.errors.HypergradientError` naming
the method: a finite difference or a Gauss–Newton multiplier gives first derivatives, and
differentiating the rule's own arithmetic again would be a number nobody asked for.
"""

from __future__ import annotations

from typing import Any, Optional, Protocol, Sequence

import torch
from torch import Tensor

from ._autodiff import refuse_legacy_vmap
from ._torch_compat import derivative_carried, differentiating_transforms, is_dead_wrapper, transforms_active
from .errors import HypergradientError

__all__ = ["Rule", "RuleStep", "attach"]


class Rule(Protocol):
    """A vector–Jacobian rule: ``vjp(g, tensors, needs)`` returns one gradient (or ``None``) per tensor."""

    method: str

    def vjp(self, g: Tensor, tensors: Sequence[Tensor], needs: Sequence[bool]) -> list[Optional[Tensor]]:
        ...  # pragma: no cover - protocol


class RuleStep(torch.autograd.Function):
    """``RuleStep.apply(rule, value, *tensors)``: ``value`` (no gradient of its own) whose backward is
    ``rule.vjp``."""

    generate_vmap_rule = True

    @staticmethod
    def forward(rule: Rule, value: Tensor, *tensors: Tensor) -> Tensor:  # type: ignore[override]
        """The value itself (a copy)."""
        return value.clone()

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Tensor) -> None:
        """Saves the rule and the tensors."""
        rule, _value, *tensors = inputs
        ctx.rule = rule
        ctx.save_for_backward(*tensors)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple:  # type: ignore[override]
        """``rule.vjp``, computed without recording (refused where it would be differentiated again:
        ``create_graph=True``, nested ``torch.func.grad``)."""
        rule: Rule = ctx.rule
        refuse_legacy_vmap(g, f"the {rule.method} rule")
        if _second_order(g, ctx.saved_tensors):
            raise HypergradientError(
                f"{rule.method} gives first derivatives only (backward(), autograd.grad, torch.func.grad / vjp); "
                "create_graph=True or a nested torch.func.grad asks for the derivative of its rule, which is not a "
                "derivative of the map: use hypergrad='unrolled', 'truncated' or 'implicit' for second derivatives"
            )
        needs = ctx.needs_input_grad[2:]
        with torch.no_grad():  # a graph of the rule's arithmetic would be a wrong second derivative
            grads = rule.vjp(g, ctx.saved_tensors, needs)
        return (None, None, *(gr if n else None for gr, n in zip(grads, needs)))

    @staticmethod
    def jvp(ctx: Any, *tangents: Any) -> Tensor:  # type: ignore[override]
        """Refused: the rules are reverse-mode rules."""
        raise HypergradientError(
            f"{ctx.rule.method} gives reverse-mode derivatives only (backward(), autograd.grad, torch.func.grad / "
            "vjp / jacrev); forward mode (jvp, jacfwd, dual numbers) is not defined for it: use hypergrad='implicit'"
        )


def _second_order(g: Tensor, saved: Sequence[Tensor]) -> bool:
    """Whether this backward would itself be differentiated: ``create_graph=True`` on tensors of plain
    autograd, a ``torch.func.grad`` inside another, or one around the pullback of ``torch.func.vjp``
    (which runs after its transform ended, on the tensors saved inside it). The pullback of a
    ``torch.func.vjp`` called on its own asks for a first derivative, whatever its ``create_graph``."""
    if transforms_active():
        return differentiating_transforms() > 1 or any(derivative_carried(t) for t in (g, *saved))
    return torch.is_grad_enabled() and not any(is_dead_wrapper(t) for t in (g, *saved))


def attach(rule: Rule, value: Tensor, tensors: Sequence[Tensor]) -> Tensor:
    """``value`` carrying ``rule`` as its derivative w.r.t. ``tensors`` (``value`` itself when none of
    them carries a derivative)."""
    return RuleStep.apply(rule, value.detach(), *tensors)
