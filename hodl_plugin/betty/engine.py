"""``HODLEngine``: Betty's ``Engine`` with CPU data parallelism (gloo) and Ctrl-C at step boundaries."""

from __future__ import annotations

import signal
import threading
from typing import Any

import torch

from ..errors import HODLError
from ._betty import Engine as _BettyEngine

__all__ = ["HODLEngine"]


class HODLEngine(_BettyEngine):
    r"""Betty's ``Engine``, plus data parallelism on CPU processes with the gloo backend.

    Betty 0.2.1's ``distributed`` strategy assumes CUDA (``rank % torch.cuda.device_count()``,
    ``torch.cuda.set_device``). With ``EngineConfig(strategy="distributed", backend="gloo")`` on a
    machine without CUDA, this engine joins the process group (``torchrun`` or any launcher that sets
    ``MASTER_ADDR``/``MASTER_PORT``/``RANK``/``WORLD_SIZE``, or a group the caller initialised),
    places every rank on the CPU and leaves the rest to Betty: data loaders split by rank, modules
    wrapped in DDP. GKM edges average the full hypergradient over the ranks. Where CUDA is present,
    Betty's own path runs unchanged. With any other strategy it is Betty's ``Engine`` (example in
    :func:`save_checkpoint`; the 2-process run is ``tests/betty/ddp_case.py``).

    Ctrl-C (SIGINT) during ``run()`` finishes the current global step and then raises
    ``KeyboardInterrupt``, so a checkpoint saved in ``except KeyboardInterrupt`` resumes exactly; a
    second Ctrl-C interrupts at once (and such a checkpoint is refused). Outside the main thread
    the signal is Python's default.

    Args:
        problems: the graph's nodes (Betty's ``Engine(problems, config, dependencies)``).
        config: a Betty ``EngineConfig`` (``train_iters``, ``strategy``, ``backend``, ...).
        dependencies: ``{"u2l": {upper: [lower, ...]}, "l2u": {lower: [upper, ...]}}``, as for Betty.

    Raises:
        HODLError: when the nodes are initialised, a GKM node without an upper node or in ``l2u`` but
            in no ``u2l`` (its hypergradient would be lost; the message gives the entry to add), or a
            coupled node whose upper objective cannot serve as :math:`F`; data parallel on CPU with a
            backend other than ``"gloo"`` or a single process.

    Example — a GKM node :math:`u^*(x) = 2x` under an upper node that minimises
    :math:`\|u^* - 1\|^2` by SGD: each step maps :math:`x \mapsto x - 0.1(8x - 4)`, so 3 steps from 0
    give :math:`x_3 = \tfrac12(1 - 0.2^3) = 0.496`. A larger graph is
    :doc:`/auto_examples/plot_03_betty_gkm_node`; the :func:`~hodl_plugin.betty.save_checkpoint`
    example interrupts and resumes one.

    >>> import torch, hodl_plugin.betty as hb
    >>> from hodl_plugin.betty import HODLEngine
    >>> from betty.configs import EngineConfig
    >>> from betty.problems import ImplicitProblem
    >>> hb.set_log_level("WARNING")
    >>> class Low(hb.GKMProblem):                        # u*(x) = 2x
    ...     def operator(self, u, batch): return 0.5 * u + self.up.module.x
    ...     def initial_state(self, batch): return torch.zeros(2, dtype=torch.float64)
    >>> class Up(ImplicitProblem):                       # F = ||u* - 1||^2, minimised at x = 1/2
    ...     def get_batch(self): return None
    ...     def training_step(self, batch): return ((self.low.u - 1.0) ** 2).sum()
    >>> def build(steps):
    ...     m = torch.nn.Module(); m.x = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
    ...     up = Up("up", hb.HODLConfig(), module=m, optimizer=torch.optim.SGD(m.parameters(), lr=0.1))
    ...     low = Low("low", hb.HODLConfig(type="gkm_implicit", tol=1e-12))
    ...     return HODLEngine([up, low], EngineConfig(train_iters=steps, strategy="cpu"),
    ...                          dependencies={"u2l": {up: [low]}, "l2u": {low: [up]}}), m, up, low
    >>> engine, m, up, low = build(3); engine.run()
    >>> [round(v, 12) for v in m.x.tolist()], low.stats["converged"]
    ([0.496, 0.496], 1.0)
    """

    _hodl_in_step = False
    _hodl_interrupted = False

    def train_step(self) -> None:
        self._hodl_in_step = True
        super().train_step()
        self._hodl_in_step = False
        if self._hodl_interrupted:
            self._hodl_interrupted = False
            raise KeyboardInterrupt(f"interrupted after global step {self.global_step} (a step boundary)")

    def run(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return super().run()
        previous = signal.getsignal(signal.SIGINT)

        def defer(signum: int, frame: Any) -> None:
            self._hodl_interrupted = True
            signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C: now

        signal.signal(signal.SIGINT, defer)
        try:
            return super().run()
        finally:
            signal.signal(signal.SIGINT, previous)

    def cleanup(self) -> None:
        """Betty's cleanup (it destroys the process group), after a barrier: a rank that tore the group
        down while another still had a collective in flight aborted that rank (gloo: SIGABRT, "terminate
        called without an active exception")."""
        import torch.distributed as dist

        if self._strategy in ("distributed", "zero", "fsdp") and dist.is_available() and dist.is_initialized():
            dist.barrier()
        super().cleanup()

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
