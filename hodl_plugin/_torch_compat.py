"""Every private torch API hodl_plugin uses, in one place.

A torch upgrade is the likeliest thing to break a library quietly; so each private entry point is
read here, once, with a public fallback where one exists, and :func:`missing` lists those that this
torch lacks (``tests/test_torch_compat.py`` fails naming the torch version when the list is not
empty).

>>> missing()
[]
"""

from __future__ import annotations

import contextlib
from typing import Any, Optional

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor

__all__ = [
    "transforms_active",
    "is_functorch_wrapped",
    "functorch_level",
    "current_functorch_level",
    "unwrap_once",
    "forward_ad_active",
    "nested_forward_transforms",
    "differentiating_transforms",
    "derivative_carried",
    "is_dead_wrapper",
    "version",
    "plain_tensors",
    "engine_backward",
    "HAS_ENGINE",
    "function_apply",
    "missing",
]

_ARE_ACTIVE = getattr(torch._C, "_are_functorch_transforms_active", None)
_FUNCTORCH = getattr(torch._C, "_functorch", None)
_IS_WRAPPED = getattr(_FUNCTORCH, "is_functorch_wrapped_tensor", None)
_GET_LEVEL = getattr(_FUNCTORCH, "maybe_get_level", None)
_CURRENT_LEVEL = getattr(_FUNCTORCH, "maybe_current_level", None)
_STACK = getattr(_FUNCTORCH, "get_interpreter_stack", None)
_UNWRAP = getattr(_FUNCTORCH, "get_unwrapped", None)
_LEGACY_BATCHED = getattr(_FUNCTORCH, "is_legacy_batchedtensor", None)
_JVP = getattr(getattr(_FUNCTORCH, "TransformType", None), "Jvp", None)
_DISABLE = getattr(torch._C, "_DisableFuncTorch", None)
_ENGINE = getattr(getattr(torch.autograd, "Variable", None), "_execution_engine", None)
try:  # the stack of active torch.func transforms (grad, vjp, jvp, vmap), innermost last
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters as _INTERPRETERS
except ImportError:  # pragma: no cover - a torch without it
    _INTERPRETERS = None
_UNWRAP_DEAD = getattr(getattr(getattr(torch, "_functorch", None), "utils", None), "unwrap_dead_wrappers", None)


def transforms_active() -> bool:
    """Whether a ``torch.func`` transform (vmap, grad, jacrev, jacfwd) is running: then no host
    sync (``float``, ``bool``, ``.item()``) may happen on the tensors it traces.

    >>> transforms_active()
    False
    """
    return bool(_ARE_ACTIVE()) if _ARE_ACTIVE is not None else False


def is_functorch_wrapped(t: Tensor) -> bool:
    """Whether ``t`` is a tensor of a ``torch.func`` transform (a GradTrackingTensor or a
    BatchedTensor): a tensor that carries a transform's derivative or batch.

    Without the private test, every floating tensor counts (the caller then treats more tensors as
    differentiable inputs, which costs time, never correctness)."""
    if _IS_WRAPPED is None:
        return t.is_floating_point() or t.is_complex()
    return bool(_IS_WRAPPED(t))


def functorch_level(t: Tensor) -> int:
    """The ``torch.func`` level ``t`` is wrapped at (-1 for a plain tensor, or when unknown)."""
    return int(_GET_LEVEL(t)) if _GET_LEVEL is not None else -1


def unwrap_once(t: Tensor) -> Optional[Tensor]:
    """The tensor a ``torch.func`` wrapper wraps (``None`` when unknown)."""
    return _UNWRAP(t) if _UNWRAP is not None else None


def current_functorch_level() -> int:
    """The level of the innermost active ``torch.func`` transform (0 when none, or when unknown)."""
    if _CURRENT_LEVEL is None:
        return 0
    level = _CURRENT_LEVEL()
    return 0 if level is None else int(level)


def version(t: Tensor) -> int:
    """``t``'s version counter (bumped by every in-place write; what autograd checks saved tensors
    with). Inference tensors have none: test ``t.is_inference()`` first."""
    return t._version


def nested_forward_transforms() -> bool:
    """Whether two ``torch.func`` forward-mode transforms are active (``jacfwd(jacfwd(f))``): a custom
    ``autograd.Function``'s forward rule then runs with tensors that do not carry the outer level's
    tangents (torch 2.13 returns a zero for that dependence), so the primitives refuse it by name."""
    if _STACK is None or _JVP is None:
        return False
    stack = _STACK() or []
    return sum(1 for i in stack if i.key() == _JVP) >= 2


def forward_ad_active() -> bool:
    """Whether a forward-mode AD dual level is open (``torch.autograd.forward_ad.dual_level``)."""
    return getattr(fwAD, "_current_level", -1) >= 0


def differentiating_transforms() -> int:
    """How many of the active ``torch.func`` transforms differentiate (``grad``/``vjp`` and ``jvp``
    levels; ``vmap`` does not count). Inside the backward of a ``torch.autograd.Function`` it is 1 for
    one ``torch.func.grad`` and 2 for ``grad(grad(...))``. Without the private stack, every active
    transform counts (a nested ``vmap`` then looks like a second derivative: an error, never a wrong
    number).

    >>> differentiating_transforms()
    0
    """
    if _INTERPRETERS is None:
        return current_functorch_level() if transforms_active() else 0
    return sum(1 for i in _INTERPRETERS() if str(i.key()).rsplit(".", 1)[-1] in ("Grad", "Jvp"))


