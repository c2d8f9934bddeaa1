"""Image helpers shared by the imaging recipes: bundled grayscale images, patches, PSNR, blur."""

from __future__ import annotations

import os
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as Fnn

#: natural images bundled with scikit-image (no download)
TRAIN_IMAGES = ("camera", "astronaut", "coffee", "chelsea")
TEST_IMAGES = ("rocket", "cat")


def load_gray(names: Sequence[str], data_dir: Optional[str] = None) -> list[np.ndarray]:
    """Grayscale float images in [0, 1]: scikit-image's bundled ones, or every PNG/JPG of ``data_dir``."""
    if data_dir:
        from skimage import io

        files = sorted(f for f in os.listdir(data_dir) if f.lower().endswith((".png", ".jpg", ".jpeg", ".tif")))
        names = [os.path.join(data_dir, f) for f in files]
        imgs = [io.imread(f) for f in names]
    else:
        import skimage.data

        imgs = [getattr(skimage.data, n)() for n in names]
    out = []
    for im in imgs:
        im = np.asarray(im, dtype=np.float64)
        if im.ndim == 3:
            im = im[..., :3] @ np.array([0.299, 0.587, 0.114])
        out.append(im / 255.0 if im.max() > 1.5 else im)
    return out


def random_patches(images: Sequence[np.ndarray], size: int, n: int, rng: np.random.Generator) -> torch.Tensor:
    """``n`` random ``size×size`` patches, shape (n, 1, size, size), float64."""
    out = []
    for i in range(n):
        im = images[i % len(images)]
        r = rng.integers(0, im.shape[0] - size + 1)
        c = rng.integers(0, im.shape[1] - size + 1)
        out.append(im[r:r + size, c:c + size])
    return torch.tensor(np.stack(out))[:, None]


def psnr(x: torch.Tensor, ref: torch.Tensor) -> float:
    """PSNR (dB) with peak 1 over the whole batch."""
    mse = float(((x - ref) ** 2).mean())
    return 10 * np.log10(1.0 / mse)


def gaussian_kernel(size: int = 5, std: float = 1.0, dtype=torch.float64) -> torch.Tensor:
    ax = torch.arange(size, dtype=dtype) - (size - 1) / 2
    g = torch.exp(-(ax**2) / (2 * std**2))
    k = torch.outer(g, g)
    return (k / k.sum())[None, None]


def blur(x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Convolution with reflect padding (self-adjoint up to boundary effects for symmetric kernels)."""
    p = k.shape[-1] // 2
    return Fnn.conv2d(Fnn.pad(x, (p, p, p, p), mode="reflect"), k)
