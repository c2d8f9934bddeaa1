"""Betty 0.2.1 on its own path: the lower node is an ``ImplicitProblem`` solved by Betty steps
(``unroll_steps``), the hypergradient by ``darts`` / ``sama`` (defaults) / ``neumann`` / ``cg``."""

from __future__ import annotations

import time
from typing import Callable

import torch

from ..problems import HyperCleaning, Logits, Quadratic, U, W


def _options(kind: str, iters: int, alpha: float) -> dict:
    """Betty's options of ``kind``: ``iters`` iterations, step ``alpha`` = the lower step."""
    return {"neumann": {"neumann_iterations": iters, "neumann_alpha": alpha},
            "cg": {"cg_iterations": iters, "cg_alpha": alpha}, "darts": {}, "sama": {}}[kind]


def method(P: Quadratic, K_fwd: int, kind: str) -> Callable[[int], torch.Tensor]:
    """The lower node takes K_fwd SGD steps as Betty steps, then the upper steps (lr 0: x stays)."""
    from betty.configs import Config, EngineConfig
    from betty.engine import Engine
    from betty.problems import ImplicitProblem

    import hodl_plugin.betty as hb

    hb.set_log_level("WARNING")

    def run(iters: int) -> torch.Tensor:
        got: dict[str, torch.Tensor] = {}

        class Lower(ImplicitProblem):
            def get_batch(self):
                return None

            def training_step(self, batch):
                return P.lower_loss(self.module.u, self.upper.module.u)

        class Upper(ImplicitProblem):
            def get_batch(self):
                return None

            def training_step(self, batch):
                return P.upper(self.lower.module.u)

            def grad_callback(self):
                got["g"] = self.module.u.grad.detach().clone()

        um, xm = U(P.n), U(P.n)
        with torch.no_grad():
            xm.u.copy_(P.x0)
        low = Lower("lower", Config(type=kind, unroll_steps=K_fwd, **_options(kind, iters, P.s)), module=um,
                    optimizer=torch.optim.SGD(um.parameters(), lr=P.s))
        up = Upper("upper", Config(), module=xm, optimizer=torch.optim.SGD(xm.parameters(), lr=0.0))
        eng = Engine([up, low], EngineConfig(train_iters=K_fwd, strategy="cpu"),
                     dependencies={"u2l": {up: [low]}, "l2u": {low: [up]}})
        eng.run()
        return got["g"]
    return run


def hyper_cleaning(H: HyperCleaning, kind: str) -> Callable[[], tuple[list[float], list[float], torch.Tensor]]:
    """K Betty steps of the lower node per upper step (Adam on x), ``neumann``/``cg`` with 20 iterations."""
    def run():
        from betty.configs import Config, EngineConfig
        from betty.engine import Engine
        from betty.problems import ImplicitProblem

        import hodl_plugin.betty as hb

        hb.set_log_level("WARNING")
        ts, vs = [], []

        class Lower(ImplicitProblem):
            def get_batch(self):
                return None

            def training_step(self, batch):
                return H.f(self.module.W, self.upper.module.x)

        class Upper(ImplicitProblem):
            def get_batch(self):
                return None

            def training_step(self, batch):
                v = H.val_loss(self.lower.module.W)
                vs.append(float(v.detach()))
                ts.append(time.perf_counter() - t0)
                return v

        wm, xm = W(H.d, H.c), Logits(H.n_train)
        low = Lower("lower", Config(type=kind, unroll_steps=H.K, **_options(kind, 20, H.s)), module=wm,
                    optimizer=torch.optim.SGD(wm.parameters(), lr=H.s))
        up = Upper("upper", Config(), module=xm, optimizer=torch.optim.Adam(xm.parameters(), lr=H.lr))
        eng = Engine([up, low], EngineConfig(train_iters=H.K * H.iters, strategy="cpu"),
                     dependencies={"u2l": {up: [low]}, "l2u": {low: [up]}})
        t0 = time.perf_counter()
        eng.run()
        return ts, vs, wm.W.detach()
    return run
