r"""Shared machinery of the image-restoration recipes (deconvolution, derain): BMO/HODL with a learned module.

The task model (BMO/HODL's) is a smoothed-TV restoration problem with a linear forward operator A,

.. math::

    \min_u\ h(u; b, \lambda) = \tfrac12\|Au - b\|^2 + \lambda\,\mathrm{TV}_\epsilon(u),\qquad
    \mathrm{TV}_\epsilon(u) = \sum_p \sqrt{(D_1u)_p^2 + (D_2u)_p^2 + \epsilon^2} - \epsilon,

whose solution is the fixed point of the gradient step :math:`T(u) = u - \tau\nabla_u h(u)`,
:math:`\tau = 1/(\|A\|^2 + 8\lambda/\epsilon)` (averaged, so GKM converges). The learned module is a
small residual CNN :math:`N_\omega` that enters the GKM step as the upper-level direction
:math:`d_\omega(u) = N_\omega(u)` (an estimate of the artefact in :math:`u`):

.. math::

    w_k = u_k - \alpha_k\,N_\omega(u_k),\qquad u_{k+1} = T(w_k; \lambda),

- **HODL/BMO**: :math:`\alpha_k = \alpha_0 (k+1)^{-\gamma}` (to 0, not summable), so the iteration
  still converges to Fix T however :math:`\omega` was trained — the learned module speeds up and
  steers the first K steps;
- **unrolled without aggregation**: :math:`\alpha_k \equiv 1`, the classical learned unrolled
  network :math:`u_{k+1} = T(u_k - N_\omega(u_k))`, with no guarantee beyond the trained K.

Every GKM run (learned or the plain TV iteration) starts from :math:`u_0` = the tuned Tikhonov
solution (a linear Wiener-type deconvolution, one FFT).

Both learn :math:`(\omega, \log\lambda)` by back-propagation through K steps (``hypergrad="unrolled"``,
as in BMO) on random patches, Adam, mean squared error to the clean patch. Baselines with weights
tuned on the training patches: Tikhonov :math:`\tfrac12\|Au-b\|^2 + \tfrac{\lambda}{2}\|Du\|^2`
(closed form by FFT) and TV (the task model solved to convergence). Metrics: PSNR and SSIM of
scikit-image (SSIM: 11×11 Gaussian window σ = 1.5, as in the papers) on [0, 1]-clipped test crops.
Convolutions are circular (exact adjoints; the observations are simulated with the same operator).
"""

from __future__ import annotations

import math
import time
import warnings
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.nn.functional as Fnn
from torch import nn

import hodl_plugin as hp

from ._common import acceleration, add_anderson, positive_int, print_table, progress, save_json
from ._images import TEST_IMAGES, TRAIN_IMAGES, load_gray, random_patches

DT = torch.float32