def _differentiating_levels() -> Optional[set[int]]:
    """The levels of the active ``grad``/``vjp``/``jvp`` transforms (``None`` when unknown)."""
    if _INTERPRETERS is None:
        return None
    return {int(i.level()) for i in _INTERPRETERS() if str(i.key()).rsplit(".", 1)[-1] in ("Grad", "Jvp")}


def derivative_carried(t: Tensor) -> bool:
    """Whether ``t`` is the wrapper of a ``torch.func`` transform that has ended around a tensor that
    carries the derivative of an *active* ``grad``/``vjp``/``jvp`` transform: the pullback of
    ``torch.func.vjp`` runs after its transform exited, on tensors saved inside it, and a
    ``torch.func.grad`` around that call differentiates what they wrap. Without the private stack,
    any wrapped tensor inside counts (an error, never a wrong number).

    >>> derivative_carried(torch.ones(2))
    False
    """
    if not is_dead_wrapper(t):
        return False
    levels = _differentiating_levels()
    while is_functorch_wrapped(t):
        level = functorch_level(t)
        if level >= 0 and (levels is None or level in levels):
            return True
        inner = unwrap_once(t)
        if inner is None:
            return levels is None
        t = inner
    return False


def legacy_batched(t: Tensor) -> bool:
    """Whether ``t`` is batched by torch's legacy vmap (``torch.autograd.grad(..., is_grads_batched=True)``,
    ``torch.autograd.functional.jacobian(..., vectorize=True)``), not by ``torch.func.vmap``."""
    return _LEGACY_BATCHED is not None and bool(_LEGACY_BATCHED(t))


def is_dead_wrapper(t: Tensor) -> bool:
    """Whether ``t`` is the wrapper of a ``torch.func`` transform that has ended (what the pullback of
    ``torch.func.vjp`` finds in its saved tensors)."""
    return is_functorch_wrapped(t) and functorch_level(t) == -2


def plain_tensors() -> Any:
    """A context in which new tensors are plain, not wrapped by the active ``torch.func`` transforms
    (for diagnostics that are no part of the transformed computation)."""
    return _DISABLE() if _DISABLE is not None else contextlib.nullcontext()


def engine_backward(outputs: tuple, grad_outputs: tuple, inputs: tuple) -> tuple:
    """The autograd engine's ``run_backward`` (``retain_graph=True``, ``allow_unused=True``): what
    ``torch.autograd.grad`` runs after its argument checks, at half its fixed cost on small problems.
    Raises ``AttributeError`` when this torch has no such entry point (see :data:`HAS_ENGINE`)."""
    if _ENGINE is None:
        raise AttributeError("torch.autograd.Variable._execution_engine is not available")
    return _ENGINE.run_backward(outputs, grad_outputs, True, False, inputs, True, False)


#: whether :func:`engine_backward` is available
HAS_ENGINE = _ENGINE is not None


def function_apply(cls: Any, args: tuple) -> Any:
    """``cls.apply(*args)`` for an ``autograd.Function`` whose ``forward`` takes no default arguments:
    outside ``torch.func`` transforms, what ``Function.apply`` runs after binding the arguments to
    the forward's signature (``inspect.signature`` at every call, a tenth of a small solve's fixed
    cost); under transforms, ``Function.apply`` itself."""
    if _UNWRAP_DEAD is None or transforms_active():
        return torch.autograd.Function.apply.__func__(cls, *args)  # type: ignore[attr-defined]
    return super(torch.autograd.Function, cls).apply(*_UNWRAP_DEAD(args))  # type: ignore[misc]


def missing() -> list[str]:
    """The private torch APIs above that this torch lacks (each has a fallback; the fallback is
    slower or less precise, so a non-empty list is a regression to look at)."""
    names = {
        "torch._C._are_functorch_transforms_active": _ARE_ACTIVE,
        "torch._C._functorch.is_functorch_wrapped_tensor": _IS_WRAPPED,
        "torch._C._functorch.maybe_get_level": _GET_LEVEL,
        "torch._C._functorch.maybe_current_level": _CURRENT_LEVEL,
        "torch._C._functorch.get_interpreter_stack": _STACK,
        "torch._C._functorch.get_unwrapped": _UNWRAP,
        "torch._C._functorch.is_legacy_batchedtensor": _LEGACY_BATCHED,
        "torch._C._functorch.TransformType.Jvp": _JVP,
        "torch._C._DisableFuncTorch": _DISABLE,
        "torch.autograd.Variable._execution_engine": _ENGINE,
        "torch.autograd.forward_ad._current_level": getattr(fwAD, "_current_level", None),
        "torch._functorch.pyfunctorch.retrieve_all_functorch_interpreters": _INTERPRETERS,
        "torch._functorch.utils.unwrap_dead_wrappers": _UNWRAP_DEAD,
    }
    return [name for name, obj in names.items() if obj is None]
