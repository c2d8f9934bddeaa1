"""hodl_plugin itself: the implicit and unrolled hypergradients, ``gkm_implicit`` in a Betty Engine,
and the hyper-cleaning outer loop through :class:`~hodl_plugin.GKMSolver`."""

from __future__ import annotations

import warnings
from typing import Callable

import torch

import hodl_plugin as hp

from ..problems import DT, FWD, HyperCleaning, Quadratic, U


def implicit(P: Quadratic, K_fwd: int, solver: str, anderson: int = 0, krylov: bool = False
             ) -> Callable[[int], torch.Tensor]:
    """K_fwd GKM steps (no grad) — or, with ``anderson=m``, the forward accelerated by
    ``hp.Anderson(m)`` to a relative 1e-12, or with ``krylov=True`` the Krylov forward of an affine T
    (``forward=solver``: CG or GMRES on (I − ∂T)u = T(0)) to a relative 1e-12 — then the adjoint solve
    with ``maxiter`` = the knob products."""
    if krylov:
        forward: dict = dict(max_steps=100_000, tol=1e-12, forward=solver)
    elif anderson:
        forward = dict(max_steps=100_000, tol=1e-12, acceleration=hp.Anderson(history_size=anderson))
    else:
        forward = dict(max_steps=K_fwd, tol=0.0, check_every=K_fwd)

    def run(maxiter: int) -> torch.Tensor:
        s = hp.GKMSolver(P.step, hypergrad="implicit", solver=solver, adjoint_rtol=0.0, adjoint_atol=1e-300,
                         adjoint_maxiter=maxiter, on_fail="warn", **forward)
        x = P.x0.clone().requires_grad_(True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with FWD[0]():
                loss = P.upper(s(torch.zeros(P.n, dtype=DT), x))
            loss.backward()
        return x.grad
    return run


def unrolled(P: Quadratic) -> Callable[[int], torch.Tensor]:
    """Back-propagation through K = the knob GKM steps."""
    def run(K: int) -> torch.Tensor:
        s = hp.GKMSolver(P.step, max_steps=K, tol=0.0, check_every=K, hypergrad="unrolled")
        x = P.x0.clone().requires_grad_(True)
        with FWD[0]():
            loss = P.upper(s(torch.zeros(P.n, dtype=DT), x))
        loss.backward()
        return x.grad
    return run


def in_betty(P: Quadratic, K_fwd: int) -> Callable[[int], torch.Tensor]:
    """Ours inside a Betty Engine: one GKM node (gkm_implicit), one Betty step."""
    from betty.configs import EngineConfig
    from betty.engine import Engine
    from betty.problems import ImplicitProblem

    import hodl_plugin.betty as hb

    hb.set_log_level("WARNING")

    def run(maxiter: int) -> torch.Tensor:
        got: dict[str, torch.Tensor] = {}

        class Lower(hb.GKMProblem):
            symmetric_jacobian = True

            def operator(self, u, batch):
                return P.step(u, self.upper.module.u)

            def initial_state(self, batch):
                return torch.zeros(P.n, dtype=DT)

        class Upper(ImplicitProblem):
            def get_batch(self):
                return None

            def training_step(self, batch):
                return P.upper(self.lower.u)

            def grad_callback(self):
                got["g"] = self.module.u.grad.detach().clone()

        xm = U(P.n)
        with torch.no_grad():
            xm.u.copy_(P.x0)
        low = Lower("lower", hb.HODLConfig(type="gkm_implicit", max_steps=K_fwd, tol=0.0, check_every=K_fwd,
                                           adjoint_rtol=0.0, adjoint_atol=1e-300, adjoint_maxiter=maxiter,
                                           on_fail="warn"))
        up = Upper("upper", hb.HODLConfig(), module=xm, optimizer=torch.optim.SGD(xm.parameters(), lr=0.0))
        eng = Engine([up, low], EngineConfig(train_iters=1, strategy="cpu"),
                     dependencies={"u2l": {up: [low]}, "l2u": {low: [up]}})
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            eng.run()
        return got["g"]
    return run


def hyper_cleaning(H: HyperCleaning, method: str) -> Callable[[], tuple[list[float], list[float], torch.Tensor]]:
    """``method`` in implicit (CG, adjoint rtol 1e-6), inexact (ε_k = δ_k = 1e-3/√(k+1)), inexact_anderson
    (the same with an Anderson(10) forward), unrolled;
    K warm-started GKM steps (tol 1e-6) per outer step."""
    opts = {"implicit": {"solver": "cg", "adjoint_rtol": 1e-6, "on_fail": "warn"},
            "inexact": {"eps": hp.Polynomial(1e-3, 0.5), "delta": hp.Polynomial(1e-3, 0.5), "solver": "cg",
                        "constants": None, "relative": False},
            "inexact_anderson": {"eps": hp.Polynomial(1e-3, 0.5), "delta": hp.Polynomial(1e-3, 0.5), "solver": "cg",
                                 "constants": None, "relative": False, "acceleration": hp.Anderson(history_size=10)},
            "unrolled": {}}[method]
    mode = "inexact" if method == "inexact_anderson" else method

    def run():
        solver = hp.GKMSolver(hp.GradientStep(objective=H.f, step=H.s), max_steps=H.K, tol=1e-6, hypergrad=mode,
                              **opts)
        return H.outer_loop(lambda W, x: solver(W, x, key="train"))
    return run
