"""The problems of ``benchmarks.compare``, shared by every peer's wrapper (``benchmarks/peers/``).

- :class:`Quadratic` — problem (a)/(a2)/(d): lower ½uᵀQu − xᵀu (fixed-point map
  T(u; x) = u − s(Mu − x), M = Q or Q + S with S skew), upper ½‖u − y‖², closed-form hypergradient
  ∇f(x) = M⁻ᵀ(M⁻¹x − y).
- :class:`HyperCleaning` — problem (b): recipes/hyper_cleaning.py's weighted logistic regression on
  digits; a peer's run returns ``(times, validation losses, W)`` over the same outer loop.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import time
from typing import Any, Callable

import torch

DT = torch.float64

#: context entered around each method's forward (the memory problem (d) records saved tensors there)
FWD: list[Callable[[], Any]] = [contextlib.nullcontext]


class Quadratic:
    """Lower ½uᵀQu − xᵀu (+ optional skew S in the fixed-point map), upper ½||u − y||²."""

    def __init__(self, n: int, cond: float, skew: float = 0.0, seed: int = 0, nonlinear: float = 0.0) -> None:
        g = torch.Generator().manual_seed(seed)
        U, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=DT))
        eig = torch.logspace(0, math.log10(cond), n, dtype=DT)
        self.Q = (U * eig) @ U.T
        self.Q = 0.5 * (self.Q + self.Q.T)
        R = torch.randn(n, n, generator=g, dtype=DT)
        self.S = skew * cond * (R - R.T) / float(torch.linalg.matrix_norm(R - R.T, 2))
        self.M = self.Q + self.S  # the fixed-point map's linear part
        self.s = 1.0 / float(torch.linalg.matrix_norm(self.M, 2)) if skew else 1.0 / cond
        self.y = torch.randn(n, generator=g, dtype=DT)
        self.x0 = torch.randn(n, generator=g, dtype=DT)
        u_star = torch.linalg.solve(self.M, self.x0)
        self.ref = torch.linalg.solve(self.M.T, u_star - self.y)  # ∇f = M⁻ᵀ(u* − y)
        self.n, self.cond, self.symmetric, self.c = n, cond, skew == 0.0, nonlinear
        if nonlinear:  # + c Σ log cosh u in the lower loss (memory runs only: ``ref`` is then not ∇f)
            self.s = 1.0 / (cond + nonlinear)

    def step(self, u: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        g = self.M @ u - x
        return u - self.s * (g + self.c * torch.tanh(u) if self.c else g)

    def lower_loss(self, u: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        f = 0.5 * u @ (self.Q @ u) - x @ u
        return f + self.c * torch.log(torch.cosh(u)).sum() if self.c else f

    def upper(self, u: torch.Tensor) -> torch.Tensor:
        return 0.5 * ((u - self.y) ** 2).sum()

    def rel_err(self, g: torch.Tensor) -> float:
        return float((g.detach().reshape(-1) - self.ref).norm() / self.ref.norm())

    def forward_steps(self, tol: float = 1e-12) -> int:
        """K_fwd: steps after which the contraction has reduced the error by ``tol``."""
        rho = float(torch.linalg.eigvals(torch.eye(self.n, dtype=DT) - self.s * self.M).abs().max())
        return int(math.ceil(math.log(tol) / math.log(rho)))


class HyperCleaning:
    """(b) data hyper-cleaning on digits: lower f(W; x) (weighted cross-entropy + ridge μ), K gradient
    steps of size s = 1/L per outer step, upper the validation cross-entropy; Adam(lr) on the logits x."""

    def __init__(self, quick: bool) -> None:
        from recipes._common import load_xy
        from recipes.hyper_cleaning import lower_objective, split

        self.n_train, self.K, self.iters, mu = (400, 30, 60, 1e-2) if quick else (800, 60, 300, 1e-2)
        X, y = load_xy(argparse.Namespace(data_dir=None))
        self.D = split(X, y, self.n_train, 300, 0.5, 0)
        self.f, L = lower_objective(self.D, mu)
        self.s = 1.0 / L
        self.d, self.c = self.D["Xtr"].shape[1], self.D["classes"]
        self.lr = 0.3

    def val_loss(self, W: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(self.D["Xva"] @ W, self.D["yva"])

    def outer_loop(self, solve: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]):
        """Adam on x for ``iters`` steps; ``solve(W, x)`` returns the lower solution after K steps from W,
        differentiable w.r.t. x. Returns (wall times, validation losses, final W)."""
        x = torch.zeros(self.n_train, dtype=DT, requires_grad=True)
        opt = torch.optim.Adam([x], lr=self.lr)
        W, ts, vs = torch.zeros(self.d, self.c, dtype=DT), [], []
        t0 = time.perf_counter()
        for _ in range(self.iters):
            opt.zero_grad()
            Wx = solve(W, x)
            v = self.val_loss(Wx)
            v.backward()
            opt.step()
            W = Wx.detach()
            ts.append(time.perf_counter() - t0)
            vs.append(float(v.detach()))
        return ts, vs, W

    def test_acc(self, W: torch.Tensor) -> float:
        from recipes.hyper_cleaning import accuracy

        return accuracy(W, self.D["Xte"], self.D["yte"])


class U(torch.nn.Module):
    """One parameter vector ``u`` (a lower variable or an upper x, for libraries that need modules)."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.u = torch.nn.Parameter(torch.zeros(n, dtype=DT))


class W(torch.nn.Module):
    """The hyper-cleaning classifier weights ``W`` (d × classes)."""

    def __init__(self, d: int, c: int) -> None:
        super().__init__()
        self.W = torch.nn.Parameter(torch.zeros(d, c, dtype=DT))


class Logits(torch.nn.Module):
    """The hyper-cleaning per-sample weight logits ``x``."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.x = torch.nn.Parameter(torch.zeros(n, dtype=DT))
