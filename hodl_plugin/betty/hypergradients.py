"""The hypergradients registered in Betty's registry: ``gkm_*`` for GKM nodes, ``implicit_*`` for argmin nodes."""

from __future__ import annotations

import warnings
from typing import Any, Callable, Optional, Sequence, Union

import torch
from torch import Tensor

from .. import linear_solve as ls
from ..errors import ConvergenceWarning, HODLError, LinearSolveError
from ..hypergrad import default_adjoint_rtol
from ._betty import get_logger
from ._betty import hypergradient as _betty_hypergradient
from ._messages import in_config_terms, resolution_note
from .config import GKM_METHODS, _cfg
from .distributed import _average_grads_across_ranks
from .errors import WiringWarning
from .nodes import GKMProblem

__all__ = ["gkm_vjp", "implicit_vjp", "register", "set_log_level"]


def _zeros_for_none(grads: Sequence[Optional[Tensor]], params: Sequence[Tensor]) -> list[Tensor]:
    return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]


def _accumulate(params: Sequence[Tensor], grads: Sequence[Tensor]) -> None:
    for p, g in zip(params, grads):
        p.grad = g.detach().clone() if p.grad is None else p.grad + g.detach()


def gkm_vjp(vector: Sequence[Optional[Tensor]], curr: Any, prev: Any, sync: bool = False) -> Optional[list[Tensor]]:
    r"""Hypergradient of a GKM edge: :math:`(\partial u^*/\partial x)^\top` times ``vector``.

    ``vector`` is :math:`\partial L_{\text{upper}}/\partial u`; the GKM node's stored solution
    carries the chosen method in its autograd graph (the implicit adjoint hook, or the unrolled
    steps), so one backward through it gives :math:`(\partial u^*/\partial x)^\top` ``vector``
    w.r.t. the trainable parameters of ``prev``. With ``sync`` the result is accumulated into
    ``.grad`` (Betty's convention) and ``None`` returned. Betty calls it for ``type="gkm_*"``; the
    module example runs it.

    Args:
        vector: :math:`\partial L_{\text{upper}}/\partial u` (Betty passes a one-element sequence).
        curr: the GKM node (:class:`~hodl_plugin.betty.GKMProblem`).
        prev: the upper node whose parameters receive the hypergradient.
        sync: accumulate into ``.grad`` instead of returning.

    Returns:
        tuple or None: the hypergradient for each trainable parameter of ``prev``, or ``None`` with
        ``sync``.

    Raises:
        HODLError: ``curr`` is not a GKM node or was not solved yet, the upper node read a tensor of
            another shape than the solution, or the operator does not depend on any trainable
            parameter of the upper node (the message says what to read).

    Example — Betty calls it along every ``gkm_*`` edge; called by hand after the node's step, on
    :math:`u^*(x) = 2x`: :math:`(\partial u^*/\partial x)^\top v = 2v`:

    >>> import torch, hodl_plugin.betty as hb
    >>> from betty.configs import EngineConfig
    >>> from betty.problems import ImplicitProblem
    >>> hb.set_log_level("WARNING")
    >>> class Low(hb.GKMProblem):                        # u*(x) = 2x
    ...     def operator(self, u, batch): return 0.5 * u + self.up.module.x
    ...     def initial_state(self, batch): return torch.zeros(2, dtype=torch.float64)
    >>> class Up(ImplicitProblem):                       # F = ||u* - 1||^2, minimised at x = 1/2
    ...     def get_batch(self): return None
    ...     def training_step(self, batch): return ((self.low.u - 1.0) ** 2).sum()
    >>> def build(steps):
    ...     m = torch.nn.Module(); m.x = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
    ...     up = Up("up", hb.HODLConfig(), module=m, optimizer=torch.optim.SGD(m.parameters(), lr=0.1))
    ...     low = Low("low", hb.HODLConfig(type="gkm_implicit", tol=1e-12))
    ...     return hb.HODLEngine([up, low], EngineConfig(train_iters=steps, strategy="cpu"),
    ...                          dependencies={"u2l": {up: [low]}, "l2u": {low: [up]}}), m, up, low
    >>> engine, m, up, low = build(1); engine.run()
    >>> _ = low.one_step_descent()                       # the node's step: a fresh solve at the new x
    >>> hb.gkm_vjp([torch.ones(2, dtype=torch.float64)], low, up)
    [tensor([2.0000, 2.0000], dtype=torch.float64)]
    """
    if not isinstance(curr, GKMProblem):
        raise HODLError(
            f"Config(type={curr.config.type!r}) is a GKM hypergradient but node {curr.name!r} is a "
            f"{type(curr).__name__}; use it on a hodl_plugin.betty.GKMProblem, or use 'implicit_cg' "
            "for an argmin ImplicitProblem"
        )
    z = curr.solution
    if z is None:
        raise HODLError(f"GKM node {curr.name!r} has not been solved yet")
    params = list(prev.trainable_parameters())
    v = vector[0] if vector and vector[0] is not None else torch.zeros_like(z)
    if v.shape != z.shape:
        raise HODLError(
            f"the upper node {prev.name!r} read a {tuple(v.shape)} tensor from {curr.name!r} whose solution "
            f"has shape {tuple(z.shape)}"
        )
    if not z.requires_grad:
        raise HODLError(
            f"the operator of GKM node {curr.name!r} does not depend on any trainable parameter of its "
            f"upper node {prev.name!r}: read the upper variables inside operator(u, batch)"
        )
    if not curr._fresh_served and not bool(v.ne(0).any()):
        warnings.warn(
            f"the loss of node {prev.name!r} has an exactly zero gradient with respect to the solution of "
            f"GKM node {curr.name!r}, so no hypergradient reaches {prev.name!r} through this edge. If its "
            f"training_step reads self.{curr.name}.u.detach() (or .data), read self.{curr.name}.u instead "
            f"(or call self.{curr.name}(batch)); if the loss is exactly stationary in u, ignore this",
            WiringWarning,
            stacklevel=2,
        )
    curr._fresh_served = False
    try:
        grads = torch.autograd.grad(z, params, v, retain_graph=True, allow_unused=True)
    except LinearSolveError as e:
        raise _node_error(e, curr, v) from e
    except RuntimeError as e:
        if "modified by an inplace operation" not in str(e):
            raise
        raise HODLError(
            f"the solution of GKM node {curr.name!r} was computed before the parameters of {prev.name!r} changed "
            f"in place (an optimizer step since its solve): its derivative is no longer that of this solution. "
            f"Solve again first — {curr.name}.one_step_descent(), or the next engine step — then call gkm_vjp"
        ) from e
    if all(g is None for g in grads):
        raise HODLError(
            f"the operator of GKM node {curr.name!r} does not depend on the trainable parameters of "
            f"{prev.name!r}: the edge {curr.name!r} -> {prev.name!r} carries no hypergradient"
        )
    grads = _zeros_for_none(grads, params)
    curr.stats["hypergrad_norm"] = float(torch.sqrt(sum((g * g).sum() for g in grads)))
    info = curr.info
    if info is not None and info.adjoint is not None:
        curr.stats["adjoint_iterations"] = float(info.adjoint.iterations)
        curr.stats["adjoint_residual"] = info.adjoint.residual
    if info is not None and info.error_bound is not None:
        curr.stats["error_bound"] = info.error_bound
    if sync:
        _accumulate(params, grads)
        _average_grads_across_ranks(params)
        return None
    return grads


