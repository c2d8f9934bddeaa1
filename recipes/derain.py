"""Rain streak removal (BMO/HODL): GKM iterations with a learned module vs TV, Tikhonov, unrolled.

BMO's deraining experiment (Liu et al., ICML 2022) at CPU scale, on synthetic rain (``add_rain``) over
scikit-image's bundled natural images (training patches from camera, astronaut, coffee, chelsea;
test crops of rocket and cat) or ``--data-dir``.

The rain generator: per image a dominant direction θ₀ ~ U(−25°, 25°) from the vertical; streaks
with centres uniform over the image, length ~ U(6, 18) px, angle θ₀ + N(0, 3°), brightness
a ~ U(0.25, 0.6) by default, drawn as 1-px anti-aliased segments (wrapping at the borders), optionally
thickened; the streak layer r ∈ [0, 1) is screen-blended, b = x + r(1 − x) (so b stays in [0, 1],
as rain lightens a scene). ``--density`` is the fraction of pixels a streak's centre line covers
(0.05 light; 0.1 and 2-px streaks heavy, roughly Rain100L / Rain100H-like).

Model and methods (``recipes/_restoration.py``): A = I, the smoothed-TV task model
½||u − b||² + λTV_ε(u) whose gradient step is T; the learned module N_ω enters the GKM step as
w_k = u_k − α_k N_ω(u_k), u_{k+1} = T(w_k); HODL uses α_k = (k+1)^-½ → 0, the unrolled network
α_k ≡ 1. Baselines: Tikhonov and TV with weights tuned on validation patches.

``--data-dir``: a folder of images (PNG/JPG); the last two are the test images.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import numpy as np
import torch

from ._common import choice, parse_list, parser, setup
from ._restoration import DT, Identity, add_args, run_recipe

NAME = "derain"


def add_rain(x: torch.Tensor, g: torch.Generator, density: float = 0.04, length: tuple[float, float] = (6, 18),
             spread_deg: float = 25.0, brightness: tuple[float, float] = (0.2, 0.5), thick: bool = False
             ) -> torch.Tensor:
    """Screen-blend synthetic rain streaks onto images ``x`` of shape (n, 1, H, W) in [0, 1].

    Example:
        >>> x = torch.zeros(2, 1, 32, 32)
        >>> b = add_rain(x, torch.Generator().manual_seed(0))
        >>> tuple(b.shape), bool(b.min() >= 0), bool(b.max() < 1), bool(b.mean() > 0)
        ((2, 1, 32, 32), True, True, True)
    """
    n, _, H, W = x.shape
    seed = int(torch.randint(2**31 - 1, (1,), generator=g))
    rng = np.random.default_rng(seed)
    layers = np.zeros((n, H, W))
    mean_len = sum(length) / 2
    for i in range(n):
        count = max(1, int(density * H * W / mean_len))
        theta0 = math.radians(rng.uniform(-spread_deg, spread_deg))
        rc = rng.uniform(0, [H, W], size=(count, 2))
        ln = rng.uniform(*length, size=count)
        th = theta0 + np.radians(rng.normal(0.0, 3.0, size=count))
        a = rng.uniform(*brightness, size=count)
        t = np.linspace(-0.5, 0.5, int(2 * length[1]))[None, :] * ln[:, None]  # (count, samples)
        rr = rc[:, :1] + t * np.cos(th)[:, None]
        cc = rc[:, 1:] + t * np.sin(th)[:, None]
        r0, c0 = np.floor(rr).astype(int), np.floor(cc).astype(int)
        fr, fc = rr - r0, cc - c0
        amp = np.broadcast_to(a[:, None], rr.shape)
        for dr, dc, w in ((0, 0, (1 - fr) * (1 - fc)), (1, 0, fr * (1 - fc)), (0, 1, (1 - fr) * fc), (1, 1, fr * fc)):
            np.maximum.at(layers[i], ((r0 + dr) % H, (c0 + dc) % W), amp * w)
            if thick:
                np.maximum.at(layers[i], ((r0 + dr) % H, (c0 + dc + 1) % W), 0.6 * amp * w)
    r = torch.tensor(np.clip(layers, 0, 0.99), dtype=x.dtype)[:, None]
    return x + r * (1 - x)


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    ap = parser(NAME, __doc__.split("\n")[0])
    ap.add_argument("--settings", default=None,
                    help="comma list of light|heavy (default light quick / light,heavy)")
    add_args(ap)
    args = ap.parse_args(argv)
    setup(args)
    kinds = {"light": {"density": 0.05, "brightness": (0.25, 0.6)},
             "heavy": {"density": 0.1, "brightness": (0.25, 0.6), "thick": True}}
    names = parse_list(ap, "--settings", args.settings or ("light" if args.quick else "light,heavy"), choice(kinds))
    settings = []
    for k in names:
        degrade = lambda x, g, kw=kinds[k]: add_rain(x, g, **kw).to(DT)
        settings.append((f"{k} rain", Identity(), degrade))
    return run_recipe(NAME, "derain: test PSNR vs GKM step, training curves", args, settings,
                      np.logspace(-3, 0, 7))


if __name__ == "__main__":
    main()
