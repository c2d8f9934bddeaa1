r"""The two problems of ``benchmarks.baselines``: a quadratic with a closed form and hyper-cleaning.

Both are written as ``upper(x, y)`` / ``lower(x, y)`` on tensors (x the upper variable), with the
analytic gradients the references of :mod:`benchmarks.fo_reference` use (no autograd there).

- :class:`QuadraticBLO` — the MAID quadratic (lower :math:`f = \tfrac12\|A_2 y + A_3 x - b_2\|^2`,
  upper :math:`F = \tfrac12\|A_1 y - b_1\|^2 + \tfrac{\rho}{2}\|x\|^2`; :math:`A_i \sim U[0,1]^{n\times m}`)
  at a small size, with an upper ridge ρ that keeps the hyper-objective well conditioned. Closed form:
  :math:`y^*(x) = c - Mx`, :math:`c = H^{-1}A_2^\top b_2`, :math:`M = H^{-1}A_2^\top A_3`, :math:`H = A_2^\top A_2`,
  :math:`x^* = (P^\top P + \rho I)^{-1}P^\top(A_1 c - b_1)`, :math:`P = A_1 M`.
- :class:`HyperCleaningBLO` — recipes/hyper_cleaning.py's problem on digits (its data helpers, not a
  copy): y the classifier W, x the per-sample weight logits, F the validation cross-entropy; gradients
  of the softmax cross-entropy written out.
"""

from __future__ import annotations

import argparse

import torch

DT = torch.float64


class QuadraticBLO:
    """The MAID quadratic at size (n, m) with an upper ridge ρ; ``x_star``/``y_star`` in closed form."""

    def __init__(self, n: int = 20, m: int = 3, rho: float = 1.0, seed: int = 29) -> None:
        g = torch.Generator().manual_seed(seed)
        self.A1, self.A2, self.A3 = (torch.rand(n, m, generator=g, dtype=DT) for _ in range(3))
        x1, x2, th = (torch.rand(m, generator=g, dtype=DT) for _ in range(3))
        self.b1 = self.A1 @ x1 + 0.01 * torch.randn(n, generator=g, dtype=DT)
        self.b2 = self.A2 @ x2 + self.A3 @ th + 0.01 * torch.randn(n, generator=g, dtype=DT)
        self.rho, self.m = rho, m
        H = self.A2.T @ self.A2
        self.c = torch.linalg.solve(H, self.A2.T @ self.b2)
        self.M = torch.linalg.solve(H, self.A2.T @ self.A3)
        P = self.A1 @ self.M
        self.x_star = torch.linalg.solve(P.T @ P + rho * torch.eye(m, dtype=DT), P.T @ (self.A1 @ self.c - self.b1))
        self.y_star = self.c - self.M @ self.x_star
        eig = torch.linalg.eigvalsh(H)
        self.L_lower, self.mu_lower = float(eig[-1]), float(eig[0])  # of f(x, ·)
        self.L_upper_y = float(torch.linalg.eigvalsh(self.A1.T @ self.A1)[-1])
        self.x0 = torch.ones(m, dtype=DT)
        self.y0 = torch.zeros(m, dtype=DT)

    # objectives (autograd-able)
    def upper(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return 0.5 * ((self.A1 @ y - self.b1) ** 2).sum() + 0.5 * self.rho * (x**2).sum()

    def lower(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return 0.5 * ((self.A2 @ y + self.A3 @ x - self.b2) ** 2).sum()

    # analytic gradients (the references use these, not autograd)
    def gF(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.rho * x, self.A1.T @ (self.A1 @ y - self.b1)

    def gf(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        r = self.A2 @ y + self.A3 @ x - self.b2
        return self.A3.T @ r, self.A2.T @ r

    def dist(self, x: torch.Tensor) -> float:
        """Relative distance of x to the bilevel solution x*."""
        return float((x.detach() - self.x_star).norm() / self.x_star.norm())


class HyperCleaningBLO:
    """Hyper-cleaning on digits: ``n_train`` samples (half corrupted), ridge μ; x logits, y = W."""

    def __init__(self, n_train: int = 200, n_val: int = 200, mu: float = 1e-2, seed: int = 0) -> None:
        from recipes._common import load_xy
        from recipes.hyper_cleaning import lower_objective, split

        X, yl = load_xy(argparse.Namespace(data_dir=None))
        self.D = split(X, yl, n_train, n_val, 0.5, seed)
        self._f, self.L_lower = lower_objective(self.D, mu)
        self.mu = mu
        self.d, self.classes = self.D["Xtr"].shape[1], self.D["classes"]
        self.x0 = torch.zeros(n_train, dtype=DT)
        self.y0 = torch.zeros(self.d, self.classes, dtype=DT)

    def upper(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(self.D["Xva"] @ y, self.D["yva"])

    def lower(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self._f(y, x)

    # analytic gradients: ∇_W CE_i = X_iᵀ(softmax(X_i W) - e_{y_i}), σ' = σ(1 - σ)
    def gF(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        X, lab = self.D["Xva"], self.D["yva"]
        R = torch.softmax(X @ y, 1) - torch.nn.functional.one_hot(lab, self.classes).to(DT)
        return torch.zeros_like(x), X.T @ R / len(lab)

    def gf(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        X, lab = self.D["Xtr"], self.D["ytr"]
        logp = torch.log_softmax(X @ y, 1)
        ce = -logp.gather(1, lab[:, None])[:, 0]
        s = torch.sigmoid(x)
        R = torch.exp(logp) - torch.nn.functional.one_hot(lab, self.classes).to(DT)
        return s * (1 - s) * ce / len(lab), X.T @ (s[:, None] * R) / len(lab) + self.mu * y

    def test_acc(self, y: torch.Tensor) -> float:
        from recipes.hyper_cleaning import accuracy

        return accuracy(y.detach(), self.D["Xte"], self.D["yte"])
