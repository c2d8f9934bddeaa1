"""BOAT 1.1.1 (``boat-torch``): ``NGD`` lower loop with ``CG`` (k the knob) or ``RAD`` (K the knob).

BOAT loads its losses by dotted path, so they are module-level functions reading the current problem
from ``_CURRENT``."""

from __future__ import annotations

import os
import tempfile
import time
from typing import Any, Callable, Optional

import torch

from ..problems import FWD, HyperCleaning, Logits, Quadratic, U, W

_CURRENT: dict[str, Any] = {}
_CFG = {"GDA": {"alpha_init": 0.0, "alpha_decay": 1.0}, "RGT": {"truncate_iter": 0}, "DI": {"lr": 0.0},
        "fo_op": None, "gm_op": ["NGD"], "device": "cpu", "accumulate_grad": False}


def ll_loss(ll_feed_dict: dict, ul_model: torch.nn.Module, ll_model: torch.nn.Module,
            params: Optional[list[torch.Tensor]] = None) -> torch.Tensor:
    """Quadratic lower loss (``params`` = the lower model's weights when BOAT passes them)."""
    return _CURRENT["P"].lower_loss(ll_model.u if params is None else params[0], ul_model.u)


def ul_loss(ul_feed_dict: dict, ul_model: torch.nn.Module, ll_model: torch.nn.Module,
            params: Optional[list[torch.Tensor]] = None) -> torch.Tensor:
    return _CURRENT["P"].upper(ll_model.u if params is None else params[0])


def hc_ll_loss(ll_feed_dict: dict, ul_model: torch.nn.Module, ll_model: torch.nn.Module,
               params: Optional[list[torch.Tensor]] = None) -> torch.Tensor:
    """Hyper-cleaning lower loss f(W; x)."""
    return _CURRENT["H"].f(ll_model.W if params is None else params[0], ul_model.x)


def hc_ul_loss(ul_feed_dict: dict, ul_model: torch.nn.Module, ll_model: torch.nn.Module,
               params: Optional[list[torch.Tensor]] = None) -> torch.Tensor:
    return _CURRENT["H"].val_loss(ll_model.W if params is None else params[0])


def _problem(cfg: dict, ll: str, ul: str) -> Any:
    import boat_torch

    prob = boat_torch.Problem({**_CFG, **cfg}, {"lower_level_loss": {"function": f"{__name__}.{ll}"},
                                                "upper_level_loss": {"function": f"{__name__}.{ul}"}})
    prob.build_ll_solver()
    prob.build_ul_solver()
    return prob


def method(P: Quadratic, K_fwd: int, na_op: str) -> Callable[[int], torch.Tensor]:
    """NGD lower loop (K_fwd steps for CG; K = knob for RAD), ``return_grad=True``."""
    import boat_torch  # noqa: F401 - fail here, at construction, when BOAT is missing

    _CURRENT["P"] = P
    log = os.path.join(tempfile.mkdtemp(), "boat_loss.json")

    def run(knob: int) -> torch.Tensor:
        ll, ul = U(P.n), U(P.n)
        with torch.no_grad():
            ul.u.copy_(P.x0)
        prob = _problem({"na_op": [na_op], "lower_level_model": ll, "upper_level_model": ul,
                         "lower_level_var": list(ll.parameters()), "upper_level_var": list(ul.parameters()),
                         "lower_level_opt": torch.optim.SGD(ll.parameters(), lr=P.s),
                         "upper_level_opt": torch.optim.SGD(ul.parameters(), lr=0.0),
                         "lower_iters": K_fwd if na_op == "CG" else knob, "return_grad": True,
                         "copy_last_param": False, "loss_log_path": log, "CG": {"k": knob, "tolerance": 0.0}},
                        "ll_loss", "ul_loss")
        with FWD[0]():  # BOAT runs forward and backward in one call: both are recorded
            grads, _ = prob.run_iter({}, {}, current_iter=0)
        return grads[0]
    return run


def hyper_cleaning(H: HyperCleaning, na_op: str) -> Callable[[], tuple[list[float], list[float], torch.Tensor]]:
    """K NGD steps per outer step, ``CG`` with k = 10 (tolerance 1e-10) or ``RAD``; Adam on x."""
    def run():
        wm, xm = W(H.d, H.c), Logits(H.n_train)
        _CURRENT["H"] = H
        prob = _problem({"na_op": [na_op], "lower_level_model": wm, "upper_level_model": xm,
                         "lower_level_var": list(wm.parameters()), "upper_level_var": list(xm.parameters()),
                         "lower_level_opt": torch.optim.SGD(wm.parameters(), lr=H.s),
                         "upper_level_opt": torch.optim.Adam(xm.parameters(), lr=H.lr),
                         "lower_iters": H.K, "return_grad": False, "copy_last_param": True,
                         "loss_log_path": os.path.join(tempfile.mkdtemp(), "boat_loss.json"),
                         "CG": {"k": 10, "tolerance": 1e-10}}, "hc_ll_loss", "hc_ul_loss")
        ts, vs = [], []
        t0 = time.perf_counter()
        for it in range(H.iters):
            prob.run_iter({}, {}, current_iter=it)
            ts.append(time.perf_counter() - t0)
            vs.append(prob.loss_history[-1]["ul_loss"])
        return ts, vs, wm.W.detach()
    return run
