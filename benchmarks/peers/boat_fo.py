"""BOAT 1.1.1's first-order operations (``fo_op``: ``VFO``, ``PGDO``, ``MESO``, ``ALTO``, ``VSO``) on a problem
of :mod:`benchmarks.fo_problems`, through its ``Problem`` as a BOAT user configures it.

BOAT loads the losses by dotted path, so they are module-level functions reading the current problem
from ``_CURRENT``; the variables are one-parameter modules (``.v``) holding copies of the problem's
starting point. :func:`run` returns the iterates after ``iters`` steps and the time of each step
(``optimize`` + the upper optimizer's step: BOAT's ``run_iter`` also writes its loss history to a JSON
file at every step, which is not part of the algorithm and is left out of the timing).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from typing import Any, Iterator, Optional

import torch

_CURRENT: dict[str, Any] = {}


class Param(torch.nn.Module):
    """One parameter tensor ``v`` (BOAT's variables are modules)."""

    def __init__(self, value: torch.Tensor) -> None:
        super().__init__()
        self.v = torch.nn.Parameter(value.detach().clone())


def ll_loss(ll_feed_dict: dict, ul_model: torch.nn.Module, ll_model: torch.nn.Module) -> torch.Tensor:
    return _CURRENT["P"].lower(ul_model.v, ll_model.v)


def ul_loss(ul_feed_dict: dict, ul_model: torch.nn.Module, ll_model: torch.nn.Module) -> torch.Tensor:
    return _CURRENT["P"].upper(ul_model.v, ll_model.v)


def problem(P: Any, op: str, op_config: dict, lower_iters: int, x_lr: float, y_lr: float,
            x0: Optional[torch.Tensor] = None, y0: Optional[torch.Tensor] = None) -> Any:
    """A built BOAT ``Problem`` running ``fo_op=op`` on P, SGD on both levels."""
    import boat_torch

    _CURRENT["P"] = P
    ll, ul = Param(P.y0 if y0 is None else y0), Param(P.x0 if x0 is None else x0)
    cfg = {"fo_op": op, "gm_op": None, "na_op": None, "lower_level_model": ll, "upper_level_model": ul,
           "lower_level_var": list(ll.parameters()), "upper_level_var": list(ul.parameters()),
           "lower_level_opt": torch.optim.SGD(ll.parameters(), lr=y_lr),
           "upper_level_opt": torch.optim.SGD(ul.parameters(), lr=x_lr),
           "lower_iters": lower_iters, "device": "cpu", "fo_ol_batch_input": False, "return_grad": False,
           "loss_log_path": os.path.join(tempfile.mkdtemp(), "boat_loss.json"), op: op_config}
    prob = boat_torch.Problem(cfg, {"lower_level_loss": {"function": f"{__name__}.ll_loss"},
                                    "upper_level_loss": {"function": f"{__name__}.ul_loss"}})
    prob.build_ll_solver()
    prob.build_ul_solver()
    prob.models = (ul, ll)
    return prob


def one_step(prob: Any, k: int) -> None:
    """BOAT's step k: the operation's ``optimize``, then the upper optimizer's step (as ``run_iter`` does)."""
    prob._fo_op_solver.optimize({}, {}, k)
    prob._upper_opt.step()
    prob._upper_opt.zero_grad()


@contextlib.contextmanager
def default_dtype(dtype: Optional[torch.dtype]) -> Iterator[None]:
    """torch's default dtype set to ``dtype`` inside the block (``None``: unchanged)."""
    before = torch.get_default_dtype()
    if dtype is not None:
        torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def run(P: Any, op: str, op_config: dict, lower_iters: int, x_lr: float, y_lr: float, iters: int,
        dtype: Optional[torch.dtype] = None) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    """(x, y) after ``iters`` BOAT steps, and the wall time of each step. ``dtype=torch.float64`` runs BOAT
    with that default dtype: its ``VFO`` then builds its direction in float64, not float32."""
    with default_dtype(dtype):
        prob = problem(P, op, op_config, lower_iters, x_lr, y_lr)
        times = []
        for k in range(iters):
            t0 = time.perf_counter()
            one_step(prob, k)
            times.append(time.perf_counter() - t0)
    ul, ll = prob.models
    return ul.v.detach().clone(), ll.v.detach().clone(), times
