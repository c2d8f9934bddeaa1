"""Plain torch: the sparse-coding (LISTA setting) training loop of problem (c) written by hand, the
loop a user of any peer would write (no peer has a proximal-layer lower level)."""

from __future__ import annotations

from typing import Callable

import torch


def forward(kind: str, mods: torch.nn.ModuleList, b: torch.Tensor, K: int,
            alpha: Callable[[int], float]) -> torch.Tensor:
    """K layers from 0: LISTA (``mods[0]`` applied K times) or the HODL/BMO model
    u_{k+1} = T(u_k − α_k (u_k − layer(u_k)))."""
    u = torch.zeros(b.shape[0], 500, dtype=b.dtype)
    if kind == "lista":
        layer = mods[0]
        for _ in range(K):
            u = layer(u, b)
        return u
    T, layer = mods[0], mods[1]
    for k in range(K):
        a = alpha(k)
        u = T(u - a * (u - layer(u, b)), b)
    return u
