"""Assertions shared by the tests: the right number or a named error, and warnings recorded.

Unlike :mod:`_oracles` (references, no :mod:`hodl_plugin`), these look at what the library raises.
"""

from __future__ import annotations

import re
import warnings
from typing import Any, Callable, Optional

import torch
from _oracles import DT, rel_err

import hodl_plugin as hp

MODE_NAMES = ("implicit", "inexact", "unrolled", "truncated", "first_order")
_MODE_RE = re.compile("|".join(MODE_NAMES))


def assert_right_or_named(fn: Callable[[], Any], ref: Any, tol: float, what: str = "") -> Optional[Any]:
    """``fn()`` equals ``ref`` (relative error ≤ ``tol``; ``ref=True`` for gradcheck-like calls), or
    raises a :class:`hp.HODLError` naming a hypergradient mode. Returns the result (None if named)."""
    try:
        out = fn()
    except hp.HODLError as e:
        msg = str(e)
        assert _MODE_RE.search(msg), f"{what}: named error {type(e).__name__} names no mode to use: {msg}"
        return None
    if ref is True:
        assert out is True, f"{what}: expected True, got {out!r}"
        return out
    assert isinstance(out, torch.Tensor), f"{what}: expected a tensor, got {type(out).__name__}"
    assert tuple(out.shape) == tuple(ref.shape), f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert bool(torch.isfinite(out).all()), f"{what}: non-finite result {out}"
    err = rel_err(out.detach(), ref)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.1e}\n got {out}\n ref {ref}"
    return out


def zeros(n, dtype=DT):
    return torch.zeros(n, dtype=dtype)


def run_recording(fn):
    """Run fn(); return (result or None, exception or None, list of warnings)."""
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        try:
            return fn(), None, list(rec)
        except Exception as e:  # noqa: BLE001 — classified by the caller
            return None, e, list(rec)


def conv_warned(rec) -> bool:
    return any(issubclass(w.category, hp.ConvergenceWarning) for w in rec)
