"""Data parallelism: CPU processes with gloo (Betty 0.2.1 assumes CUDA), hypergradients averaged."""

from __future__ import annotations

from typing import Sequence

from torch import Tensor, nn

__all__ = ["unwrap"]


def unwrap(module: nn.Module) -> nn.Module:
    """The user's module inside a DDP wrapper (Betty wraps modules for ``strategy="distributed"``).

    Args:
        module: a module, possibly wrapped in :class:`~torch.nn.parallel.DistributedDataParallel`.

    Returns:
        torch.nn.Module: the wrapped module, or ``module`` itself. Nothing is raised.

    >>> import torch
    >>> lin = torch.nn.Linear(2, 2)
    >>> unwrap(lin) is lin
    True
    """
    return module.module if isinstance(module, nn.parallel.DistributedDataParallel) else module


def _average_grads_across_ranks(params: Sequence[Tensor]) -> None:
    """Data parallel: average the full gradient (direct + implicit) of ``params`` over the ranks.

    Betty relies on DDP's reducer hooks, which the implicit part of a hypergradient never triggers
    (it is computed by ``autograd.grad``); averaging here makes every rank step with the full-batch
    hypergradient. Idempotent if a reducer already averaged (the ranks then hold equal values).
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return
    world = dist.get_world_size()
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            p.grad.div_(world)