# -- forward operators -------------------------------------------------------------------------
class CircularBlur:
    """A u = k ⊛ u with circular boundary; ``adjoint`` is exact; ``fft`` gives the transfer function."""

    def __init__(self, kernel: torch.Tensor) -> None:
        if kernel.ndim != 2 or kernel.shape[0] % 2 == 0 or kernel.shape[0] != kernel.shape[1]:
            raise ValueError(f"kernel must be square with odd size, got {tuple(kernel.shape)}")
        self.k = (kernel / kernel.sum()).to(DT)[None, None]
        self.kt = torch.flip(self.k, (-2, -1))
        self.p = kernel.shape[0] // 2

    def _conv(self, x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        p = self.p
        return Fnn.conv2d(Fnn.pad(x, (p, p, p, p), mode="circular"), k)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv(x, self.k)

    def adjoint(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv(x, self.kt)

    def transfer(self, shape: tuple[int, int]) -> torch.Tensor:
        """The 2-D DFT of the kernel placed for circular correlation on an image of ``shape``."""
        H, W = shape
        kk = torch.zeros(H, W, dtype=torch.float64)
        ks = self.k.shape[-1]
        kk[:ks, :ks] = self.kt[0, 0].double()
        kk = torch.roll(kk, (-self.p, -self.p), (0, 1))
        return torch.fft.fft2(kk)


class Identity:
    """A = I (denoising-type problems such as deraining)."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x

    adjoint = __call__

    def transfer(self, shape: tuple[int, int]) -> torch.Tensor:
        return torch.ones(shape, dtype=torch.complex128)


def gaussian_psf(size: int, std: float) -> torch.Tensor:
    ax = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(ax**2) / (2 * std**2))
    k = torch.outer(g, g)
    return k / k.sum()


def motion_psf(length: int, angle_deg: float, size: Optional[int] = None) -> torch.Tensor:
    """Linear motion blur: a segment of ``length`` pixels at ``angle_deg``, anti-aliased, sum 1."""
    size = size or (length if length % 2 else length + 1)
    k = np.zeros((size, size))
    c = (size - 1) / 2
    t = np.linspace(-(length - 1) / 2, (length - 1) / 2, 8 * length)
    a = math.radians(angle_deg)
    r, s = c - t * math.sin(a), c + t * math.cos(a)
    for rr, ss in zip(r, s):  # bilinear splat
        r0, s0 = int(math.floor(rr)), int(math.floor(ss))
        fr, fs = rr - r0, ss - s0
        for dr, ds, w in ((0, 0, (1 - fr) * (1 - fs)), (1, 0, fr * (1 - fs)), (0, 1, (1 - fr) * fs), (1, 1, fr * fs)):
            if 0 <= r0 + dr < size and 0 <= s0 + ds < size:
                k[r0 + dr, s0 + ds] += w
    return torch.tensor(k / k.sum())


# -- the task model and its GKM operator -----------------------------------------------------------
def _grad_tv(u: torch.Tensor, eps: float) -> torch.Tensor:
    """∇ TV_ε(u) with circular forward differences: Dᵀ(Du / √(|Du|² + ε²))."""
    d1 = torch.roll(u, -1, -1) - u
    d2 = torch.roll(u, -1, -2) - u
    n = torch.sqrt(d1 * d1 + d2 * d2 + eps * eps)
    p1, p2 = d1 / n, d2 / n
    return (torch.roll(p1, 1, -1) - p1) + (torch.roll(p2, 1, -2) - p2)


class TVStep(nn.Module):
    r"""T(u; b, λ) = u - τ(Aᵀ(Au - b) + λ∇TV_ε(u)), τ = 1/(1 + 8λ/ε); λ = exp(log_lam) is learnable."""

    def __init__(self, A: Any, lam: float, eps: float = 0.02, learn_lam: bool = True) -> None:
        super().__init__()
        self.A, self.eps = A, float(eps)
        self.log_lam = nn.Parameter(torch.tensor([math.log(lam)], dtype=DT), requires_grad=learn_lam)

    def step_size(self) -> torch.Tensor:
        return 1.0 / (1.0 + 8.0 * torch.exp(self.log_lam.detach()) / self.eps)

    def forward(self, u: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        lam = torch.exp(self.log_lam)
        g = self.A.adjoint(self.A(u) - b) + lam * _grad_tv(u, self.eps)
        return u - self.step_size() * g


class ArtifactCNN(nn.Module):
    """N_ω: three 3×3 convolutions (ReLU) predicting the artefact of u (d_ω in the GKM step)."""

    def __init__(self, channels: int = 16, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.net = nn.Sequential(
            nn.Conv2d(1, channels, 3, padding=1, padding_mode="reflect"), nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1, padding_mode="reflect"), nn.ReLU(),
            nn.Conv2d(channels, 1, 3, padding=1, padding_mode="reflect"),
        ).to(DT)
        with torch.no_grad():
            for m in self.net:
                if isinstance(m, nn.Conv2d):
                    m.weight.copy_(torch.randn(m.weight.shape, generator=g) * math.sqrt(2.0 / (9 * m.in_channels)))
                    m.bias.zero_()
            self.net[-1].weight.mul_(0.1)  # start close to plain T

    def forward(self, u: torch.Tensor, *unused: torch.Tensor) -> torch.Tensor:
        return self.net(u)


class LearnedGKM(nn.Module):
    """The learned restoration model: K GKM steps of T with the aggregated module N_ω.

    ``aggregation="hodl"``: α_k = α₀(k+1)^-γ; ``"none"``: α_k ≡ 1 (unrolled learned network).
    """

    def __init__(self, A: Any, lam: float, K: int, channels: int, aggregation: str, alpha0: float = 1.0,
                 gamma: float = 0.5, seed: int = 0, init: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
                 ) -> None:
        super().__init__()
        self.init = init or (lambda b: b.clone())
        self.T = TVStep(A, lam)
        self.net = ArtifactCNN(channels, seed)
        self.K, self.aggregation = K, aggregation
        alpha = hp.Polynomial(alpha0, gamma) if aggregation == "hodl" else hp.Constant(1.0)
        # α ≡ 1 is outside HODL's conditions on purpose (the baseline): strict=False, its warning silenced
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", hp.ConvergenceWarning)
            self.solver = hp.GKMSolver(self.T, max_steps=K, tol=0.0, hypergrad="unrolled", upper_grad=self.net,
                                       alpha=alpha, check_every=K, strict=aggregation == "hodl",
                                       on_divergence="warn")

    def forward(self, b: torch.Tensor) -> torch.Tensor:
        return self.solver(self.init(b), b)

    @torch.no_grad()
    def trajectory(self, b: torch.Tensor, steps: int) -> list[torch.Tensor]:
        """u_1, ..., u_steps (for PSNR-vs-step curves), with the same schedule as the solver."""
        it = self.solver.iteration
        u, out = self.init(b), []
        for k in range(steps):
            a = it.alpha(k)
            u = self.T(u - a * self.net(u), b)
            out.append(u)
        return out


# -- baselines -------------------------------------------------------------------------------
def tikhonov(A: Any, b: torch.Tensor, lam: float) -> torch.Tensor:
    """argmin ½||Au-b||² + (λ/2)||Du||² in closed form (circular D, FFT)."""
    H, W = b.shape[-2:]
    Ah = A.transfer((H, W))
    w1 = torch.fft.fftfreq(W, dtype=torch.float64) * 2 * math.pi
    w2 = torch.fft.fftfreq(H, dtype=torch.float64) * 2 * math.pi
    D2 = (2 - 2 * torch.cos(w1))[None, :] + (2 - 2 * torch.cos(w2))[:, None]
    num = torch.conj(Ah) * torch.fft.fft2(b.double())
    return torch.fft.ifft2(num / (Ah.abs() ** 2 + lam * D2)).real.to(b.dtype)


def tv_solve(A: Any, b: torch.Tensor, lam: float, max_steps: int = 2000, tol: float = 1e-4,
             u0: Optional[torch.Tensor] = None, acc: Optional[hp.Anderson] = None) -> torch.Tensor:
    """The TV task model solved by the GKM solver (no learned module), from ``u0`` (default b);
    ``acc``: its ``acceleration=`` (``--anderson``)."""
    T = TVStep(A, lam, learn_lam=False)
    solver = hp.GKMSolver(T, max_steps=max_steps, tol=tol, check_every=25, acceleration=acc)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", hp.ConvergenceWarning)
        return solver(b.clone() if u0 is None else u0, b)


def tune(solve: Callable[[float], torch.Tensor], x: torch.Tensor, grid: np.ndarray) -> tuple[float, float]:
    """The weight of ``grid`` with the best PSNR of ``solve(λ)`` against ``x`` (training patches)."""
    best = (-math.inf, float(grid[0]))
    for lam in grid:
        best = max(best, (batch_psnr(solve(float(lam)), x), float(lam)))
    return best[1], best[0]


# -- metrics -----------------------------------------------------------------------------------
def batch_psnr(u: torch.Tensor, x: torch.Tensor) -> float:
    """Mean over images of PSNR (peak 1) of u clipped to [0, 1]."""
    mse = ((u.clamp(0, 1) - x) ** 2).flatten(1).mean(1)
    return float((10 * torch.log10(1.0 / mse)).mean())


def metrics(u: torch.Tensor, x: torch.Tensor) -> tuple[float, float]:
    """Mean PSNR and SSIM (scikit-image; SSIM with the 11×11 Gaussian window σ = 1.5, as in the papers)."""
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    ps, ss = [], []
    for ui, xi in zip(u.detach().clamp(0, 1).double().numpy()[:, 0], x.double().numpy()[:, 0]):
        ps.append(peak_signal_noise_ratio(xi, ui, data_range=1.0))
        ss.append(structural_similarity(xi, ui, data_range=1.0, gaussian_weights=True, sigma=1.5,
                                        use_sample_covariance=False))
    return float(np.mean(ps)), float(np.mean(ss))


# -- training ----------------------------------------------------------------------------------
def train(model: LearnedGKM, make_batch: Callable[[int], tuple[torch.Tensor, torch.Tensor]], val: tuple,
          iters: int, lr: float, args: Any, label: str, eval_every: int = 20) -> dict[str, Any]:
    """Adam on (ω, log λ) through K unrolled GKM steps; returns the validation-PSNR curve."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, iters)
    xs, ys = [0], [batch_psnr(model(val[0]).detach(), val[1])]
    t0 = time.perf_counter()
    for it in progress(range(iters), args, desc=label):
        b, x = make_batch(it)
        opt.zero_grad()
        loss = ((model(b) - x) ** 2).mean()
        loss.backward()
        opt.step()
        sched.step()
        if (it + 1) % eval_every == 0 or it + 1 == iters:
            with torch.no_grad():
                xs.append(it + 1)
                ys.append(batch_psnr(model(val[0]), val[1]))
    return {"train_time_s": time.perf_counter() - t0, "curve_iter": xs, "curve_val_psnr": ys,
            "lambda": float(torch.exp(model.T.log_lam.detach()))}


def run_setting(name: str, A: Any, data: dict[str, torch.Tensor], args: Any, make_batch,
                lam_grid: np.ndarray) -> dict[str, Any]:
    """Tune the baselines, train HODL and the unrolled network, evaluate everything on the test crops."""
    b_te, x_te, b_val, x_val = data["b_test"], data["x_test"], data["b_val"], data["x_val"]
    rows: list[dict[str, Any]] = []

    def row(method: str, u: torch.Tensor, **extra: Any) -> None:
        p, s = metrics(u, x_te)
        rows.append({"setting": name, "method": method, "PSNR": p, "SSIM": s, **extra})

    row("observation b", b_te)
    lam_tik, _ = tune(lambda lam: tikhonov(A, b_val, lam), x_val, lam_grid)
    row("Tikhonov (tuned)", tikhonov(A, b_te, lam_tik), weight=lam_tik)
    t0 = time.perf_counter()
    acc = acceleration(args)
    lam_tv, _ = tune(lambda lam: tv_solve(A, b_val, lam, max_steps=args.tv_steps, acc=acc), x_val, lam_grid / 4)
    tune_s = time.perf_counter() - t0
    row("TV (tuned, converged)", tv_solve(A, b_te, lam_tv, max_steps=args.tv_steps, acc=acc), weight=lam_tv,
        time_s=tune_s)
    init = lambda b: tikhonov(A, b, lam_tik)  # noqa: E731 - u_0 of every GKM run below
    row(f"TV, {args.K} steps from u_0", tv_solve(A, b_te, lam_tv, max_steps=args.K, tol=0.0, u0=init(b_te)),
        weight=lam_tv)

    models, curves, step_curves = {}, {}, {}
    long = args.K * args.test_mult
    for agg, label in (("none", "unrolled α≡1"), ("hodl", "HODL α_k=(k+1)^-½")):
        torch.manual_seed(args.seed)
        model = LearnedGKM(A, lam_tv, args.K, args.channels, agg, seed=args.seed, init=init)
        tr = train(model, make_batch, (b_val, x_val), args.iters, args.lr, args, f"{name}: {label}")
        models[agg] = model
        with torch.no_grad():
            traj = model.trajectory(b_te, long)
        row(f"{label}, K={args.K}", traj[args.K - 1], weight=tr["lambda"], time_s=tr["train_time_s"])
        row(f"{label}, {long} steps", traj[-1], weight=tr["lambda"])
        curves[label] = (tr["curve_iter"], tr["curve_val_psnr"])
        step_curves[label] = (list(range(1, long + 1)), [batch_psnr(u, x_te) for u in traj])
    T, u, tv_traj = TVStep(A, lam_tv, learn_lam=False), init(b_te), []
    with torch.no_grad():
        for _ in range(long):
            u = T(u, b_te)
            tv_traj.append(u)
    step_curves["TV task model (no module)"] = (list(range(1, long + 1)), [batch_psnr(u, x_te) for u in tv_traj])
    return {"rows": rows, "train_curves": curves, "step_curves": step_curves, "models": models,
            "lam_tv": lam_tv, "lam_tikhonov": lam_tik}


def save_figures(path: str, title: str, results: list[dict[str, Any]], examples: list[tuple[str, list]]) -> str:
    """One PNG: per setting, test PSNR vs GKM step (trained K marked) and validation PSNR vs training
    iteration; below, the first test crop restored by each method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # two settings (four panels) per row, the restored crops in a last row: legible at page width
    n = len(results)
    per_row = min(n, 2)
    ncols = 2 * per_row
    setting_rows = -(-n // per_row)
    rows = setting_rows + (1 if examples else 0)
    fig = plt.figure(figsize=(3.1 * ncols, 3.2 * rows))
    grid = fig.add_gridspec(rows, ncols)
    for i, res in enumerate(results):
        r, c = divmod(i, per_row)
        ax = fig.add_subplot(grid[r, 2 * c])
        for lab, (x, y) in res["step_curves"].items():
            ax.plot(x, y, label=lab, lw=1.5)
        ax.axvline(res["K"], color="gray", ls=":", lw=1)
        ax.set_xlabel("GKM step k (test)")
        ax.set_ylabel("test PSNR (dB)")
        ax.set_title(res["setting"], fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        ax = fig.add_subplot(grid[r, 2 * c + 1])
        for lab, (x, y) in res["train_curves"].items():
            ax.plot(x, y, label=lab, lw=1.5)
        ax.set_xlabel("training iteration")
        ax.set_ylabel("val. PSNR (dB)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    crops = examples[0][1] if examples else []
    if crops:
        sub = grid[rows - 1, :].subgridspec(1, len(crops))
        for j, (lab, img) in enumerate(crops):
            ax = fig.add_subplot(sub[0, j])
            ax.imshow(np.clip(img, 0, 1), cmap="gray", vmin=0, vmax=1)
            ax.set_title(lab, fontsize=8)
            ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# -- the recipe driver shared by deconvolution and derain ------------------------------------------
def center_crops(images: list[np.ndarray], size: int) -> torch.Tensor:
    out = []
    for im in images:
        r, c = (im.shape[0] - size) // 2, (im.shape[1] - size) // 2
        out.append(im[r:r + size, c:c + size])
    return torch.tensor(np.stack(out), dtype=DT)[:, None]


def add_args(ap: Any) -> None:
    """Training/evaluation options of the restoration recipes."""
    ap.add_argument("--K", type=positive_int, default=None, help="GKM steps trained (default 8 quick / 10)")
    ap.add_argument("--iters", type=positive_int, default=None, help="training iterations (default 150 quick / 300)")
    ap.add_argument("--channels", type=int, default=None, help="channels of N_ω (default 12 quick / 16)")
    ap.add_argument("--batch", type=int, default=None, help="patches per batch (default 8 quick / 12)")
    ap.add_argument("--patch", type=int, default=None, help="patch size (default 32 quick / 40)")
    ap.add_argument("--test-size", type=int, default=None, help="test crop size (default 96 quick / 128)")
    ap.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate (cosine decay)")
    ap.add_argument("--test-mult", type=int, default=4, help="also evaluate after test_mult·K steps")
    ap.add_argument("--tv-steps", type=int, default=None,
                    help="GKM steps of the converged TV baseline (default 400 quick / 600)")
    add_anderson(ap, default=0)  # of the converged TV baseline (the trained GKM runs are unrolled)


def _fill_defaults(args: Any) -> None:
    for name, quick, full in (("K", 8, 10), ("iters", 150, 300), ("channels", 12, 16), ("batch", 8, 12),
                              ("patch", 32, 40), ("test_size", 96, 128), ("tv_steps", 400, 600)):
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)


Degrade = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


def run_recipe(name: str, title: str, args: Any, settings: list[tuple[str, Any, Degrade]],
               lam_grid: np.ndarray) -> dict[str, Any]:
    """Every setting ``(label, A, degrade(x, generator) -> b)``: baselines, training, table, JSON, PNG."""
    _fill_defaults(args)
    imgs = load_gray(TRAIN_IMAGES + TEST_IMAGES, args.data_dir)
    rng = np.random.default_rng(args.seed)
    pool = random_patches(imgs[:-2], args.patch, 64 * args.batch, rng).to(DT)
    x_val = random_patches(imgs[:-2], args.patch, 32, rng).to(DT)
    x_test = center_crops(imgs[-2:], args.test_size)
    rows, results, examples = [], [], []
    for label, A, degrade in settings:
        g = torch.Generator().manual_seed(args.seed)
        data = {"b_val": degrade(x_val, g), "x_val": x_val, "b_test": degrade(x_test, g), "x_test": x_test}
        bg = torch.Generator().manual_seed(args.seed + 1)

        def make_batch(it: int, degrade=degrade) -> tuple[torch.Tensor, torch.Tensor]:
            x = pool[torch.randint(len(pool), (args.batch,), generator=bg)]
            if it % 2:  # horizontal flips: cheap augmentation
                x = torch.flip(x, (-1,))
            return degrade(x, bg), x

        res = run_setting(label, A, data, args, make_batch, lam_grid)
        res.update(setting=label, K=args.K)
        rows += res["rows"]
        results.append(res)
        if not examples:
            b0 = data["b_test"][:1]
            with torch.no_grad():
                examples.append((label, [("clean", x_test[0, 0].numpy()), ("observation", b0[0, 0].numpy()),
                                         (f"unrolled α≡1, K={args.K}", res["models"]["none"](b0)[0, 0].numpy()),
                                         (f"HODL, K={args.K}", res["models"]["hodl"](b0)[0, 0].numpy())]))
    png = save_figures(f"{args.out}/{name}.png", title, results, examples)
    print_table(rows, ["setting", "method", "PSNR", "SSIM", "weight", "time_s"],
                title=f"# {name}: test crops ({args.test_size}×{args.test_size}), PSNR (dB) / SSIM")
    out = {"rows": rows, "plot": png, "K": args.K,
           "curves": [{"setting": r["setting"], "train": r["train_curves"], "steps": r["step_curves"]}
                      for r in results]}
    print(f"wrote {save_json(args, name, out)} and {png}")
    return out
