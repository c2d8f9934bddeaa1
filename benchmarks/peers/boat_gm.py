"""BOAT 1.1.1's hypergradient operations (``na_op``: ``PTT`` + ``RAD``, ``FD``, ``IGA``, ``IAD`` + ``RAD``; ``gm_op``:
``NGD``, ``GDA``, ``DI``) on a problem of :mod:`benchmarks.fo_problems`, through its ``Problem`` as a BOAT user
configures it: one ``run_iter`` with ``return_grad=True`` gives the hypergradient of the upper variable.

BOAT loads the losses by dotted path, so they are module-level functions reading the current problem from
``_CURRENT``; BOAT passes the lower parameters as ``params=`` where it evaluates a loss at an iterate of its
trajectory. The lower optimizer is SGD with the lower step s (``NGD``'s step ``y - s ∇_y f``); with ``DI`` the
initialisation's optimizer is SGD with step 1 (BOAT makes it of the upper optimizer's type), so the
initialisation's gradient is read back as ``z_0 - z_1``.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any, Optional

import torch

from .boat_fo import Param

_CURRENT: dict[str, Any] = {}


def _y(ll_model: torch.nn.Module, params: Optional[list[torch.Tensor]]) -> torch.Tensor:
    return ll_model.v if params is None else params[0]


def ll_loss(ll_feed_dict: dict, ul_model: torch.nn.Module, ll_model: torch.nn.Module,
            params: Optional[list[torch.Tensor]] = None) -> torch.Tensor:
    return _CURRENT["P"].lower(ul_model.v, _y(ll_model, params))


def ul_loss(ul_feed_dict: dict, ul_model: torch.nn.Module, ll_model: torch.nn.Module,
            params: Optional[list[torch.Tensor]] = None) -> torch.Tensor:
    return _CURRENT["P"].upper(ul_model.v, _y(ll_model, params))


def gda_loss(ll_feed_dict: dict, ul_feed_dict: dict, ul_model: torch.nn.Module, ll_model: torch.nn.Module,
             params: Optional[list[torch.Tensor]] = None) -> torch.Tensor:
    """BOAT's aggregated loss (1 - α) f + α F, α = ``ll_feed_dict["alpha"]``."""
    a = ll_feed_dict["alpha"]
    P, y = _CURRENT["P"], _y(ll_model, params)
    return (1 - a) * P.lower(ul_model.v, y) + a * P.upper(ul_model.v, y)


def init_ll_loss(ll_feed_dict: dict, ul_model: torch.nn.Module, ll_model: torch.nn.Module,
                 params: Optional[list[torch.Tensor]] = None) -> torch.Tensor:
    """IAD's lower loss: f at the upper variable's value of x fixed by the problem (MAML: x is the start)."""
    return _CURRENT["P"].lower(_CURRENT["x"], _y(ll_model, params))


def init_ul_loss(ul_feed_dict: dict, ul_model: torch.nn.Module, ll_model: torch.nn.Module,
                 params: Optional[list[torch.Tensor]] = None) -> torch.Tensor:
    return _CURRENT["P"].upper(_CURRENT["x"], _y(ll_model, params))


