"""Input validation shared by the solver and the methods (clear errors naming the culprit)."""

from __future__ import annotations

from typing import Callable, Iterable, Sequence

import torch
from torch import Tensor, nn

from ._torch_compat import transforms_active, version


def module_tensors(*objs: object) -> list[Tensor]:
    """Parameters and buffers of the objects that are ``nn.Module``s."""
    out: list[Tensor] = []
    for obj in objs:
        if isinstance(obj, nn.Module):
            out.extend(obj.parameters())
            out.extend(obj.buffers())
    return out


def check_inputs(u0: object, params: Sequence[object], modules: Iterable[Tensor] = ()) -> None:
    """Types, dtypes, devices and finiteness of ``u0``, ``params`` (tensors, or lists / tuples /
    dicts of tensors) and the operator's tensors."""
    if not isinstance(u0, Tensor):
        raise TypeError(f"u0 must be a torch.Tensor, got {type(u0).__name__}")
    if not u0.is_floating_point():
        raise TypeError(f"u0 must have a floating dtype, got {u0.dtype}")
    if all(isinstance(p, Tensor) for p in params):  # the common case: no structure to walk
        leaves = list(params)
    else:
        from ._capture import flatten

        leaves, _ = flatten(params)  # raises TypeError naming a non-tensor parameter
    device, dtype = u0.device, u0.dtype
    for j, t in enumerate([*leaves, *modules]):
        if t.device != device or (t.dtype != dtype and t.is_floating_point()):  # named only on failure
            n = len(leaves)
            what = _leaf_names(params)[j] if j < n else f"a parameter/buffer of the operator (#{j - n})"
            _check_like(t, u0, what)
    if transforms_active():  # a finiteness test would need a host sync; NaN then propagates
        return
    floats = [p for p in leaves if p.is_floating_point()]
    if not all_finite([u0, *floats]):
        names = _leaf_names(params)
        labels = ["u0", *(n for n, p in zip(names, leaves) if p.is_floating_point())]
        bad = [label for label, t in zip(labels, [u0, *floats]) if not bool(torch.isfinite(t).all())]
        raise ValueError(f"non-finite values (NaN or Inf) in {', '.join(bad)}")


def all_finite(tensors: Sequence[Tensor]) -> bool:
    """Whether every entry of the (floating) ``tensors`` is finite, in one host read: ``t - t`` is 0
    for a finite entry and NaN for an infinite or NaN one, and a sum of zeros cannot overflow.

    >>> all_finite([torch.ones(2), torch.tensor([1.0, float("inf")])])
    False
    """
    t = tensors[0].detach()
    total = (t - t).sum()
    for t in tensors[1:]:
        t = t.detach()
        total = total + (t - t).sum()
    return float(total) == 0.0


def _leaf_names(params: Sequence[object]) -> list[str]:
    """``params[i]``, ``params[i]['w']``, ... for each tensor of ``params``, in flatten order."""
    out: list[str] = []

    def walk(obj: object, where: str) -> None:
        if isinstance(obj, Tensor):
            out.append(where)
        elif isinstance(obj, dict):
            for k, v in obj.items():
                walk(v, f"{where}[{k!r}]")
        elif isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                walk(v, f"{where}[{i}]")

    for i, p in enumerate(params):
        walk(p, f"params[{i}]")
    return out


def _check_like(t: Tensor, u0: Tensor, what: str) -> None:
    if t.device != u0.device:
        raise ValueError(f"{what} is on {t.device} but u0 is on {u0.device}; move them to one device")
    if t.is_floating_point() and t.dtype != u0.dtype:
        raise TypeError(f"{what} has dtype {t.dtype} but u0 has dtype {u0.dtype}; use one dtype")


def check_operator_output(out: object, u: Tensor) -> None:
    """``T(u, *params)`` must return a tensor shaped, typed and placed like ``u``."""
    if not isinstance(out, Tensor):
        raise TypeError(f"the operator T(u, *params) must return a tensor, got {type(out).__name__}")
    if out.shape != u.shape:
        raise ValueError(
            f"the operator T(u, *params) returned shape {tuple(out.shape)}, expected u's shape "
            f"{tuple(u.shape)}"
        )
    if out.dtype != u.dtype:
        raise TypeError(f"the operator T(u, *params) returned dtype {out.dtype}, expected {u.dtype}")
    if out.device != u.device:
        raise ValueError(f"the operator T(u, *params) returned a tensor on {out.device}, expected {u.device}")


def guard_inplace(T: Callable[..., Tensor], u: Tensor, params: Sequence[Tensor], functional: bool = False) -> Tensor:
    """``T(u, *params)``, raising ``ValueError`` if ``T`` wrote into ``u`` or a parameter in place
    (their version counters moved): the iteration needs ``u_k`` after computing ``T(u_k)``.

    >>> import torch
    >>> guard_inplace(lambda u, x: u.mul_(0.5).add_(x), torch.ones(2), [torch.ones(2)])  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: the operator T modified its input u in place (e.g. u.mul_(...), ...
    """
    if functional:
        return T(u, *params)
    from ._capture import flatten

    tensors = [u, *flatten(params)[0]]
    if any(t.is_inference() for t in tensors):  # no version counters: compare u's values instead
        kept = u.clone()
        out = T(u, *params)
        changed = [] if torch.equal(kept, u) else [0]
    else:
        before = [version(t) for t in tensors]
        out = T(u, *params)
        changed = [i for i, (t, v) in enumerate(zip(tensors, before)) if version(t) != v]
    if changed:
        raise inplace_error(changed[0])
    return out


def inplace_error(which: int) -> ValueError:
    """The error of an operator that wrote into its input ``which`` (0: u, i: the (i-1)-th tensor of params)."""
    what = "u" if which == 0 else f"params[{which - 1}]"
    return ValueError(
        f"the operator T modified its input {what} in place (e.g. u.mul_(...), u += ..., or an out= buffer it "
        "returned before and the iteration now passes back as u); the GKM iteration needs u_k after T(u_k): "
        "write T out of place (0.5 * u + x, not u.mul_(0.5).add_(x) or torch.add(..., out=buf))"
    )
