"""Checkpoints of a Betty engine of HODL nodes (Betty has none): save, validate, restore, resume."""

from __future__ import annotations

from typing import Any

import torch

from ..errors import HODLError
from .nodes import GKMProblem

__all__ = ["engine_state_dict", "load_engine_state_dict", "save_checkpoint", "load_checkpoint"]


def _rng_state() -> dict[str, Any]:
    import random

    import numpy as np

    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    import random

    import numpy as np

    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def engine_state_dict(engine: Any) -> dict[str, Any]:
    """Everything needed to resume a Betty ``Engine`` of HODL nodes exactly (Betty has no checkpoints).

    Per problem: module, optimizer, scheduler, step counter, data-loader epochs and, for
    :class:`GKMProblem` nodes, the iterate, the warm starts and the hypergradient method's state
    (inexact counters, warm-started adjoints, estimated bound constants); plus the engine's global
    step and the torch / python / numpy RNG states. Take it between global steps (after ``run()``
    or in a callback), not inside a step.
    """
    problems = {}
    for p in engine.problems:
        st: dict[str, Any] = {
            "module": p.module.state_dict(),
            "optimizer": p.optimizer.state_dict() if p.optimizer is not None else None,
            "scheduler": p.scheduler.state_dict() if p.scheduler is not None else None,
            "count": p._count,
            "epoch_counter": list(p.epoch_counter) if p.epoch_counter is not None else None,
        }
        if isinstance(p, GKMProblem):
            st["hodl"] = p.hodl_state_dict()
        problems[p.name] = st
    return {"global_step": engine.global_step, "problems": problems, "rng": _rng_state()}


def load_engine_state_dict(engine: Any, state: dict[str, Any]) -> None:
    """Restore :func:`engine_state_dict` into an engine built the same way (same problems, loaders,
    ``train_iters`` = the total): ``engine.run()`` then runs the remaining iterations and the result
    equals an uninterrupted run bit for bit on CPU (for deterministic data loaders: no shuffling, or
    a seeded ``generator``, which the replay below reproduces).
    """
    by_name = {p.name: p for p in engine.problems}
    missing = set(state["problems"]) ^ set(by_name)
    if missing:
        raise HODLError(f"checkpoint and engine have different problems: {sorted(missing)}")
    for name, st in state["problems"].items():
        p = by_name[name]
        if isinstance(p, GKMProblem):
            p.load_hodl_state_dict(st["hodl"])  # first: it sets u's shape
        p.module.load_state_dict(st["module"])
        if st["optimizer"] is not None:
            p.optimizer.load_state_dict(st["optimizer"])
        if st["scheduler"] is not None:
            p.scheduler.load_state_dict(st["scheduler"])
        # replay the data loaders to the same position (one batch per local step)
        if p.train_data_loader is not None:
            for _ in range(st["count"]):
                for idx in range(len(p.train_data_loader)):
                    p.get_batch_single_loader(idx)
        p._count = st["count"]
    engine.global_step = state["global_step"]
    engine.train_iters = engine.config.train_iters - state["global_step"]
    _set_rng_state(state["rng"])


def save_checkpoint(engine: Any, path: str) -> None:
    """``torch.save(engine_state_dict(engine), path)``.

    Example — interrupt after 5 of 10 steps, resume in a fresh engine, get the uninterrupted result:

    >>> import tempfile, os, torch
    >>> import hodl_plugin.betty as hb
    >>> from betty.configs import EngineConfig
    >>> from betty.problems import ImplicitProblem
    >>> hb.set_log_level("WARNING")
    >>> class Low(hb.GKMProblem):
    ...     def operator(self, u, batch): return 0.5 * u + self.up.module.x
    ...     def initial_state(self, batch): return torch.zeros(2, dtype=torch.float64)
    >>> class Up(ImplicitProblem):
    ...     def get_batch(self): return None
    ...     def training_step(self, batch): return ((self.low.u - 1.0) ** 2).sum()
    >>> def build():
    ...     m = torch.nn.Module(); m.x = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
    ...     up = Up("up", hb.HODLConfig(), module=m, optimizer=torch.optim.Adam(m.parameters(), lr=0.1))
    ...     low = Low("low", hb.HODLConfig(type="gkm_implicit", tol=1e-12))
    ...     eng = hb.HODLEngine([up, low], EngineConfig(train_iters=10, strategy="cpu"),
    ...                      dependencies={"u2l": {up: [low]}, "l2u": {low: [up]}})
    ...     return eng, m
    >>> straight, m0 = build(); straight.run()
    >>> first, _ = build(); first.train_iters = 5; first.run()
    >>> path = os.path.join(tempfile.mkdtemp(), "ckpt.pt")
    >>> hb.save_checkpoint(first, path)
    >>> resumed, m1 = build(); hb.load_checkpoint(resumed, path); resumed.run()
    >>> torch.equal(m0.x, m1.x)
    True
    """
    torch.save(engine_state_dict(engine), path)


def load_checkpoint(engine: Any, path: str) -> None:
    """Load a file written by :func:`save_checkpoint` into a freshly built engine."""
    load_engine_state_dict(engine, torch.load(path, weights_only=False))
