r"""The implicit derivative of *any* solver: :func:`custom_fixed_point` and :func:`custom_root`.

The faces of :mod:`hodl_plugin.implicit`'s rules that TorchOpt and jaxopt users know: decorate a
function ``solver(init, *args) -> u`` — a closed form, L-BFGS, your own CG — and its result gets the
exact implicit derivative, at every order and under ``torch.func`` transforms (:ref:`math-implicit`).
"""

from __future__ import annotations

import functools
import inspect
import math
import warnings
from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor

from . import linear_solve as ls
from ._autodiff import grad_wanted
from ._capture import bind, flatten
from ._checks import all_finite
from ._stopping import default_tol, scaled_norm
from ._torch_compat import transforms_active
from .errors import ConvergenceWarning, DivergenceError, user_stacklevel
from .gkm import validate_count, validate_nonneg, validate_relative
from .implicit import FixedPoint, FixedPointProblem

__all__ = ["custom_fixed_point", "custom_root"]


def _decorated(kind: str, fn: Callable[..., Tensor], solve: ls.SolverLike, on_fail: str, symmetric: bool,
               tol: Optional[float], atol: float, batch_dims: int
               ) -> Callable[[Callable[..., Tensor]], Callable[..., Tensor]]:
    solver = ls.as_solver(solve, default="cg" if symmetric else "gmres")
    batch_dims = validate_count(batch_dims, "batch_dims", minimum=0)
    if on_fail not in ("raise", "warn"):
        raise ValueError(f"on_fail must be 'raise' or 'warn', got {on_fail!r}")
    tol = validate_relative(tol, "tol", allow_none=True)
    atol = validate_nonneg(atol, "atol")
    sign = 1.0 if kind == "fixed_point" else -1.0

    def decorator(solver_fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
        name = getattr(solver_fn, "__name__", "the solver")
        try:
            sig: Optional[inspect.Signature] = inspect.signature(solver_fn)
        except (TypeError, ValueError):  # a builtin without a signature: positional arguments only
            sig = None

        @functools.wraps(solver_fn)
        def wrapped(*args: Any, **kwargs: Any) -> Tensor:
            if kwargs:  # bound to the solver's signature: the ones it can take by position become positional
                args, kwargs = _bind(sig, name, args, kwargs)
            if not args or not isinstance(args[0], Tensor):
                raise TypeError(f"the first argument of {name} (the initial point) must be a tensor")
            init, args = args[0], tuple(args[1:])
            if batch_dims > init.dim():
                raise ValueError(f"batch_dims={batch_dims} but the initial point of {name} has only {init.dim()} "
                                 "dimensions")
            _check_finite(name, sig, init, args, kwargs)
            g, solver_g = fn, solver_fn
            if kwargs:  # keyword-only arguments travel as one trailing dict, its tensors differentiable too
                args = (*args, kwargs)
                g = functools.partial(_call_with_keywords, fn)
                solver_g = functools.partial(_call_with_keywords, solver_fn)
            if not grad_wanted():
                return solver_g(init, *args)
            op = bind(g, init, args, static=True)

            def fwd(u0: Tensor, tensors: Sequence[Tensor], info: Any, problem: FixedPointProblem) -> Tensor:
                with torch.no_grad(), op.context(tensors):
                    params = op.params(tensors)
                    out = solver_g(u0.detach(), *params)
                    _check_solution(kind, name, g, out, u0, params, tol, atol, batch_dims)
                return out

            problem = FixedPointProblem(op, fwd, solver, sign=sign, on_fail=on_fail, batch_dims=batch_dims)
            leaves, _ = flatten(args, static=True)
            return FixedPoint.apply(problem, init, *leaves, *op.captured)

        return wrapped

    return decorator


def _bind(sig: Optional[inspect.Signature], name: str, args: tuple, kwargs: dict[str, Any]
          ) -> tuple[tuple, dict[str, Any]]:
    """``(args, kwargs)`` as the solver's signature takes them: a keyword argument that it can take by
    position becomes positional (``solve(u0, x=x)`` is ``solve(u0, x)``, and ``T(u, x)`` is called so);
    keyword-only ones stay keywords (passed by name to the solver and to the map)."""
    if sig is None:
        raise TypeError(f"{name} has no inspectable signature: pass its arguments by position")
    try:
        bound = sig.bind(*args, **kwargs)
    except TypeError as e:
        raise TypeError(f"{name}{sig}: {e}") from None
    return tuple(bound.args), dict(bound.kwargs)


def _call_with_keywords(f: Callable[..., Tensor], u: Tensor, *params: Any) -> Tensor:
    """``f(u, *args, **kwargs)`` for ``params = (*args, kwargs)``."""
    return f(u, *params[:-1], **params[-1])


def _check_finite(name: str, sig: Optional[inspect.Signature], init: Tensor, args: tuple,
                  kwargs: dict[str, Any]) -> None:
    """NaN or Inf in the initial point or a tensor argument: a ``ValueError`` naming the argument (as
    :class:`~hodl_plugin.GKMSolver` does), rather than the solver's NaN result. No check under
    ``torch.func`` transforms (it would need a host sync)."""
    if transforms_active():
        return
    names = list(sig.parameters) if sig is not None else []
    labelled = [(names[i] if i < len(names) and sig.parameters[names[i]].kind in _POSITIONAL
                 else f"argument {i}", a) for i, a in enumerate((init, *args))]
    labelled += list(kwargs.items())
    floats = [(label, t) for label, a in labelled for t in flatten([a], static=True)[0] if t.is_floating_point()]
    if not floats or all_finite([t for _, t in floats]):
        return
    bad = list(dict.fromkeys(label for label, t in floats if not bool(torch.isfinite(t).all())))
    raise ValueError(f"non-finite values (NaN or Inf) in {', '.join(bad)} (an argument of {name})")


_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


def _check_solution(kind: str, name: str, fn: Callable[..., Tensor], out: Any, init: Tensor,
                    params: Sequence[Any], tol: Optional[float], atol: float, batch_dims: int = 0) -> None:
    """The solver's result is a tensor like ``init``, finite, and a fixed point (a root) to the tolerance
    (each sample's, over ``batch_dims`` leading dims): the derivative is that of the equation *at the
    returned point*, so a wrong point is said, not used."""
    if not isinstance(out, Tensor) or out.shape != init.shape:
        raise TypeError(
            f"{name} must return the solution, a tensor shaped like its first argument {tuple(init.shape)}; "
            f"got {type(out).__name__}{'' if not isinstance(out, Tensor) else ' of shape ' + str(tuple(out.shape))}"
        )
    if out.dtype != init.dtype or out.device != init.device:
        raise TypeError(
            f"{name} returned a {out.dtype} tensor on {out.device} for a {init.dtype} problem on {init.device}: "
            "return the solution in the dtype and on the device of the initial point"
        )
    if transforms_active():  # no host syncs under torch.func transforms
        return
    r = fn(out, *params)
    if kind == "fixed_point":
        r = r - out
    dims = tuple(range(batch_dims, out.dim())) if batch_dims else None

    def norm(t: Tensor) -> Tensor:  # (scaled: a solution at 1e200 has squares beyond float64's range)
        return scaled_norm(t.detach(), dims)

    res_all = norm(r)
    res = float(res_all.max()) if res_all.numel() else 0.0
    if not math.isfinite(res) or not bool(torch.isfinite(out).all()):
        what_fn = "fixed-point map" if kind == "fixed_point" else "optimality function"
        raise DivergenceError(
            f"{name} returned a point with NaN/Inf entries (or at which the {what_fn} is not finite): there is "
            "no derivative to take. Check the solver"
        )
    rel = math.sqrt(default_tol(out.dtype)) if tol is None else tol
    if kind == "fixed_point":
        scale, what = norm(out), "||T(u) - u||"
    else:
        scale, what = norm(fn(init, *params)), "||G(u)||"
    thresh_all = torch.clamp(rel * scale, min=atol)
    bad = res_all > thresh_all
    if kind == "root" and bool(bad.any()):  # an init at (or near) the root: ||G(init)|| is rounding, not a
        g0 = norm(fn(torch.zeros_like(init), *params))  # scale; the problem's own size is ||G(0)||
        scale = torch.where(torch.isfinite(g0), torch.maximum(scale, g0), scale)
        thresh_all = torch.clamp(rel * scale, min=atol)
        bad = res_all > thresh_all
    if bool(bad.any()):
        j = int(torch.where(bad, res_all / thresh_all.clamp_min(1e-300), -math.inf).reshape(-1).argmax())
        res, thresh = float(res_all.reshape(-1)[j]), float(thresh_all.reshape(-1)[j])
        where = f" (sample {j} of the batch_dims={batch_dims} batch)" if batch_dims else ""
        warnings.warn(
            f"{name} returned a point with {what} = {res:.3e}{where} above {thresh:.3e} (tol={rel:g} relative to "
            f"{'||u||' if kind == 'fixed_point' else 'max(||G(init)||, ||G(0)||)'}, atol={atol:g}): it is not a "
            f"{'fixed point' if kind == 'fixed_point' else 'root'} to that accuracy, and the implicit derivative "
            "taken there is that of the equation at this point. Solve more accurately, or pass tol=/atol=",
            ConvergenceWarning,
            stacklevel=user_stacklevel(),
        )


def custom_fixed_point(T: Callable[..., Tensor], *, solve: ls.SolverLike = None, on_fail: str = "raise",
                       tol: Optional[float] = None, atol: float = 0.0, batch_dims: int = 0
                       ) -> Callable[[Callable[..., Tensor]], Callable[..., Tensor]]:
    r"""Decorate any solver ``solver(init, *args) -> u`` whose result is a fixed point
    :math:`u = T(u, *args)`: the decorated function's result is differentiable w.r.t. the tensors in
    ``args`` (and those ``T`` reads from its closure) by the implicit function theorem, at every order
    and under ``torch.func`` transforms (jaxopt's ``custom_fixed_point``).

    Args:
        T: the fixed-point map ``T(u, *args)``.
        solve: the linear solver of the implicit derivative (:mod:`hodl_plugin.linear_solve`; default
            CG when ``T.symmetric_jacobian`` is true, else GMRES; tolerance following the dtype).
        on_fail: ``"raise"`` (default) a :class:`~hodl_plugin.errors.LinearSolveError` when a solve
            misses its tolerance, or ``"warn"``.
        tol, atol: the check of the returned point, ``‖T(u) − u‖ ≤ max(tol·‖u‖, atol)`` (default ``tol``:
            the square root of the dtype's default, ``1e-5`` in float64); a point that misses it is
            reported by a :class:`~hodl_plugin.errors.ConvergenceWarning` (its derivative is that of the
            equation at that point), a non-finite one by a :class:`~hodl_plugin.errors.DivergenceError`.
        batch_dims: the leading dims of ``u`` that index independent problems (a batch of samples, as
            :class:`~hodl_plugin.GKMSolver`'s ``batch_dims``): the returned point is checked per sample, and
            each sample's adjoint meets its own tolerance (one solve per sample where the linear solver has a
            per-sample mode — CG, GMRES, the Neumann series — else each sample's right-hand side scaled to
            unit size). ``T`` must act on each sample independently.

    Returns:
        a decorator; ``init`` gets no gradient. Non-tensor ``args`` (numbers, strings) are passed
        through as constants. Keyword arguments are bound to the solver's signature
        (``solve(u0, x=x)`` is ``solve(u0, x)``, and ``T(u, x)`` is called so; keyword-only ones are
        passed by name to both), their tensors differentiable like positional ones.

    Raises:
        TypeError: ``T`` is not callable; (at call time) the solver returns something other than a
            tensor shaped like ``init``, of its dtype and device.
        ValueError: ``on_fail`` or a tolerance out of range; (at call time) NaN or Inf in ``init`` or a
            tensor argument (named).
        DivergenceError: (at call time) the returned point is not finite.
        LinearSolveError: (in ``backward``, ``on_fail="raise"``) the adjoint solve misses its tolerance.

    >>> import torch, hodl_plugin as hp
    >>> A = torch.tensor([[3.0, 1.0], [1.0, 2.0]], dtype=torch.float64)
    >>> T = lambda u, x: u - 0.2 * (A @ u - x)           # gradient step of ½uᵀAu - xᵀu
    >>> @hp.custom_fixed_point(T)
    ... def solve(u0, x):                                  # any solver: here a direct one
    ...     return torch.linalg.solve(A, x)
    >>> x = torch.ones(2, dtype=torch.float64, requires_grad=True)
    >>> solve(torch.zeros(2, dtype=torch.float64), x).sum().backward()
    >>> torch.allclose(x.grad, torch.linalg.solve(A, torch.ones(2, dtype=torch.float64)))
    True
    """
    if not callable(T):
        raise TypeError(f"custom_fixed_point(T): T must be callable T(u, *args), got {type(T).__name__}")
    return _decorated("fixed_point", T, solve, on_fail, bool(getattr(T, "symmetric_jacobian", False)), tol, atol,
                      batch_dims)


def custom_root(optimality_fn: Callable[..., Tensor], *, solve: ls.SolverLike = None, on_fail: str = "raise",
                tol: Optional[float] = None, atol: float = 0.0, batch_dims: int = 0
                ) -> Callable[[Callable[..., Tensor]], Callable[..., Tensor]]:
    r"""Decorate any solver ``solver(init, *args) -> u`` whose result is a root
    :math:`G(u, *args) = 0` of ``optimality_fn``: derivatives w.r.t. the tensors in ``args`` by the
    implicit function theorem, :math:`\dot u = -(\partial_u G)^{-1}\partial_\theta G\,\dot\theta` (TorchOpt's
    and jaxopt's ``custom_root``; ``argnums`` is not needed: every tensor argument is differentiable).

    Args:
        optimality_fn: ``G(u, *args)``, e.g. the gradient of the inner objective.
        solve: the linear solver of :math:`(\partial_u G)^\top v = \bar u` (default GMRES; pass CG,
            ``hp.linear_solve.cg()``, for a symmetric positive definite :math:`\partial_u G`, e.g. a Hessian).
        on_fail: as for :func:`custom_fixed_point`.
        tol, atol: the check of the returned point, ``‖G(u)‖ ≤ max(tol·max(‖G(init)‖, ‖G(0)‖), atol)`` (as
            for :func:`custom_fixed_point`; ``‖G(0)‖``, the problem's size, is evaluated only when the first
            test fails — an ``init`` at the root has a rounding-level ``‖G(init)‖``).
        batch_dims: the leading dims of ``u`` that index independent problems (as for
            :func:`custom_fixed_point`).

    Returns:
        a decorator: the decorated ``solver(init, *args)`` returns the same root, differentiable
        w.r.t. the tensors in ``args`` (and those ``G`` reads from its closure); ``init`` gets no
        gradient. Keyword arguments: as for :func:`custom_fixed_point`.

    Raises:
        TypeError: ``optimality_fn`` is not callable; (at call time) the solver returns something
            other than a tensor shaped like ``init``, of its dtype and device.
        ValueError: ``on_fail`` or a tolerance out of range; (at call time) NaN or Inf in ``init`` or a
            tensor argument (named).
        DivergenceError: (at call time) the returned point is not finite.
        LinearSolveError: (in ``backward``, ``on_fail="raise"``) the adjoint solve misses its tolerance.

    >>> import torch, hodl_plugin as hp
    >>> X = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 2.0]], dtype=torch.float64)
    >>> y = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    >>> G = lambda w, lam: X.T @ (X @ w - y) + lam * w            # ridge: ∇ of ½‖Xw-y‖² + λ/2‖w‖²
    >>> @hp.custom_root(G, solve=hp.linear_solve.cg())
    ... def ridge(w0, lam):
    ...     return torch.linalg.solve(X.T @ X + lam * torch.eye(2, dtype=X.dtype), X.T @ y)
    >>> lam = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    >>> w = ridge(torch.zeros(2, dtype=torch.float64), lam)
    >>> (dw,) = torch.autograd.grad(w.sum(), lam)
    >>> H = X.T @ X + 0.5 * torch.eye(2, dtype=X.dtype)
    >>> torch.allclose(dw, -(torch.linalg.solve(H, w.detach())).sum())     # dw/dλ = -H⁻¹w
    True
    """
    if not callable(optimality_fn):
        raise TypeError(f"custom_root(optimality_fn): must be callable G(u, *args), got {type(optimality_fn).__name__}")
    return _decorated("root", optimality_fn, solve, on_fail, False, tol, atol, batch_dims)
