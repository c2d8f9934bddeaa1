"""TorchDEQ 0.1.0 (installed for the benchmarks only, ``--no-deps``) with its documented patterns: the
solvers ``anderson_solver`` / ``broyden_solver`` called directly for the forward, and a DEQ core
(``get_deq(..., ift=True)``) for the implicit backward.

Its stopping rule ``stop_mode="rel"`` is ``‖f(z) − z‖ / (‖f(z)‖ + 1e-9) < tol`` for every sample of the
batch (it stops when the largest is below ``tol``; nothing is frozen before) and it returns the
iterate of lowest residual. On an early stop it appends ``max_iter − k`` entries to its residual
trace, so ``max_iter`` is kept near the steps needed (a huge one would time that loop).
"""

from __future__ import annotations

from typing import Callable

import torch

Map = Callable[[torch.Tensor], torch.Tensor]


def forward(kind: str, func: Map, z0: torch.Tensor, *, max_iter: int, tol: float,
            m: int = 6) -> tuple[torch.Tensor, int]:
    """``(z, steps)`` of ``anderson_solver(m=m)`` or ``broyden_solver`` (its default memory: every
    step) from ``z0`` without autograd; ``steps`` is the largest over the samples."""
    from torchdeq.solver import anderson_solver, broyden_solver

    with torch.no_grad():
        if kind == "anderson":
            z, _, info = anderson_solver(func, z0, max_iter=max_iter, tol=tol, stop_mode="rel", m=m)
        elif kind == "broyden":
            z, _, info = broyden_solver(func, z0, max_iter=max_iter, tol=tol, stop_mode="rel")
        else:
            raise ValueError(f"unknown TorchDEQ solver {kind!r}")
    return z, int(info["nstep"].max())


def implicit(kind: str, T: Callable[..., torch.Tensor], z0: torch.Tensor, params: tuple[torch.Tensor, ...],
             v: torch.Tensor, *, max_iter: int, tol: float) -> tuple[float, float, tuple[torch.Tensor, ...]]:
    """A DEQ core (``kind`` forward, ``kind`` IFT backward, both to ``tol`` relative) on ``z = T(z, *params)``:
    ``(forward seconds, backward seconds, gradients of Σ v·z* w.r.t. params)``."""
    import time

    import torchdeq

    deq = torchdeq.get_deq(f_solver=kind, f_max_iter=max_iter, f_tol=tol, f_stop_mode="rel", b_solver=kind,
                           b_max_iter=max_iter, b_tol=tol, b_stop_mode="rel", ift=True)
    deq.train()
    ps = tuple(p.detach().clone().requires_grad_(True) for p in params)
    t0 = time.perf_counter()
    z_out, _ = deq(lambda z: T(z, *ps), z0)
    loss = (v * z_out[-1]).sum()
    t1 = time.perf_counter()
    loss.backward()
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1, tuple(p.grad for p in ps)  # type: ignore[misc]