def _node_error(e: LinearSolveError, node: GKMProblem, v: Tensor) -> LinearSolveError:
    """The core's adjoint failure, naming the node and the HODLConfig fields (not GKMSolver's keywords)."""
    info = node.info
    linfo = None if info is None else info.adjoint
    msg = f"GKM node {node.name!r} (HODLConfig(type={node.config.type!r})): "
    if linfo is not None and not linfo.converged:
        rhs = float(torch.linalg.vector_norm(v.detach()))
        note = resolution_note(linfo.threshold, rhs, v.dtype, inexact=node.method.name == "inexact")
        msg += f"{note} The solver's report: " if note else ""
    msg += in_config_terms(str(e), None if linfo is None else linfo.method)
    return LinearSolveError(msg)


def _flat(ts: Sequence[Tensor]) -> Tensor:
    return torch.cat([t.reshape(-1) for t in ts])


def _unflat(v: Tensor, like: Sequence[Tensor]) -> list[Tensor]:
    out, i = [], 0
    for t in like:
        out.append(v[i : i + t.numel()].view_as(t))
        i += t.numel()
    return out


def _make_implicit(solver_name: str) -> Callable[..., Optional[list[Tensor]]]:
    def implicit_vjp_named(
        vector: Sequence[Optional[Tensor]], curr: Any, prev: Any, sync: bool = False
    ) -> Optional[list[Tensor]]:
        return implicit_vjp(vector, curr, prev, sync, solver=solver_name)

    implicit_vjp_named.__name__ = f"implicit_{solver_name}"
    return implicit_vjp_named


