"""TorchOpt 0.7.3 with its documented patterns: ``custom_root`` + ``solve_cg`` (``solve_normal_cg`` for a
non-symmetric Jacobian), and ``MetaSGD`` unrolling."""

from __future__ import annotations

from typing import Callable

import torch

from ..problems import DT, FWD, HyperCleaning, Quadratic, U


def root(P: Quadratic, K_fwd: int) -> Callable[[int], torch.Tensor]:
    """``custom_root`` on the optimality condition (u − T(u; x))/s = 0, CG with ``maxiter`` = knob."""
    import torchopt

    def optimality(u: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return (u - P.step(u, x)) / P.s

    def run(maxiter: int) -> torch.Tensor:
        lin = (torchopt.linear_solve.solve_cg(rtol=0.0, atol=0.0, maxiter=maxiter) if P.symmetric
               else torchopt.linear_solve.solve_normal_cg(rtol=0.0, atol=0.0, maxiter=maxiter))

        @torchopt.diff.implicit.custom_root(optimality, argnums=1, solve=lin)
        def solve(u: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                for _ in range(K_fwd):
                    u = P.step(u, x)
            return u

        x = P.x0.clone().requires_grad_(True)
        with FWD[0]():
            loss = P.upper(solve(torch.zeros(P.n, dtype=DT), x))
        loss.backward()
        return x.grad
    return run


def unrolled(P: Quadratic) -> Callable[[int], torch.Tensor]:
    """``MetaSGD`` for K = knob differentiable steps on the lower loss."""
    import torchopt

    def run(K: int) -> torch.Tensor:
        net = U(P.n)
        opt = torchopt.MetaSGD(net, lr=P.s)
        x = P.x0.clone().requires_grad_(True)
        with FWD[0]():
            for _ in range(K):
                opt.step(P.lower_loss(net.u, x))
            loss = P.upper(net.u)
        loss.backward()
        return x.grad
    return run


def hyper_cleaning(H: HyperCleaning) -> Callable[[], tuple[list[float], list[float], torch.Tensor]]:
    """``custom_root`` on ∇_W f = 0 with ``solve_cg(rtol=1e-6)``; K gradient steps forward."""
    def run():
        import torchopt

        def optimality(W: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
            return torch.func.grad(H.f)(W, x)

        @torchopt.diff.implicit.custom_root(optimality, argnums=1,
                                            solve=torchopt.linear_solve.solve_cg(rtol=1e-6, maxiter=1000))
        def solve(W: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
            with torch.enable_grad():
                for _ in range(H.K):
                    W = W.detach().requires_grad_(True)
                    W = W - H.s * torch.autograd.grad(H.f(W, x.detach()), W)[0]
            return W.detach()

        return H.outer_loop(solve)
    return run
