"""higher 0.2.1: ``innerloop_ctx`` + SGD, back-propagation through the K lower steps."""

from __future__ import annotations

import time
from typing import Callable

import torch

from ..problems import FWD, HyperCleaning, Quadratic, U, W


def unrolled(P: Quadratic) -> Callable[[int], torch.Tensor]:
    """K = knob differentiable SGD steps on the lower loss."""
    import higher

    def run(K: int) -> torch.Tensor:
        net = U(P.n)
        x = P.x0.clone().requires_grad_(True)
        with higher.innerloop_ctx(net, torch.optim.SGD(net.parameters(), lr=P.s),
                                  copy_initial_weights=True) as (fnet, dopt):
            with FWD[0]():
                for _ in range(K):
                    dopt.step(P.lower_loss(fnet.u, x))
                loss = P.upper(fnet.u)
            loss.backward()
        return x.grad
    return run


def hyper_cleaning(H: HyperCleaning) -> Callable[[], tuple[list[float], list[float], torch.Tensor]]:
    """A new ``innerloop_ctx`` per outer step, K SGD steps from the last W."""
    def run():
        import higher

        x = torch.zeros(H.n_train, dtype=torch.float64, requires_grad=True)
        opt = torch.optim.Adam([x], lr=H.lr)
        net = W(H.d, H.c)
        inner = torch.optim.SGD(net.parameters(), lr=H.s)
        ts, vs = [], []
        t0 = time.perf_counter()
        for _ in range(H.iters):
            opt.zero_grad()
            with higher.innerloop_ctx(net, inner, copy_initial_weights=True) as (fnet, dopt):
                for _ in range(H.K):
                    dopt.step(H.f(fnet.W, x))
                v = H.val_loss(fnet.W)
                v.backward()
                with torch.no_grad():
                    net.W.copy_(fnet.W)
            opt.step()
            ts.append(time.perf_counter() - t0)
            vs.append(float(v.detach()))
        return ts, vs, net.W.detach()
    return run
