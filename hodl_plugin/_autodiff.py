"""Derivative products on autograd graphs: ∇_u f, and vector–Jacobian / Jacobian–vector products of a
graph built once (the matrix products of every linear solve)."""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor

from ._torch_compat import (
    HAS_ENGINE,
    current_functorch_level,
    engine_backward,
    forward_ad_active,
    legacy_batched,
    nested_forward_transforms,
    transforms_active,
)
from .errors import HODLError


def grad_u(fn: Callable[..., Tensor], u: Tensor, params: Sequence[Tensor]) -> Tensor:
    r""":math:`\nabla_u f(u, *params)`.

    With grad mode on, the result stays differentiable w.r.t. ``u`` and ``params``
    (``create_graph=True``, needed by unrolled differentiation and the adjoint products); with grad
    mode off it is a plain value and ``params`` are detached.
    """
    create = torch.is_grad_enabled()
    if transforms_active():  # inside torch.func.grad/vmap/...: requires_grad_ is refused, so a func.grad
        return _grad_u_func(fn, u, params, create)
    # under torch.inference_mode the inputs are inference tensors, which autograd cannot record: the gradient
    # is taken on normal copies (a T that reads inference tensors from its closure still cannot be differentiated)
    with torch.inference_mode(False), torch.enable_grad():
        if u.is_inference():
            u, params = u.clone(), [p.clone() if isinstance(p, Tensor) and p.is_inference() else p for p in params]
        u_ = u if (create and u.requires_grad) else u.detach().requires_grad_(True)
        args = params if create else [p.detach() if isinstance(p, Tensor) else p for p in params]
        val = fn(u_, *args)
        if not isinstance(val, Tensor) or val.numel() != 1:
            raise ValueError("the objective must return a scalar tensor")
        g = None
        if val.requires_grad:
            (g,) = torch.autograd.grad(val.sum(), u_, create_graph=create, allow_unused=True)
    if g is None:
        raise ValueError(_INDEPENDENT)
    return g


_INDEPENDENT = (
    "the upper objective F(u, *params) does not depend on u: HODL's aggregation needs "
    "∇_u F (drop upper=, or pass alpha=0 to keep F only for the inexact error bound)"
)


def _grad_u_func(fn: Callable[..., Tensor], u: Tensor, params: Sequence[Tensor], create: bool) -> Tensor:
    """:func:`grad_u` under active torch.func transforms: ``torch.func.grad`` composes with them
    (the outer transforms differentiate through it when ``create``; otherwise its inputs are detached)."""

    def scalar(u_: Tensor, *ps: Tensor) -> Tensor:
        val = fn(u_, *ps)
        if not isinstance(val, Tensor) or val.numel() != 1:
            raise ValueError("the objective must return a scalar tensor")
        return val.sum()

    if not create:
        u, params = u.detach(), [p.detach() for p in params]
    return torch.func.grad(scalar)(u, *params)


def make_vjp(out: Tensor, inp: Tensor) -> Callable[[Tensor], Tensor]:
    r"""``v -> (∂out/∂inp)ᵀ v`` on a graph built once (kept between calls).

    This is the matrix product of every adjoint solve, so its fixed cost matters: it calls the
    autograd engine directly (:func:`~hodl_plugin._torch_compat.engine_backward`: what
    ``torch.autograd.grad`` does after its argument checks, half the time per call on small problems)
    and falls back to ``torch.autograd.grad`` where that is unavailable. Unused inputs give zeros.
    """

    def public(v: Tensor) -> Tensor:
        (g,) = torch.autograd.grad(out, inp, v, retain_graph=True, allow_unused=True)
        return torch.zeros_like(inp) if g is None else g

    if not HAS_ENGINE:
        return public
    state = {"fast": True}

    def fast(v: Tensor) -> Tensor:
        if state["fast"]:
            try:
                (g,) = engine_backward((out,), (v,), (inp,))
                return torch.zeros_like(inp) if g is None else g
            except (TypeError, RuntimeError, AttributeError):
                state["fast"] = False
        return public(v)

    return fast


def grad_once(out: Tensor, inputs: Sequence[Tensor], v: Tensor) -> tuple:
    r""":math:`(\partial\,\mathrm{out}/\partial\,\mathrm{inputs})^\top v` for the last time on a graph
    (``torch.autograd.grad(out, inputs, v, allow_unused=True)``, through the engine's entry point where
    this torch has it: :func:`make_vjp`). ``None`` for an input ``out`` does not depend on."""
    if HAS_ENGINE and not transforms_active():
        try:
            return tuple(engine_backward((out,), (v,), tuple(inputs)))
        except (TypeError, RuntimeError, AttributeError):
            pass
    return torch.autograd.grad(out, inputs, v, allow_unused=True)


