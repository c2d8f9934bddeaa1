"""Data parallelism: CPU processes with gloo (Betty 0.2.1 assumes CUDA), hypergradients averaged."""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor, nn

from ..errors import HODLError
from ._betty import Engine as _BettyEngine

__all__ = ["HODLEngine", "unwrap"]


def unwrap(module: nn.Module) -> nn.Module:
    """The user's module inside a DDP wrapper (Betty wraps modules for ``strategy="distributed"``).

    >>> lin = torch.nn.Linear(2, 2)
    >>> unwrap(lin) is lin
    True
    """
    return module.module if isinstance(module, nn.parallel.DistributedDataParallel) else module


class HODLEngine(_BettyEngine):
    """Betty's ``Engine``, plus data parallelism on CPU processes with the gloo backend.

    Betty 0.2.1's ``distributed`` strategy assumes CUDA (``rank % torch.cuda.device_count()``,
    ``torch.cuda.set_device``). With ``EngineConfig(strategy="distributed", backend="gloo")`` on a
    machine without CUDA, this engine joins the process group (``torchrun`` or any launcher that sets
    ``MASTER_ADDR``/``MASTER_PORT``/``RANK``/``WORLD_SIZE``, or a group the caller initialised),
    places every rank on the CPU and leaves the rest to Betty: data loaders split by rank, modules
    wrapped in DDP. GKM edges average the full hypergradient over the ranks. Where CUDA is present,
    Betty's own path runs unchanged. With any other strategy it is Betty's ``Engine`` (example in
    :func:`save_checkpoint`; the 2-process run is ``tests/ddp_case.py``).
    """

    def configure_systems(self) -> dict[str, Any]:
        import torch.distributed as dist

        cpu_parallel = self._strategy in ("distributed", "zero") and (
            not torch.cuda.is_available() or self._backend == "gloo"
        )
        if not cpu_parallel:
            return super().configure_systems()
        if self._backend != "gloo":
            raise HODLError(f"data parallel on CPU needs EngineConfig(backend='gloo'), got {self._backend!r}")
        if not dist.is_initialized():
            dist.init_process_group(backend="gloo")
        self._world_size = dist.get_world_size()
        if self._world_size < 2:
            raise HODLError("strategy='distributed' needs at least 2 processes")
        self._rank = dist.get_rank()
        self._local_rank = self._rank
        self.device = "cpu"
        return {
            "strategy": self._strategy,
            "backend": self._backend,
            "world_size": self._world_size,
            "rank": self._rank,
            "local_rank": self._local_rank,
        }


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