def implicit_vjp(
    vector: Sequence[Optional[Tensor]], curr: Any, prev: Any, sync: bool = False, solver: str = "cg"
) -> Optional[list[Tensor]]:
    r"""Implicit hypergradient of an argmin node :math:`\theta^*(\lambda) = \arg\min_\theta L(\theta, \lambda)`.

    Solves :math:`\nabla^2_{\theta\theta} L\, q = v` (``vector``) to the tolerance
    ``config.adjoint_rtol`` (default ``None``: ``hodl_plugin.hypergrad.default_adjoint_rtol`` of the
    dtype, 1e-10 in float64, 1.2e-5 in float32) with ``solver`` (``"cg"`` or ``"gmres"``), then returns
    :math:`-\nabla^2_{\lambda\theta} L\, q`. Correct where Betty's ``cg`` is not (its direction
    update uses the old residual), stops on a tolerance instead of a fixed count, and works on any
    path of the graph. Betty calls it for ``type="implicit_cg"`` / ``"implicit_gmres"``
    (``tests/betty/test_betty_hypergradients.py`` checks it against the closed form).

    Args:
        vector: :math:`v = \partial L_{\text{upper}}/\partial\theta` (one tensor per parameter).
        curr: the argmin node (a Betty ``ImplicitProblem``) whose solution is :math:`\theta^*`.
        prev: the upper node.
        sync: accumulate into ``.grad`` instead of returning.
        solver: ``"cg"`` (symmetric positive-definite Hessian) or ``"gmres"``.

    Returns:
        tuple or None: :math:`-\nabla^2_{\lambda\theta} L\, q` per parameter of ``prev``, or ``None``
        with ``sync``.

    Raises:
        HODLError: ``curr`` is a GKM node (which needs one of the ``gkm_*`` types).
        LinearSolveError: the Hessian system was not solved to ``adjoint_rtol`` (``on_fail="raise"``).

    Example — ``HODLConfig(type="implicit_cg")`` on an argmin node (the :doc:`/betty` guide has a
    larger one). With :math:`L(\theta, \lambda) = \tfrac12\|\theta - \lambda\|^2`,
    :math:`\nabla^2_{\theta\theta} L = I` and :math:`\nabla^2_{\lambda\theta} L = -I`, so the
    hypergradient is :math:`v` itself:

    >>> import torch, hodl_plugin.betty as hb
    >>> from betty.configs import EngineConfig
    >>> from betty.problems import ImplicitProblem
    >>> hb.set_log_level("WARNING")
    >>> class Inner(ImplicitProblem):
    ...     def get_batch(self): return None
    ...     def training_step(self, batch): return 0.5 * ((self.module.theta - self.outer.module.lam) ** 2).sum()
    >>> class Outer(ImplicitProblem):
    ...     def get_batch(self): return None
    ...     def training_step(self, batch): return ((self.inner.module.theta - 1.0) ** 2).sum()
    >>> mi, mo = torch.nn.Module(), torch.nn.Module()
    >>> mi.theta = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
    >>> mo.lam = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
    >>> inner = Inner("inner", hb.HODLConfig(type="implicit_cg"), module=mi,
    ...               optimizer=torch.optim.SGD(mi.parameters(), lr=1.0))
    >>> outer = Outer("outer", hb.HODLConfig(), module=mo, optimizer=torch.optim.SGD(mo.parameters(), lr=0.1))
    >>> engine = hb.HODLEngine([outer, inner], EngineConfig(train_iters=1, strategy="cpu"),
    ...                        dependencies={"u2l": {outer: [inner]}, "l2u": {inner: [outer]}})
    >>> engine.run()
    >>> hb.implicit_vjp([torch.tensor([1.0, 2.0], dtype=torch.float64)], inner, outer)
    [tensor([1., 2.], dtype=torch.float64)]
    """
    if isinstance(curr, GKMProblem):
        raise HODLError(
            f"Config(type={curr.config.type!r}) is for argmin ImplicitProblem nodes; the GKM node "
            f"{curr.name!r} needs one of {list(GKM_METHODS)}"
        )
    cfg = curr.config
    params = list(curr.trainable_parameters())
    loss = curr.training_step_exec(curr.cur_batch)
    if isinstance(loss, dict):
        loss = loss["loss"]
    in_grad = torch.autograd.grad(loss, params, create_graph=True)
    b = _flat(_zeros_for_none(vector, params)).detach()

    def matvec(p: Tensor) -> Tensor:
        hvp = torch.autograd.grad(in_grad, params, _unflat(p, params), retain_graph=True, allow_unused=True)
        return _flat(_zeros_for_none(hvp, params))

    rtol = _cfg(cfg, "adjoint_rtol", None)
    solve = ls.get(
        solver,
        rtol=default_adjoint_rtol(b.dtype) if rtol is None else rtol,
        atol=_cfg(cfg, "adjoint_atol", 0.0),
        maxiter=_cfg(cfg, "adjoint_maxiter", 1000),
    )
    q, info = solve._call(matvec, b, None)  # (the library's own solve: not the public call's checks, one HVP fewer)
    curr.hodl_adjoint_info = info
    if not info.converged:
        note = resolution_note(info.threshold, float(torch.linalg.vector_norm(b)), b.dtype)
        msg = (
            f"node {curr.name!r}: the Hessian system of the implicit hypergradient was not solved "
            f"({info.method}: residual {info.residual:.3e} > {info.threshold:.3e} after {info.iterations} "
            "products); " + (note or "is the lower level solved to optimality and its Hessian nonsingular? Or "
                             "raise HODLConfig(adjoint_maxiter=...)")
        )
        if _cfg(cfg, "on_fail", None) in (None, "raise"):  # None: raise, as hp.Implicit() does
            raise LinearSolveError(msg)
        warnings.warn(msg, ConvergenceWarning, stacklevel=2)
    prev_params = list(prev.trainable_parameters())
    grads = torch.autograd.grad(in_grad, prev_params, _unflat(q, params), allow_unused=True)
    grads = [-g for g in _zeros_for_none(grads, prev_params)]
    if sync:
        _accumulate(prev_params, grads)
        _average_grads_across_ranks(prev_params)
        return None
    return grads


