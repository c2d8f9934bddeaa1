r"""The model of the learned-regulariser recipes: a convex Field-of-Experts regulariser and its denoising /
deblurring task, shared by :mod:`recipes.learned_regularizer` (the core ISGD, MAID-style and unrolled loops)
and :mod:`recipes._isgd_betty` (ISGD as a Betty graph).

Lower level, per patch: :math:`\hat x(\theta) = \arg\min_x \tfrac12\|Ax - y\|^2 + R_\theta(x)`, solved by the
GKM gradient step :math:`T(x) = x - \tau\nabla_x h` with :math:`\tau = 1/(1 + L(\theta))`; upper level: the
squared error to the clean patch (:func:`upper_loss`), trained by Adam with steps :math:`\alpha_0(k+1)^{-q}`
(:func:`adam_with_decay`).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as Fnn

import hodl_plugin as hp

from ._common import acceleration
from ._images import TEST_IMAGES, TRAIN_IMAGES, blur, gaussian_kernel, load_gray, psnr, random_patches

__all__ = ["DT", "FoE", "Task", "adam_with_decay", "upper_loss"]

DT = torch.float64


class FoE(torch.nn.Module):
    """Convex Field-of-Experts regulariser R_θ(x) = e^c Σ_j e^{w_j} Σ_p (√((K_j * x)_p² + e^s) - e^{s/2}), filters
    K_j kept zero-mean by :meth:`project`."""

    def __init__(self, n_filters: int, ksize: int, seed: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        K = torch.randn(n_filters, 1, ksize, ksize, generator=g, dtype=DT) * math.sqrt(2.0 / (2 * ksize * ksize))
        self.K = torch.nn.Parameter(K - K.mean(dim=(2, 3), keepdim=True))
        self.w = torch.nn.Parameter(torch.full((n_filters,), math.log(0.01), dtype=DT))
        self.s = torch.nn.Parameter(torch.tensor([-3.0], dtype=DT))  # shape (1,), not 0-d
        self.c = torch.nn.Parameter(torch.tensor([0.0], dtype=DT))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.K.shape[-1] // 2
        z = Fnn.conv2d(Fnn.pad(x, (p, p, p, p), mode="reflect"), self.K)
        e = torch.exp(self.s)
        pot = torch.sqrt(z * z + e) - torch.sqrt(e)
        return torch.exp(self.c) * (torch.exp(self.w)[None, :, None, None] * pot).sum()

    @torch.no_grad()
    def lipschitz(self) -> float:
        """Upper bound of the Lipschitz constant of ∇R: e^c Σ e^{w_j} ||K_j||₁² / e^{s/2}."""
        l1 = self.K.abs().sum(dim=(1, 2, 3))
        return float(torch.exp(self.c) * (torch.exp(self.w) * l1**2).sum() / torch.exp(self.s / 2))

    @torch.no_grad()
    def project(self) -> None:
        self.K -= self.K.mean(dim=(2, 3), keepdim=True)


class Task:
    """Forward model A, data and the lower-level operator for one task (denoise / deblur)."""

    def __init__(self, kind: str, args: Any, rng: np.random.Generator, g: torch.Generator) -> None:
        self.acc = acceleration(args)  # of the lower solves to a tolerance (--anderson)
        self.kind = kind
        size = 40 if args.paper else 24
        n_train = 256 if args.paper else 64
        n_test = 64 if args.paper else 32
        imgs = load_gray(TRAIN_IMAGES + TEST_IMAGES, args.data_dir)
        train_imgs, test_imgs = imgs[:-2], imgs[-2:]
        self.x_train = random_patches(train_imgs, size, n_train, rng)
        self.x_test = random_patches(test_imgs, size, n_test, rng)
        self.k = gaussian_kernel(5, 1.0) if kind == "deblur" else None
        sigma = 25 / 255 if kind == "denoise" else 0.01
        self.y_train = self.A(self.x_train) + sigma * torch.randn(self.x_train.shape, generator=g, dtype=DT)
        self.y_test = self.A(self.x_test) + sigma * torch.randn(self.x_test.shape, generator=g, dtype=DT)

    def A(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.k is None else blur(x, self.k)

    def operator(self, foe: FoE) -> hp.GradientStep:
        def h(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return 0.5 * ((self.A(x) - y) ** 2).sum() + foe(x)

        T = hp.GradientStep(objective=h, step=1.0)
        T.foe = foe  # registered: the solver checks its parameters' dtype/device
        return T

    def set_step(self, T: hp.GradientStep, foe: FoE) -> None:
        T.step = 1.0 / (1.0 + foe.lipschitz())  # ||A|| ≤ 1 for the identity and a normalised blur

    def test_psnr(self, foe: FoE) -> float:
        T = self.operator(foe)
        self.set_step(T, foe)
        solver = hp.GKMSolver(T, max_steps=5000, tol=1e-6, acceleration=self.acc)
        with torch.no_grad():
            return psnr(solver(self.y_test.clone(), self.y_test), self.x_test)


def upper_loss(u: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Upper loss: squared error summed over a patch's pixels, averaged over patches (ISGD's scaling;
    a per-pixel mean makes the gradients, and so the meaning of absolute accuracies, tiny)."""
    return ((u - x) ** 2).sum() / x.shape[0]


def adam_with_decay(foe: FoE, lr0: float, q: float):
    opt = torch.optim.Adam(foe.parameters(), lr=lr0)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda k: (k + 1) ** (-q))
