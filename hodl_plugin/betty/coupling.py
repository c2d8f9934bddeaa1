r"""HODL's aggregation with the upper node's own objective (the GKM node and its upper node coupled).

A GKM node configured with ``HODLConfig(alpha=...)`` and no ``upper_objective`` hook aggregates

.. math::  u_{k+1} = T\bigl(u_k - \alpha_k s \nabla_u F(u_k; x)\bigr),
           \qquad F(u; x) = \text{upper.training\_step}(b)\big|_{\text{lower.u} = u},

where :math:`b` is the batch of the upper node's *coming* step (the step whose hypergradient this
solve serves). :class:`UpperLookahead` draws that batch once, through the upper's own ``get_batch``
(Betty's loaders, epochs, devices), and hands the same batch to the upper's step, so the upper trains
on exactly the batches it would have seen without aggregation. :func:`evaluate_upper` runs the
upper's ``training_step`` with the candidate ``u`` substituted for ``lower.u`` and puts the upper's
buffers and the random generators back afterwards (no optimizer step, no gradient accumulation, no
batch advance; a ``training_step`` that draws random numbers — dropout, noise — draws, at every
evaluation, the numbers its coming step will draw).

>>> class Upper:                       # stands for a Betty problem: only get_batch matters here
...     def __init__(self): self.drawn = 0
...     def get_batch(self):
...         self.drawn += 1
...         return self.drawn
>>> up = Upper(); look = install_lookahead(up)
>>> look.peek(), look.peek(), up.drawn   # peeking twice draws once
(1, 1, 1)
>>> up.get_batch(), up.get_batch(), up.drawn   # the upper's step receives the peeked batch, then the next
(1, 2, 2)
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor, nn

__all__ = ["UpperLookahead", "evaluate_upper", "install_lookahead"]

_EMPTY = object()


class UpperLookahead:
    """Replaces an upper node's ``get_batch`` (as an instance attribute): ``peek()`` draws the batch of
    its next step once, and its next ``get_batch()`` returns that batch instead of drawing another.

    Args:
        draw: the upper node's own ``get_batch`` (called with no arguments).

    >>> batches = iter(["b0", "b1"])
    >>> look = UpperLookahead(lambda: next(batches))
    >>> look.peek(), look.has_pending, look(), look.has_pending, look()
    ('b0', True, 'b0', False, 'b1')
    """

    def __init__(self, draw: Callable[[], Any]) -> None:
        self.draw = draw
        self.pending: Any = _EMPTY

    @property
    def has_pending(self) -> bool:
        return self.pending is not _EMPTY

    def peek(self) -> Any:
        """The batch of the upper's next step (drawn now if not yet drawn)."""
        if self.pending is _EMPTY:
            self.pending = self.draw()
        return self.pending

    def __call__(self) -> Any:
        if self.pending is _EMPTY:
            return self.draw()
        batch, self.pending = self.pending, _EMPTY
        return batch


def install_lookahead(problem: Any) -> UpperLookahead:
    """The lookahead of ``problem`` (installed on first use; one per problem, shared by its GKM children).

    Args:
        problem: the upper node (a Betty problem, or any object with a ``get_batch()`` method).

    Returns:
        The :class:`UpperLookahead` now installed as ``problem.get_batch`` (the same one on every call).

    >>> class Upper:
    ...     def get_batch(self):
    ...         return "batch"
    >>> up = Upper()
    >>> install_lookahead(up) is install_lookahead(up) is up.get_batch
    True
    """
    current = problem.__dict__.get("get_batch")
    if isinstance(current, UpperLookahead):
        return current
    look = UpperLookahead(problem.get_batch)
    problem.get_batch = look
    return look


def _buffers(problem: Any) -> list[Tensor]:
    mod = getattr(problem, "module", None)
    return list(mod.buffers()) if isinstance(mod, nn.Module) else []


def _rng_devices() -> list[int]:
    """The CUDA device whose generator :func:`torch.random.fork_rng` restores (none without CUDA in use)."""
    return [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []


def evaluate_upper(problem: Any, batch: Any) -> Tensor:
    """``problem.training_step(batch)`` as a scalar (a dict's ``"loss"``), the problem's buffers and the
    random generators (CPU, current CUDA device) restored.

    The caller substitutes the lower variable; gradients are the caller's business (take them with
    ``torch.autograd.grad`` on chosen inputs, so nothing accumulates into ``.grad``). The value is
    :math:`F(u; x)` of the module docstring's aggregation.

    Args:
        problem: the upper node (a Betty problem: its ``training_step_exec``, ``module`` and ``name``).
        batch: the batch of its coming step (:meth:`UpperLookahead.peek`).

    Returns:
        The loss as a 0-d tensor (on the autograd graph of ``training_step``).

    Raises:
        TypeError: ``training_step`` returns neither a one-element tensor nor a dict with one under ``"loss"``.

    Example — a batch-norm layer's running mean (a buffer) is put back after the evaluation:

    >>> import torch
    >>> class Upper:                      # stands for a Betty problem
    ...     name = "upper"
    ...     def __init__(self):
    ...         self.module = torch.nn.BatchNorm1d(1)
    ...     def training_step_exec(self, batch):
    ...         return {"loss": self.module(batch).pow(2).mean()}
    >>> up = Upper()
    >>> loss = evaluate_upper(up, torch.tensor([[1.0], [3.0]]))
    >>> round(loss.item(), 4), up.module.running_mean.tolist()     # normalised batch: mean square 1
    (1.0, [0.0])
    """
    saved = [b.detach().clone() for b in _buffers(problem)]
    try:
        with torch.random.fork_rng(devices=_rng_devices()):
            out = problem.training_step_exec(batch)
    finally:
        with torch.no_grad():
            for b, s in zip(_buffers(problem), saved):
                b.copy_(s)
    loss = out["loss"] if isinstance(out, dict) else out
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        raise TypeError(
            f"upper node {problem.name!r}: training_step must return a scalar tensor (or a dict with one under "
            f"'loss') to serve as F in the GKM node's aggregation, got {type(loss).__name__}"
        )
    return loss.reshape(())