_REGISTRY: dict[str, Callable[..., Any]] = {
    **{name: gkm_vjp for name in GKM_METHODS},
    "implicit_cg": _make_implicit("cg"),
    "implicit_gmres": _make_implicit("gmres"),
}


def set_log_level(level: Union[int, str]) -> None:
    """Set the level of Betty's logger (it prints every logged step at INFO on stdout).

    Args:
        level: a :mod:`logging` level, e.g. ``"WARNING"`` or ``logging.WARNING``.

    Returns:
        None. An unknown level name raises :class:`ValueError` (from :mod:`logging`).

    >>> set_log_level("WARNING")
    """
    get_logger().setLevel(level)


def register() -> None:
    """Add our methods to Betty's hypergradient registry (done on import; idempotent).

    Returns:
        None: afterwards ``Config(type="gkm_implicit")`` (and the other names) select our methods.
        Nothing is raised.

    >>> import betty.hypergradient
    >>> register()
    >>> sorted(k for k in betty.hypergradient.jvp_fn_mapping
    ...        if k.startswith(("gkm", "implicit")))  # doctest: +NORMALIZE_WHITESPACE
    ['gkm_fd', 'gkm_first_order', 'gkm_iga', 'gkm_implicit', 'gkm_inexact', 'gkm_ptt', 'gkm_truncated',
     'gkm_unrolled', 'implicit_cg', 'implicit_gmres']
    """
    _betty_hypergradient.jvp_fn_mapping.update(_REGISTRY)


register()