def build(P: Any, na_op: list[str], K: int, s: float, *, x0: Optional[torch.Tensor] = None,
          y0: Optional[torch.Tensor] = None, di: bool = False, gda: Optional[tuple[float, float]] = None,
          fd_r: float = 0.01) -> Any:
    """A built BOAT ``Problem``: ``na_op`` after K ``NGD`` steps of size s from ``(x0, y0)`` (default P's start);
    ``di``: the start is learned (``DI``); ``gda=(alpha_init, alpha_decay)`` adds ``GDA`` (BOAT's aggregation)."""
    import boat_torch

    _CURRENT["P"] = P
    ll, ul = Param(P.y0 if y0 is None else y0), Param(P.x0 if x0 is None else x0)
    gm_op = ["NGD"] + (["GDA"] if gda else []) + (["DI"] if di else [])
    cfg = {"fo_op": None, "gm_op": gm_op, "na_op": na_op, "lower_level_model": ll, "upper_level_model": ul,
           "lower_level_var": list(ll.parameters()), "upper_level_var": list(ul.parameters()),
           "lower_level_opt": torch.optim.SGD(ll.parameters(), lr=s),
           "upper_level_opt": torch.optim.SGD(ul.parameters(), lr=1.0),
           "lower_iters": K, "device": "cpu", "return_grad": True, "copy_last_param": False,
           "accumulate_grad": False, "loss_log_path": os.path.join(tempfile.mkdtemp(), "boat_loss.json"),
           "GDA": {"alpha_init": gda[0] if gda else 0.0, "alpha_decay": gda[1] if gda else 1.0},
           "RGT": {"truncate_iter": 0}, "DI": {"lr": 1.0}, "FD": {"r": fd_r}}
    losses = {"lower_level_loss": {"function": f"{__name__}.ll_loss"},
              "upper_level_loss": {"function": f"{__name__}.ul_loss"}}
    if gda:
        losses["gda_loss"] = {"function": f"{__name__}.gda_loss"}
    prob = boat_torch.Problem(cfg, losses)
    prob.build_ll_solver()
    prob.build_ul_solver()
    prob.models = (ul, ll)
    prob.learned_start = di
    return prob


def call(prob: Any) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """One ``run_iter``: ``(∇_x, ∇_{y0} or None)``; the start is put back after ``DI``'s step and ``.grad``
    cleared, so the next call computes the same hypergradient."""
    ul, ll = prob.models
    z0 = ll.v.detach().clone()
    ul.v.grad = None
    grads, _ = prob.run_iter({}, {}, current_iter=0)
    gx = grads[0].detach().clone()
    gz = None
    if prob.learned_start:  # DI: one SGD step of size 1 on the start, z_1 = z_0 - g
        gz = z0 - ll.v.detach()
        with torch.no_grad():
            ll.v.copy_(z0)
    ul.v.grad = None
    return gx, gz


def hypergradient(P: Any, na_op: list[str], K: int, s: float, **kw: Any) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """BOAT's hypergradient (:func:`build`'s arguments): ``(∇_x, ∇_{y0})``, the second with ``di=True``, else
    ``None``."""
    return call(build(P, na_op, K, s, **kw))


def iad_hypergradient(P: Any, x: torch.Tensor, z0: torch.Tensor, K: int, s: float) -> torch.Tensor:
    """BOAT's ``IAD`` + ``RAD`` (MAML): the upper variable is the start z of K NGD steps on f(x, ·) (x fixed);
    returns ∇_z F(x, y_K(z))."""
    import boat_torch

    _CURRENT.update(P=P, x=x)
    model = Param(z0)  # IAD: the upper and lower variables are the same tensors
    cfg = {"fo_op": None, "gm_op": ["NGD"], "na_op": ["IAD", "RAD"], "lower_level_model": model,
           "upper_level_model": model, "lower_level_var": list(model.parameters()),
           "upper_level_var": list(model.parameters()),
           "lower_level_opt": torch.optim.SGD(model.parameters(), lr=s),
           "upper_level_opt": torch.optim.SGD(model.parameters(), lr=1.0),
           "lower_iters": K, "device": "cpu", "return_grad": True, "copy_last_param": False,
           "accumulate_grad": False, "loss_log_path": os.path.join(tempfile.mkdtemp(), "boat_loss.json"),
           "GDA": {"alpha_init": 0.0, "alpha_decay": 1.0}, "RGT": {"truncate_iter": 0}}
    prob = boat_torch.Problem(cfg, {"lower_level_loss": {"function": f"{__name__}.init_ll_loss"},
                                    "upper_level_loss": {"function": f"{__name__}.init_ul_loss"}})
    prob.build_ll_solver()
    prob.build_ul_solver()
    grads, _ = prob.run_iter({}, {}, current_iter=0)
    return grads[0].detach().clone()
