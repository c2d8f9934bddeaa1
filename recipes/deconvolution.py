"""Non-blind image deconvolution (BMO/HODL): GKM iterations with a learned module vs TV, Tikhonov, unrolled.

BMO's deconvolution experiment (Liu et al., ICML 2022) at CPU scale. Clean images: scikit-image's bundled
natural images (training patches from camera, astronaut, coffee, chelsea; test crops of rocket and
cat), or ``--data-dir``. Observations b = k ⊛ x + σn with a 9×9 Gaussian blur (std 1.6) or a
linear motion blur (length 9, 45°), noise σ ∈ {0.01, 0.02}.

Model and methods (``recipes/_restoration.py``): the smoothed-TV task model ½||k ⊛ u − b||² + λTV_ε(u)
whose gradient step is T; the learned module N_ω (3 conv layers) enters the GKM step as
w_k = u_k − α_k N_ω(u_k), u_{k+1} = T(w_k). HODL uses α_k = (k+1)^-½ → 0 (the iteration still
converges to Fix T); the unrolled network uses α_k ≡ 1. Both are trained by back-propagation
through K steps on random patches. Baselines: Tikhonov and TV with weights tuned on validation
patches. The table reports PSNR/SSIM on the test crops after K steps and after 4K steps (beyond
the trained horizon).

``--data-dir``: a folder of images (PNG/JPG); the last two are the test images.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch

from ._common import parse_list, parser, setup
from ._restoration import DT, CircularBlur, add_args, gaussian_psf, motion_psf, run_recipe

NAME = "deconvolution"
KERNELS = {"gaussian": lambda: gaussian_psf(9, 1.6), "motion": lambda: motion_psf(9, 45.0)}


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    ap = parser(NAME, __doc__.split("\n")[0])
    ap.add_argument("--settings", default=None,
                    help="comma list of kernel:sigma, kernels gaussian|motion "
                         "(default gaussian:0.01 quick / all four of {gaussian,motion}×{0.01,0.02})")
    add_args(ap)
    args = ap.parse_args(argv)
    setup(args)
    specs = args.settings or ("gaussian:0.01" if args.quick else "gaussian:0.01,gaussian:0.02,motion:0.01,motion:0.02")
    settings = []
    def kernel_sigma(spec: str) -> tuple[str, float]:
        kname, sep, sigma = spec.partition(":")
        if kname not in KERNELS or not sep:
            raise ValueError(f"expected kernel:sigma with a kernel from {sorted(KERNELS)}")
        if not float(sigma) >= 0:
            raise ValueError("sigma must be >= 0")
        return kname, float(sigma)

    for kname, s in parse_list(ap, "--settings", specs, kernel_sigma):
        A = CircularBlur(KERNELS[kname]())
        degrade = lambda x, g, A=A, s=s: A(x) + s * torch.randn(x.shape, generator=g, dtype=DT)
        settings.append((f"{kname} blur, σ={s:g}", A, degrade))
    return run_recipe(NAME, "deconvolution: test PSNR vs GKM step, training curves", args, settings,
                      np.logspace(-4, -1, 7))


if __name__ == "__main__":
    main()