def make_jvp(out: Tensor, inp: Tensor) -> Callable[[Tensor], Tensor] | None:
    r"""``z -> (∂out/∂inp) z`` on a graph built once, by the transpose of a vjp: with
    :math:`h(g) = J^\top g` (linear in a dummy ``g``), :math:`Jz = \partial_g\langle h(g), z\rangle`.

    One reverse pass per product through a graph kept between calls — on the GKM operators several
    times cheaper than re-tracing ``torch.func.jvp`` at every product (forward-mode AD decomposes
    many ops). ``None`` — use ``torch.func.jvp`` — where that could be wrong or fail: a graph with a
    custom ``autograd.Function`` (its backward may not be differentiable, which autograd would not
    always say) or a backward that does not depend on ``g``.
    """
    if _has_custom_function(out):
        return None
    g = torch.zeros_like(out, requires_grad=True)
    try:
        (h,) = torch.autograd.grad(out, inp, g, create_graph=True, retain_graph=True, allow_unused=True)
    except RuntimeError:
        return None
    if h is None or not h.requires_grad:
        return None
    jvp = make_vjp(h, g)
    try:  # a double backward that is not implemented may only fail when it runs
        jvp(torch.zeros_like(out))
    except RuntimeError:
        return None
    return jvp


def _has_custom_function(out: Tensor) -> bool:
    """Whether ``out``'s graph contains a node of a custom ``torch.autograd.Function``."""
    seen, stack = set(), [out.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, torch.autograd.function.BackwardCFunction):
            return True
        stack.extend(nxt for nxt, _ in node.next_functions)
    return False


def jvp_any(fn: Callable[..., Tensor], primals: tuple, tangents: tuple) -> Tensor:
    """``∂fn(primals)·tangents``: ``torch.func.jvp`` (which nests under ``torch.func`` transforms), or —
    inside a ``torch.autograd.forward_ad`` dual level and no transform, where forward AD cannot nest —
    the transpose of a vjp (two reverse passes)."""
    if not forward_ad_active() or current_functorch_level() > 0:
        return torch.func.jvp(fn, primals, tangents)[1]
    return jvp_by_vjp(fn, primals, tangents)


def jvp_by_vjp(fn: Callable[..., Tensor], primals: tuple, tangents: tuple) -> Tensor:
    """``∂fn(primals)·tangents`` as the transpose of a vjp (two reverse passes): it nests under every
    forward mode, ``torch.func.jvp`` and ``torch.autograd.forward_ad`` dual levels alike."""
    out, pull = torch.func.vjp(fn, *primals)
    _, pull2 = torch.func.vjp(lambda z_: pull(z_), torch.zeros_like(out))
    return pull2(tuple(tangents))[0]


def refuse_forward_over_forward() -> None:
    if nested_forward_transforms():
        raise HODLError(
            "forward-over-forward differentiation (torch.func.jacfwd(jacfwd(f)), or a jvp inside a jvp) "
            "through hodl_plugin's implicit primitive is not supported: torch's forward rules of custom "
            "autograd.Functions do not see the outer level's tangents and would return a zero second "
            "derivative. Use torch.func.hessian (= jacfwd(jacrev)), jacrev(jacfwd(f)) or jacrev(jacrev(f)), "
            "which are exact, or hypergrad='unrolled'"
        )


def grad_wanted() -> bool:
    """Whether a derivative can be asked of this call: grad mode, a torch.func transform or a
    forward-mode dual level."""
    return torch.is_grad_enabled() or transforms_active() or forward_ad_active()


def refuse_legacy_vmap(g: Tensor, what: str) -> None:
    """Torch's legacy vmap (vectorized reverse mode: ``is_grads_batched=True``, ``jacobian`` / ``hessian``
    with ``vectorize=True``, ``gradcheck(check_batched_grad=True)``) cannot run a backward that solves a
    linear system with host-side stopping: it is refused with what to use instead."""
    if legacy_batched(g):
        raise HODLError(
            f"{what} under torch's legacy vectorized reverse mode (torch.autograd.grad(..., is_grads_batched=True), "
            "torch.autograd.functional.jacobian / hessian(..., vectorize=True), gradcheck(check_batched_grad=True)) "
            "is not supported: use torch.func.jacrev / torch.func.hessian / torch.func.vmap over torch.func.vjp "
            "(exact, batched), or vectorize=False"
        )
